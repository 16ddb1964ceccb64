"""What a node's data dir says of its job: the record and the state it was last in.

Light on purpose (json and paths only): the daemon's command line reads it before
importing anything heavy, to decide whether the function zygote is wanted at once.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

INFO_MAX = 65536  # job.json: the state, a detail, a few figures
# The states a daemon stopped in that it picks the job up from when it starts again.
RESUMABLE = ("running", "syncing")


def job_dir(root: Path) -> Path:
    return root / "training"


def record_path(root: Path) -> Path:
    return job_dir(root) / "job.rec"


def info_path(root: Path) -> Path:
    return job_dir(root) / "job.json"


def read_small(path: Path, limit: int) -> bytes:
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"{path} is larger than {limit} bytes")
    return data


def read_info(root: Path) -> dict[str, Any]:
    """job.json as saved; {} if there is none. Raises OSError or ValueError."""
    path = info_path(root)
    if not path.exists():
        return {}
    info = json.loads(read_small(path, INFO_MAX))
    if not isinstance(info, dict):
        raise ValueError(f"{path} does not hold an object")
    return info


def interrupted(root: Path) -> bool:
    """The daemon stopped (or was killed) while taking part in a job: it resumes it."""
    try:
        state = read_info(root).get("state")
    except (OSError, ValueError):
        return False
    return state in RESUMABLE and record_path(root).exists()
