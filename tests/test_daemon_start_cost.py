"""What a daemon spends on starting: torch and the function zygote (seconds of CPU
and hundreds of MB between them) only when a job wants them at once."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from spirtd.keyfiles import write_secret
from spirtd.localcluster import LocalNode, wait_for
from spirtd.training import jobfiles


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def _zygotes(node: LocalNode) -> list[int]:
    assert node.proc is not None
    return [p for p in _children(node.proc.pid) if "runtime.zygote" in _cmdline(p)]


def _torch_mapped(pid: int) -> bool:
    return "libtorch" in Path(f"/proc/{pid}/maps").read_text()


def test_an_idle_daemon_loads_neither_torch_nor_a_zygote(make_cluster: Any) -> None:
    c = make_cluster(2)
    c.start()
    n = c.nodes[0]
    wait_for(lambda: len(n.status()["members"]) >= 2, 30, "the two daemons to meet")
    assert n.proc is not None
    assert not _torch_mapped(n.proc.pid)
    assert _zygotes(n) == []
    # A job makes it want both: the zygote starts while the job is prepared.
    c.nodes[1].call("POST", "/v1/train/start", {"task": "digits", "rounds": 3})
    wait_for(lambda: _zygotes(n) != [], 60, "the zygote to start once a job is known")
    wait_for(lambda: n.call("GET", "/v1/train/status")["state"] == "done", 120, "the job")
    assert _torch_mapped(n.proc.pid)


def test_a_daemon_stopped_in_a_job_starts_its_zygote_with_the_process(
    make_cluster: Any,
) -> None:
    c = make_cluster(1)
    n = c.nodes[0]
    # What the training service leaves in the data dir while a job runs. The record
    # is not a valid one (the daemon says so and resumes nothing): the zygote is
    # started before any of that is read, from the state alone.
    write_secret(jobfiles.record_path(n.data_dir), b"not a record")
    write_secret(jobfiles.info_path(n.data_dir), json.dumps({"state": "running"}).encode())
    n.start()
    assert _zygotes(n) != []


def test_interrupted_reads_only_a_running_or_syncing_job(tmp_path: Path) -> None:
    assert not jobfiles.interrupted(tmp_path)  # nothing saved
    jobfiles.job_dir(tmp_path).mkdir()
    info = jobfiles.info_path(tmp_path)
    info.write_text(json.dumps({"state": "running"}))
    assert not jobfiles.interrupted(tmp_path)  # no record: no job to resume
    jobfiles.record_path(tmp_path).write_bytes(b"r")
    for state, want in (("running", True), ("syncing", True), ("done", False), ("stopped", False)):
        info.write_text(json.dumps({"state": state}))
        assert jobfiles.interrupted(tmp_path) is want, state
    for bad in ("[]", "{", '{"state": "running"' + " " * jobfiles.INFO_MAX + "}"):
        info.write_text(bad)
        assert not jobfiles.interrupted(tmp_path), bad[:20]
