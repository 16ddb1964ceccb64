"""A handler for runtime tests that raises two calls below itself, so a test can
see which frames a function error's ``stackTrace`` lists."""

from __future__ import annotations

from typing import Any


class NestedError(LookupError):
    pass


def _check(event: dict[str, Any]) -> None:
    raise NestedError(f"no {event.get('key')!r} here")


def _parse(event: dict[str, Any]) -> None:
    _check(event)


def handler(event: Any, context: Any) -> Any:
    _parse(event if isinstance(event, dict) else {})
