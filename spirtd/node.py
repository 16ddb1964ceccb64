"""The node: one spirtd process. It owns the identity, the transport, the
control API and the services, and routes envelopes and streams between the
transport and the services. It implements ``spirtd.nodeapi.NodeApi``, the only
view of it that services get."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import time
from collections import Counter
from typing import Any

from protocol import strictpack, wire
from protocol.errors import DecodeError
from protocol.identity import Admission, Certificate, node_id
from protocol.wire import MsgType
from spirtd import __version__, logs, rules, services
from spirtd.config import Config, ConfigError
from spirtd.control.api import ApiServer
from spirtd.keyfiles import DataDir, KeyFileError, load_or_create_key
from spirtd.metrics import LinkBytes
from spirtd.net.link import Link, StreamSink
from spirtd.net.startup_hold import StartupHold
from spirtd.net.transport import Transport
from spirtd.nodeapi import EnvelopeHandler, LinkListener, StreamHandler
from spirtd.redis.module import ModuleNotBuilt

log = logging.getLogger("spirtd.node")

_STREAM_META_LIMITS = strictpack.Limits(max_size=4096, max_depth=2, max_items=4, max_str=64)
# Revocation lists due for their next update within this long are warned about,
# at most once per CRL_WARN_EVERY_S.
CRL_WARN_BEFORE_S = 7 * 86400.0
CRL_WARN_EVERY_S = 3600.0


class Node:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.data = DataDir(config.data_dir)
        self.counters: Counter[str] = Counter()
        self.started_at = time.time()
        self._envelope_handlers: dict[MsgType, EnvelopeHandler] = {}
        # Envelopes for services not started yet (see startup_hold.py).
        self._early: StartupHold[tuple[Link, wire.Envelope]] = StartupHold()
        self._stream_handlers: dict[str, StreamHandler] = {}
        # Bytes over peer links, closed links included: metrics and each round's record.
        self.link_bytes = LinkBytes()
        self._link_listeners: list[LinkListener] = [self.link_bytes.on_link]
        # Receivers keep per-origin sequence windows, so a restarted node must not
        # reuse old numbers: start from the clock in microseconds, then count up.
        self._seq = int(time.time() * 1_000_000)
        self._stop = asyncio.Event()
        self._lock_fd: int | None = None
        self.transport: Transport | None = None
        self.api: ApiServer | None = None
        self.services: list[services.Service] = []
        self._crl_warned_at = -float("inf")

    # -- startup -------------------------------------------------------------------------

    def _prepare(self) -> None:
        """Everything that can fail on misconfiguration, before any socket opens."""
        try:
            self.data.ensure()
        except OSError as e:
            raise ConfigError(f"data_dir: cannot create {self.data.root}: {e.strerror}") from None
        self._lock_data_dir()
        try:
            # Before any service starts: the Redis ACL and job checks read the registry.
            rules.load_modules(self.config.rule_modules)
        except ValueError as e:
            raise ConfigError(f"rule_modules: {e}") from None
        self.key, created = load_or_create_key(self.data.key_path)
        logs.bind(node=self.key.node_id)  # every later log line names this node
        if created:
            log.info("created a new node identity in %s", self.data.key_path)
        self.certificate = self.data.certificate()
        self.data.check_trust_writable()
        self.trust = self.data.trust_store(self.config.cluster)
        # Shared by every service that judges identities carried inside messages.
        self.admission = Admission(self.trust)
        self._warn_stale_crls(time.time())
        if self.certificate is not None and self.certificate.public_key != self.key.public_key:
            raise ConfigError(f"data_dir: {self.data.cert_path} is for another key than node.key")
        if not self.trust.ca_keys and not self.trust.allowlist:
            log.warning(
                "admission is closed: no trusted CA and an empty allowlist, so no peer can "
                "join (see `spirtctl ca enroll` and `spirtctl trust`)"
            )

    def _lock_data_dir(self) -> None:
        path = self.data.root / "spirtd.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError(f"data_dir: {self.data.root} is in use by another spirtd") from None
        self._lock_fd = fd

    async def run(self) -> int:
        # Handlers go in before anything can announce the node: a supervisor (or a test)
        # may SIGTERM as soon as the identity lines appear, and that must be a graceful
        # stop, not death by the default handler. A stop asked for during start-up is
        # honoured once start-up is done.
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        # SIGHUP before start-up ends has nothing to reload: start-up reads the trust dir.
        loop.add_signal_handler(signal.SIGHUP, lambda: self.api is not None and self.reload_trust())
        self._prepare()
        self.transport = Transport(
            self.key,
            self.certificate,
            self.trust,
            self.config.transport,
            self,
            counters=self.counters,
            on_link_up=self._on_link_up,
            on_link_down=self._on_link_down,
        )
        try:
            listen = await self.transport.start(self.config.listen, self.config.advertise)
        except OSError as e:
            raise ConfigError(
                f"listen: cannot listen on {self.config.listen}: {e.strerror}"
            ) from None
        self.api = ApiServer(self, self.data.api_socket)
        self.services = services.build(self)
        started: list[services.Service] = []
        try:
            for svc in self.services:
                await svc.start()
                started.append(svc)
        except BaseException:
            for svc in reversed(started):
                with contextlib.suppress(Exception):
                    await svc.stop()
            await self.transport.stop()
            raise
        self._release_early()
        await self.api.start()

        # The first lines of output identify the node (INTERFACES.md).
        logs.identity(
            {"node_id": self.key.node_id, "listen": listen, "public_key": self.key.public_key.hex()}
        )
        log.info("spirtd %s up: node %s listening on %s", __version__, self.key.node_id, listen)

        trust_task = asyncio.create_task(self._trust_refresher())

        await self._stop.wait()
        log.info("shutting down")
        trust_task.cancel()
        for svc in reversed(self.services):
            try:
                await svc.stop()
            except Exception:
                log.exception("stopping %s failed", svc.name)
        await self.transport.stop()
        await self.api.stop()
        log.info("stopped")
        return 0

    def request_stop(self) -> None:
        self._stop.set()

    # -- trust ---------------------------------------------------------------------------

    def reload_trust(self) -> None:
        self._reload_certificate()
        try:
            trust = self.data.trust_store(self.config.cluster)
        except Exception as e:  # keep the old policy rather than die on a bad edit
            log.error("trust reload failed, keeping the current policy: %s", e)
            return
        self.trust = trust
        self.admission.update(trust)
        if self.transport is not None:
            self.transport.update_trust(trust)

    def _reload_certificate(self) -> None:
        """Presents a renewed node.cert on new handshakes, without a restart. A file
        that is unreadable, gone or for another key leaves the current one in use."""
        try:
            cert = self.data.certificate()
        except KeyFileError as e:
            log.error("keeping the current certificate: %s", e)
            return
        if cert is None or cert == self.certificate:
            return
        if cert.public_key != self.key.public_key:
            log.error(
                "keeping the current certificate: %s is for another key than node.key",
                self.data.cert_path,
            )
            return
        self.certificate = cert
        if self.transport is not None:
            self.transport.certificate = cert
        for svc in self.services:
            renewed = getattr(svc, "certificate_renewed", None)
            if renewed is not None:
                renewed(cert.encode())
        log.info(
            "presenting certificate serial %d from CA %s on new handshakes (expires %s)",
            cert.serial,
            node_id(cert.issuer),
            time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(cert.expires_at)),
        )

    def _warn_stale_crls(self, now: float) -> None:
        if now - self._crl_warned_at < CRL_WARN_EVERY_S:
            return
        stale = self.trust.stale_crls(now, CRL_WARN_BEFORE_S)
        if stale:
            self._crl_warned_at = now
        for crl, left in stale:
            ca = node_id(crl.issuer)
            if left < 0:
                log.error(
                    "the revocation list of CA %s (v%d) is %.1f days past its next update; it is "
                    "still enforced, but revocations issued since may be missing: install a "
                    "newer one in %s",
                    ca,
                    crl.version,
                    -left / 86400,
                    self.data.crl_path,
                )
            else:
                log.warning(
                    "the revocation list of CA %s (v%d) is due for its next update in %.1f days; "
                    "issue one with `spirtctl ca revoke` and install it in %s",
                    ca,
                    crl.version,
                    left / 86400,
                    self.data.crl_path,
                )

    async def _trust_refresher(self) -> None:
        """Picks up revocations, allowlist and CA edits and a renewed node.cert, and
        expires certificates, without a restart."""

        watched = (
            self.data.cert_path,
            self.data.ca_pub_path,
            self.data.allowlist_path,
            self.data.crl_path,
        )

        def stamp() -> tuple:
            out = []
            for p in watched:
                with contextlib.suppress(OSError):
                    st = p.stat()
                    # Atomic replacement (a new inode) within one mtime tick counts too.
                    out.append((p, st.st_mtime_ns, st.st_ino, st.st_size))
            return tuple(out)

        last = stamp()
        while True:
            await asyncio.sleep(2.0)
            now = stamp()
            if now != last:
                last = now
                log.info("trust material changed on disk; reloading")
                self.reload_trust()
            elif self.transport is not None:
                self.transport.update_trust(self.trust)  # catches certificate expiry
            self._warn_stale_crls(time.time())

    # -- transport callbacks -------------------------------------------------------------

    def register(self, msg_type: MsgType, handler: EnvelopeHandler) -> None:
        self._envelope_handlers[msg_type] = handler

    def register_stream(self, kind: str, handler: StreamHandler) -> None:
        self._stream_handlers[kind] = handler

    def add_link_listener(self, listener: LinkListener) -> None:
        self._link_listeners.append(listener)

    def wire_bytes(self) -> tuple[int, int]:
        """(in, out): every byte this node's peer links have carried so far."""
        live = self.transport.links.values() if self.transport is not None else ()
        return self.link_bytes.totals(live)

    def seal(self, msg_type: MsgType, body: Any) -> bytes:
        """Signs ``body`` as an envelope from this node, with a fresh sequence number."""
        self._seq += 1
        self.counters[f"wire.out.{msg_type.name.lower()}"] += 1
        return wire.seal(self.key, msg_type, self._seq, int(time.time() * 1000), body)

    @staticmethod
    def stream_meta(kind: str, header: bytes) -> bytes:
        """The meta a stream sender passes to Link.send_stream for ``kind`` streams."""
        return strictpack.pack([kind, header])

    async def link_to(self, peer_id: str | None, addr: str) -> Link:
        """The link to a peer, dialing ``addr`` if there is none (raises DialError)."""
        assert self.transport is not None
        if peer_id is not None:
            link = self.transport.links.get(peer_id)
            if link is not None and link.close_reason is None:
                return link
        return await self.transport.connect(addr, expected_peer=peer_id)

    def on_message(self, link: Link, data: bytes) -> None:
        env = wire.decode_counted(data, self.counters)
        if env is None:
            return
        if env.type not in self._envelope_handlers and self._early.hold((link, env), len(data)):
            self.counters["wire.held_at_start"] += 1
            return
        self._dispatch(link, env)

    def _dispatch(self, link: Link, env: wire.Envelope) -> None:
        handler = self._envelope_handlers.get(env.type)
        if handler is None:
            self.counters["wire.unhandled_type"] += 1
            return
        self.counters[f"wire.in.{env.type.name.lower()}"] += 1
        handler(link, env)

    def _release_early(self) -> None:
        """Every service is up: what came for them meanwhile, in arrival order."""
        if self._early.dropped:
            log.warning(
                "%d messages that came during start-up were dropped: over the %d bytes held",
                self._early.dropped,
                self._early.max_bytes,
            )
        for link, env in self._early.release():
            self._dispatch(link, env)

    def on_stream(self, link: Link, stream: int, total: int, meta: bytes) -> StreamSink | None:
        try:
            obj = strictpack.unpack(meta, _STREAM_META_LIMITS)
        except DecodeError:
            obj = None
        if not (
            isinstance(obj, list)
            and len(obj) == 2
            and isinstance(obj[0], str)
            and isinstance(obj[1], bytes)
        ):
            self.counters["stream.bad_meta"] += 1
            return None
        handler = self._stream_handlers.get(obj[0])
        if handler is None:
            self.counters["stream.unhandled_kind"] += 1
            return None
        return handler(link, total, obj[1])

    def _on_link_up(self, link: Link) -> None:
        # The handshake verified this certificate: identities it vouches for inside
        # messages then need no signature check of their own.
        self.admission.learn(link.peer_cert, time.time())
        for listener in self._link_listeners:
            listener(link, True)

    def _on_link_down(self, link: Link) -> None:
        for listener in self._link_listeners:
            listener(link, False)

    # -- status --------------------------------------------------------------------------

    def members(self) -> list[dict[str, Any]]:
        for svc in self.services:
            if svc.name == "membership":
                return svc.members()  # type: ignore[attr-defined]
        return self._linked_members()

    def _linked_members(self) -> list[dict[str, Any]]:
        me = {
            "node_id": self.key.node_id,
            "address": self.transport.advertise if self.transport else self.config.listen,
            "state": "alive",
            "incarnation": 0,
            "last_heard_s": 0.0,
            "self": True,
        }
        out = [me]
        if self.transport is not None:
            for link in sorted(self.transport.links.values(), key=lambda k: k.peer_id):
                info = link.info()
                out.append(
                    {
                        "node_id": link.peer_id,
                        "address": link.peer_addr,
                        "state": "alive",
                        "incarnation": 0,
                        "last_heard_s": info["last_heard_s"],
                        "self": False,
                    }
                )
        return out

    def status(self) -> dict[str, Any]:
        out = self._base_status()
        for svc in self.services:
            out.update(svc.status())
        return out

    def _base_status(self) -> dict[str, Any]:
        return {
            "node_id": self.key.node_id,
            "address": self.transport.advertise if self.transport else self.config.listen,
            "public_key": self.key.public_key.hex(),
            "cluster": self.trust.cluster,
            "version": __version__,
            "uptime_s": round(time.time() - self.started_at, 3),
            "members": self._linked_members(),
            "certificate": _cert_info(self.certificate),
            "links": [
                {**link.info(), "certificate": _cert_info(link.peer_cert)}
                for link in self.transport.links.values()
            ]
            if self.transport
            else [],
            "training": {
                "job": None,
                "state": "idle",
                "round": 0,
                "model_digest": None,
                "loss": None,
                "accuracy": None,
            },
            "counters": dict(sorted(self.counters.items())),
        }


def _cert_info(cert: Certificate | None) -> dict[str, Any] | None:
    if cert is None:
        return None
    return {"serial": cert.serial, "issuer": node_id(cert.issuer), "expires_at": cert.expires_at}


def main_async(config: Config) -> int:
    import uvloop

    node = Node(config)
    try:
        return uvloop.run(node.run())
    except (ConfigError, ModuleNotBuilt) as e:
        logs.fatal(str(e))
        return 78  # EX_CONFIG: systemd will not hammer-restart on a config error
    finally:
        # The loop and its handlers are gone but the interpreter still has to wind
        # down; a repeated SIGTERM (an impatient supervisor) must not turn a clean
        # shutdown into death by signal.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
