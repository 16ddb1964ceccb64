"""A job's model state in Redis: where each tensor lives and what the digest covers.

The state is the parameters, the optimizer's tensors (SGD's momentum buffer;
Adam's two moments, whose step number is the round), centered clipping's
previous aggregate when that rule runs, and the number of completed rounds.
The digest covers exactly that, so two peers with equal digests will compute
equal updates from equal gradients, and state sync (next issue) moves exactly
what the digest names.
"""

from __future__ import annotations

import hashlib
import struct

import numpy as np

from spirtd.redis.store import TensorStore
from spirtd.training.job import JobSpec

DIGEST_DOMAIN = b"spirt.state.v1\x00"
ABSENT = "absent"  # a state tensor that does not exist yet (momentum before step 1)


class StateKeys:
    """Redis key names for one job. The prefix holds the job id, so two jobs
    (or an old job's leftovers) never share a key."""

    def __init__(self, job_id: str) -> None:
        self.prefix = f"spirt:{job_id}:"
        p = self.prefix
        self.theta = p + "theta"
        self.buf = p + "opt:buf"
        self.m = p + "opt:m"
        self.v = p + "opt:v"
        self.agg = p + "agg"
        self.agg_prev = p + "agg:prev"
        # Outer rounds: the outer optimizer's momentum (in the digest)...
        self.outer_buf = p + "outer:buf"
        # ...and this peer's own tensors (not in the digest): the parameters its
        # inner steps train (the functions read them: ``spirt:*:theta``), the last
        # inner gradient, the inner optimizer's state, and what compression left out.
        self.inner_theta = p + "inner:theta"
        self.inner_grad = p + "inner:g"
        self.inner_buf = p + "inner:opt:buf"
        self.inner_m = p + "inner:opt:m"
        self.inner_v = p + "inner:opt:v"
        self.residual = p + "residual"
        # Where the state stands, written after every update (not part of the digest).
        self.completed = p + "completed"
        self.digest = p + "digest"

    def fn_output(self, round: int, index: int, nonce: str) -> str:
        """Where one function invocation writes its slice's gradient: the only keys the
        functions' Redis user may write (``spirt:*:fn:*``, redis/process.py). The nonce
        is fresh for every invocation and read once, so one invocation cannot guess,
        pre-fill or overwrite another's output."""
        return f"{self.prefix}fn:{round}:{index}:{nonce}"

    def local(self, round: int) -> str:
        return f"{self.prefix}g:{round}:local"

    def peer(self, round: int, node_id: str) -> str:
        return f"{self.prefix}g:{round}:p:{node_id}"

    def wire(self, round: int) -> str:
        """This peer's compressed body for ``round``, as published."""
        return f"{self.prefix}g:{round}:wire"

    def own_tensors(self) -> list[str]:
        """This peer's tensors outside the agreed state: dropped when a state is loaded."""
        return [
            self.inner_theta,
            self.inner_grad,
            self.inner_buf,
            self.inner_m,
            self.inner_v,
            self.residual,
        ]

    def own_state(self, spec: JobSpec) -> list[tuple[str, str]]:
        """(role, key) of this peer's own tensors that outlive a round (checkpointed,
        not in the digest): the inner optimizer's state and the compression residual."""
        out = []
        if spec.inner_steps > 1:
            if spec.optimizer == "adam":
                out += [("inner_m", self.inner_m), ("inner_v", self.inner_v)]
            elif spec.momentum > 0:
                out.append(("inner_buf", self.inner_buf))
        if spec.compression != "none":
            out.append(("residual", self.residual))
        return out

    def round_pattern(self, round: int) -> str:
        return f"{self.prefix}g:{round}:*"

    def state_tensors(self, spec: JobSpec) -> list[tuple[str, str]]:
        """(role, key) of every tensor in the state, in digest order."""
        out = [("theta", self.theta)]
        if spec.inner_steps > 1:
            # The job's optimizer runs inside each peer's inner steps; what the peers
            # agree on is the outer step's.
            if spec.outer_momentum > 0:
                out.append(("outer_buf", self.outer_buf))
        elif spec.optimizer == "sgd" and spec.momentum > 0:
            out.append(("buf", self.buf))
        elif spec.optimizer == "adam":
            out += [("m", self.m), ("v", self.v)]
        if spec.rule.keeps_previous:
            out.append(("agg_prev", self.agg_prev))
        return out


async def tensor_digests(store: TensorStore, keys: list[tuple[str, str]]) -> list[str]:
    out = []
    for _, key in keys:
        out.append(await store.digest(key) if await store.exists(key) else ABSENT)
    return out


def state_digest(job_id: str, completed: int, roles: list[str], digests: list[str]) -> bytes:
    """BLAKE2b-256 over the job, the completed-round count and each tensor's digest."""
    h = hashlib.blake2b(DIGEST_DOMAIN, digest_size=32)
    h.update(job_id.encode())
    h.update(struct.pack(">Q", completed))
    for role, d in zip(roles, digests, strict=True):
        h.update(role.encode() + b"=" + d.encode() + b";")
    return h.digest()


async def digest_of(store: TensorStore, job_id: str, spec: JobSpec, completed: int) -> bytes:
    keys = StateKeys(job_id).state_tensors(spec)
    digests = await tensor_digests(store, keys)
    return state_digest(job_id, completed, [r for r, _ in keys], digests)


async def initialise(store: TensorStore, job_id: str, spec: JobSpec, params: np.ndarray) -> None:
    """Writes round 0's state: the initial parameters and no optimizer history."""
    keys = StateKeys(job_id)
    await store.delete(*[k for _, k in keys.state_tensors(spec) if k != keys.theta])
    await store.delete(*keys.own_tensors())
    await store.put(keys.theta, params)
