"""The bounded, least-sent-first broadcast queue."""

from __future__ import annotations

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.membership.broadcast import BroadcastQueue
from protocol.membership.messages import Alive, Suspect


def _alive(i: int, inc: int = 0, pad: int = 0) -> Alive:
    return Alive(f"n{i}" + "x" * pad, f"127.0.0.1:{1000 + i}", inc)


def _size(u: Alive | Suspect) -> int:
    return len(u.encoded())


def test_least_sent_first_then_newest() -> None:
    q = BroadcastQueue(100, Counter())
    a, b, c = _alive(1), _alive(2), _alive(3)
    for k, u in (("a", a), ("b", b), ("c", c)):
        q.add(k, u)
    one = _size(a)
    assert q.take(one, 10) == [c]  # newest first among the never-sent
    assert q.take(one, 10) == [b]
    assert q.take(one, 10) == [a]
    # Equals in sends: the one that reached that count last goes first.
    assert q.take(3 * one, 10) == [a, b, c]
    assert [q.transmits(k) for k in "abc"] == [2, 2, 2]


def test_replacing_an_update_resets_its_count() -> None:
    q = BroadcastQueue(100, Counter())
    q.add("n1", _alive(1, 0))
    q.take(1000, 10)
    q.take(1000, 10)
    assert q.transmits("n1") == 2
    newer = Suspect("n1", 0, "n2")
    q.add("n1", newer)
    assert len(q) == 1
    assert q.transmits("n1") == 0
    assert q.take(1000, 10) == [newer]


def test_retransmit_limit_then_gone() -> None:
    q = BroadcastQueue(100, Counter())
    q.add("n1", _alive(1))
    for _ in range(3):
        assert q.take(1000, 3) == [_alive(1)]
    assert q.take(1000, 3) == []
    assert len(q) == 0


def test_a_shrinking_limit_drops_the_oversent() -> None:
    q = BroadcastQueue(100, Counter())
    q.add("n1", _alive(1))
    for _ in range(5):
        q.take(1000, 8)
    q.add("n2", _alive(2))
    assert q.take(1000, 4) == [_alive(2)]  # n1 was sent 5 >= 4 times
    assert "n1" not in q


def test_budget_is_respected_and_nothing_is_dropped_for_size() -> None:
    q = BroadcastQueue(100, Counter())
    ups = [_alive(i, pad=40) for i in range(10)]
    for i, u in enumerate(ups):
        q.add(f"k{i}", u)
    size = _size(ups[0])
    got: list[Alive] = []
    for _ in range(10):
        batch = q.take(3 * size + size // 2, 1)
        assert sum(_size(u) for u in batch) <= 3 * size + size // 2
        got.extend(batch)  # type: ignore[arg-type]
    assert sorted(u.node_id for u in got) == sorted(u.node_id for u in ups)
    assert len(q) == 0


def test_skip_leaves_that_key_queued() -> None:
    q = BroadcastQueue(100, Counter())
    q.add("a", _alive(1))
    q.add("b", _alive(2))
    assert q.take(1000, 5, skip="b") == [_alive(1)]
    assert q.transmits("b") == 0
    assert q.take(1000, 5) == [_alive(2), _alive(1)]


def test_bounded_evicts_most_sent_and_counts() -> None:
    counters: Counter[str] = Counter()
    q = BroadcastQueue(3, counters)
    q.add("old", _alive(1))
    q.take(1000, 10)  # "old" is now the most sent
    q.add("b", _alive(2))
    q.add("c", _alive(3))
    q.add("d", _alive(4))
    assert len(q) == 3
    assert "old" not in q
    assert counters["broadcast_evicted"] == 1


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("add"), st.integers(0, 12), st.integers(0, 30)),
            st.tuples(st.just("take"), st.integers(0, 400), st.integers(1, 6)),
            st.tuples(st.just("remove"), st.integers(0, 12), st.just(0)),
        ),
        max_size=80,
    )
)
def test_queue_invariants(ops: list[tuple[str, int, int]]) -> None:
    """Against a model: one entry per key, never sent once it reached the limit,
    the budget holds, no duplicates in a batch, and least-sent-first: a batch never
    contains an update sent more often than one it left behind."""
    q = BroadcastQueue(8, Counter())
    current: dict[str, Alive] = {}
    sends: dict[str, int] = {}
    for op, a, b in ops:
        key = f"k{a}"
        if op == "add":
            u = _alive(a, inc=b, pad=b % 7)
            q.add(key, u)
            if key not in current and len(current) >= 8:
                evicted = next(k for k in current if k not in q)
                del current[evicted]
                del sends[evicted]
            current[key] = u
            sends[key] = 0
        elif op == "remove":
            q.remove(key)
            current.pop(key, None)
            sends.pop(key, None)
        else:
            budget, limit = a, b
            before = {k: sends[k] for k in current}
            batch = q.take(budget, limit)
            assert sum(_size(u) for u in batch) <= budget
            keys = [next(k for k, v in current.items() if v is u) for u in batch]
            assert len(keys) == len(set(keys))
            left_behind = [before[k] for k in current if k not in keys and before[k] < limit]
            for k in keys:
                assert before[k] < limit
                assert all(before[k] <= t for t in left_behind)
                sends[k] += 1
            for k in list(current):
                if k in keys and sends[k] >= limit:
                    assert k not in q  # sent its last time: gone
                if k not in q:
                    # Only what reached this limit may go (lazily, when scanned).
                    assert sends[k] >= limit
                    del current[k]
                    del sends[k]
        assert set(current) == {k for k in current if k in q}
        assert len(q) == len(current) <= 8
        for k, u in current.items():
            assert q.get(k) is u
            assert q.transmits(k) == sends[k]
