"""The main job: a local multi-peer SPIRT cluster on 127.0.0.1.

Creates a throwaway CA, enrolls N nodes, starts N real spirtd processes that
bootstrap from the first, waits until every node is linked to every other over
an authenticated, encrypted session, prints the cluster's status, and shuts it
down with SIGTERM, checking that every node exits 0.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from spirtd.control.ctl import render_status
from spirtd.localcluster import LocalCluster, NodeError, all_see, wait_for


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m spirtd.demo", description=__doc__)
    p.add_argument("--peers", type=int, default=3)
    p.add_argument("--dir", type=Path, help="where to keep the nodes' data dirs (default: temp)")
    p.add_argument("--timeout", type=float, default=60.0)
    a = p.parse_args(argv)
    if a.peers < 2:
        p.error("--peers must be at least 2")

    with tempfile.TemporaryDirectory(prefix="spirt-demo-") as tmp:
        root = a.dir or Path(tmp)
        print(f"[demo] {a.peers} peers under {root}", flush=True)
        cluster = LocalCluster(root, a.peers, args=["--profile", "local"])
        t0 = time.monotonic()
        try:
            cluster.start()
            for n in cluster.nodes:
                print(f"[demo] started {n.node_id} on {n.address}", flush=True)
            everyone = {n.node_id: "alive" for n in cluster.nodes}
            wait_for(
                lambda: all_see(cluster.nodes, everyone),
                a.timeout,
                "every node to see every other alive",
            )
            print(f"[demo] cluster formed in {time.monotonic() - t0:.1f}s; status of node 0:\n")
            print(render_status(cluster.nodes[0].status()), flush=True)
            print()
        except (NodeError, TimeoutError) as e:
            print(f"[demo] FAILED: {e}", file=sys.stderr)
            for n in cluster.nodes:
                print(f"--- {n.data_dir}/spirtd.log\n{n.log_tail()}", file=sys.stderr)
            cluster.kill_all()
            return 1
        codes = cluster.stop()
        print(f"[demo] shut down with SIGTERM; exit codes {codes}", flush=True)
        return 0 if all(c == 0 for c in codes) else 1


if __name__ == "__main__":
    sys.exit(main())
