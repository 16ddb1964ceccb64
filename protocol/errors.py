"""Error types raised by the sans-IO core.

Each carries a short machine-readable ``reason`` that callers count (``counters``
in the daemon, exported as metrics), so every rejection is both explained in a log
line and visible as a number.
"""

from __future__ import annotations


class ProtocolError(Exception):
    """Base: ``reason`` is a stable snake_case token, ``detail`` is for humans."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class DecodeError(ProtocolError):
    """Bytes that do not form a valid message (wire format, limits, types)."""


class TrustError(ProtocolError):
    """A peer or a certificate that admission refuses."""


class HandshakeError(ProtocolError):
    """A handshake that must be abandoned; ``reason`` says why."""


class SessionError(ProtocolError):
    """A record that an established session refuses; the link must be dropped."""
