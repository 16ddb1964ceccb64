"""Drives many membership machines over the simulated network and records what
they conclude, next to the ground truth, so scenarios can check it.

Ground truth: a host that is up or paused is alive (a paused node is slow, not
dead); a crashed host is dead; a host that called ``leave`` has left.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field

from ..membership import (
    EventKind,
    MemberEvent,
    Membership,
    MembershipConfig,
    MemberState,
    SharedView,
    decode_message,
    encode_message,
)
from ..membership.messages import Alive, message_size
from ..membership.state import Entry
from .host import Host, HostState
from .loop import EventLoop
from .network import Codec, Network
from .signing import SimKeys

BASE_PORT = 10000


def node_name(i: int) -> str:
    return f"n{i:05d}"


def node_addr(i: int, generation: int = 0) -> str:
    # Only a label: nothing is ever bound. Loopback-looking so it passes the decoder.
    return f"127.0.{generation}.1:{BASE_PORT + i}"


@dataclass
class FalseDead:
    at: float
    observer: str
    subject: str


@dataclass
class Observations:
    """What the machines reported, gathered from their events."""

    dead_at: dict[str, dict[str, float]] = field(default_factory=dict)  # subject -> observer -> t
    left_at: dict[str, dict[str, float]] = field(default_factory=dict)
    joined_at: dict[str, dict[str, float]] = field(default_factory=dict)  # watched subjects
    watch: set[str] = field(default_factory=set)
    suspected: Counter[str] = field(default_factory=Counter)  # subject -> suspicions raised
    false_dead: list[FalseDead] = field(default_factory=list)
    events: Counter[str] = field(default_factory=Counter)


class MembershipCluster:
    """N membership machines on one simulated network.

    ``converged=True`` starts every machine from one shared converged view (every
    node alive at incarnation 0), which is how large N are set up cheaply;
    otherwise machines start alone and must ``join``.
    """

    def __init__(
        self,
        n: int,
        config: MembershipConfig,
        *,
        seed: int = 1,
        latency: float = 0.001,
        jitter: float = 0.0005,
        loss: float = 0.0,
        wire: bool = False,
        measure_bytes: bool = True,
        signed: bool = True,
        converged: bool = False,
        view_size: int | None = None,
        started: bool = True,
    ) -> None:
        """``view_size`` (with ``converged``): only the first view_size nodes share
        the converged view and start; the rest start alone, unstarted, to ``join``."""
        self.n = n
        self.config = config
        self.seed = seed
        self.loop = EventLoop()
        self._rng = random.Random(f"net/{seed}")
        codec = Codec(encode_message, decode_message) if wire else None
        self.net = Network(
            self.loop,
            self._rng,
            latency=latency,
            jitter=jitter,
            loss=loss,
            codec=codec,
            size_of=message_size if measure_bytes and not wire else None,
        )
        self.keys = SimKeys(f"sim/{seed}".encode()) if signed else None
        self._verifier = self.keys.verifier() if self.keys is not None else None
        self.obs = Observations()
        self.hosts: list[Host] = []
        self.index: dict[str, int] = {}
        self.left: set[str] = set()
        self._generation: dict[str, int] = {}
        in_view = n if view_size is None else view_size
        view = self._converged_view(in_view) if converged else None
        for i in range(n):
            nid = node_name(i)
            self.index[nid] = i
            m = self._machine(i, nid, node_addr(i), 0, view if i < in_view else None)
            self.hosts.append(Host(self.net, nid, node_addr(i), m, self._after))
        if started:
            for h in self.hosts[:in_view]:
                h.start()

    # --- construction -----------------------------------------------------------------

    def _machine(
        self, i: int, nid: str, addr: str, incarnation: int, view: SharedView | None
    ) -> Membership:
        gen = self._generation.get(nid, 0)
        return Membership(
            nid,
            addr,
            self.config,
            random.Random(f"node/{self.seed}/{i}/{gen}"),
            self.loop.now,
            incarnation,
            record_signer=self.keys.signer(nid) if self.keys is not None else None,
            record_verifier=self._verifier,
            view=view,
        )

    def _converged_view(self, n: int) -> SharedView:
        entries: dict[str, Entry] = {}
        for i in range(n):
            nid = node_name(i)
            rec = Alive(nid, node_addr(i), 0)
            if self.keys is not None:
                from ..membership.signing import record_bytes

                rec = Alive(nid, rec.addr, 0, self.keys.signer(nid)(record_bytes(rec)))
            entries[nid] = Entry(rec, MemberState.ALIVE, None, 0.0)
        return SharedView(entries)

    # --- observation ------------------------------------------------------------------

    def _after(self, host: Host) -> None:
        events = host.machine.drain_events()  # type: ignore[attr-defined]
        if events:
            self._observe(host, events)

    def _observe(self, host: Host, events: list[MemberEvent]) -> None:
        obs = self.obs
        for ev in events:
            kind = ev.kind
            obs.events[kind] += 1  # a StrEnum: counted under its plain string value
            if kind is EventKind.JOINED and not obs.watch:
                continue
            if kind is EventKind.DEAD:
                per = obs.dead_at.setdefault(ev.node_id, {})
                per.setdefault(host.node_id, ev.at)
                if self.is_live(ev.node_id):
                    obs.false_dead.append(FalseDead(ev.at, host.node_id, ev.node_id))
            elif kind is EventKind.SUSPECT:
                obs.suspected[ev.node_id] += 1
            elif kind is EventKind.LEFT:
                obs.left_at.setdefault(ev.node_id, {}).setdefault(host.node_id, ev.at)
            elif kind is EventKind.JOINED and ev.node_id in obs.watch:
                obs.joined_at.setdefault(ev.node_id, {}).setdefault(host.node_id, ev.at)

    def is_live(self, node_id: str) -> bool:
        i = self.index.get(node_id)
        if i is None or node_id in self.left:
            return False
        return self.hosts[i].state is not HostState.CRASHED

    # --- control ----------------------------------------------------------------------

    @property
    def now(self) -> float:
        return self.loop.now

    def machine(self, i: int) -> Membership:
        return self.hosts[i].machine  # type: ignore[return-value]

    def run(self, until: float) -> float:
        return self.loop.run(until)

    def run_for(self, duration: float) -> float:
        return self.loop.run(self.loop.now + duration)

    def join(self, i: int, seed_indices: list[int], at: float | None = None) -> None:
        addrs = [self.hosts[j].addr for j in seed_indices]

        def do(_: object) -> None:
            h = self.hosts[i]
            if h.up:
                h.machine.join(addrs, self.loop.now)  # type: ignore[attr-defined]
                h.start()

        if at is None:
            do(None)
        else:
            self.loop.schedule(at, do)

    def crash(self, i: int) -> None:
        self.hosts[i].crash()

    def pause(self, i: int, duration: float) -> None:
        self.hosts[i].pause(duration)

    def leave(self, i: int) -> None:
        h = self.hosts[i]
        self.left.add(h.node_id)
        h.machine.leave(self.loop.now)  # type: ignore[attr-defined]
        h.start()

    def restart(self, i: int, *, new_address: bool = False, seeds: list[int] | None = None) -> None:
        """Restarts node i as a fresh process with the same identity (incarnation 0,
        empty table), optionally on a new address, joining through ``seeds``."""
        h = self.hosts[i]
        nid = h.node_id
        gen = self._generation.get(nid, 0) + 1
        self._generation[nid] = gen
        self.left.discard(nid)
        addr = node_addr(i, gen) if new_address else h.addr
        m = self._machine(i, nid, addr, 0, None)
        h.restart(m, addr)
        if seeds:
            self.join(i, seeds)

    def partition(self, groups: list[list[int]], heal_after: float | None = None) -> None:
        self.net.partition([[node_name(i) for i in g] for g in groups], heal_after)

    def heal(self) -> None:
        self.net.heal()

    # --- views ------------------------------------------------------------------------

    def live_indices(self) -> list[int]:
        return [i for i, h in enumerate(self.hosts) if self.is_live(h.node_id)]

    def one_view(self) -> bool:
        """Every live node holds exactly the live nodes as alive, nothing else as
        alive or suspect."""
        live = self.live_indices()
        n = len(live)
        for i in live:
            m = self.machine(i)
            if m.count(MemberState.ALIVE) != n or m.count(MemberState.SUSPECT) != 0:
                return False
        return True

    def dead_everywhere(self, subject: int) -> bool:
        nid = node_name(subject)
        seen = self.obs.dead_at.get(nid, {})
        return all(self.hosts[i].node_id in seen for i in self.live_indices() if i != subject)

    def messages_by_kind(self) -> dict[str, int]:
        return dict(self.net.sent_by_kind)
