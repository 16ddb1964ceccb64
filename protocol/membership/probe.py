"""Bookkeeping for probes this node runs and ping-reqs it relays for others."""

from __future__ import annotations


class Probe:
    """One probe of ``target_id``: direct ping, then ping-req through relays.

    ``confirm`` marks a probe started because someone else suspects the target
    (its failure is an independent confirmation), as opposed to the round-robin.
    """

    __slots__ = (
        "addr",
        "confirm",
        "direct_deadline",
        "end",
        "expected_nacks",
        "incarnation",
        "nackers",
        "relays",
        "seq",
        "start",
        "target_id",
    )

    def __init__(
        self,
        seq: int,
        target_id: str,
        addr: str,
        incarnation: int,
        start: float,
        direct_deadline: float,
        end: float,
        confirm: bool,
    ) -> None:
        self.seq = seq
        self.target_id = target_id
        self.addr = addr
        self.incarnation = incarnation
        self.start = start
        self.direct_deadline = direct_deadline
        self.end = end
        self.confirm = confirm
        self.relays: tuple[str, ...] = ()
        self.expected_nacks = 0
        self.nackers: set[str] = set()


class Relay:
    """A ping we sent on behalf of ``requester_id``'s probe number ``requester_seq``."""

    __slots__ = ("deadline", "nack", "requester_addr", "requester_id", "requester_seq", "target_id")

    def __init__(
        self,
        requester_id: str,
        requester_addr: str,
        requester_seq: int,
        target_id: str,
        deadline: float,
        nack: bool,
    ) -> None:
        self.requester_id = requester_id
        self.requester_addr = requester_addr
        self.requester_seq = requester_seq
        self.target_id = target_id
        self.deadline = deadline
        self.nack = nack
