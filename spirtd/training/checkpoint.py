"""State snapshots: one format for checkpoints on disk and for state transfers between peers.

A snapshot is a job's state as :mod:`spirtd.training.state` defines it (the parameters,
the optimizer's tensors, centered clipping's previous aggregate, the completed-round
count) together with its state digest. Encoded, it is::

    MAGIC (4 bytes, b"SPSN") | header length (u32, big-endian) | header | tensor bytes...

The header is a msgpack map ``{"v": 1, "job": str, "completed": int, "digest": bin(32),
"tensors": [[role, size or -1], ...]}`` of at most :data:`MAX_HEADER` bytes; the body is
the present tensors' raw little-endian float32 bytes, in ``state_tensors`` order, back to
back. Nothing in it is trusted: the header is decoded with :mod:`protocol.strictpack`,
every size is checked against what the job spec implies *before* anything is allocated,
and :meth:`Snapshot.verify` recomputes the digest (and refuses non-finite values) before
any byte reaches the live Redis keys. Nothing is unpickled.

A checkpoint file may also carry this peer's own tensors of an outer-round job (the
inner optimizer's state and the compression residual: ``StateKeys.own_state``),
which are not part of the agreed state: the header then has ``"own": [[role, size
or -1], ...]`` and ``"own_step"`` (the inner Adam's step count), and their bytes
follow the state's. They are checked for size and finiteness, not by the
digest, and a snapshot from the network may not carry them.

Checkpoints are ``DATA_DIR/training/ckpt-<job>-<completed>.bin`` files in that format,
created with mode 0600 (O_EXCL: never readable by others, even briefly), written by
atomic rename with the file and the directory fsynced; the last ``keep`` are kept.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from protocol import strictpack
from protocol.errors import DecodeError
from spirtd.redis import tensorfmt
from spirtd.redis.store import TensorStore
from spirtd.training.job import JobSpec
from spirtd.training.state import ABSENT, StateKeys, digest_of, state_digest

log = logging.getLogger("spirtd.checkpoint")

VERSION = 1
MAGIC = b"SPSN"
_PREFIX = struct.Struct(">4sI")
PREFIX_SIZE = _PREFIX.size  # 8
MAX_HEADER = 4096
DIGEST_SIZE = 32
# Job ids are BLAKE2b hex; the charset keeps them safe in key and file names.
_JOB_RE = re.compile(r"[0-9A-Za-z_]{1,128}")
_HEADER_LIMITS = strictpack.Limits(
    max_size=MAX_HEADER, max_depth=3, max_items=64, max_str=128, max_bin=64, max_container=16
)
_HEADER_KEYS = frozenset({"v", "job", "completed", "digest", "tensors"})
OWN, OWN_STEP = "own", "own_step"  # the header keys of a checkpoint's own tensors
_MAX_COMPLETED = 2**63 - 1
_FINITE_BLOCK = 1 << 20  # floats checked per step (bounds the temporary bool array)


class SnapshotError(ValueError):
    """A snapshot that is malformed, does not fit the job, or whose digest does not match;
    the message is one line saying why. Nothing was written to the live keys."""


def spec_roles(spec: JobSpec) -> list[str]:
    """The state roles of ``spec``, in digest order (role names do not depend on the job)."""
    return [role for role, _ in StateKeys("_").state_tensors(spec)]


def own_roles(spec: JobSpec) -> list[str]:
    """The roles of this peer's own tensors that a checkpoint of ``spec`` keeps."""
    return [role for role, _ in StateKeys("_").own_state(spec)]


def tensor_digest(data: bytes | memoryview) -> str:
    """What SPIRT.DIGEST / TensorStore.digest return for a tensor with these raw bytes."""
    return hashlib.blake2b(data, digest_size=DIGEST_SIZE).hexdigest()


def _check_job_id(job_id: object) -> str:
    if not isinstance(job_id, str) or not _JOB_RE.fullmatch(job_id):
        raise SnapshotError("snapshot: bad job id")
    return job_id


def _tensor_size(spec: JobSpec) -> int:
    if not isinstance(spec.param_count, int) or not 0 < spec.param_count <= tensorfmt.MAX_ELEMENTS:
        raise SnapshotError(f"job spec has no usable param_count ({spec.param_count!r})")
    return spec.param_count * tensorfmt.DTYPE.itemsize


def max_encoded_size(spec: JobSpec) -> int:
    """An upper bound on an encoded snapshot of ``spec``'s job (for a receiver's limit)."""
    return PREFIX_SIZE + MAX_HEADER + len(spec_roles(spec)) * _tensor_size(spec)


def _first_nonfinite(data: bytes) -> int | None:
    a = np.frombuffer(data, dtype=tensorfmt.DTYPE)
    for start in range(0, a.size, _FINITE_BLOCK):
        ok = np.isfinite(a[start : start + _FINITE_BLOCK])
        if not ok.all():
            return start + int(np.argmin(ok))
    return None


@dataclass(frozen=True)
class Header:
    """A decoded, checked header: sizes are what the spec implies."""

    version: int
    job_id: str
    completed: int
    digest: bytes
    tensors: tuple[tuple[str, int], ...]  # (role, size in bytes or -1 = absent)
    header_size: int  # bytes of prefix + header, i.e. where the body starts
    own: tuple[tuple[str, int], ...] = ()  # a checkpoint's own tensors, after the state's
    own_step: int = 0

    @property
    def body_size(self) -> int:
        return sum(size for _, size in (*self.tensors, *self.own) if size >= 0)

    @property
    def total_size(self) -> int:
        return self.header_size + self.body_size


@dataclass(frozen=True)
class Snapshot:
    job_id: str
    completed: int
    digest: bytes  # state_digest(job_id, completed, roles, tensor digests): 32 bytes
    # (role, raw little-endian float32 bytes or None = absent), in state_tensors order
    tensors: tuple[tuple[str, bytes | None], ...]
    # A checkpoint's own tensors (own_roles order) and the inner Adam's step: not in
    # the digest, never sent to a peer.
    own: tuple[tuple[str, bytes | None], ...] = ()
    own_step: int = 0

    # --- checks -------------------------------------------------------------------------

    def compute_digest(self) -> bytes:
        """The state digest of this snapshot's contents (not of its ``digest`` field)."""
        roles = [role for role, _ in self.tensors]
        digests = [ABSENT if data is None else tensor_digest(data) for _, data in self.tensors]
        return state_digest(self.job_id, self.completed, roles, digests)

    def check_structure(self, spec: JobSpec, *, job_id: str | None = None) -> None:
        """Everything verify() checks except the digest."""
        _check_job_id(self.job_id)
        if job_id is not None and self.job_id != job_id:
            raise SnapshotError(f"snapshot is of job {self.job_id}, not {job_id}")
        c = self.completed
        if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c <= spec.rounds:
            raise SnapshotError(f"snapshot: completed rounds {c!r} not in 0..{spec.rounds}")
        if not isinstance(self.digest, bytes) or len(self.digest) != DIGEST_SIZE:
            raise SnapshotError("snapshot: the digest must be 32 bytes")
        roles = [role for role, _ in self.tensors]
        want = spec_roles(spec)
        if roles != want:
            raise SnapshotError(f"snapshot roles {roles} differ from the job's {want}")
        if self.own and [role for role, _ in self.own] != own_roles(spec):
            raise SnapshotError(f"snapshot's own roles differ from the job's {own_roles(spec)}")
        size = _tensor_size(spec)
        for role, data in (*self.tensors, *self.own):
            if data is None:
                continue
            if not isinstance(data, bytes):
                raise SnapshotError(f"snapshot: tensor {role} is not bytes")
            if len(data) != size:
                raise SnapshotError(
                    f"snapshot: tensor {role} has {len(data)} bytes, the job needs {size}"
                )
            bad = _first_nonfinite(data)
            if bad is not None:
                raise SnapshotError(f"snapshot: tensor {role} has a non-finite value at {bad}")

    def verify(self, spec: JobSpec, *, job_id: str | None = None) -> None:
        """Raises SnapshotError unless the roles are exactly the spec's state roles in order,
        every present tensor is param_count float32 values, all finite, and the digest
        recomputed from the bytes equals ``self.digest``. ``job_id``: also require this job."""
        self.check_structure(spec, job_id=job_id)
        if self.compute_digest() != self.digest:
            raise SnapshotError(
                f"snapshot of job {self.job_id} at round {self.completed}: digest mismatch"
            )

    # --- the format ---------------------------------------------------------------------

    def encode_header(self) -> bytes:
        obj: dict[str, object] = {
            "v": VERSION,
            "job": self.job_id,
            "completed": self.completed,
            "digest": self.digest,
            "tensors": [[role, -1 if d is None else len(d)] for role, d in self.tensors],
        }
        if self.own:
            own = [[role, -1 if d is None else len(d)] for role, d in self.own]
            obj[OWN], obj[OWN_STEP] = own, self.own_step
        header = strictpack.pack(obj)
        if len(header) > MAX_HEADER:
            raise SnapshotError(f"snapshot header of {len(header)} bytes exceeds {MAX_HEADER}")
        return _PREFIX.pack(MAGIC, len(header)) + header

    def encode(self) -> list[bytes]:
        """The encoded snapshot as pieces (prefixed header, then each present tensor's
        bytes, not copied): write or send them in order without joining."""
        present = (d for _, d in (*self.tensors, *self.own) if d is not None)
        return [self.encode_header(), *present]

    @property
    def encoded_size(self) -> int:
        return sum(len(p) for p in self.encode())

    @staticmethod
    def header_length(prefix: bytes | memoryview) -> int:
        """The msgpack header's length from the first PREFIX_SIZE bytes (checked)."""
        if len(prefix) < PREFIX_SIZE:
            raise SnapshotError("snapshot: truncated before the header")
        magic, length = _PREFIX.unpack_from(prefix, 0)
        if magic != MAGIC:
            raise SnapshotError("not a SPIRT state snapshot (bad magic)")
        if not 0 < length <= MAX_HEADER:
            raise SnapshotError(f"snapshot header length {length} not in 1..{MAX_HEADER}")
        return int(length)

    @classmethod
    def decode_header(
        cls,
        header: bytes | memoryview,
        spec: JobSpec,
        *,
        job_id: str | None = None,
        allow_own: bool = False,
    ) -> Header:
        """Decodes exactly the prefixed header (PREFIX_SIZE + header_length bytes). Every
        tensor size must be the spec's, so ``body_size`` is what the spec implies.
        ``allow_own``: a checkpoint file's own tensors may follow (never a peer's)."""
        length = cls.header_length(header)
        if len(header) != PREFIX_SIZE + length:
            raise SnapshotError(
                f"snapshot header: {len(header) - PREFIX_SIZE} bytes, the prefix says {length}"
            )
        try:
            obj = strictpack.unpack(memoryview(header)[PREFIX_SIZE:], _HEADER_LIMITS)
        except DecodeError as e:
            raise SnapshotError(f"snapshot header does not decode: {e}") from None
        allowed = [_HEADER_KEYS, *([_HEADER_KEYS | {OWN, OWN_STEP}] if allow_own else [])]
        if not isinstance(obj, dict) or set(obj) not in allowed:
            raise SnapshotError("snapshot header: wrong fields")
        if obj["v"] != VERSION or isinstance(obj["v"], bool):
            raise SnapshotError(f"snapshot header: unknown version {obj['v']!r}")
        job = _check_job_id(obj["job"])
        if job_id is not None and job != job_id:
            raise SnapshotError(f"snapshot is of job {job}, not {job_id}")
        completed = obj["completed"]
        if isinstance(completed, bool) or not isinstance(completed, int):
            raise SnapshotError("snapshot header: completed is not an integer")
        if not 0 <= completed <= spec.rounds:
            raise SnapshotError(f"snapshot: completed rounds {completed} not in 0..{spec.rounds}")
        digest = obj["digest"]
        if not isinstance(digest, bytes) or len(digest) != DIGEST_SIZE:
            raise SnapshotError("snapshot header: the digest must be 32 bytes")
        tensors = _entries(obj["tensors"], spec_roles(spec), _tensor_size(spec))
        own: tuple[tuple[str, int], ...] = ()
        step = 0
        if OWN in obj:
            step = obj[OWN_STEP]
            if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < 2**53:
                raise SnapshotError("snapshot header: own_step is not a count")
            own = _entries(obj[OWN], own_roles(spec), _tensor_size(spec))
        return Header(
            VERSION, job, completed, digest, tensors, PREFIX_SIZE + length, own, int(step)
        )

    @classmethod
    def decode(
        cls, data: bytes | memoryview, spec: JobSpec, *, job_id: str | None = None
    ) -> Snapshot:
        """Decodes and verifies a whole encoded snapshot (header and body, nothing more)."""
        view = memoryview(data).cast("B")
        length = cls.header_length(view[:PREFIX_SIZE])
        if len(view) < PREFIX_SIZE + length:
            raise SnapshotError("snapshot: truncated header")
        header = cls.decode_header(view[: PREFIX_SIZE + length], spec, job_id=job_id)
        if len(view) != header.total_size:
            raise SnapshotError(
                f"snapshot body of {len(view) - header.header_size} bytes, "
                f"the header says {header.body_size}"
            )
        pos = header.header_size
        tensors: list[tuple[str, bytes | None]] = []
        for role, n in header.tensors:
            if n < 0:
                tensors.append((role, None))
            else:
                # A copy: the verified bytes must not change under us before they are written.
                tensors.append((role, bytes(view[pos : pos + n])))
                pos += n
        snap = cls(header.job_id, header.completed, header.digest, tuple(tensors))
        snap.verify(spec, job_id=job_id)
        return snap

    @classmethod
    def read_from(cls, f: BinaryIO, spec: JobSpec, *, job_id: str | None = None) -> Snapshot:
        """Reads exactly one snapshot from a binary stream (a checkpoint file, which may
        hold own tensors too), tensor by tensor, so no more is allocated than the spec
        implies; then verifies it."""
        prefix = _read_exact(f, PREFIX_SIZE)
        length = cls.header_length(prefix)
        header = cls.decode_header(
            prefix + _read_exact(f, length), spec, job_id=job_id, allow_own=True
        )
        tensors = [(role, None if n < 0 else _read_exact(f, n)) for role, n in header.tensors]
        own = [(role, None if n < 0 else _read_exact(f, n)) for role, n in header.own]
        if f.read(1):
            raise SnapshotError("snapshot: trailing bytes after the body")
        snap = cls(
            header.job_id,
            header.completed,
            header.digest,
            tuple(tensors),
            tuple(own),
            header.own_step,
        )
        snap.verify(spec, job_id=job_id)
        return snap


def encoded_digest(data: bytes | memoryview, *, job_id: str) -> tuple[int, bytes]:
    """The (completed, digest) of an encoded snapshot of ``job_id`` whose bytes match
    the digest in its header; raises SnapshotError otherwise. Needs no job spec, so a
    transfer can be checked where the spec is not at hand (state sync, to tell which
    source served bad bytes). It does not replace :meth:`Snapshot.decode`: roles,
    sizes and finiteness against the spec are checked there, before anything loads."""
    view = memoryview(data).cast("B")
    length = Snapshot.header_length(view[:PREFIX_SIZE])
    if len(view) < PREFIX_SIZE + length:
        raise SnapshotError("snapshot: truncated header")
    try:
        obj = strictpack.unpack(view[PREFIX_SIZE : PREFIX_SIZE + length], _HEADER_LIMITS)
    except DecodeError as e:
        raise SnapshotError(f"snapshot header does not decode: {e}") from None
    if not isinstance(obj, dict) or set(obj) != _HEADER_KEYS or obj["job"] != job_id:
        raise SnapshotError(f"snapshot header: wrong fields or not of job {job_id}")
    completed, digest, entries = obj["completed"], obj["digest"], obj["tensors"]
    if isinstance(completed, bool) or not isinstance(completed, int) or completed < 0:
        raise SnapshotError("snapshot header: completed is not a count")
    if not isinstance(digest, bytes) or len(digest) != DIGEST_SIZE or not isinstance(entries, list):
        raise SnapshotError("snapshot header: bad digest or tensor list")
    pos = PREFIX_SIZE + length
    roles: list[str] = []
    digests: list[str] = []
    for entry in entries:
        if not isinstance(entry, list) or len(entry) != 2 or not isinstance(entry[0], str):
            raise SnapshotError("snapshot header: a tensor entry is not [role, size]")
        role, n = entry
        if isinstance(n, bool) or not isinstance(n, int) or n < -1 or pos + max(n, 0) > len(view):
            raise SnapshotError(f"snapshot header: tensor {role} of {n!r} bytes does not fit")
        roles.append(role)
        digests.append(ABSENT if n < 0 else tensor_digest(view[pos : pos + n]))
        pos += max(n, 0)
    if pos != len(view):
        raise SnapshotError(f"snapshot: {len(view) - pos} bytes past the last tensor")
    if state_digest(job_id, completed, roles, digests) != digest:
        raise SnapshotError(f"snapshot of job {job_id} at round {completed}: digest mismatch")
    return completed, digest


def _entries(entries: object, want: list[str], size: int) -> tuple[tuple[str, int], ...]:
    """A header's [[role, size or -1], ...]: exactly the roles ``want``, in order, each
    of ``size`` bytes or absent."""
    if not isinstance(entries, list) or len(entries) != len(want):
        raise SnapshotError(f"snapshot header: expected {len(want)} tensors ({want})")
    out = []
    for entry, role in zip(entries, want, strict=True):
        if not isinstance(entry, list) or len(entry) != 2:
            raise SnapshotError("snapshot header: a tensor entry is not [role, size]")
        name, n = entry
        if name != role:
            raise SnapshotError(f"snapshot header: roles differ from the job's {want}")
        if isinstance(n, bool) or not isinstance(n, int) or n not in (-1, size):
            raise SnapshotError(
                f"snapshot header: tensor {role} of {n!r} bytes (the job needs {size} or -1)"
            )
        out.append((role, n))
    return tuple(out)


def _read_exact(f: BinaryIO, n: int) -> bytes:
    data = f.read(n)
    if data is None or len(data) != n:
        raise SnapshotError("snapshot: truncated")
    return data


# --- Redis ----------------------------------------------------------------------------------


async def read_snapshot(
    store: TensorStore,
    job_id: str,
    spec: JobSpec,
    completed: int,
    *,
    own_step: int | None = None,
) -> Snapshot:
    """The job's live state as a snapshot: every state tensor read in one MULTI/EXEC (a
    consistent view), its digest computed here (equal to ``state.digest_of``).
    ``own_step``: for a checkpoint, this peer's own tensors come along, with that
    inner step count."""
    _check_job_id(job_id)
    own_keys = StateKeys(job_id).own_state(spec) if own_step is not None else []
    keys = StateKeys(job_id).state_tensors(spec) + own_keys
    async with store.client.pipeline(transaction=True) as pipe:
        for _, key in keys:
            pipe.type(key)
        pipe.mget([k for _, k in keys])
        replies = await pipe.execute()
    types, values = replies[: len(keys)], replies[len(keys)]
    tensors: list[tuple[str, bytes | None]] = []
    for (role, key), t, value in zip(keys, types, values, strict=True):
        t = t.decode() if isinstance(t, bytes) else str(t)
        if t not in ("none", "string"):
            raise SnapshotError(f"state key {key} holds a {t}, not a tensor")
        tensors.append((role, None if value is None else bytes(value)))
    split = len(keys) - len(own_keys)
    state, own = tuple(tensors[:split]), tuple(tensors[split:])
    snap = Snapshot(job_id, completed, b"\0" * DIGEST_SIZE, state, own, own_step or 0)
    snap.check_structure(spec)
    return Snapshot(job_id, completed, snap.compute_digest(), state, own, own_step or 0)


async def load_snapshot(
    store: TensorStore, snap: Snapshot, spec: JobSpec, *, job_id: str | None = None
) -> None:
    """Makes Redis hold exactly ``snap``: verify() first (nothing is written if it fails),
    then every tensor written (absent ones deleted) in one MULTI/EXEC, then the digest
    re-read from Redis and compared (SnapshotError if it differs)."""
    snap.verify(spec, job_id=job_id)
    sk = StateKeys(snap.job_id)
    keys = sk.state_tensors(spec)
    tensors = list(snap.tensors)
    if snap.own:
        keys += sk.own_state(spec)
        tensors += snap.own
    shape = tensorfmt.encode_shape((spec.param_count,))
    async with store.client.pipeline(transaction=True) as pipe:
        # This peer's own tensors belonged to whatever state was there: they are
        # the snapshot's (a checkpoint of ours) or start fresh.
        pipe.delete(*sk.own_tensors())
        for (_, key), (_, data) in zip(keys, tensors, strict=True):
            if data is None:
                pipe.delete(key, tensorfmt.shape_key(key))
            else:
                pipe.set(key, data)
                pipe.set(tensorfmt.shape_key(key), shape)
        await pipe.execute()
    got = await digest_of(store, snap.job_id, spec, snap.completed)
    if got != snap.digest:
        raise SnapshotError(
            f"after loading the snapshot of job {snap.job_id} at round {snap.completed}, "
            "Redis holds a different state (written concurrently?)"
        )


# --- files ----------------------------------------------------------------------------------

_FILE_RE = re.compile(r"ckpt-(?P<job>[0-9A-Za-z_]{1,128})-(?P<n>[0-9]{1,19})\.bin")
_TMP_SUFFIX = ".tmp"


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data).cast("B")
    while view:  # os.write may write less than asked for large buffers
        view = view[os.write(fd, view) :]


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Checkpoints:
    """DATA_DIR/training/ckpt-<job>-<completed>.bin files, mode 0600, written by atomic
    rename (temp file created O_EXCL 0600, fsync, rename, fsync of the directory); the
    last ``keep`` (by completed rounds) are kept per job, older ones deleted once the new
    one is in place. Temp files are ``.ckpt-<job>-<completed>.bin.tmp``: never listed, and
    a crash's leftovers are removed by the next save() or latest() of that job.

    Methods do blocking file I/O: run them with ``asyncio.to_thread``. One instance per
    directory (a per-job lock serialises save() and latest() of the same job)."""

    def __init__(self, directory: Path, keep: int = 2) -> None:
        if keep < 1:
            raise ValueError("keep must be at least 1")
        self.directory = Path(directory)
        self.keep = keep
        self._locks: dict[str, threading.Lock] = {}
        self._locks_lock = threading.Lock()

    def _lock(self, job_id: str) -> threading.Lock:
        with self._locks_lock:
            return self._locks.setdefault(job_id, threading.Lock())

    def path(self, job_id: str, completed: int) -> Path:
        _check_job_id(job_id)
        return self.directory / f"ckpt-{job_id}-{int(completed)}.bin"

    def list(self, job_id: str) -> list[tuple[int, Path]]:
        """(completed, path) of the job's checkpoint files, oldest first."""
        _check_job_id(job_id)
        out = []
        try:
            entries = list(os.scandir(self.directory))
        except FileNotFoundError:
            return []
        for e in entries:
            m = _FILE_RE.fullmatch(e.name)
            if m and m["job"] == job_id and e.is_file(follow_symlinks=False):
                out.append((int(m["n"]), Path(e.path)))
        out.sort()
        return out

    def _clean_temps(self, job_id: str) -> None:
        for p in self.directory.glob(f".ckpt-{job_id}-*.bin{_TMP_SUFFIX}"):
            log.info("removing %s, left over from an interrupted checkpoint", p)
            with contextlib.suppress(FileNotFoundError):
                p.unlink()

    def save(self, snap: Snapshot) -> Path:
        """Writes ``snap`` (pieces streamed, never joined) and prunes old files; returns
        the file's path. Blocking: callers run it with asyncio.to_thread."""
        final = self.path(snap.job_id, snap.completed)
        tmp = final.with_name(f".{final.name}{_TMP_SUFFIX}")
        with self._lock(snap.job_id):
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._clean_temps(snap.job_id)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                try:
                    for piece in snap.encode():
                        _write_all(fd, piece)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.replace(tmp, final)
            except BaseException:
                with contextlib.suppress(OSError):
                    tmp.unlink()
                raise
            fsync_dir(self.directory)
            self._prune(snap.job_id, final)
        return final

    def _prune(self, job_id: str, just_written: Path) -> None:
        files = self.list(job_id)
        others = [(n, p) for n, p in files if p != just_written]
        # The file just written always stays, with the newest keep-1 of the others.
        removed = False
        for _, p in others[: max(0, len(others) - (self.keep - 1))]:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                removed = True
        if removed:
            fsync_dir(self.directory)

    def latest(self, job_id: str, spec: JobSpec) -> Snapshot | None:
        """The newest checkpoint of the job that decodes and verifies, or None. A corrupt or
        truncated one is logged and skipped in favour of an older one."""
        _check_job_id(job_id)  # before it goes into a glob pattern
        with self._lock(job_id):
            if self.directory.is_dir():
                self._clean_temps(job_id)
            for completed, p in reversed(self.list(job_id)):
                try:
                    with p.open("rb") as f:
                        snap = Snapshot.read_from(f, spec, job_id=job_id)
                    if snap.completed != completed:
                        raise SnapshotError(
                            f"holds round {snap.completed}, its name says {completed}"
                        )
                except (OSError, SnapshotError) as e:
                    log.warning("skipping checkpoint %s: %s", p, e)
                    continue
                return snap
        return None
