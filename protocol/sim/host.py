"""A simulated host running one sans-IO protocol machine.

Any machine with the project's shape works: ``receive(sender_id, sender_addr,
message, now)``, ``tick(now)``, ``drain_outgoing()`` (items with ``node_id``,
``addr``, ``message``) and ``next_deadline()``. A host can crash (drops
everything), be paused (a GC pause or CPU starvation: messages queue up unread
and timers do not run; on resume the backlog is read, then timers fire late),
and be restarted with a new machine.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum
from typing import Any, Protocol

from .loop import EventLoop
from .network import Network


class Machine(Protocol):
    def receive(self, sender_id: str, sender_addr: str, message: Any, now: float) -> None: ...
    def tick(self, now: float) -> None: ...
    def drain_outgoing(self) -> list[Any]: ...
    def next_deadline(self) -> float | None: ...


class HostState(Enum):
    UP = "up"
    PAUSED = "paused"
    CRASHED = "crashed"


class Host:
    __slots__ = (
        "_backlog",
        "_epoch",
        "_tick_at",
        "addr",
        "after",
        "loop",
        "machine",
        "net",
        "node_id",
        "state",
    )

    def __init__(
        self,
        net: Network,
        node_id: str,
        addr: str,
        machine: Machine,
        after: Callable[[Host], None] | None = None,
    ) -> None:
        self.net = net
        self.loop: EventLoop = net.loop
        self.node_id = node_id
        self.addr = addr
        self.machine = machine
        self.after = after  # called after every activation (e.g. to drain events)
        self.state = HostState.UP
        self._tick_at: float | None = None
        self._backlog: list[tuple[str, str, Any]] = []
        self._epoch = 0  # bumped on crash/restart so stale timers are ignored
        net.attach(self)

    @property
    def up(self) -> bool:
        return self.state is HostState.UP

    # --- driving the machine ----------------------------------------------------------

    def start(self) -> None:
        self._flush()

    def deliver(self, item: tuple[str, str, Any]) -> None:
        state = self.state
        if state is not HostState.UP:
            if state is HostState.PAUSED:
                self._backlog.append(item)
            else:
                self.net.dropped["crashed"] += 1
            return
        sender_id, sender_addr, payload = item
        codec = self.net.codec
        if codec is not None:
            try:
                payload = codec.decode(payload)
            except Exception as e:  # a decoder bug must be visible, not fatal to the run
                self.net.dropped[f"decode:{type(e).__name__}"] += 1
                return
        self.machine.receive(sender_id, sender_addr, payload, self.loop.now)
        self._flush()

    def _on_timer(self, key: tuple[int, float]) -> None:
        epoch, when = key
        if epoch != self._epoch or self._tick_at != when or self.state is not HostState.UP:
            return
        self._tick_at = None
        self.machine.tick(self.loop.now)
        self._flush()

    def _flush(self) -> None:
        out = self.machine.drain_outgoing()
        if out:
            send = self.net.send
            for o in out:
                send(self, o.node_id, o.addr, o.message)
        if self.after is not None:
            self.after(self)
        d = self.machine.next_deadline()
        if d is not None:
            now = self.loop.now
            if d < now:
                d = now
            # Re-arm whenever the deadline moved, also later: an orphaned earlier
            # event is then dismissed by _on_timer, which costs far less than a tick.
            if self._tick_at != d:
                self._tick_at = d
                self.loop.schedule(d, self._on_timer, (self._epoch, d))

    # --- faults -----------------------------------------------------------------------

    def crash(self) -> None:
        self.state = HostState.CRASHED
        self._backlog.clear()
        self._epoch += 1
        self._tick_at = None

    def pause(self, duration: float) -> None:
        if self.state is not HostState.UP:
            return
        self.state = HostState.PAUSED
        self._epoch += 1
        self._tick_at = None
        self.loop.call_later(duration, self._resume, self._epoch)

    def _resume(self, epoch: int) -> None:
        if epoch != self._epoch or self.state is not HostState.PAUSED:
            return
        self.state = HostState.UP
        backlog, self._backlog = self._backlog, []
        for item in backlog:
            if self.state is not HostState.UP:
                break
            self.deliver(item)
        # Every timer that came due during the pause fires now, late.
        self.machine.tick(self.loop.now)
        self._flush()

    def restart(self, machine: Machine, addr: str | None = None) -> None:
        """A new process with the same identity (and maybe a new address)."""
        self.net.detach(self)
        if addr is not None:
            self.addr = addr
        self.machine = machine
        self.state = HostState.UP
        self._backlog.clear()
        self._epoch += 1
        self._tick_at = None
        self.net.attach(self)
        self._flush()
