"""Peer links: listening, dialing, the handshake, one link per peer pair, and
reconnection.

Plain asyncio streams under uvloop, not aiohttp WebSockets: bench.link measures
both on this machine (see its `aiohttp_ws_MBps` field). Streams avoid
WebSocket framing and masking on top of our own records, and the encrypted
link then runs at the AEAD's own speed.

Before the handshake completes, records are ``u32 length || msgpack`` capped at
protocol.handshake.MAX_MESSAGE (MAX_HELLO for an inbound first message); after
it, protocol.session records.

Inbound connections are unauthenticated until their handshake completes, so
everything they can make us hold or compute is bounded (SECURITY.md): the
pending table (spirtd.net.admission) caps them in total and per source address
and drops silent ones first; the first message has a short deadline of its own;
and the responder's key work happens only for a hello that passed the cheap
checks, within a per-source budget.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import struct
import time
from collections import Counter
from collections.abc import Callable

from protocol import aead
from protocol.budget import KeyedBuckets
from protocol.errors import HandshakeError, TrustError
from protocol.handshake import (
    MAX_HELLO,
    MAX_MESSAGE,
    Handshake,
    HandshakeResult,
    ReplayCache,
    Role,
    screen_hello,
)
from protocol.identity import Certificate, NodeKey, TrustStore
from protocol.session import Session
from spirtd import logs
from spirtd.config import TransportConfig, parse_hostport
from spirtd.net.admission import Pending, PendingTable, source_key
from spirtd.net.link import Link, LinkHandler, MessageGate

log = logging.getLogger("spirtd.transport")

_LEN = struct.Struct(">I")
# The StreamReader carries only the handshake (messages of at most 4 KiB);
# after it, records.RecordReader owns the socket. The reader pauses the socket
# at 2x this, which bounds what a peer can push ahead of the switch.
_READ_LIMIT = 1 << 16


class DialError(Exception):
    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class Transport:
    def __init__(
        self,
        key: NodeKey,
        certificate: Certificate | None,
        trust: TrustStore,
        config: TransportConfig,
        handler: LinkHandler,
        *,
        counters: Counter[str],
        on_link_up: Callable[[Link], None] = lambda link: None,
        on_link_down: Callable[[Link], None] = lambda link: None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.key = key
        self.node_id = key.node_id
        self.certificate = certificate
        self.trust = trust
        self.config = config
        self.handler = handler
        self.counters = counters
        self.on_link_up = on_link_up
        self.on_link_down = on_link_down
        self.rng = rng or random.Random()
        self.links: dict[str, Link] = {}
        self.gates: list[MessageGate] = []  # see link.MessageGate; every link asks them
        self.advertise = ""
        self.listen_addr = ""
        self._server: asyncio.base_events.Server | None = None
        self.clock = clock
        self._replay = ReplayCache()
        self._pending = PendingTable(
            config.max_pending_handshakes, config.max_pending_per_source, self.rng
        )
        self._hello_work = KeyedBuckets(
            config.handshakes_per_source_s, config.handshake_burst_per_source
        )
        self._dials: dict[str, asyncio.Future[Link]] = {}
        self._backoff: dict[str, tuple[float, float]] = {}  # addr -> (retry_at, delay)
        self._tasks: set[asyncio.Task] = set()
        self._closing = False

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self, listen: str, advertise: str | None = None) -> str:
        """Binds ``listen`` (port 0 picks one) and returns the bound HOST:PORT."""
        host, port = parse_hostport(listen, "listen")
        self._server = await asyncio.start_server(
            self._on_inbound, host, port, reuse_address=True, limit=_READ_LIMIT
        )
        sock = self._server.sockets[0].getsockname()
        self.listen_addr = f"{sock[0]}:{sock[1]}"
        self.advertise = advertise or self.listen_addr
        return self.listen_addr

    async def stop(self) -> None:
        self._closing = True
        if self._server is not None:
            self._server.close()
        links = list(self.links.values())
        for link in links:
            link.close("shutdown")
        for link in links:
            await link.wait_closed(timeout=2.0)
        for t in list(self._tasks):
            t.cancel()
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2.0):
                    await self._server.wait_closed()

    def update_trust(self, trust: TrustStore) -> None:
        """Swaps the admission policy and drops links to peers it no longer admits
        (revoked, removed from the allowlist, or whose certificate expired)."""
        self.trust = trust
        now = time.time()
        for link in list(self.links.values()):
            try:
                trust.check(link.peer_key, link.peer_cert, now)
            except TrustError as e:
                self.counters[f"transport.evicted.{e.reason}"] += 1
                log.warning(
                    "dropping link to %s: %s", link.peer_id, e, extra={"peer": link.peer_id}
                )
                link.close(e.reason)

    # -- dialing -------------------------------------------------------------------------

    async def connect(self, addr: str, expected_peer: str | None = None) -> Link:
        """Returns a link to the peer at ``addr``, dialing if needed. Concurrent
        calls for one address share one dial. After a failed dial the address is
        in backoff (jittered, doubling up to reconnect_max_s): calls fail fast
        with reason ``backoff`` until it passes, so no caller can storm a dead peer."""
        if expected_peer is not None:
            existing = self.links.get(expected_peer)
            if existing is not None and existing.close_reason is None:
                return existing
        pending = self._dials.get(addr)
        if pending is not None:
            return await asyncio.shield(pending)
        retry_at, _ = self._backoff.get(addr, (0.0, 0.0))
        if time.monotonic() < retry_at:
            self.counters["transport.dial_backoff"] += 1
            raise DialError(
                "backoff", f"{addr} failed recently; next try in {retry_at - time.monotonic():.1f}s"
            )
        fut: asyncio.Future[Link] = asyncio.get_running_loop().create_future()
        self._dials[addr] = fut
        try:
            link = await self._dial(addr, expected_peer)
            self._backoff.pop(addr, None)
            fut.set_result(link)
            return link
        except BaseException as e:
            if isinstance(e, DialError):
                self._note_failure(addr)
            fut.set_exception(e)
            fut.exception()  # mark retrieved: nobody else may be waiting
            raise
        finally:
            del self._dials[addr]

    def _note_failure(self, addr: str) -> None:
        _, last = self._backoff.get(addr, (0.0, 0.0))
        delay = min(max(last * 2, self.config.reconnect_min_s), self.config.reconnect_max_s)
        # Jitter spreads a cluster's redials after a shared outage.
        self._backoff[addr] = (time.monotonic() + delay * (0.5 + self.rng.random()), delay)
        if len(self._backoff) > 4 * self.config.max_links:
            # Bounded: forget the entry whose backoff ends first.
            del self._backoff[min(self._backoff, key=lambda k: self._backoff[k][0])]

    async def _dial(self, addr: str, expected_peer: str | None) -> Link:
        host, port = parse_hostport(addr, "peer address")
        try:
            async with asyncio.timeout(self.config.dial_timeout_s):
                reader, writer = await asyncio.open_connection(host, port, limit=_READ_LIMIT)
        except (OSError, TimeoutError) as e:
            self.counters["transport.dial_failed"] += 1
            raise DialError("unreachable", f"{addr}: {e}") from None
        try:
            result = await self._handshake(reader, writer, Role.INITIATOR, expected_peer)
        except DialError:
            writer.close()
            raise
        return self._establish(reader, writer, result, outbound=True, dialed=addr)

    # -- accepting -----------------------------------------------------------------------

    async def _on_inbound(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._closing:
            writer.close()
            return
        if len(self.links) >= self.config.max_links:
            self.counters["transport.too_many_links"] += 1
            writer.close()
            return
        peer = writer.get_extra_info("peername")
        source = source_key(str(peer[0])) if peer else "?"
        entry, evicted = self._pending.admit(source, writer.transport.abort)
        for victim in evicted:
            # Bounded: the flood's silent connections go, not the newcomer.
            self.counters["handshake.evicted"] += 1
            victim.abort()
        if entry is None:
            # Every slot of this source is in a handshake past its hello.
            self.counters["transport.handshake_overload"] += 1
            writer.close()
            return
        try:
            result = await self._handshake(reader, writer, Role.RESPONDER, None, entry)
        except DialError:
            writer.close()
            return
        finally:
            self._pending.remove(entry)
        self._establish(reader, writer, result, outbound=False, dialed=None)

    # -- handshake -----------------------------------------------------------------------

    async def _handshake(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        role: Role,
        expected_peer: str | None,
        pending: Pending | None = None,
    ) -> HandshakeResult:
        peer = writer.get_extra_info("peername")
        where = f"{peer[0]}:{peer[1]}" if peer else "?"
        hs = Handshake(
            role,
            self.key,
            self.certificate,
            self.trust,
            random_bytes=os.urandom,
            now=time.time(),
            replay_cache=self._replay if role is Role.RESPONDER else None,
            expected_peer=expected_peer,
            advertise=self.advertise,
            ciphers=aead.offer(allow_aes=self.config.aes_gcm),
        )
        stage = "hello"
        try:
            async with asyncio.timeout(self.config.handshake_timeout_s):
                if role is Role.INITIATOR:
                    _write_record(writer, hs.start())
                else:
                    await self._screen_first(reader, writer, hs, pending)
                stage = "handshake"
                while not hs.complete:
                    data = await _read_record(reader)
                    reply = hs.receive(data, time.time())
                    if reply is not None:
                        _write_record(writer, reply)
                await writer.drain()
        except HandshakeError as e:
            self.counters[f"handshake.{e.reason}"] += 1
            # The detail may quote the peer (its reject reason, its cluster name).
            detail = logs.quote(e.detail)
            log.warning(
                "handshake with %s (%s) refused: %s %s",
                where,
                role.value,
                e.reason,
                detail,
                extra={"addr": where, "peer": expected_peer},
            )
            if e.reason != "rejected_by_peer":
                with contextlib.suppress(Exception):
                    _write_record(writer, Handshake.reject(e.reason))
                    async with asyncio.timeout(1.0):
                        await writer.drain()
            raise DialError(e.reason, detail) from None
        except TimeoutError:
            reason = "hello_timeout" if stage == "hello" and role is Role.RESPONDER else "timeout"
            self.counters[f"handshake.{reason}"] += 1
            log.info(
                "handshake with %s (%s) timed out (%s)",
                where,
                role.value,
                reason,
                extra={"addr": where, "peer": expected_peer},
            )
            raise DialError("handshake_timeout") from None
        except (asyncio.IncompleteReadError, ConnectionError, OSError) as e:
            if pending is not None and pending.evicted:
                raise DialError("evicted") from None  # counted when evicted
            self.counters["handshake.connection_lost"] += 1
            raise DialError("connection_lost", logs.sanitize(str(e))) from None
        assert hs.result is not None
        return hs.result

    async def _screen_first(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        hs: Handshake,
        pending: Pending | None,
    ) -> None:
        """The responder's first step: the hello within its own short deadline,
        the cheap checks, the per-source work budget, and only then the key work."""
        async with asyncio.timeout(self.config.hello_timeout_s):
            data = await _read_record(reader, MAX_HELLO)
        now = time.time()
        screen_hello(data, self.trust.cluster, now)
        if pending is not None:
            self._pending.said_hello(pending)
            if not self._hello_work.try_take(pending.source, 1, self.clock()):
                raise HandshakeError("handshake_rate", "too many handshakes from this address")
        reply = hs.receive(data, now)
        if reply is not None:
            _write_record(writer, reply)

    def _establish(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        result: HandshakeResult,
        *,
        outbound: bool,
        dialed: str | None,
    ) -> Link:
        session = Session(
            result.send_key,
            result.recv_key,
            cipher_name=result.cipher,
            max_payload=max(self.config.stream_chunk_bytes, 1 << 20) + 1024,
            rekey_every=self.config.rekey_every_frames,
        )
        link = Link(
            reader,
            writer,
            session,
            result,
            outbound=outbound,
            initiator_id=self.node_id if outbound else result.peer_id,
            dialed_addr=dialed,
            config=self.config,
            handler=self.handler,
            counters=self.counters,
            clock=self.clock,
            gates=self.gates,
        )
        link.start()
        keep = self._register(link)
        task = asyncio.create_task(self._watch(link))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return keep

    def _register(self, link: Link) -> Link:
        """One link per peer pair. When both sides dial at once, both keep the
        link dialed by the smaller node id, so they agree without talking."""
        existing = self.links.get(link.peer_id)
        if existing is not None and existing.close_reason is None:
            if existing.initiator_id != link.initiator_id:
                winner = min(self.node_id, link.peer_id)
                if link.initiator_id != winner:
                    self.counters["transport.duplicate_link"] += 1
                    link.close("duplicate")
                    return existing
            self.counters["transport.duplicate_link"] += 1
            existing.close("replaced")
        self.links[link.peer_id] = link
        self.counters["transport.links_opened"] += 1
        log.info(
            "link up: %s at %s (%s, %s, %s, session %s)",
            link.peer_id,
            logs.quote(link.peer_addr),  # the address the peer says it listens on
            "outbound" if link.outbound else "inbound",
            link.admitted_by,
            link.session.cipher_name,
            link.session_id,
            extra={"peer": link.peer_id},
        )
        self.on_link_up(link)
        return link

    async def _watch(self, link: Link) -> None:
        await link.closed.wait()
        if self.links.get(link.peer_id) is link:
            del self.links[link.peer_id]
            log.info(
                "link down: %s (%s)",
                link.peer_id,
                logs.sanitize(link.close_reason or ""),
                extra={"peer": link.peer_id},
            )
            self.on_link_down(link)


def _write_record(writer: asyncio.StreamWriter, payload: bytes) -> None:
    writer.write(_LEN.pack(len(payload)) + payload)


async def _read_record(reader: asyncio.StreamReader, limit: int = MAX_MESSAGE) -> bytes:
    (n,) = _LEN.unpack(await reader.readexactly(4))
    if n > limit:
        raise HandshakeError("handshake_oversized", f"{n} bytes > {limit}")
    return await reader.readexactly(n)
