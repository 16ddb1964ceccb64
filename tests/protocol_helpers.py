"""Deterministic keys, certificates and handshakes for the protocol tests."""

from __future__ import annotations

import hashlib
import random

from protocol.handshake import Handshake, ReplayCache, Role
from protocol.identity import Certificate, NodeKey, TrustStore

NOW = 1_800_000_000.0


def key(name: str) -> NodeKey:
    return NodeKey(hashlib.sha256(name.encode()).digest())


def rng_bytes(seed: int):
    r = random.Random(seed)
    return lambda n: r.randbytes(n)


CA = key("ca")


def cert(k: NodeKey, *, ca: NodeKey = CA, cluster: str = "c1", days: float = 1.0) -> Certificate:
    return Certificate.issue(ca, cluster, k.public_key, now=NOW - 60, days=days, serial=7)


def trust(cluster: str = "c1", *, ca: NodeKey = CA) -> TrustStore:
    return TrustStore(cluster, ca_keys={ca.public_key})


def pair(
    *,
    i_key: NodeKey | None = None,
    r_key: NodeKey | None = None,
    i_cert: Certificate | str | None = "default",
    r_cert: Certificate | str | None = "default",
    i_trust: TrustStore | None = None,
    r_trust: TrustStore | None = None,
    now: float = NOW,
    replay: ReplayCache | None = None,
    seed: int = 1,
) -> tuple[Handshake, Handshake]:
    ik = i_key or key("alice")
    rk = r_key or key("bob")
    init = Handshake(
        Role.INITIATOR,
        ik,
        cert(ik) if i_cert == "default" else i_cert,  # type: ignore[arg-type]
        i_trust or trust(),
        random_bytes=rng_bytes(seed),
        now=now,
        advertise="127.0.0.1:1000",
    )
    resp = Handshake(
        Role.RESPONDER,
        rk,
        cert(rk) if r_cert == "default" else r_cert,  # type: ignore[arg-type]
        r_trust or trust(),
        random_bytes=rng_bytes(seed + 1000),
        now=now,
        replay_cache=replay if replay is not None else ReplayCache(),
        advertise="127.0.0.1:2000",
    )
    return init, resp


def run(init: Handshake, resp: Handshake, now: float = NOW) -> list[bytes]:
    """Runs a handshake to completion; returns the messages exchanged."""
    msgs = [init.start()]
    msgs.append(resp.receive(msgs[-1], now))
    msgs.append(init.receive(msgs[-1], now))
    msgs.append(resp.receive(msgs[-1], now))
    assert init.receive(msgs[-1], now) is None
    return msgs
