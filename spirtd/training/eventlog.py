"""What the job machine's events count, log and note in the job's event log (the
trainer acts on the few that need more than that)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from protocol.rounds import (
    CHECKPOINT,
    CaughtUp,
    Diverged,
    GradientRejected,
    JobDone,
    JobFailed,
    LeftView,
    QuorumWait,
    RoundClosed,
    StateLoaded,
    StateUnvouched,
    SyncStarted,
    Unfollowed,
)

if TYPE_CHECKING:
    from spirtd.training.trainerenv import TrainerEnv

log = logging.getLogger("spirtd.training")


class EventLog:
    def __init__(self, job_id: str, env: TrainerEnv) -> None:
        self.job_id = job_id
        self.env = env

    def report(self, ev: Any, digest: bytes, accuracy: float | None) -> None:
        """``digest``, ``accuracy``: this peer's model now, for the lines that show it."""
        c = self.env.counters
        if isinstance(ev, RoundClosed):
            c[f"training.rounds_closed.{ev.reason}"] += 1
        elif isinstance(ev, GradientRejected):
            c[f"training.gradient_rejected.{ev.reason}"] += 1
            log.debug("gradient from %s for round %d rejected: %s", ev.origin, ev.round, ev.reason)
        elif isinstance(ev, Diverged):
            c["training.diverged_peers"] += 1
            log.warning(
                "peer %s holds another model at round %d (digest %s, ours %s)",
                ev.origin,
                ev.round,
                ev.digest.hex()[:12],
                digest.hex()[:12],
            )
        elif isinstance(ev, QuorumWait):
            c["training.quorum_waits"] += 1
            log.warning(
                "round %d: deadline passed with %d of the %d gradients a quorum needs; waiting",
                ev.round,
                ev.have,
                ev.need,
            )
        elif isinstance(ev, LeftView):
            c[f"training.left_view.{ev.why}"] += 1
            log.info("round %d: no longer waiting for %s (%s)", ev.round, ev.node_id, ev.why)
        elif isinstance(ev, SyncStarted):
            log.warning("job %s: syncing state (%s)", self.job_id[:12], ev.why)
            c["training.syncs_started"] += 1
            self.env.note("sync_started", ev.why)
        elif isinstance(ev, StateLoaded):
            self._loaded(ev)
        elif isinstance(ev, StateUnvouched):
            c["training.sync_unvouched"] += 1
            log.warning(
                "state from %s (round %d) is not vouched for by f+1 peers; not loaded",
                ev.peer,
                ev.completed,
            )
        elif isinstance(ev, CaughtUp):
            log.info("caught up at round %d; contributing from round %d", ev.round - 1, ev.round)
        elif isinstance(ev, Unfollowed):
            c["training.unfollowed"] += 1
            log.info("round %d: no one is computing it; computing it here", ev.round)
        elif isinstance(ev, JobDone):
            if ev.via == "run":
                log.info(
                    "job %s done after %d rounds: accuracy=%s digest=%s",
                    self.job_id[:12],
                    ev.round,
                    "-" if accuracy is None else f"{accuracy:.4f}",
                    digest.hex()[:12],
                )
        elif isinstance(ev, JobFailed):
            log.error("job %s failed: %s", self.job_id[:12], ev.why)

    def _loaded(self, ev: StateLoaded) -> None:
        c = self.env.counters
        if ev.source == CHECKPOINT:
            log.info("state from checkpoint: round %d", ev.completed)
            c["training.checkpoint_loads"] += 1
            return
        c["training.syncs_done"] += 1
        self.env.note("synced", f"round {ev.completed} from {ev.source}")
        log.info(
            "synced job %s state from %s: round %d, digest %s",
            self.job_id[:12],
            ev.source,
            ev.completed,
            ev.digest.hex()[:12],
        )
