"""The simulator's protocol-agnostic core: event loop, network model, hosts."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import pytest

from protocol.sim.host import Host, HostState
from protocol.sim.loop import EventLoop
from protocol.sim.network import Codec, Network


def test_events_run_in_time_then_scheduling_order() -> None:
    loop = EventLoop()
    seen: list[str] = []
    loop.schedule(2.0, seen.append, "c")
    loop.schedule(1.0, seen.append, "a")
    loop.schedule(1.0, seen.append, "b")
    loop.schedule(5.0, seen.append, "late")
    assert loop.run(3.0) == 3.0
    assert seen == ["a", "b", "c"]
    assert loop.pending() == 1
    loop.run(10.0)
    assert seen[-1] == "late" and loop.now == 10.0


def test_past_events_run_now_and_stop_interrupts() -> None:
    loop = EventLoop(start=5.0)
    seen: list[float] = []
    loop.schedule(1.0, lambda _: seen.append(loop.now))
    loop.schedule(6.0, lambda _: loop.stop())
    loop.schedule(7.0, lambda _: seen.append(loop.now))
    loop.run(100.0)
    assert seen == [5.0] and loop.now == 6.0
    loop.run(100.0)
    assert seen == [5.0, 7.0]


def test_every_repeats() -> None:
    loop = EventLoop()
    ticks: list[float] = []
    loop.every(0.5, ticks.append)
    loop.run(2.0)
    assert ticks == [0.0, 0.5, 1.0, 1.5, 2.0]
    with pytest.raises(ValueError):
        loop.every(0, ticks.append)


@dataclass
class Out:
    node_id: str | None
    addr: str
    message: Any


class Echo:
    """A minimal machine: answers "ping" with "pong"; sends what it is told to."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.got: list[tuple[float, str, Any]] = []
        self.out: list[Out] = []
        self.wake_at: float | None = None
        self.ticks: list[float] = []

    def receive(self, sender_id: str, sender_addr: str, message: Any, now: float) -> None:
        self.got.append((now, sender_id, message))
        if message == "ping":
            self.out.append(Out(sender_id, sender_addr, "pong"))

    def tick(self, now: float) -> None:
        self.ticks.append(now)
        if self.wake_at is not None and now >= self.wake_at:
            self.wake_at = None

    def drain_outgoing(self) -> list[Out]:
        out, self.out = self.out, []
        return out

    def next_deadline(self) -> float | None:
        return self.wake_at


def _net(**kw: Any) -> tuple[EventLoop, Network, dict[str, Host]]:
    loop = EventLoop()
    net = Network(loop, random.Random(7), **kw)
    hosts = {n: Host(net, n, f"127.0.0.1:{9000 + i}", Echo(n)) for i, n in enumerate("abc")}
    return loop, net, hosts


def _send(host: Host, to: Host, msg: Any, node_id: str | None = "auto") -> None:
    host.machine.out.append(Out(to.node_id if node_id == "auto" else node_id, to.addr, msg))  # type: ignore[attr-defined]
    host.start()


def test_latency_and_jitter_bound_delivery() -> None:
    loop, _, h = _net(latency=0.010, jitter=0.005)
    for _ in range(200):
        _send(h["a"], h["b"], "x")
    loop.run(1.0)
    times = [t for t, _, _ in h["b"].machine.got]  # type: ignore[attr-defined]
    assert len(times) == 200
    assert min(times) >= 0.010 and max(times) <= 0.015
    assert max(times) - min(times) > 0.003  # jitter is really applied


def test_loss_rate_is_applied() -> None:
    loop, net, h = _net(loss=0.2)
    for _ in range(5000):
        _send(h["a"], h["b"], "x")
    loop.run(1.0)
    got = len(h["b"].machine.got)  # type: ignore[attr-defined]
    assert 3800 < got < 4200
    assert net.dropped["loss"] == 5000 - got


def test_partition_blocks_until_healed() -> None:
    loop, net, h = _net()
    net.partition([["a"], ["b"]], heal_after=1.0)
    _send(h["a"], h["b"], "blocked")
    _send(h["a"], h["c"], "blocked too")  # c is in the implicit third group
    loop.run(0.5)
    assert net.partitioned("a", "b") and net.partitioned("a", "c")
    assert not h["b"].machine.got and not h["c"].machine.got  # type: ignore[attr-defined]
    loop.run(1.5)
    _send(h["a"], h["b"], "through")
    loop.run(2.0)
    assert [m for _, _, m in h["b"].machine.got] == ["through"]  # type: ignore[attr-defined]
    assert net.dropped["partition"] == 2


def test_wrong_identity_and_unknown_address_are_dropped() -> None:
    loop, net, h = _net()
    _send(h["a"], h["b"], "x", node_id="someone-else")
    h["a"].machine.out.append(Out(None, "127.0.0.1:1", "x"))  # type: ignore[attr-defined]
    h["a"].start()
    _send(h["a"], h["b"], "by address", node_id=None)
    loop.run(1.0)
    assert net.dropped["wrong_identity"] == 1 and net.dropped["no_host"] == 1
    assert [m for _, s, m in h["b"].machine.got] == ["by address"]  # type: ignore[attr-defined]


def test_replies_flow_back_with_authenticated_sender() -> None:
    loop, _, h = _net()
    _send(h["a"], h["b"], "ping")
    loop.run(1.0)
    assert [(s, m) for _, s, m in h["a"].machine.got] == [("b", "pong")]  # type: ignore[attr-defined]


def test_crash_drops_and_restart_revives() -> None:
    loop, net, h = _net()
    h["b"].crash()
    _send(h["a"], h["b"], "lost")
    loop.run(1.0)
    assert net.dropped["crashed"] == 1
    fresh = Echo("b")
    h["b"].restart(fresh, addr="127.0.0.1:9999")
    _send(h["a"], h["b"], "ping")
    loop.run(2.0)
    assert [m for _, _, m in fresh.got] == ["ping"]
    assert h["b"].state is HostState.UP and net.hosts["127.0.0.1:9999"] is h["b"]


def test_pause_queues_messages_and_delays_timers() -> None:
    loop, _, h = _net()
    b = h["b"].machine
    b.wake_at = 0.5  # type: ignore[attr-defined]
    h["b"].start()
    h["b"].pause(2.0)
    _send(h["a"], h["b"], "ping")
    loop.run(1.9)
    assert b.got == [] and b.ticks == []  # type: ignore[attr-defined]
    assert h["b"].state is HostState.PAUSED
    loop.run(3.0)
    # On resume the backlog is read first, then the overdue timer fires, both late.
    assert [(t, m) for t, _, m in b.got] == [(2.0, "ping")]  # type: ignore[attr-defined]
    assert b.ticks and b.ticks[0] == 2.0  # type: ignore[attr-defined]
    assert [m for _, _, m in h["a"].machine.got] == ["pong"]  # type: ignore[attr-defined]


def test_codec_round_trips_and_counts_bytes() -> None:
    loop = EventLoop()
    net = Network(loop, random.Random(1), codec=Codec(lambda m: m.encode(), lambda b: b.decode()))
    a = Host(net, "a", "127.0.0.1:1", Echo("a"))
    b = Host(net, "b", "127.0.0.1:2", Echo("b"))
    _send(a, b, "ping")
    loop.run(1.0)
    assert net.bytes_sent == len("ping") + len("pong")
    assert [m for _, _, m in a.machine.got] == ["pong"]  # type: ignore[attr-defined]


def test_bad_bytes_are_counted_not_fatal() -> None:
    loop = EventLoop()

    def decode(b: bytes) -> str:
        raise ValueError("garbage")

    net = Network(loop, random.Random(1), codec=Codec(lambda m: m.encode(), decode))
    a = Host(net, "a", "127.0.0.1:1", Echo("a"))
    b = Host(net, "b", "127.0.0.1:2", Echo("b"))
    _send(a, b, "ping")
    loop.run(1.0)
    assert net.dropped["decode:ValueError"] == 1 and b.machine.got == []  # type: ignore[attr-defined]


def test_network_refuses_nonsense_parameters() -> None:
    with pytest.raises(ValueError):
        Network(EventLoop(), random.Random(1), loss=1.5)
    with pytest.raises(ValueError):
        Network(EventLoop(), random.Random(1), latency=-1)
