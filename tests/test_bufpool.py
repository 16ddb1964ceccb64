"""SlabPool and the slab-backed body store: recycling, bounds, and reader safety."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from spirtd.pubsub.bufpool import SlabPool
from spirtd.pubsub.store import SlabBody

SLAB = 4096
ARENA = 4 * SLAB


def pool(limit: int = 4 * ARENA) -> SlabPool:
    return SlabPool(limit, slab_bytes=SLAB, arena_bytes=ARENA)


def test_freed_slabs_are_reused_before_the_pool_grows() -> None:
    p = pool()
    first = [p.take() for _ in range(ARENA // SLAB)]
    assert p.capacity == ARENA
    for sid in first:
        assert sid is not None
        p.give(sid)
    again = [p.take() for _ in range(ARENA // SLAB)]
    assert sorted(again) == sorted(first)  # type: ignore[type-var]
    assert p.capacity == ARENA  # no new arena for recycled slabs
    assert p.take() is not None
    assert p.capacity == 2 * ARENA


def test_pool_stops_at_its_limit_and_refuses_double_frees() -> None:
    p = pool(limit=ARENA)
    got = [p.take() for _ in range(ARENA // SLAB)]
    assert None not in got
    assert p.take() is None
    assert p.in_use == ARENA
    p.give(got[0])  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        p.give(got[0])  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        p.give(10_000)


def test_reserve_maps_up_front_but_not_past_the_limit() -> None:
    p = pool(limit=3 * ARENA)
    assert p.reserve(2 * ARENA + 1) == 3 * ARENA  # whole arenas
    assert p.in_use == 0
    assert p.reserve(100 * ARENA) == 3 * ARENA
    with pytest.raises(ValueError):
        SlabPool(ARENA, slab_bytes=SLAB, arena_bytes=SLAB + 1)


def test_slab_body_round_trips_across_slab_boundaries_and_resumes() -> None:
    p = pool()
    data = os.urandom(3 * SLAB + 123)
    b = SlabBody(p)
    # Pieces of awkward sizes cross slab edges.
    off = 0
    for n in (1000, SLAB, 5000, len(data)):
        piece = data[off : off + n]
        b.write(off, memoryview(piece))
        off += len(piece)
        if off >= len(data):
            break
    assert b.size == len(data)
    assert b.read() == data
    assert b"".join(b.pieces(SLAB + 7, step=999)) == data[SLAB + 7 :]
    # A resumed transfer rewrites from a verified boundary; the tail's slabs go back.
    b.write(SLAB, memoryview(b"x" * 10))
    assert b.size == SLAB + 10
    assert p.in_use == 2 * SLAB
    assert b.read() == data[:SLAB] + b"x" * 10
    with pytest.raises(ValueError):
        b.write(b.size + 1, memoryview(b"gap"))
    b.free()
    assert p.in_use == 0


def test_slab_body_refuses_to_grow_past_an_exhausted_pool() -> None:
    p = pool(limit=ARENA)
    b = SlabBody(p)
    with pytest.raises(OSError, match="exhausted"):
        b.write(0, memoryview(bytes(ARENA + 1)))
    b.free()
    assert p.in_use == 0


def test_free_waits_for_readers_so_slabs_are_never_reused_underneath() -> None:
    p = pool()
    data = os.urandom(2 * SLAB)
    b = SlabBody(p)
    b.write(0, memoryview(data))
    reader = b.pieces(0, step=SLAB // 2)
    assert next(reader) == data[: SLAB // 2]
    b.free()  # evicted mid-read
    assert p.in_use == 2 * SLAB  # still held for the reader
    other = SlabBody(p)
    other.write(0, memoryview(b"\xff" * 2 * SLAB))  # must not land in the read body's slabs
    assert b"".join(reader) == data[SLAB // 2 :]
    assert p.in_use == 2 * SLAB  # the reader finished: only `other` holds slabs
    with pytest.raises(OSError, match="evicted"):
        b.pieces()


def test_an_abandoned_reader_releases_its_hold() -> None:
    p = pool()
    b = SlabBody(p)
    b.write(0, memoryview(bytes(SLAB)))
    r = b.pieces()
    b.free()
    assert p.in_use == SLAB
    del r  # never iterated: dropping it is enough
    assert p.in_use == 0


def test_readers_on_threads_and_eviction_do_not_race() -> None:
    p = pool(limit=64 * ARENA)
    data = os.urandom(8 * SLAB)
    errors: list[BaseException] = []
    for _ in range(50):
        b = SlabBody(p)
        b.write(0, memoryview(data))

        def read(body: SlabBody = b) -> None:
            try:
                got = body.read()
            except OSError:
                return  # evicted before the read began: a clean refusal
            except BaseException as e:  # pragma: no cover - reported below
                errors.append(e)
                return
            if got != data:
                errors.append(AssertionError("a reader saw reused slabs"))

        threads = [threading.Thread(target=read) for _ in range(3)]
        for t in threads:
            t.start()
        b.free()
        scribble = SlabBody(p)
        scribble.write(0, memoryview(b"\0" * 8 * SLAB))
        for t in threads:
            t.join(10)
        scribble.free()
    assert not errors
    assert p.in_use == 0


CHILD = """
import logging, resource, sys, tempfile
from pathlib import Path
from spirtd.pubsub.store import BodyStore, StoreLimits
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
vm = int([l.split()[1] for l in open("/proc/self/status") if l.startswith("VmSize")][0]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + (96 << 20), vm + (96 << 20)))
store = BodyStore(Path(tempfile.mkdtemp()) / "b", StoreLimits(memory_reserve=512 << 20))
store.reset()
print("capacity", store.pool.capacity >> 20)
"""


def test_a_reserve_the_machine_cannot_give_is_logged_not_fatal() -> None:
    out = subprocess.run(
        [sys.executable, "-c", CHILD],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert out.returncode == 0, out.stderr
    assert "body memory: reserved" in out.stdout and "of 512 MiB" in out.stdout
    capacity = int(out.stdout.split("capacity")[1])
    assert 0 < capacity < 512
