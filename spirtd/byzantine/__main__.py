"""``python -m spirtd.byzantine --experimental-attack NAME [spirtd arguments]``.

Runs the real spirtd as a Byzantine peer (see spirtd.byzantine.harness). Two
deliberate steps are needed: the flag, and SPIRT_I_UNDERSTAND_THIS_IS_AN_ATTACK=yes
in the environment. Without the second it refuses to start and says why; no
spirtd flag or config key can reach this code.
"""

from __future__ import annotations

import argparse
import json
import sys

from spirtd.byzantine.attacks import ATTACKS, Attack, AttackError

EXIT_REFUSED = 78  # what spirtd exits with on a configuration it will not run


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m spirtd.byzantine",
        description="EXPERIMENTAL: run spirtd as a Byzantine peer that attacks training. "
        "Needs SPIRT_I_UNDERSTAND_THIS_IS_AN_ATTACK=yes. Other arguments go to spirtd.",
    )
    p.add_argument("--experimental-attack", required=True, choices=ATTACKS, metavar="NAME")
    p.add_argument("--attack-params", default="{}", metavar="JSON", help="e.g. '{\"scale\": 10}'")
    p.add_argument("--attack-seed", type=int, default=0)
    p.add_argument(
        "--colluder",
        action="append",
        default=[],
        metavar="NODE_ID",
        help="another Byzantine peer (its gradients are not taken for honest ones)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args, rest = parser().parse_known_args(sys.argv[1:] if argv is None else argv)
    from spirtd.byzantine import harness

    if not harness.confirmed():
        print(
            f"spirtd.byzantine: refusing to start an attack: set "
            f"{harness.CONFIRM_ENV}={harness.CONFIRM_VALUE} to confirm that this peer "
            f"is meant to attack its cluster",
            file=sys.stderr,
        )
        return EXIT_REFUSED
    try:
        params = json.loads(args.attack_params)
        if not isinstance(params, dict):
            raise AttackError("--attack-params must be a JSON object")
        attack = Attack.make(args.experimental_attack, params, args.attack_seed)
    except (ValueError, AttackError) as e:
        print(f"spirtd.byzantine: {e}", file=sys.stderr)
        return EXIT_REFUSED
    harness.install(attack, frozenset(args.colluder))
    from spirtd import cli

    return cli.main(rest)


if __name__ == "__main__":
    sys.exit(main())
