"""A job's round records on this peer: what each closed round took, cost and
reached (``train status``'s history, the report's plots), and its log line.

Until a round is recorded its pieces gather here: the contributors' losses (from
their gradient messages), this peer's phase timings, and when the round closed.
A round that is evaluated waits for its accuracy before its line is logged.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from protocol.rounds import RoundClosed
from spirtd import metrics
from spirtd.training.job import JobSpec

if TYPE_CHECKING:
    from spirtd.tasks.base import Evaluation
    from spirtd.training.trainerenv import TrainerEnv

log = logging.getLogger("spirtd.training")

HISTORY_MAX = 2000  # rounds kept for `train status`


@dataclass
class RoundRecord:
    round: int
    contributors: list[str]
    duration_s: float
    closed_by: str
    loss: float | None
    model_digest: str
    accuracy: float | None = None
    phases: dict[str, float] = field(default_factory=dict)
    wait_s: float = 0.0  # round begin to close: what the deadline bounds
    deadline_s: float = 0.0
    closed_at: float = field(default_factory=time.time)  # wall clock, for plots against time
    # Each contributor's minibatch loss, as its gradient message reported it.
    peer_losses: dict[str, float] = field(default_factory=dict)
    inner_steps: int = 1
    bytes_sent: int = 0  # over this node's peer links since the previous round closed
    bytes_received: int = 0
    cost: dict[str, Any] | None = None  # this peer's invocations for the round

    def to_json(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "loss": self.loss,
            "accuracy": self.accuracy,
            "contributors": self.contributors,
            "duration_s": round(self.duration_s, 4),
            "model_digest": self.model_digest,
            "closed_by": self.closed_by,
            "wait_s": round(self.wait_s, 4),
            "deadline_s": round(self.deadline_s, 3),
            "closed_at": round(self.closed_at, 3),
            "peer_losses": {k: round(v, 6) for k, v in self.peer_losses.items()},
            "inner_steps": self.inner_steps,
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "cost": self.cost,
            "phases": {k: round(v, 5) for k, v in self.phases.items()},
        }


@dataclass
class Closing:
    """A round taken out of the gathering once aggregated, before its record."""

    closed: RoundClosed | None
    deadline_s: float
    losses: dict[str, float]
    phases: dict[str, float]


class RoundLog:
    def __init__(self, spec: JobSpec, env: TrainerEnv) -> None:
        self.spec = spec
        self.env = env
        self.history: deque[RoundRecord] = deque(maxlen=HISTORY_MAX)
        self.last_accuracy: float | None = None
        # Per round: losses reported by contributors, phase timings.
        self.losses: dict[int, dict[str, float]] = {}
        self.phases: dict[int, dict[str, float]] = {}
        # Closed rounds: the event, when we saw it, and the deadline the round had.
        self.closed: dict[int, tuple[RoundClosed, float, float]] = {}
        self._records: dict[int, RoundRecord] = {}  # waiting for their evaluation
        self._wire_at = env.wire_bytes()  # link bytes when the last round closed

    def closing(self, r: int, timings: dict[str, float]) -> Closing:
        closed, closed_at, deadline_s = self.closed.pop(r, (None, 0.0, 0.0))
        phases = self.phases.pop(r, {})
        ready_at = phases.pop("ready_at", None)
        if ready_at is not None and closed is not None:
            # From our gradient going out to the round closing: the wait for the others.
            phases["dissemination_s"] = max(0.0, closed_at - ready_at)
        phases |= timings
        return Closing(closed, deadline_s, self.losses.pop(r, {}), phases)

    def record(
        self, r: int, c: Closing, contributors: list[str], digest: bytes, work_s: float, cost: Any
    ) -> None:
        """Round ``r``'s record from what was gathered (``work_s``: aggregation to
        digest, after the close), into the history and the round metrics."""
        env, spec, closed, losses = self.env, self.spec, c.closed, c.losses
        picked = [losses[x] for x in contributors if x in losses]
        wire_in, wire_out = env.wire_bytes()
        rec = RoundRecord(
            cost=cost,
            inner_steps=spec.inner_steps,
            bytes_sent=wire_out - self._wire_at[1],
            bytes_received=wire_in - self._wire_at[0],
            round=r,
            contributors=list(contributors),
            duration_s=closed.duration_s + work_s if closed else work_s,
            closed_by=closed.reason if closed else "?",
            loss=float(np.mean(picked)) if picked else None,
            model_digest=digest.hex(),
            phases=c.phases,
            wait_s=closed.duration_s if closed else 0.0,
            deadline_s=c.deadline_s,
            peer_losses={x: float(losses[x]) for x in contributors if x in losses},
        )
        self._wire_at = (wire_in, wire_out)
        self.history.append(rec)
        metrics.for_node(env.node_id).observe_round(rec.duration_s, rec.phases)
        env.counters["training.rounds"] += 1
        if r % spec.eval_every == 0 or r == spec.rounds:
            self._records[r] = rec  # its accuracy comes with the evaluation
        else:
            self._log_round(rec)

    def evaluated(self, r: int, ev: Evaluation) -> None:
        rec = self._records.pop(r, None)
        self.last_accuracy = ev.accuracy
        if rec is not None:
            rec.accuracy = ev.accuracy
            self._log_round(rec, test_loss=ev.loss)
        for old in [x for x in self._records if x < r]:
            del self._records[old]

    def forget_before(self, round: int) -> None:
        """Rounds abandoned by a sync leave no per-round records behind."""
        for per_round in (self.losses, self.phases, self.closed, self._records):
            for old in [k for k in per_round if k < round]:
                del per_round[old]

    def status(self) -> dict[str, Any]:
        last = self.history[-1] if self.history else None
        return {"loss": last.loss if last else None, "accuracy": self.last_accuracy}

    def _log_round(self, rec: RoundRecord, test_loss: float | None = None) -> None:
        acc = "" if rec.accuracy is None else f" accuracy={rec.accuracy:.4f}"
        if rec.inner_steps > 1:
            acc += (
                f" steps={rec.round * rec.inner_steps}"
                f" sent={rec.bytes_sent} received={rec.bytes_received}"
            )
        log.info(
            "round %d/%d loss=%s%s contributors=%d duration=%.3fs digest=%s%s",
            rec.round,
            self.spec.rounds,
            "-" if rec.loss is None else f"{rec.loss:.4f}",
            acc,
            len(rec.contributors),
            rec.duration_s,
            rec.model_digest[:12],
            "" if rec.closed_by == "complete" else f" closed_by={rec.closed_by}",
        )
