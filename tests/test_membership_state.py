"""The member table (with and without a shared base view) and the probe order."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.membership.messages import Alive
from protocol.membership.state import (
    ALIVE,
    DEAD,
    SUSPECT,
    Entry,
    MemberTable,
    ProbeOrder,
    SharedView,
)


def _entry(i: int, state=ALIVE) -> Entry:  # type: ignore[no-untyped-def]
    return Entry(Alive(f"n{i}", f"127.0.0.1:{1000 + i}", 0), state, None, 0.0)


def _base(n: int) -> SharedView:
    return SharedView({f"n{i}": _entry(i) for i in range(n)})


def test_counts_follow_puts_and_removes() -> None:
    t = MemberTable()
    for i in range(5):
        t.put(f"n{i}", _entry(i))
    t.put("n1", _entry(1, SUSPECT))
    t.put("n2", _entry(2, DEAD))
    assert (len(t), t.count(ALIVE), t.count(SUSPECT), t.count(DEAD), t.live) == (5, 3, 1, 1, 4)
    t.remove("n2")
    t.remove("n2")  # twice is harmless
    assert (len(t), t.count(DEAD), t.get("n2")) == (4, 0, None)
    assert [nid for nid, _ in t.items()] == ["n0", "n1", "n3", "n4"]
    assert len(list(t.entries())) == 4


def test_shared_view_is_copy_on_write() -> None:
    base = _base(10)
    a, b = MemberTable(base), MemberTable(base)
    a.put("n3", _entry(3, DEAD))
    a.remove("n4")
    a.put("n99", _entry(99))
    assert a.get("n3").state is DEAD  # type: ignore[union-attr]
    assert b.get("n3").state is ALIVE  # type: ignore[union-attr]
    assert base.entries["n3"].state is ALIVE
    assert a.get("n4") is None and b.get("n4") is not None
    assert (len(a), a.count(ALIVE), a.count(DEAD)) == (10, 9, 1)
    assert (len(b), b.count(ALIVE)) == (10, 10)
    assert sorted(nid for nid, _ in a.items()) == sorted(
        [f"n{i}" for i in range(10) if i != 4] + ["n99"]
    )
    a.put("n4", _entry(4))  # back after removal
    assert len(a) == 11 and a.get("n4") is not None


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 60), st.integers(0, 2**32), st.integers(0, 10))
def test_sample_is_distinct_and_accepted(n: int, seed: int, k: int) -> None:
    t = MemberTable(_base(n))
    for i in range(0, n, 3):
        t.put(f"n{i}", _entry(i, DEAD))
    rng = random.Random(seed)
    got = t.sample(rng, k, lambda nid, e: e.state is ALIVE)
    ids = [nid for nid, _ in got]
    eligible = [f"n{i}" for i in range(n) if i % 3]
    assert len(ids) == len(set(ids)) == min(k, len(eligible))
    assert set(ids) <= set(eligible)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 80), st.integers(0, 2**32))
def test_probe_order_visits_each_member_once_per_round(n: int, seed: int) -> None:
    t = MemberTable(_base(n))
    rng = random.Random(seed)
    order = ProbeOrder()
    accept = lambda nid, e: nid != "n0"  # noqa: E731 - "n0" plays this node
    first = [order.next(t, rng, accept) for _ in range(n - 1)]
    second = [order.next(t, rng, accept) for _ in range(n - 1)]
    for rnd in (first, second):
        ids = [p[0] for p in rnd if p is not None]
        assert sorted(ids) == sorted(f"n{i}" for i in range(1, n))


def test_probe_order_without_targets() -> None:
    t = MemberTable(_base(3))
    assert ProbeOrder().next(t, random.Random(1), lambda nid, e: False) is None
    assert ProbeOrder().next(MemberTable(), random.Random(1), lambda nid, e: True) is None
