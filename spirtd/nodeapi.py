"""What a service may use of the node: its extension points and a few shared facts.

Services (membership, pub/sub, Redis, functions, training) and the control API
depend on this narrow interface, never on ``spirtd.node``; ``Node`` implements
it. That keeps the dependency graph a tree (node -> services -> nodeapi) and
lets a test hand a service a small stand-in node.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

from protocol.wire import Envelope, MsgType

if TYPE_CHECKING:
    from protocol.identity import Admission, Certificate, NodeKey
    from spirtd.config import Config
    from spirtd.keyfiles import DataDir
    from spirtd.net.link import Link, StreamSink
    from spirtd.net.transport import Transport

EnvelopeHandler = Callable[["Link", Envelope], None]
# (link, total size, kind-specific header) -> a sink, or None to refuse the stream.
StreamHandler = Callable[["Link", int, bytes], "StreamSink | None"]
LinkListener = Callable[["Link", bool], None]  # (link, up)
# A control endpoint: takes the decoded JSON body, returns a JSON-able reply.
RouteHandler = Callable[[dict[str, Any]], Awaitable[Any]]


class ApiError(Exception):
    """A control endpoint's refusal: the API answers ``status`` with ``message``.

    Here rather than in :mod:`spirtd.control.api` so a service raising it does not
    depend on the control plane that serves it."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Routes(Protocol):
    def route(self, method: str, path: str, fn: RouteHandler) -> None:
        """Adds a control endpoint under /v1/."""
        ...


class StatusSource(Protocol):
    """What the control API reads for its built-in endpoints."""

    def status(self) -> dict[str, Any]: ...
    def members(self) -> list[dict[str, Any]]: ...


class NodeApi(StatusSource, Protocol):
    config: Config
    data: DataDir
    key: NodeKey
    certificate: Certificate | None
    admission: Admission  # judges identities carried inside messages (gossip, membership)
    counters: Counter[str]
    transport: Transport | None
    api: Routes | None

    def register(self, msg_type: MsgType, handler: EnvelopeHandler) -> None:
        """Routes envelopes of ``msg_type`` (signature already verified) to ``handler``."""
        ...

    def register_stream(self, kind: str, handler: StreamHandler) -> None: ...
    def add_link_listener(self, listener: LinkListener) -> None: ...
    def seal(self, msg_type: MsgType, body: Any) -> bytes:
        """Signs ``body`` as an envelope from this node, with a fresh sequence number."""
        ...

    def stream_meta(self, kind: str, header: bytes) -> bytes: ...
    async def link_to(self, peer_id: str | None, addr: str) -> Link: ...
    def request_stop(self) -> None: ...
