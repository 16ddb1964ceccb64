"""What a trainer needs of its node, and the seams the Byzantine experiments use.

Seams: ``TrainerEnv.gradient_source`` may replace the local gradient before the
machine hears it is ready, and ``TrainerEnv.gradient_publisher`` publishes it (the
Byzantine experiments plug in there; the honest daemon leaves both unset).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from protocol.rounds import RoundConfig
from spirtd.config import BODY_ROUNDS
from spirtd.functions.cost import Prices
from spirtd.functions.event import DataSlice, RedisTarget
from spirtd.functions.invoker import Invoker
from spirtd.pubsub.service import PubSub
from spirtd.redis.store import TensorStore
from spirtd.training.checkpoint import Checkpoints
from spirtd.training.messages import GradientMeta
from spirtd.training.statesync import StateSync

if TYPE_CHECKING:
    from spirtd.tasks import Task
    from spirtd.training.trainer import Trainer

# A gradient source runs once this node's honest gradient for the round is in Redis
# (StateKeys.local) and may rewrite it; a publisher sends the gradient's body with
# its encoded GradientMeta.
GradientSource = Callable[["Trainer", int], Awaitable[None]]
GradientPublisher = Callable[["Trainer", int, bytes, GradientMeta], Awaitable[None]]


@dataclass
class TrainerEnv:
    """What a trainer needs of the node: the other services and this node's facts."""

    node_id: str
    store: TensorStore
    invoker: Invoker
    pubsub: PubSub
    redis_target: RedisTarget
    data: DataSlice  # shard and dataset location; seed and batch are filled per round
    task: Task  # this node's instance, for evaluation
    invoke_timeout_s: float
    min_slice_fraction: float
    round_config: RoundConfig
    sync: StateSync
    checkpoints: Checkpoints
    checkpoint_every: int
    sync_timeout_s: float
    counters: Counter[str] = field(default_factory=Counter)
    # (kind, detail): what the job's event log (train status, the report) shows.
    note: Callable[[str, str], None] = lambda kind, detail: None
    gradient_source: GradientSource | None = None
    gradient_publisher: GradientPublisher | None = None
    prices: Prices | None = None  # of function invocations (None: Lambda's x86_64)
    # (in, out) bytes over this node's peer links so far (a history row's wire bytes).
    wire_bytes: Callable[[], tuple[int, int]] = lambda: (0, 0)
    body_rounds: int = BODY_ROUNDS  # a closed round's bodies are released this many rounds on
