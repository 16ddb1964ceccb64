"""Rate budgets (sans-IO): token buckets that are handed the time.

A peer's messages, bytes and handshakes cost us CPU whatever they contain, so
each is charged against a budget that refills at a fixed rate up to a burst.
The shell decides what "over budget" means: a link stops reading until the
debt is repaid (TCP then pushes back on the sender), a listener refuses the
expensive part of a handshake.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up.

    ``charge`` always takes the tokens and may leave a debt; the debt says how
    long the caller should wait before the next charge. That way one item
    larger than the burst (a 1 MiB envelope under a 512 KiB burst) still gets
    through, and pays for itself in waiting time instead of being refused forever.
    """

    __slots__ = ("_at", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        if rate <= 0 or burst <= 0:
            raise ValueError("rate and burst must be positive")
        self.rate = float(rate)
        self.burst = float(burst)
        self._tokens = float(burst)
        self._at = now

    def _refill(self, now: float) -> None:
        # A clock that steps back must not mint tokens or erase a debt.
        if now > self._at:
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
            self._at = now

    def tokens(self, now: float) -> float:
        self._refill(now)
        return self._tokens

    def charge(self, n: float, now: float) -> float:
        """Takes ``n`` tokens; returns the seconds until the balance is >= 0 again."""
        self._refill(now)
        self._tokens -= n
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate

    def delay(self, now: float) -> float:
        """Seconds until the balance is back to >= 0 (0.0 if it is)."""
        self._refill(now)
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate

    def try_take(self, n: float, now: float) -> bool:
        """Takes ``n`` tokens only if they are there (no debt)."""
        self._refill(now)
        if self._tokens < n:
            return False
        self._tokens -= n
        return True


@dataclass(frozen=True, slots=True)
class MessageBudget:
    """Per-link limits on messages received: a count and a byte rate."""

    messages_per_s: float = 500.0
    message_burst: float = 2000.0
    bytes_per_s: float = 2 * 1024 * 1024
    byte_burst: float = 8 * 1024 * 1024


class LinkBudget:
    """The message and byte buckets of one link. ``charge`` returns how long to
    stop reading: the longer of the two debts."""

    __slots__ = ("bytes", "charged", "messages", "throttled")

    def __init__(self, limits: MessageBudget, now: float) -> None:
        self.messages = TokenBucket(limits.messages_per_s, limits.message_burst, now)
        self.bytes = TokenBucket(limits.bytes_per_s, limits.byte_burst, now)
        self.charged = 0  # messages charged, for introspection and tests
        self.throttled = 0  # charges that left a debt (the reader had to wait)

    def charge(self, nbytes: int, now: float) -> float:
        self.charged += 1
        wait = max(self.messages.charge(1, now), self.bytes.charge(nbytes, now))
        if wait > 0:
            self.throttled += 1
        return wait

    def delay(self, now: float) -> float:
        return max(self.messages.delay(now), self.bytes.delay(now))


class KeyedBuckets:
    """One TokenBucket per key (a source address, say), at most ``max_keys`` of
    them. When full, the key touched longest ago is forgotten: a forgotten key
    starts again with a full burst, which is the price of bounded memory."""

    __slots__ = ("_buckets", "burst", "max_keys", "rate")

    def __init__(self, rate: float, burst: float, max_keys: int = 4096) -> None:
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def try_take(self, key: str, n: float, now: float) -> bool:
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = TokenBucket(self.rate, self.burst, now)
            self._buckets[key] = bucket
            while len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
        return bucket.try_take(n, now)

    def __len__(self) -> int:
        return len(self._buckets)
