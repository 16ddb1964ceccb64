"""State snapshots and checkpoints (spirtd.training.checkpoint), against real redis-servers.

The round trips go from one server to a fresh one: with and without the SPIRT module on
either side, so the digest computed here must equal SPIRT.DIGEST's and the client's.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import stat
import struct
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from protocol import strictpack
from spirtd.redis.store import TensorStore
from spirtd.training import checkpoint as ckpt
from spirtd.training import job as jobs
from spirtd.training.checkpoint import (
    MAX_HEADER,
    PREFIX_SIZE,
    Checkpoints,
    Snapshot,
    SnapshotError,
    load_snapshot,
    read_snapshot,
)
from spirtd.training.job import JobSpec
from spirtd.training.state import StateKeys, digest_of
from tests.fixtures_redis import RunningRedis, reset_shared

amark = pytest.mark.asyncio(loop_scope="module")

P = 37  # parameters: small, odd
JOB = "0123456789abcdef0123456789abcdef"
OTHER = "fedcba9876543210fedcba9876543210"
KINDS = {
    "sgd": {"task": "digits", "optimizer": "sgd", "momentum": 0.9},
    "adam": {"task": "digits"},
    "cclip": {"task": "digits", "aggregator": "cclip"},
}


def make_spec(kind: str, param_count: int = P) -> JobSpec:
    return jobs.with_model(jobs.from_request(dict(KINDS[kind]), now_ms=0), param_count, "x")


def roles(spec: JobSpec) -> list[str]:
    return [r for r, _ in StateKeys(JOB).state_tensors(spec)]


def values(seed: int, n: int = P) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(n).astype(np.float32)


def make_snapshot(
    spec: JobSpec, completed: int = 5, seed: int = 0, absent: frozenset[str] = frozenset()
) -> Snapshot:
    """A valid snapshot built without Redis."""
    tensors = tuple(
        (r, None if r in absent else values(seed + i, spec.param_count).tobytes())
        for i, r in enumerate(roles(spec))
    )
    unsigned = Snapshot(JOB, completed, b"\0" * 32, tensors)
    return Snapshot(JOB, completed, unsigned.compute_digest(), tensors)


async def write_state(
    store: TensorStore, spec: JobSpec, seed: int, absent: frozenset[str] = frozenset()
) -> None:
    for i, (role, key) in enumerate(StateKeys(JOB).state_tensors(spec)):
        if role in absent:
            await store.delete(key)
        else:
            await store.put(key, values(seed + i))


async def dump(client: aioredis.Redis) -> dict[bytes, bytes]:
    """Every key and its value (all keys here are strings)."""
    return {k: await client.get(k) for k in sorted(await client.keys("*"))}


def split(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack_from(">I", data, 4)
    return strictpack.unpack(data[PREFIX_SIZE : PREFIX_SIZE + n]), data[PREFIX_SIZE + n :]


def rebuild(header: dict, body: bytes) -> bytes:
    h = strictpack.pack(header)
    return ckpt.MAGIC + struct.pack(">I", len(h)) + h + body


def with_header(data: bytes, **changes: object) -> bytes:
    header, body = split(data)
    return rebuild({**header, **changes}, body)


@pytest_asyncio.fixture(loop_scope="module")
async def stores(
    module_managed_redis: RunningRedis, module_plain_redis: RunningRedis
) -> dict[str, TensorStore]:
    """Both shared servers, emptied: 'module' (SPIRT loaded) and 'plain' (client-side)."""
    out = {}
    for name, r in (("module", module_managed_redis), ("plain", module_plain_redis)):
        await reset_shared(r)
        out[name] = await TensorStore.open(r.client)
    return out


# --- round trips ---------------------------------------------------------------------------


@amark
@pytest.mark.parametrize("src,dst", [("module", "plain"), ("plain", "module")])
@pytest.mark.parametrize("kind", sorted(KINDS))
async def test_round_trip_into_fresh_redis(
    stores: dict[str, TensorStore], kind: str, src: str, dst: str
) -> None:
    spec = make_spec(kind)
    a, b = stores[src], stores[dst]
    await write_state(a, spec, seed=10)
    before = await digest_of(a, JOB, spec, 7)

    snap = await read_snapshot(a, JOB, spec, 7)
    assert snap.digest == before  # our BLAKE2b equals SPIRT.DIGEST / the client's
    assert [r for r, _ in snap.tensors] == roles(spec)
    pieces = snap.encode()
    assert len(pieces) == 1 + len(roles(spec))
    assert all(p is d for p, (_, d) in zip(pieces[1:], snap.tensors, strict=True))  # no copy
    data = b"".join(pieces)
    assert len(data) == snap.encoded_size

    got = Snapshot.decode(memoryview(data), spec, job_id=JOB)
    assert got == snap
    assert await dump(b.client) == {}
    await load_snapshot(b, got, spec)
    assert await digest_of(b, JOB, spec, 7) == before
    for _, key in StateKeys(JOB).state_tensors(spec):
        assert await b.client.get(key) == await a.client.get(key)
        assert await b.client.get(key + ":shape") == str(P).encode()
        np.testing.assert_array_equal(await b.get(key), await a.get(key))
    # The completed count is part of the state: the same tensors at another round differ.
    assert await digest_of(b, JOB, spec, 8) != before


@amark
@pytest.mark.parametrize("kind", sorted(KINDS))
async def test_absent_tensors_round_trip_as_absent(
    stores: dict[str, TensorStore], kind: str
) -> None:
    """Round 0: only theta exists (no momentum, moments or previous aggregate yet)."""
    spec = make_spec(kind)
    a, b = stores["module"], stores["plain"]
    absent = frozenset(roles(spec)[1:])
    await write_state(a, spec, seed=1, absent=absent)
    snap = await read_snapshot(a, JOB, spec, 0)
    assert [d is None for _, d in snap.tensors] == [False] + [True] * len(absent)
    header, _ = split(b"".join(snap.encode()))
    assert [n for _, n in header["tensors"]] == [4 * P] + [-1] * len(absent)

    # The destination holds a later state (every tensor present): absent ones are deleted.
    await write_state(b, spec, seed=50)
    got = Snapshot.decode(b"".join(snap.encode()), spec)
    await load_snapshot(b, got, spec)
    assert await digest_of(b, JOB, spec, 0) == await digest_of(a, JOB, spec, 0) == snap.digest
    for role, key in StateKeys(JOB).state_tensors(spec):
        assert await b.exists(key) is (role not in absent)
        assert await b.client.exists(key + ":shape") == (role not in absent)


# --- tampering: refused, and nothing written ------------------------------------------------


def _flip(data: bytes, pos: int) -> bytes:
    out = bytearray(data)
    out[pos] ^= 0x01
    return bytes(out)


def _swap_body_tensors(data: bytes) -> bytes:
    header, body = split(data)
    n = 4 * P
    return rebuild(header, body[:n] + body[2 * n : 3 * n] + body[n : 2 * n])


def _long_header(data: bytes) -> bytes:
    header, body = split(data)
    return rebuild({**header, "pad": "x" * 5000}, body)


TAMPERS = {
    "flipped_byte_in_tensor": lambda d: _flip(d, len(d) - 4 * P - 3),
    "flipped_byte_in_digest": lambda d: with_header(d, digest=_flip(split(d)[0]["digest"], 0)),
    "wrong_completed": lambda d: with_header(d, completed=split(d)[0]["completed"] + 1),
    "wrong_job": lambda d: with_header(d, job=OTHER),
    "wrong_role_order": lambda d: with_header(
        d, tensors=[["m", 4 * P], ["theta", 4 * P], ["v", 4 * P]]
    ),
    "missing_role": lambda d: with_header(d, tensors=[["theta", 4 * P], ["m", 4 * P]]),
    "swapped_roles": lambda d: with_header(
        d, tensors=[["theta", 4 * P], ["v", 4 * P], ["m", 4 * P]]
    ),
    "swapped_tensor_bytes": _swap_body_tensors,
    "wrong_size": lambda d: with_header(
        d, tensors=[["theta", 4 * P + 4], ["m", 4 * P], ["v", 4 * P]]
    ),
    "huge_size": lambda d: with_header(d, tensors=[["theta", 1 << 40], ["m", 4 * P], ["v", 4 * P]]),
    "absent_claimed": lambda d: with_header(d, tensors=[["theta", 4 * P], ["m", -1], ["v", -1]]),
    "truncated_body": lambda d: d[:-1],
    "truncated_header": lambda d: d[: PREFIX_SIZE + 5],
    "trailing_byte": lambda d: d + b"\0",
    "oversize_header_length": lambda d: ckpt.MAGIC + struct.pack(">I", 1 << 20) + d[8:],
    "oversize_header": _long_header,
    "bad_magic": lambda d: b"XXXX" + d[4:],
    "empty": lambda d: b"",
    "bad_version": lambda d: with_header(d, v=2),
}


@amark
@pytest.mark.parametrize("tamper", sorted(TAMPERS))
async def test_tampered_encoding_refused_and_nothing_written(
    stores: dict[str, TensorStore], tamper: str
) -> None:
    spec = make_spec("adam")
    data = b"".join(make_snapshot(spec, completed=5, seed=3).encode())
    assert Snapshot.decode(data, spec, job_id=JOB)  # the untampered one is fine
    bad = TAMPERS[tamper](data)
    assert bad != data
    live = stores["module"]
    await write_state(live, spec, seed=99)
    before = await dump(live.client)
    with pytest.raises(SnapshotError):
        snap = Snapshot.decode(bad, spec, job_id=JOB)
        await load_snapshot(live, snap, spec, job_id=JOB)
    assert await dump(live.client) == before


def _replace_tensor(snap: Snapshot, i: int, data: bytes | None) -> Snapshot:
    tensors = list(snap.tensors)
    tensors[i] = (tensors[i][0], data)
    return Snapshot(snap.job_id, snap.completed, snap.digest, tuple(tensors))


def _resigned(snap: Snapshot) -> Snapshot:
    """The same contents with a digest that matches them (as an attacker could compute)."""
    return Snapshot(snap.job_id, snap.completed, snap.compute_digest(), snap.tensors)


def _nan_at(data: bytes, i: int, value: float = float("nan")) -> bytes:
    a = np.frombuffer(data, dtype="<f4").copy()
    a[i] = value
    return a.tobytes()


BAD_OBJECTS = {
    "flipped_byte": lambda s: _replace_tensor(s, 1, _flip(s.tensors[1][1], 7)),
    "wrong_completed": lambda s: Snapshot(s.job_id, s.completed + 1, s.digest, s.tensors),
    "completed_beyond_rounds": lambda s: _resigned(Snapshot(s.job_id, 10**6, s.digest, s.tensors)),
    "wrong_role_order": lambda s: _resigned(
        Snapshot(s.job_id, s.completed, s.digest, (s.tensors[0], s.tensors[2], s.tensors[1]))
    ),
    "missing_role": lambda s: _resigned(Snapshot(s.job_id, s.completed, s.digest, s.tensors[:2])),
    "wrong_size": lambda s: _resigned(_replace_tensor(s, 0, s.tensors[0][1] + b"\0\0\0\0")),
    "nan": lambda s: _resigned(_replace_tensor(s, 2, _nan_at(s.tensors[2][1], 3))),
    "inf": lambda s: _resigned(_replace_tensor(s, 0, _nan_at(s.tensors[0][1], P - 1, np.inf))),
    "short_digest": lambda s: Snapshot(s.job_id, s.completed, s.digest[:31], s.tensors),
    "bad_job_id": lambda s: _resigned(Snapshot("../x", s.completed, s.digest, s.tensors)),
}


@amark
@pytest.mark.parametrize("bad", sorted(BAD_OBJECTS))
async def test_load_refuses_bad_snapshot_before_writing(
    stores: dict[str, TensorStore], bad: str
) -> None:
    spec = make_spec("adam")
    good = make_snapshot(spec, completed=5, seed=3)
    good.verify(spec)
    snap = BAD_OBJECTS[bad](good)
    live = stores["plain"]
    await write_state(live, spec, seed=99)
    before = await dump(live.client)
    with pytest.raises(SnapshotError):
        await load_snapshot(live, snap, spec)
    assert await dump(live.client) == before
    if bad != "bad_job_id":  # (cannot even be encoded into a header a peer would accept)
        with pytest.raises(SnapshotError):
            Snapshot.decode(b"".join(snap.encode()), spec)


def test_non_finite_values_refused() -> None:
    spec = make_spec("sgd")
    snap = _resigned(_replace_tensor(make_snapshot(spec), 1, _nan_at(4 * P * b"\0", 5)))
    with pytest.raises(SnapshotError, match="non-finite value at 5"):
        snap.verify(spec)
    with pytest.raises(SnapshotError, match="non-finite"):
        Snapshot.decode(b"".join(snap.encode()), spec)


@amark
async def test_read_snapshot_refuses_bad_live_state(stores: dict[str, TensorStore]) -> None:
    spec = make_spec("sgd")
    s = stores["plain"]
    keys = StateKeys(JOB)
    await write_state(s, spec, seed=4)
    await s.client.set(keys.buf, _nan_at(values(1).tobytes(), 2))  # raw SET bypasses put()
    with pytest.raises(SnapshotError, match="non-finite"):
        await read_snapshot(s, JOB, spec, 3)
    await s.put(keys.buf, values(1, P + 1))
    with pytest.raises(SnapshotError, match="bytes, the job needs"):
        await read_snapshot(s, JOB, spec, 3)
    await s.delete(keys.buf)
    await s.client.hset(keys.buf, "a", "b")
    with pytest.raises(SnapshotError, match="holds a hash"):
        await read_snapshot(s, JOB, spec, 3)


@amark
async def test_load_checks_the_digest_after_writing(
    stores: dict[str, TensorStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = make_spec("adam")
    snap = make_snapshot(spec)

    async def other_digest(*args: object) -> bytes:
        return b"\1" * 32

    monkeypatch.setattr(ckpt, "digest_of", other_digest)
    with pytest.raises(SnapshotError, match="different state"):
        await load_snapshot(stores["module"], snap, spec)


class _RecordingStream(io.BytesIO):
    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.asked: list[int] = []

    def read(self, n: int | None = -1) -> bytes:
        self.asked.append(-1 if n is None else n)
        return super().read(n)


def test_sizes_checked_before_allocation() -> None:
    """A header claiming a huge tensor is refused after reading the header only."""
    spec = make_spec("adam")
    data = b"".join(make_snapshot(spec).encode())
    bad = with_header(data, tensors=[["theta", 1 << 40], ["m", 4 * P], ["v", 4 * P]])
    f = _RecordingStream(bad)
    with pytest.raises(SnapshotError, match="the job needs"):
        Snapshot.read_from(f, spec)
    assert max(f.asked) <= MAX_HEADER
    with pytest.raises(SnapshotError, match="header length"):
        Snapshot.header_length(ckpt.MAGIC + struct.pack(">I", MAX_HEADER + 1))
    # decode_header alone gives what the spec implies, before the body is read.
    prefix_len = PREFIX_SIZE + Snapshot.header_length(data[:PREFIX_SIZE])
    h = Snapshot.decode_header(data[:prefix_len], spec, job_id=JOB)
    assert h.body_size == 3 * 4 * P and h.total_size == len(data)
    assert h.tensors == (("theta", 4 * P), ("m", 4 * P), ("v", 4 * P))
    assert h.total_size <= ckpt.max_encoded_size(spec) < h.total_size + PREFIX_SIZE + MAX_HEADER


# --- checkpoint files ------------------------------------------------------------------------


def test_checkpoint_files_are_0600_from_the_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = make_spec("adam")
    snap = make_snapshot(spec, completed=4)
    cp = Checkpoints(tmp_path / "training")
    modes: list[int] = []
    real_replace = os.replace

    def spy_replace(a: str | Path, b: str | Path) -> None:
        modes.append(stat.S_IMODE(os.stat(a).st_mode))  # the temp file, before the rename
        real_replace(a, b)

    monkeypatch.setattr(ckpt.os, "replace", spy_replace)
    old = os.umask(0)  # the mode must not depend on the umask
    try:
        path = cp.save(snap)
    finally:
        os.umask(old)
    assert modes == [0o600]
    assert path == tmp_path / "training" / f"ckpt-{JOB}-4.bin"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "training").stat().st_mode) == 0o700
    assert path.read_bytes() == b"".join(snap.encode())
    assert cp.list(JOB) == [(4, path)]
    assert cp.latest(JOB, spec) == snap
    assert [p.name for p in (tmp_path / "training").iterdir()] == [path.name]


@pytest.mark.parametrize("keep", [1, 2, 3])
def test_keep_newest(tmp_path: Path, keep: int) -> None:
    spec = make_spec("sgd")
    cp = Checkpoints(tmp_path, keep=keep)
    snaps = {n: make_snapshot(spec, completed=n, seed=n) for n in (10, 20, 30, 40, 50)}
    for snap in snaps.values():
        cp.save(snap)
    want = sorted(snaps)[-keep:]
    assert [n for n, _ in cp.list(JOB)] == want
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"ckpt-{JOB}-{n}.bin" for n in want]
    assert cp.latest(JOB, spec) == snaps[50]


def test_default_keep_is_two(tmp_path: Path) -> None:
    cp = Checkpoints(tmp_path)
    for n in range(5):
        cp.save(make_snapshot(make_spec("sgd"), completed=n))
    assert [n for n, _ in cp.list(JOB)] == [3, 4]


@pytest.mark.parametrize("damage", ["flipped_byte", "truncated", "empty", "renamed"])
def test_corrupt_newest_falls_back_to_older(
    tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    spec = make_spec("cclip")
    cp = Checkpoints(tmp_path)
    old, new = make_snapshot(spec, completed=3, seed=1), make_snapshot(spec, completed=4, seed=2)
    cp.save(old)
    newest = cp.save(new)
    data = newest.read_bytes()
    if damage == "flipped_byte":
        newest.write_bytes(_flip(data, len(data) // 2))
    elif damage == "truncated":
        newest.write_bytes(data[:-10])
    elif damage == "empty":
        newest.write_bytes(b"")
    else:  # a valid file of round 4 under the name of round 9
        newest.rename(tmp_path / f"ckpt-{JOB}-9.bin")
    with caplog.at_level(logging.WARNING, logger="spirtd.checkpoint"):
        assert cp.latest(JOB, spec) == old
    assert "skipping checkpoint" in caplog.text
    # Both bad: nothing usable.
    (tmp_path / f"ckpt-{JOB}-3.bin").write_bytes(b"junk")
    assert cp.latest(JOB, spec) is None


def test_latest_of_another_spec_or_nothing(tmp_path: Path) -> None:
    cp = Checkpoints(tmp_path / "missing")
    assert cp.list(JOB) == [] and cp.latest(JOB, make_spec("adam")) is None
    cp = Checkpoints(tmp_path)
    cp.save(make_snapshot(make_spec("adam")))
    assert cp.latest(JOB, make_spec("adam", P + 1)) is None  # sizes do not fit that spec
    assert cp.latest(JOB, make_spec("sgd")) is None  # roles do not fit that spec


def test_other_jobs_untouched(tmp_path: Path) -> None:
    spec = make_spec("adam")
    cp = Checkpoints(tmp_path)
    other = Snapshot(OTHER, 1, b"\0" * 32, make_snapshot(spec).tensors)
    other = _resigned(other)
    other_path = cp.save(other)
    unrelated = tmp_path / "notes.txt"
    unrelated.write_text("keep me")
    (tmp_path / f".ckpt-{OTHER}-2.bin.tmp").write_bytes(b"another job's save in flight")
    for n in range(1, 6):
        cp.save(make_snapshot(spec, completed=n))
    assert [n for n, _ in cp.list(JOB)] == [4, 5]
    assert cp.list(OTHER) == [(1, other_path)]
    assert other_path.read_bytes() == b"".join(other.encode())
    assert unrelated.read_text() == "keep me"
    assert (tmp_path / f".ckpt-{OTHER}-2.bin.tmp").exists()
    assert cp.latest(OTHER, spec) == other


def test_leftover_temp_file_ignored_and_cleaned(tmp_path: Path) -> None:
    spec = make_spec("adam")
    cp = Checkpoints(tmp_path)
    snap = make_snapshot(spec, completed=6)
    path = cp.save(snap)
    # A crash mid-save of round 7 leaves a partial temp file (and one of the same name
    # as the next save's temp, which O_EXCL would otherwise trip over).
    partial = b"".join(make_snapshot(spec, completed=7).encode())[:100]
    for n in (7, 8):
        tmp = tmp_path / f".ckpt-{JOB}-{n}.bin.tmp"
        tmp.write_bytes(partial)
    assert cp.list(JOB) == [(6, path)]
    assert cp.latest(JOB, spec) == snap
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]

    (tmp_path / f".ckpt-{JOB}-8.bin.tmp").write_bytes(partial)
    p8 = cp.save(make_snapshot(spec, completed=8))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, p8.name])
    assert cp.latest(JOB, spec) == make_snapshot(spec, completed=8)


def test_failed_save_leaves_previous_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = make_spec("adam")
    cp = Checkpoints(tmp_path)
    first = make_snapshot(spec, completed=1)
    p1 = cp.save(first)

    def broken_fsync(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt.os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="No space"):
        cp.save(make_snapshot(spec, completed=2))
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == [p1.name]
    assert cp.latest(JOB, spec) == first


@amark
async def test_checkpoint_then_restore_into_empty_redis(
    stores: dict[str, TensorStore], tmp_path: Path
) -> None:
    """The restart path: live state -> file (on a thread) -> a Redis that lost its data."""
    spec = make_spec("cclip")
    a, b = stores["module"], stores["plain"]
    await write_state(a, spec, seed=21)
    snap = await read_snapshot(a, JOB, spec, 12)
    cp = Checkpoints(tmp_path / "training")
    await asyncio.to_thread(cp.save, snap)
    got = await asyncio.to_thread(cp.latest, JOB, spec)
    assert got is not None
    await load_snapshot(b, got, spec, job_id=JOB)
    assert await digest_of(b, JOB, spec, 12) == await digest_of(a, JOB, spec, 12)


@amark
async def test_a_checkpoint_keeps_this_peers_own_tensors_and_a_peer_may_not_send_them(
    stores: dict[str, TensorStore], tmp_path: Path
) -> None:
    """Outer rounds: the inner optimizer's moments and the compression residual are
    this peer's own. A checkpoint keeps them (with the inner step count) outside the
    digest; a state for a peer never carries them, and loading one drops ours."""
    spec = jobs.with_model(
        jobs.from_request({"task": "digits", "inner_steps": 10, "compression": "int8"}, now_ms=0),
        P,
        "x",
    )
    a, b = stores["module"], stores["plain"]
    sk = StateKeys(JOB)
    assert [r for r, _ in sk.own_state(spec)] == ["inner_m", "inner_v", "residual"]
    await write_state(a, spec, seed=3)
    for i, (_, key) in enumerate(sk.own_state(spec)):
        await a.put(key, values(40 + i))
    plain = await read_snapshot(a, JOB, spec, 4)
    assert plain.own == ()  # what a peer is sent
    own = await read_snapshot(a, JOB, spec, 4, own_step=37)
    assert own.digest == plain.digest  # the own tensors are not in the digest
    assert [r for r, _ in own.own] == ["inner_m", "inner_v", "residual"]

    cp = Checkpoints(tmp_path / "training")
    await asyncio.to_thread(cp.save, own)
    got = await asyncio.to_thread(cp.latest, JOB, spec)
    assert got == own and got.own_step == 37
    # Restored, into a Redis that held other own tensors: ours come back exactly.
    await b.put(sk.inner_theta, values(99))
    await load_snapshot(b, got, spec, job_id=JOB)
    for _, key in sk.own_state(spec):
        np.testing.assert_array_equal(await b.get(key), await a.get(key))
    assert not await b.exists(sk.inner_theta)
    # A peer's state with own tensors in it is refused; loading a peer's state (none)
    # drops whatever own tensors were there.
    with pytest.raises(SnapshotError, match="wrong fields"):
        Snapshot.decode(b"".join(own.encode()), spec, job_id=JOB)
    await load_snapshot(b, Snapshot.decode(b"".join(plain.encode()), spec), spec)
    for _, key in sk.own_state(spec):
        assert not await b.exists(key)
    # Own tensors are checked like the state's: a non-finite one is refused.
    bad = Snapshot(
        own.job_id,
        own.completed,
        own.digest,
        own.tensors,
        (own.own[0], (own.own[1][0], np.full(P, np.nan, np.float32).tobytes()), own.own[2]),
        1,
    )
    with pytest.raises(SnapshotError, match="non-finite"):
        bad.verify(spec)
