"""Fuzzing the decoders that face the network: random bytes and mutations of
valid inputs. Only the decoder's own error type may escape. The default run
takes 300 examples of each (a smoke pass that keeps the suite short); the deep
run is `-m long`, 50,000 of each."""

import contextlib
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol import strictpack, wire
from protocol.errors import DecodeError, HandshakeError, SessionError
from protocol.handshake import Handshake, ReplayCache, Role
from protocol.session import FrameKind, Session
from protocol.wire import MsgType
from tests.protocol_helpers import NOW, key, pair, rng_bytes, run, trust

CI_EXAMPLES = 300
LONG_EXAMPLES = 50_000
K = key("alice")

VALID_ENVELOPES = [
    wire.seal(K, MsgType.GOSSIP, 1, 1, {"a": [1, 2, b"x" * 40], "b": {"c": None}}),
    wire.seal(K, MsgType.MEMBERSHIP, 2**40, 2**41, [True, 1.5, "s" * 30]),
    wire.seal(K, MsgType.ROUNDS, 0, 0, b"\x00" * 300),
]

S_KEY1, S_KEY2 = os.urandom(32), os.urandom(32)


def _valid_session_stream() -> bytes:
    a = Session(S_KEY1, S_KEY2)
    return b"".join(
        h + c
        for h, c in (
            a.seal(FrameKind.MESSAGE, VALID_ENVELOPES[0]),
            a.seal(FrameKind.STREAM_DATA, b"z" * 1000, stream=3),
            a.seal(FrameKind.PING, b""),
        )
    )


VALID_SESSION = _valid_session_stream()


def mutate(data: bytes, ops: list[tuple[int, int, int]]) -> bytes:
    buf = bytearray(data)
    for op, pos, val in ops:
        if not buf:
            buf.append(val)
            continue
        p = pos % len(buf)
        if op == 0:
            buf[p] ^= 1 << (val % 8)
        elif op == 1:
            buf[p] = val
        elif op == 2:
            del buf[p : p + 1 + val % 8]
        elif op == 3:
            buf[p:p] = bytes([val]) * (1 + val % 5)
        else:
            del buf[p:]
    return bytes(buf)


mutations = st.lists(
    st.tuples(st.integers(0, 4), st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=6
)


def decode_envelope(data: bytes) -> None:
    with contextlib.suppress(DecodeError):
        wire.decode(data)


def decode_session(data: bytes) -> None:
    b = Session(S_KEY2, S_KEY1, max_payload=4096)
    with contextlib.suppress(SessionError):
        b.receive_data(data)


def decode_strictpack(data: bytes) -> None:
    with contextlib.suppress(DecodeError):
        strictpack.unpack(data)


def handshake_responder(data: bytes) -> None:
    r = Handshake(
        Role.RESPONDER,
        key("bob"),
        None,
        trust(),
        random_bytes=rng_bytes(1),
        now=NOW,
        replay_cache=ReplayCache(),
    )
    with contextlib.suppress(HandshakeError):
        r.receive(data, NOW)


def _settings(n: int):
    return settings(
        max_examples=n,
        deadline=None,
        derandomize=False,
        suppress_health_check=list(HealthCheck),
    )


TARGETS = [
    ("envelope", decode_envelope, VALID_ENVELOPES),
    ("session", decode_session, [VALID_SESSION]),
    ("strictpack", decode_strictpack, [strictpack.pack({"k": [1, {"x": b"y"}], "z": "w"})]),
    ("handshake", handshake_responder, None),
]


def _hello_messages() -> list[bytes]:
    return run(*pair())[:3]


def _pair_for(fn, seeds, n: int):
    @given(data=st.binary(max_size=2048))
    @_settings(n)
    def random_bytes(data):
        fn(data)

    @given(which=st.integers(0, len(seeds) - 1), ops=mutations)
    @_settings(n)
    def mutated(which, ops):
        fn(mutate(seeds[which], ops))

    return random_bytes, mutated


def _make_tests(n: int, suffix: str, mark=None) -> dict:
    tests = {}
    for name, fn, seeds in TARGETS:
        random_bytes, mutated = _pair_for(fn, seeds or _hello_messages(), n)
        for kind, t in (("random_bytes", random_bytes), ("mutations", mutated)):
            t.__name__ = f"test_{name}_{kind}{suffix}"
            tests[t.__name__] = mark(t) if mark else t
    return tests


globals().update(_make_tests(CI_EXAMPLES, ""))
globals().update(_make_tests(LONG_EXAMPLES, "_long", pytest.mark.long))


def test_mutations_really_reach_deep_paths():
    # Guard against a fuzzer that only ever exercises the first size check:
    # single-bit flips of a valid envelope must hit the signature check.
    reasons = set()
    for i in range(len(VALID_ENVELOPES[0])):
        try:
            wire.decode(mutate(VALID_ENVELOPES[0], [(0, i, 0)]))
        except DecodeError as e:
            reasons.add(e.reason)
    assert "bad_signature" in reasons
