"""Training rounds: the sans-IO machines that decide a round (when it closes, with
whom, what comes next) and a job around it (lifecycle, buffering, sync, following,
resuming, exclusion); the daemon invokes functions, moves gradients and state,
aggregates in Redis and reports back.

One concern per module: ``config`` (tuning), ``events`` (actions and events),
``view`` (who the round waits for), ``deadline`` (the adaptive deadline),
``vouch`` (who vouches for which model, and the sync decision), ``machine`` (a
round) and ``job`` (the job on one peer). ``sim`` drives many job machines on
simulated time for tests.
"""

from .config import RoundConfig
from .deadline import AdaptiveDeadline
from .events import (
    Action,
    Aggregate,
    CaughtUp,
    Diverged,
    Evaluate,
    Event,
    Excluded,
    FetchState,
    Finished,
    GradientRejected,
    InvokeFunctions,
    JobAction,
    JobDone,
    JobEvent,
    JobFailed,
    LeftView,
    LoadState,
    PublishGradient,
    PublishState,
    QuorumWait,
    ReadLocalState,
    Resumed,
    RoundClosed,
    StateLoaded,
    StateUnvouched,
    SyncStarted,
    Unfollowed,
    WarmUp,
    WriteGradient,
)
from .job import CHECKPOINT, JobConfig, JobMachine, Lifecycle
from .machine import RoundMachine
from .vouch import Decision, Target, VouchTable, caught_up, sync_decision

__all__ = [
    "CHECKPOINT",
    "Action",
    "AdaptiveDeadline",
    "Aggregate",
    "CaughtUp",
    "Decision",
    "Diverged",
    "Evaluate",
    "Event",
    "Excluded",
    "FetchState",
    "Finished",
    "GradientRejected",
    "InvokeFunctions",
    "JobAction",
    "JobConfig",
    "JobDone",
    "JobEvent",
    "JobFailed",
    "JobMachine",
    "LeftView",
    "Lifecycle",
    "LoadState",
    "PublishGradient",
    "PublishState",
    "QuorumWait",
    "ReadLocalState",
    "Resumed",
    "RoundClosed",
    "RoundConfig",
    "RoundMachine",
    "StateLoaded",
    "StateUnvouched",
    "SyncStarted",
    "Target",
    "Unfollowed",
    "VouchTable",
    "WarmUp",
    "WriteGradient",
    "caught_up",
    "sync_decision",
]
