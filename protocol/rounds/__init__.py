"""Training rounds: the sans-IO machine that decides when a round closes, with
whom, and what comes next; the daemon invokes functions, moves gradients,
aggregates in Redis and reports back.

One concern per module: ``config`` (tuning), ``events`` (actions and events),
``view`` (who the round waits for), ``deadline`` (the adaptive deadline) and
``machine``. ``sim`` drives many machines on simulated time for tests.
"""

from .config import RoundConfig
from .deadline import AdaptiveDeadline
from .events import (
    Action,
    Aggregate,
    Diverged,
    Evaluate,
    Event,
    Finished,
    GradientRejected,
    InvokeFunctions,
    LeftView,
    PublishGradient,
    PublishState,
    QuorumWait,
    RoundClosed,
)
from .machine import RoundMachine
from .vouch import Decision, Target, VouchTable, caught_up, sync_decision

__all__ = [
    "Action",
    "AdaptiveDeadline",
    "Aggregate",
    "Decision",
    "Diverged",
    "Evaluate",
    "Event",
    "Finished",
    "GradientRejected",
    "InvokeFunctions",
    "LeftView",
    "PublishGradient",
    "PublishState",
    "QuorumWait",
    "RoundClosed",
    "RoundConfig",
    "RoundMachine",
    "Target",
    "VouchTable",
    "caught_up",
    "sync_decision",
]
