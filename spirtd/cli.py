"""`spirtd`: the node daemon's command line (INTERFACES.md)."""

from __future__ import annotations

import argparse
import sys
import tomllib
from pathlib import Path

from spirtd import __version__, logs, malloc_tuning
from spirtd.config import ConfigError, load
from spirtd.keyfiles import KeyFileError
from spirtd.training import jobfiles


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="spirtd",
        description="SPIRT node daemon: runs in the foreground; SIGTERM/SIGINT leave gracefully.",
    )
    p.add_argument("--config", type=Path, help="TOML config file (flags override it)")
    p.add_argument("--data-dir", type=Path, help="node key, trust material, api.sock, state")
    p.add_argument("--listen", help="HOST:PORT for peer links (port 0 picks a free one)")
    p.add_argument("--advertise", help="HOST:PORT peers should dial (default: --listen)")
    p.add_argument(
        "--bootstrap", action="append", metavar="HOST:PORT", help="a member to join (repeatable)"
    )
    p.add_argument("--redis-url", help="use this Redis instead of a managed redis-server")
    p.add_argument("--functions", choices=["local", "lambda"])
    p.add_argument(
        "--log-format",
        choices=["text", "json"],
        help="one event per line on stderr: text, or JSON objects for journald and log shippers",
    )
    p.add_argument("--log-level")
    p.add_argument("--cluster", help="cluster name (default: the one in this node's certificate)")
    p.add_argument("--profile", choices=["local", "lan", "wan"], help="membership timing profile")
    p.add_argument(
        "--dataset",
        action="append",
        dest="datasets",
        metavar="NAME=DIR",
        help="where this node's copy of dataset NAME lives (repeatable): a directory, e.g. "
        "mnist=/srv/mnist, or an S3 location its functions can read too, "
        "e.g. mnist=s3://my-bucket/mnist",
    )
    p.add_argument("--shard", metavar="I/N", help="train on shard I of N of a built-in dataset")
    p.add_argument("--version", action="version", version=f"spirtd {__version__}")
    return p


def _log_format_despite(args: argparse.Namespace) -> str | None:
    """The log format for the one line saying the config is bad: the flag, else the
    file's own ``log_format`` if the file parses (under systemd only the file says)."""
    if args.log_format:
        return str(args.log_format)
    if args.config is None:
        return None
    try:
        with open(args.config, "rb") as f:
            value = tomllib.load(f).get("log_format")
    except (OSError, tomllib.TOMLDecodeError):
        return None
    return value if value in ("text", "json") else None


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if k != "config"}
    try:
        config = load(args.config, overrides)
    except ConfigError as e:
        logs.fatal(str(e), fmt=_log_format_despite(args))
        return 78
    logs.setup(config.log_format, config.log_level)
    malloc_tuning.tune()
    # Before the imports below (torch among them, seconds): the function zygote's own
    # imports then run meanwhile, on the other core. Only when functions are wanted
    # at once: the daemon stopped in the middle of a job, which it resumes now, or
    # it is told to keep workers warm. Otherwise the zygote starts once a job is
    # known, and a daemon that never trains never spends its seconds of CPU on it.
    if config.invoke.prewarm or jobfiles.interrupted(config.data_dir):
        from spirtd.functions.local import prestart

        prestart(config)
    from spirtd.node import main_async

    try:
        return main_async(config)
    except KeyFileError as e:
        logs.fatal(f"data_dir: {e}")
        return 78


if __name__ == "__main__":
    sys.exit(main())
