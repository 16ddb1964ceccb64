"""spirtd's functions backend, seen through the daemon."""

from __future__ import annotations

import urllib.error
import urllib.request

from spirtd.localcluster import LocalNode, wait_for

PREWARM = """
[invoke]
concurrency = 2
prewarm = 1
timeout_s = 30.0
"""


def test_local_runtime_runs_on_loopback_and_refuses_unsigned_calls(short_tmp):
    n = LocalNode(short_tmp / "n", config=PREWARM).start()
    try:
        f = n.status()["functions"]
        assert f["backend"] == "local" and f["in_flight"] == 0
        assert f["function"] == "spirt-gradient"
        assert f["endpoint"].startswith("http://127.0.0.1:")
        # Anyone on the host can reach the port, so the runtime demands SigV4 with
        # the daemon's per-start key: an unsigned Invoke is refused.
        req = urllib.request.Request(
            f["endpoint"] + "/2015-03-31/functions/spirt-gradient/invocations",
            data=b"{}",
            method="POST",
        )
        try:
            urllib.request.urlopen(req, timeout=10)
            raise AssertionError("unsigned invoke accepted")
        except urllib.error.HTTPError as e:
            assert e.code == 403
        # The prewarmed worker, started in the background as the daemon came up.
        wait_for(lambda: n.status()["functions"]["cold_starts"] >= 1, 60, "the prewarmed worker")
    finally:
        assert n.stop() == 0
