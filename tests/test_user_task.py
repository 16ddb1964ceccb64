"""A user's own `module:attr` task trains on a real 3-peer cluster, set up from
nothing but README.md's "Your own task" section.

The task's code is the README's example, cut out of README.md and written as a
package in a temp dir, so the README cannot drift from what works. The package
reaches the daemons (and, through them, their function workers) only via
PYTHONPATH and the `task_modules` setting, as the README says.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from spirtd.localcluster import LocalCluster, LocalNode, all_see, wait_for

pytestmark = pytest.mark.timeout(420)

_README = Path(__file__).resolve().parent.parent / "README.md"
_PEERS = 3


def _readme_section() -> str:
    text = _README.read_text()
    start = text.index("### Your own task")
    end = text.index("\n## ", start)
    return text[start:end]


def _block(section: str, lang: str) -> str:
    m = re.search(rf"```{lang}\n(.*?)```", section, re.S)
    assert m is not None, f"README's 'Your own task' has no {lang} block"
    return m.group(1)


def _write_package(root: Path, section: str) -> tuple[str, str]:
    """Writes the README's example as a package; returns (package, task name)."""
    code = _block(section, "python")
    first = code.splitlines()[0]
    m = re.match(r"# (\w+)/(\w+)\.py", first)
    assert m is not None, f"the example's first line names no file: {first!r}"
    package, module = m.group(1), m.group(2)
    (root / package).mkdir(parents=True)
    (root / package / "__init__.py").write_text("")
    (root / package / f"{module}.py").write_text(code)
    name = re.search(r'name = "([\w.]+:\w+)"', code)
    assert name is not None
    return package, name.group(1)


def _write_dataset(directory: Path) -> None:
    """Three well-separated 2-D blobs: the example's own data, not a built-in set."""
    rng = np.random.default_rng(7)
    centers = np.array([[0.0, 4.0], [-4.0, -3.0], [4.0, -3.0]])
    y = rng.integers(0, 3, size=1500)
    x = centers[y] + rng.normal(0.0, 1.0, size=(1500, 2))
    directory.mkdir(parents=True)
    np.savez(directory / "blobs.npz", x=x, y=y)


def _status(n: LocalNode) -> dict[str, Any]:
    return n.call("GET", "/v1/train/status")


def test_user_task_trains_on_three_peers(
    make_cluster: Any, short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    section = _readme_section()
    package, task = _write_package(short_tmp / "site", section)
    # The README's config line, as given.
    toml = _block(section, "toml")
    assert f'task_modules = ["{package}"]' in toml
    data = short_tmp / "blobs"
    _write_dataset(data)
    # The daemons (LocalNode copies this environment) and their workers import it from here.
    monkeypatch.setenv("PYTHONPATH", str(short_tmp / "site"))
    config = f'{toml}\n[datasets]\n"{task}" = "{data}"\n'

    c: LocalCluster = make_cluster(0)
    for i in range(_PEERS):
        c.add_node(
            args=["--profile", "local", "--shard", f"{i}/{_PEERS}"],
            config=config,
            start=False,
            index=i,
        )
    c.start()
    everyone = {x.node_id: "alive" for x in c.nodes}
    wait_for(lambda: all_see(c.nodes, everyone), 60, "every node to see every other alive")

    # The README's start command, with this cluster's data dir.
    line = re.search(r"^spirtctl train start --task .*$", section, re.M)
    assert line is not None, "README's 'Your own task' shows no train start command"
    cmd = line.group(0).split()
    assert cmd[:4] == ["spirtctl", "train", "start", "--task"] and task in cmd
    ctl = [sys.executable, "-m", "spirtd.control.ctl", *cmd[1:], "--data-dir"]
    where = str(c.nodes[1].data_dir)
    # An option the task does not know is refused up front, with the task's own words.
    r = subprocess.run(
        [*ctl, where, "--task-arg", "colour=red"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert r.returncode == 1 and "unknown option(s) colour" in r.stderr, r.stderr
    r = subprocess.run([*ctl, where], capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    rounds = int(cmd[cmd.index("--rounds") + 1])

    try:
        wait_for(
            lambda: all(_status(n)["state"] in ("done", "stopped") for n in c.nodes),
            300,
            "every node to finish the user task",
        )
    except TimeoutError as e:
        raise AssertionError("\n".join([str(e), *(n.log_tail(10) for n in c.nodes)])) from None
    statuses = [_status(n) for n in c.nodes]
    for s in statuses:
        assert s["state"] == "done", s.get("detail")
        assert s["job"]["task"] == task
        assert s["round"] == rounds
        # Every round had all three peers' gradients: the workers imported the task.
        assert all(len(h["contributors"]) == _PEERS for h in s["history"]), s["history"][-1]
        assert s["accuracy"] is not None and s["accuracy"] >= 0.9, s["accuracy"]
    assert len({s["model_digest"] for s in statuses}) == 1
