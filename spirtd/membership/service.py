"""The daemon shell around protocol.membership: envelopes in, timers, envelopes
out. All protocol decisions live in the sans-IO machine; this file only moves
bytes, reads the clock, and dials peers it is told to talk to.

There is one transport (encrypted TCP links), so memberlist's class of failures
where UDP probes and TCP push-pull disagree about reachability cannot happen.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from protocol.membership import (
    EventKind,
    Membership,
    MembershipDecodeError,
    Outgoing,
    decode_message,
    ed25519_signer,
    ed25519_verifier,
    encode_message,
    profile,
)
from protocol.wire import Envelope, MsgType
from spirtd.keyfiles import write_public
from spirtd.net.link import Link
from spirtd.net.transport import DialError

if TYPE_CHECKING:
    from spirtd.nodeapi import NodeApi

log = logging.getLogger("spirtd.membership")

# Messages waiting for a dial to one peer; beyond this the oldest are dropped
# (membership tolerates loss; an unbounded backlog to a dead peer would not).
MAX_PENDING_PER_PEER = 64
MAX_DIALS = 32
LEAVE_FLUSH_S = 2.0


class MembershipService:
    name = "membership"

    def __init__(self, node: NodeApi) -> None:
        self.node = node
        self.config = profile(node.config.profile)
        self.state_path = node.data.root / "membership.json"
        self.m: Membership | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._pending: dict[str, deque[bytes]] = {}
        self._dials: dict[str, asyncio.Task[None]] = {}
        self._listeners: list[Any] = []

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        node = self.node
        assert node.transport is not None
        incarnation = self._next_incarnation()
        now = time.monotonic()
        self.m = Membership(
            node.key.node_id,
            node.transport.advertise,
            self.config,
            random.Random(),
            now,
            incarnation,
            record_signer=ed25519_signer(node.key),
            record_verifier=ed25519_verifier(),
            certificate=node.certificate.encode() if node.certificate else b"",
            admission=node.admission,
            wall_offset=time.time() - now,
        )
        node.register(MsgType.MEMBERSHIP, self._on_envelope)
        if node.config.bootstrap:
            self.m.join(list(node.config.bootstrap), time.monotonic())
        log.info("membership up (profile %s, incarnation %d)", node.config.profile, incarnation)
        self._task = asyncio.create_task(self._run(), name="membership")

    def _next_incarnation(self) -> int:
        # A restart with the same identity must come back with a higher incarnation
        # than anything the cluster holds about us, so it overrides "dead".
        last = 0
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            last = int(json.loads(self.state_path.read_text())["incarnation"])
        inc = last + 1
        write_public(self.state_path, json.dumps({"incarnation": inc}).encode())
        return inc

    async def stop(self) -> None:
        if self.m is not None and self._task is not None:
            self.m.leave(time.monotonic())
            self._pump()
            # Give the "left" broadcast a moment to reach peers before links close.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(LEAVE_FLUSH_S):
                    while self.m.next_deadline() is not None and self._has_backlog():
                        await asyncio.sleep(0.05)
            await asyncio.sleep(min(LEAVE_FLUSH_S, 4 * self.config.gossip_interval))
            self._task.cancel()
        for t in list(self._dials.values()):
            t.cancel()

    def _has_backlog(self) -> bool:
        assert self.node.transport is not None
        return bool(self._pending) or any(
            link.info()["queued_frames"] for link in self.node.transport.links.values()
        )

    def add_listener(self, fn: Any) -> None:
        """fn(event: MemberEvent) for every membership change."""
        self._listeners.append(fn)

    def certificate_renewed(self, certificate: bytes) -> None:
        """Called by the node when it presents a new certificate."""
        if self.m is not None:
            self.m.set_certificate(certificate, time.monotonic())
            self._wake.set()

    # -- the loop ------------------------------------------------------------------------

    async def _run(self) -> None:
        assert self.m is not None
        while True:
            now = time.monotonic()
            self.m.tick(now)
            self._pump()
            deadline = self.m.next_deadline()
            delay = 1.0 if deadline is None else min(max(deadline - time.monotonic(), 0), 1.0)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()

    def _on_envelope(self, link: Link, env: Envelope) -> None:
        assert self.m is not None
        if env.origin != link.peer_key:
            # Membership messages are point to point; relayed claims carry their own
            # record signatures inside. A mismatch is a peer forwarding someone
            # else's envelope as its own.
            self.node.counters["membership.origin_mismatch"] += 1
            return
        if not isinstance(env.body, bytes):
            self.node.counters["membership.bad_body"] += 1
            return
        try:
            msg = decode_message(env.body)
        except MembershipDecodeError as e:
            self.node.counters[f"membership.decode.{e.reason}"] += 1
            return
        self.m.receive(link.peer_id, link.peer_addr, msg, time.monotonic())
        self._pump()
        self._wake.set()

    def _pump(self) -> None:
        assert self.m is not None
        for out in self.m.drain_outgoing():
            self._send(out)
        for ev in self.m.drain_events():
            level = (
                logging.WARNING if ev.kind in (EventKind.DEAD, EventKind.SUSPECT) else logging.INFO
            )
            log.log(
                level,
                "member %s %s at %s (incarnation %d)",
                ev.node_id,
                ev.kind.value,
                ev.addr,
                ev.incarnation,
            )
            self.node.counters[f"membership.event.{ev.kind.value}"] += 1
            for fn in self._listeners:
                fn(ev)
        for k, v in self.m.counters.items():
            self.node.counters[f"membership.{k}"] = v

    def _send(self, out: Outgoing) -> None:
        data = self.node.seal(MsgType.MEMBERSHIP, encode_message(out.message))
        transport = self.node.transport
        assert transport is not None
        if out.node_id is not None:
            link = transport.links.get(out.node_id)
            if link is not None and link.close_reason is None:
                if not link.try_send(data):
                    self.node.counters["membership.send_dropped"] += 1
                return
        key = out.node_id or out.addr
        q = self._pending.setdefault(key, deque(maxlen=MAX_PENDING_PER_PEER))
        if len(q) == q.maxlen:
            self.node.counters["membership.send_dropped"] += 1
        q.append(data)
        if key not in self._dials:
            if len(self._dials) >= MAX_DIALS:
                self.node.counters["membership.dial_throttled"] += 1
                self._pending.pop(key, None)
                return
            self._dials[key] = asyncio.create_task(self._dial(key, out.node_id, out.addr))

    async def _dial(self, key: str, node_id: str | None, addr: str) -> None:
        try:
            link = await self.node.link_to(node_id, addr)
            for data in self._pending.pop(key, ()):
                if not link.try_send(data):
                    self.node.counters["membership.send_dropped"] += 1
        except DialError as e:
            dropped = len(self._pending.pop(key, ()))
            self.node.counters["membership.send_dropped"] += dropped
            log.debug("cannot reach %s at %s: %s", node_id or "?", addr, e)
        except Exception:
            self._pending.pop(key, None)
            log.exception("dial to %s failed", addr)
        finally:
            self._dials.pop(key, None)

    # -- status --------------------------------------------------------------------------

    def members(self) -> list[dict[str, Any]]:
        assert self.m is not None
        now = time.monotonic()
        out = []
        for mem in sorted(self.m.members(), key=lambda x: x.node_id):
            is_self = mem.node_id == self.node.key.node_id
            out.append(
                {
                    "node_id": mem.node_id,
                    "address": mem.addr,
                    "state": mem.state.value,
                    "incarnation": mem.incarnation,
                    "last_heard_s": 0.0
                    if is_self
                    else (None if mem.last_heard is None else round(now - mem.last_heard, 3)),
                    "self": is_self,
                }
            )
        return out

    def status(self) -> dict[str, Any]:
        if self.m is None:
            return {}
        return {
            "members": self.members(),
            "membership": {
                "profile": self.node.config.profile,
                "incarnation": self.m.incarnation,
                "awareness": self.m.awareness,
                "live": self.m.live_count(),
            },
        }
