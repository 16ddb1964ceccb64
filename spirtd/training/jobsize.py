"""What a job's model costs a node in memory, known before any of it exists.

A job record of a few hundred bytes names a task and its options, and every
member that accepts it builds that model. So the model is sized first (its
parameter count from the task, built on torch's meta device: shapes, no storage)
and the job is refused when the memory below exceeds the node's
``[training] max_model_mb``.

Every tensor of a job is one flat float32 vector of P parameters (4 bytes each),
so the cost is 4 x P x copies, counted per node with n live members (the node
itself included) and W functions per round:

=============================  ======================================================
copies                          held by
=============================  ======================================================
1                               the parameters (Redis)
0, 1 or 2                       optimizer state: sgd none, sgd with momentum its
                                buffer, adam its two moments (Redis)
1 or 2                          the round's aggregate, and the last one for a rule that
                                keeps it (Rule.keeps_previous: cclip)
n                               a round's gradients: this node's and every peer's
W                               the gradients of this node's function slices
n - 1                           the peers' gradient bodies as received (pub/sub)
3                               the daemon's working copies: the scratch model, the
                                vector read back for evaluation and checkpoints,
                                and the float copy loaded into the model
=============================  ======================================================

Not counted: local function workers (each has its own ``[invoke] memory_mb``
limit), the dataset (bounded by each task's options), and the aggregation rules'
work space (the Redis module works through the vectors chunk by chunk). n is the
membership when the job is checked; members that join later add two copies each.
"""

from __future__ import annotations

from dataclasses import dataclass

from spirtd.training.job import JobError, JobSpec

FLOAT_BYTES = 4
WORKING_COPIES = 3


@dataclass(frozen=True)
class Footprint:
    params: int
    copies: int

    @property
    def bytes(self) -> int:
        return FLOAT_BYTES * self.params * self.copies

    def describe(self) -> str:
        return (
            f"{self.params:,} parameters ({_size(FLOAT_BYTES * self.params)} each copy), "
            f"{self.copies} copies: {_size(self.bytes)}"
        )


def copies(spec: JobSpec, members: int) -> int:
    """How many P-float vectors the job keeps on a node with ``members`` live members."""
    n = max(1, members)
    optimizer = 2 if spec.optimizer == "adam" else int(spec.momentum > 0)
    aggregate = 2 if spec.rule.keeps_previous else 1
    gradients = n + spec.functions_per_round + (n - 1)
    return 1 + optimizer + aggregate + gradients + WORKING_COPIES


def footprint(spec: JobSpec, params: int, members: int) -> Footprint:
    return Footprint(params=params, copies=copies(spec, members))


def check(spec: JobSpec, params: int, members: int, max_model_mb: int) -> Footprint:
    """The job's footprint, or a JobError naming it and the limit when it is over."""
    fp = footprint(spec, params, members)
    if fp.bytes > max_model_mb * 2**20:
        raise JobError(
            f"the model is too large for this node: {fp.describe()} with {max(1, members)} "
            f"member(s), over this node's limit of {max_model_mb} MiB ([training] max_model_mb)"
        )
    return fp


def _size(n: int) -> str:
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f} {unit}"
    return f"{n} B"
