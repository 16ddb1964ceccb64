"""Log setup: one line per event on stderr, as text or JSON (for journald and
log shippers). stdout is reserved for the identity lines printed at start.

Everything the daemon writes is a line in the configured format, so a JSON log
stays parseable: Python warnings from any library, uncaught exceptions (main
thread, other threads, "Exception ignored in" ones), a log call with bad
arguments, the identity lines and the fatal-error line all go through here.

Three rules keep the log trustworthy when peers misbehave (SECURITY.md):

* Text a peer chose (a reject or close reason, a certificate field) goes into
  a line only through ``quote``: repr-style, in quotes, control characters
  escaped, length capped. A peer cannot start a fake line or hide one. The
  formatters escape control characters again, whatever the caller did.
* Repeated lines are rate-limited per (logger, level, message template): a
  burst passes, then one line every so often, and the next line that passes
  says how many similar ones were suppressed. A flood of refused handshakes
  therefore costs a few lines, not a full disk.
* Each line carries the context that says what it is about, as fields: the
  node id (``bind``), the job and round (``context``), the peer or remote
  address (``extra={"peer": ...}`` on the call).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import sys
import threading
import time
import types
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

from protocol.budget import TokenBucket

# Context fields, in the order text lines show them.
FIELDS = ("node", "job", "round", "peer", "addr")
QUOTE_LIMIT = 200

_bound: dict[str, Any] = {}
# The format chosen by setup(), for the lines written outside a handler.
_format = "text"
_context: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "spirtd_log_context", default=None
)
# C0 and C1 control characters, DEL and the line/paragraph separators: each would
# let text break a line or rewrite what a terminal shows.
_CONTROLS = {
    c: f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"
    for c in [*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029]
}
_CONTROLS.update({ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t"})


def sanitize(text: str, limit: int = QUOTE_LIMIT) -> str:
    """``text`` with control characters escaped and at most ``limit`` characters
    kept: safe to embed in a line, for text that is ours but may carry a peer's."""
    cut = text[:limit].translate(_CONTROLS)
    return cut + "..." if len(text) > limit else cut


def quote(value: object, limit: int = QUOTE_LIMIT) -> str:
    """Peer-supplied text as it goes into a log line: repr-style, in quotes,
    every non-printable character escaped, cut at ``limit`` characters."""
    if isinstance(value, bytes | bytearray | memoryview):
        value = bytes(value).decode("utf-8", errors="replace")
    text = value if isinstance(value, str) else str(value)
    out = repr(text[:limit])
    return out + "..." if len(text) > limit else out


def bind(**fields: Any) -> None:
    """Sets process-wide fields (the node id) carried by every later line."""
    _bound.update({k: v for k, v in fields.items() if v is not None})


@contextlib.contextmanager
def context(**fields: Any) -> Iterator[None]:
    """Fields (job, round) carried by lines logged inside the block, including
    from tasks started inside it (asyncio copies the context)."""
    current = _context.get() or {}
    token = _context.set({**current, **{k: v for k, v in fields.items() if v is not None}})
    try:
        yield
    finally:
        _context.reset(token)


def task_context(**fields: Any) -> contextvars.Context:
    """A copy of the current context with ``fields`` added, for a task's
    ``context=``: its lines carry them, and the caller's do not."""
    ctx = contextvars.copy_context()
    current = ctx.get(_context) or {}
    ctx.run(_context.set, {**current, **{k: v for k, v in fields.items() if v is not None}})
    return ctx


def fields_of(record: logging.LogRecord) -> dict[str, Any]:
    """The context fields of one record: bound, then the task's context, then
    the call's ``extra`` (most specific wins)."""
    out: dict[str, Any] = dict(_bound)
    out.update(_context.get() or {})
    for name in FIELDS:
        v = record.__dict__.get(name)
        if v is not None:
            out[name] = v
    return {k: out[k] for k in FIELDS if k in out}


def _timestamp(record: logging.LogRecord) -> str:
    return (
        time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        + f".{int(record.msecs):03d}Z"
    )


class TextFormatter(logging.Formatter):
    """``TIME LEVEL LOGGER: MESSAGE key=value ...`` on one line."""

    def format(self, record: logging.LogRecord) -> str:
        msg = sanitize(record.getMessage(), limit=1 << 16)
        parts = [f"{_timestamp(record)} {record.levelname} {record.name}: {msg}"]
        suppressed = record.__dict__.get("suppressed")
        if suppressed:
            parts.append(f"({suppressed} similar lines suppressed)")
        for k, v in fields_of(record).items():
            parts.append(f"{k}={sanitize(str(v))}")
        if record.exc_info:
            # One event, one line: the traceback is escaped, not spread over lines.
            parts.append("exc=" + sanitize(self.formatException(record.exc_info), limit=1 << 16))
        return " ".join(parts)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update(fields_of(record))
        suppressed = record.__dict__.get("suppressed")
        if suppressed:
            out["suppressed"] = suppressed
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        # json.dumps escapes every control character: a value cannot break the line.
        return json.dumps(out, separators=(",", ":"), default=str)


class RateLimit(logging.Filter):
    """Lets ``burst`` lines of one (logger, level, template) through, then one
    every ``1/rate`` seconds; a line that passes after others were held back
    carries their count (``record.suppressed``). At most ``max_keys`` templates
    are tracked, the least recently seen forgotten first."""

    def __init__(
        self,
        *,
        burst: int = 20,
        rate: float = 1.0,
        max_keys: int = 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.burst = burst
        self.rate = rate
        self.max_keys = max_keys
        self.clock = clock
        self._keys: OrderedDict[tuple[str, int, str], list[Any]] = OrderedDict()
        self.suppressed_total = 0

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.levelno, str(record.msg))
        now = self.clock()
        entry = self._keys.get(key)
        if entry is None:
            entry = [TokenBucket(self.rate, self.burst, now), 0]
            self._keys[key] = entry
            while len(self._keys) > self.max_keys:
                self._keys.popitem(last=False)
        else:
            self._keys.move_to_end(key)
        bucket, held = entry
        if not bucket.try_take(1, now):
            entry[1] = held + 1
            self.suppressed_total += 1
            return False
        if held:
            record.suppressed = held
            entry[1] = 0
        return True


class _Handler(logging.StreamHandler):
    def handleError(self, record: logging.LogRecord) -> None:
        # logging's default prints "--- Logging error ---" and a raw traceback;
        # a log call with bad arguments gets a line in the format instead.
        exc = sys.exc_info()[1]
        try:
            line = self.format(
                logging.makeLogRecord(
                    {
                        "name": record.name,
                        "levelno": logging.ERROR,
                        "levelname": "ERROR",
                        "msg": "unformattable log line %r: %s",
                        "args": (sanitize(str(record.msg)), f"{type(exc).__name__}: {exc}"),
                    }
                )
            )
            self.stream.write(line + self.terminator)
            self.flush()
        except Exception:  # the stream itself is broken: nowhere left to say so
            pass


def make_handler(
    fmt: str, stream: Any = None, *, ratelimit: RateLimit | None = None
) -> logging.Handler:
    handler = _Handler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(ratelimit if ratelimit is not None else RateLimit())
    return handler


def _record(name: str, level: int, msg: str) -> logging.LogRecord:
    return logging.makeLogRecord(
        {"name": name, "levelno": level, "levelname": logging.getLevelName(level), "msg": msg}
    )


def identity(lines: dict[str, str], stream: Any = None) -> None:
    """The node's identity on stdout (INTERFACES.md), one ``key: value`` line
    each; in JSON mode each is a JSON log line whose ``msg`` is that text."""
    out = stream if stream is not None else sys.stdout
    for key, value in lines.items():
        text = f"{key}: {value}"
        if _format == "json":
            text = JsonFormatter().format(_record("spirtd.node", logging.INFO, text))
        out.write(text + "\n")
    out.flush()


def fatal(msg: str, fmt: str | None = None, stream: Any = None) -> None:
    """The one line a daemon that cannot run leaves on stderr: ``spirtd: MSG``,
    or a JSON line at level critical. ``fmt`` is for failures before setup()."""
    out = stream if stream is not None else sys.stderr
    if (fmt or _format) == "json":
        out.write(JsonFormatter().format(_record("spirtd", logging.CRITICAL, msg)) + "\n")
    else:
        out.write(f"spirtd: {sanitize(msg, limit=1 << 12)}\n")
    out.flush()


_crash_log = logging.getLogger("spirtd.crash")


def _uncaught(
    exc_type: type[BaseException], exc: BaseException, tb: types.TracebackType | None
) -> None:
    _crash_log.critical("uncaught exception", exc_info=(exc_type, exc, tb))


def _uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    if issubclass(args.exc_type, SystemExit):
        return  # what the default hook does too: a thread's way to end
    name = args.thread.name if args.thread is not None else "?"
    exc_info = (args.exc_type, args.exc_value, args.exc_traceback)
    _crash_log.error("uncaught exception in thread %s", name, exc_info=exc_info)


def _unraisable(args: Any) -> None:
    # Exceptions raised in __del__, finalizers and callbacks: Python has no one to raise them to.
    try:
        where = repr(args.object) if args.object is not None else ""
    except Exception:  # a broken __repr__ must not hide the report
        where = f"<{type(args.object).__name__} object>"
    what = args.err_msg or "Exception ignored in"
    exc_info = (args.exc_type, args.exc_value, args.exc_traceback)
    _crash_log.error("%s: %s", what, sanitize(where), exc_info=exc_info)


def setup(fmt: str, level: str, *, stream: Any = None, ratelimit: RateLimit | None = None) -> None:
    """Routes every line the process writes through one handler on stderr
    (``stream`` in tests) in format ``fmt``."""
    global _format
    _format = fmt
    root = logging.getLogger()
    root.handlers[:] = [make_handler(fmt, stream, ratelimit=ratelimit)]
    root.setLevel(level.upper())
    # aiohttp's access log would log every spirtctl call at INFO.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    # Warnings (redis-py, torch, ...) become records of logger "py.warnings",
    # formatted and rate-limited like any other line, instead of raw stderr text.
    logging.captureWarnings(True)
    sys.excepthook = _uncaught
    threading.excepthook = _uncaught_in_thread
    sys.unraisablehook = _unraisable
