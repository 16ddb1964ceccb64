"""A handler for runtime tests that leaves what its context held in a file, so a
test can see what an asynchronous (Event) invocation's handler received.

It writes ``{"client_context": ...}`` to ``<SPIRT_RECORD_DIR>/<marker>.json``; the
event names only the marker, never a path."""

from __future__ import annotations

import json
import os
import re
from typing import Any

_MARKER_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def handler(event: Any, context: Any) -> Any:
    marker = event.get("marker") if isinstance(event, dict) else None
    if not isinstance(marker, str) or not _MARKER_RE.match(marker):
        raise ValueError("a marker name of 1..64 letters, digits, - or _ is needed")
    cc = context.client_context
    doc = {"client_context": None if cc is None else {"custom": cc.custom, "env": cc.env}}
    path = os.path.join(os.environ["SPIRT_RECORD_DIR"], marker + ".json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f)
    os.replace(tmp, path)  # whole or absent, for a test that polls for it
    return doc
