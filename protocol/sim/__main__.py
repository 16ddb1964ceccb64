"""Runs a membership scenario in the simulator.

    python -m protocol.sim crash --n 1000 --profile lan --seed 3
    python -m protocol.sim pause --n 200 --pause 7.5 --json
    python -m protocol.sim list

Prints a summary (or, with --json, one JSON object as the last line) and exits 0
when the scenario met its bound, 1 when it did not, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from ..membership import PROFILES, profile
from . import scenarios


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m protocol.sim", description=__doc__.split("\n")[0])
    p.add_argument("scenario", choices=[*scenarios.SCENARIOS, "list"])
    p.add_argument("--n", type=int, default=100, help="cluster size (default 100)")
    p.add_argument("--profile", choices=sorted(PROFILES), default="lan")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--loss", type=float, default=0.02, help="loss: message loss rate")
    p.add_argument("--duration", type=float, default=300.0, help="loss: simulated seconds")
    p.add_argument("--pause", type=float, default=None, help="pause: seconds paused")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.scenario == "list":
        for name, fn in scenarios.SCENARIOS.items():
            doc = " ".join((fn.__doc__ or "").split())
            print(f"{name:10} {doc.split('. ')[0].rstrip('.')}.")
        return 0
    if not 2 <= args.n <= 50_000:
        print("--n must be between 2 and 50000", file=sys.stderr)
        return 2
    config = profile(args.profile)
    kwargs: dict[str, object] = {"seed": args.seed}
    if args.scenario == "loss":
        kwargs.update(loss_rate=args.loss, duration=args.duration)
    if args.scenario == "pause" and args.pause is not None:
        kwargs["pause_s"] = args.pause
    result = scenarios.SCENARIOS[args.scenario](args.n, config, **kwargs)  # type: ignore[operator]
    out = {**result.as_dict(), "profile": args.profile}
    if args.json:
        print(json.dumps(out))
    else:
        print(
            f"{result.scenario} n={result.n} seed={result.seed} profile={args.profile}: "
            f"{'ok' if result.ok else 'NOT OK'} ({result.wall_s:.1f} s wall)"
        )
        for k, v in result.figures.items():
            print(f"  {k}: {v}")
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
