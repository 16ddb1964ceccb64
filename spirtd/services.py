"""The node's services, in start order; they stop in reverse.

Each service owns one concern (membership, pub/sub, Redis, training, ...) and
plugs into the node through its extension points: ``node.register`` for
envelope types, ``node.register_stream`` for stream kinds,
``node.add_link_listener``, ``node.api.route`` for control endpoints, and
``node.seal`` / ``node.link_to`` to send.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from spirtd.nodeapi import NodeApi


class Service(Protocol):
    name: str  # its key in `spirtctl status --json`

    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    def status(self) -> dict[str, Any]:
        """Top-level keys merged into the node status (e.g. {"redis": {...}})."""
        ...


def build(node: NodeApi) -> list[Service]:
    from spirtd.functions.service import FunctionsService
    from spirtd.membership.service import MembershipService
    from spirtd.pubsub.service import PubSub
    from spirtd.redis.service import RedisService
    from spirtd.training.service import TrainingService

    redis = RedisService(node)
    functions = FunctionsService(node, redis=redis)
    membership, pubsub = MembershipService(node), PubSub(node)
    training = TrainingService(
        node, redis=redis, functions=functions, membership=membership, pubsub=pubsub
    )
    return [redis, functions, membership, pubsub, training]
