"""What training puts on the gossip topics, and strict decoders for it.

``spirt.jobs`` carries job records (body: the record; meta ``["start", job]``)
and stop records (empty body; meta ``["stop", job]``). The job id rides in the
meta so a receiver knows of a starting job from the announcement alone, before
that job's first gradients (sent later on the same links) are validated.

``spirt.train`` carries, in the announcement's meta:

* gradients: ``["g", job, round, base_digest, samples, loss]``, the body being
  the gradient's raw little-endian float32 values;
* heads-ups: ``["s", job, round, digest, participating]`` with an empty body,
  sent at every round start, so peers know who is at which state before any
  gradient exists.

The origin is the gossip envelope's signer, never a field of the meta.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from protocol import strictpack
from protocol.errors import DecodeError

JOBS_TOPIC = "spirt.jobs"
TRAIN_TOPIC = "spirt.train"
DIGEST_SIZE = 32
_JOB_ID_LEN = 32
_LIMITS = strictpack.Limits(max_size=512, max_depth=1, max_items=8, max_str=64, max_bin=64)


@dataclass(frozen=True, slots=True)
class GradientMeta:
    job: str
    round: int
    base_digest: bytes
    samples: int
    loss: float

    def encode(self) -> bytes:
        return strictpack.pack(
            ["g", self.job, self.round, self.base_digest, self.samples, self.loss]
        )


@dataclass(frozen=True, slots=True)
class StateMeta:
    job: str
    round: int
    digest: bytes
    participating: bool

    def encode(self) -> bytes:
        return strictpack.pack(["s", self.job, self.round, self.digest, self.participating])


def decode_train_meta(meta: bytes) -> GradientMeta | StateMeta:
    """Raises DecodeError on anything but a well-formed gradient or heads-up meta."""
    obj = strictpack.unpack(meta, _LIMITS)
    if not isinstance(obj, list) or not obj or obj[0] not in ("g", "s"):
        raise DecodeError("bad_field", "unknown training message")
    if obj[0] == "g":
        if len(obj) != 6:
            raise DecodeError("bad_field", "gradient meta has the wrong length")
        _, job, rnd, digest, samples, loss = obj
        _job(job)
        _round(rnd)
        _digest(digest)
        if not _is_int(samples) or not 0 <= samples <= 2**40:
            raise DecodeError("bad_field", "sample count out of range")
        if isinstance(loss, bool) or not isinstance(loss, float) or not math.isfinite(loss):
            raise DecodeError("bad_field", "loss must be a finite float")
        return GradientMeta(job, rnd, digest, samples, loss)
    if len(obj) != 5:
        raise DecodeError("bad_field", "heads-up meta has the wrong length")
    _, job, rnd, digest, participating = obj
    _job(job)
    _round(rnd)
    _digest(digest)
    if not isinstance(participating, bool):
        raise DecodeError("bad_field", "participating must be a bool")
    return StateMeta(job, rnd, digest, participating)


def encode_jobs_meta(kind: str, job: str) -> bytes:
    assert kind in ("start", "stop")
    return strictpack.pack([kind, job])


def decode_jobs_meta(meta: bytes) -> tuple[str, str]:
    """(kind, job id); raises DecodeError."""
    obj = strictpack.unpack(meta, _LIMITS)
    if not isinstance(obj, list) or len(obj) != 2 or obj[0] not in ("start", "stop"):
        raise DecodeError("bad_field", "unknown jobs message")
    _job(obj[1])
    return str(obj[0]), str(obj[1])


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _job(v: object) -> None:
    if not isinstance(v, str) or len(v) != _JOB_ID_LEN:
        raise DecodeError("bad_field", "job id must be 32 hex characters")


def _round(v: object) -> None:
    if not _is_int(v) or not 0 <= v <= 2**40:  # type: ignore[operator]
        raise DecodeError("bad_field", "round out of range")


def _digest(v: object) -> None:
    if not isinstance(v, bytes) or len(v) != DIGEST_SIZE:
        raise DecodeError("bad_field", "digest must be 32 bytes")
