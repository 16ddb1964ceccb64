"""A user's own `module:attr` task trains on a real 3-peer cluster, set up from
nothing but README.md's "Bring your own model" section and the example package
it shows, examples/spirt_example_task.

The README's code block must be that package's task file, byte for byte, so the
example in the README is the one that is trained here. The package reaches the
daemons (and, through them, their function workers) only via PYTHONPATH and the
`task_modules` setting, and its data comes from its own `data` module, as the
README says.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from spirtd.localcluster import LocalCluster, LocalNode, all_see, wait_for
from spirtd.tasks import TaskError, load_task, task_class
from spirtd.training import job as jobs

pytestmark = pytest.mark.timeout(420)

_ROOT = Path(__file__).resolve().parent.parent
_README = _ROOT / "README.md"
_EXAMPLES = _ROOT / "examples"
_PACKAGE = "spirt_example_task"
_TASK = f"{_PACKAGE}.blobs:Blobs"
_PEERS = 3


def _readme_section() -> str:
    text = _README.read_text()
    start = text.index("### Bring your own model")
    end = text.index("\n## ", start)
    return text[start:end]


def _block(section: str, lang: str) -> str:
    m = re.search(rf"```{lang}\n(.*?)```", section, re.S)
    assert m is not None, f"README's 'Bring your own model' has no {lang} block"
    return m.group(1)


def _write_dataset(directory: Path) -> None:
    """The example's data, written by its own script as the README says."""
    r = subprocess.run(
        [sys.executable, "-m", f"{_PACKAGE}.data", str(directory)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "PYTHONPATH": str(_EXAMPLES)},
    )
    assert r.returncode == 0, r.stderr
    assert (directory / "blobs.npz").is_file()


@pytest.fixture
def example_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(_EXAMPLES))


def _status(n: LocalNode) -> dict[str, Any]:
    return n.call("GET", "/v1/train/status")


def test_the_readme_shows_the_example_file() -> None:
    section = _readme_section()
    code = _block(section, "python")
    assert code == (_EXAMPLES / _PACKAGE / "blobs.py").read_text()
    assert f'name = "{_TASK}"' in code
    # The old heading's links still land on the section.
    text = _README.read_text()
    assert "](#your-own-task)" in text
    assert '<a id="your-own-task"></a>\n\n### Bring your own model' in text


def test_the_example_task_loads_and_checks_its_input(
    example_importable: None, tmp_path: Path
) -> None:
    data = tmp_path / "blobs"
    _write_dataset(data)
    allowed = {_PACKAGE}
    task = load_task(_TASK, "1/3", allowed_modules=allowed, path=str(data), hidden=8)
    assert task.count_params() == task.param_count == 2 * 8 + 8 + 8 * 3 + 3
    assert len(task.test) == 300 and len(task.train) == 400  # 1500 points, a third of 1200
    ev = task.evaluate(task.initial_params(0))
    assert ev.samples == 300 and ev.accuracy is not None and 0.0 <= ev.accuracy <= 1.0
    g = task.gradient(task.initial_params(0), np.arange(10))
    assert g.values.shape == (task.param_count,) and np.all(np.isfinite(g.values))

    # Its class attributes are its jobs' defaults; the rest are Task's.
    cls = task_class(_TASK, allowed_modules=allowed)
    assert cls.needs_dataset and (cls.rounds, cls.eval_every) == (40, 5)
    spec = jobs.from_request({"task": _TASK}, now_ms=1, allowed_modules=allowed)
    assert (spec.rounds, spec.eval_every, spec.optimizer, spec.lr) == (40, 5, "sgd", 0.05)

    for options, message in [
        ({"path": str(data), "colour": "red"}, "unknown option"),
        ({"path": str(data), "hidden": 0}, "hidden must be an integer"),
        ({"path": str(data), "hidden": "64"}, "hidden must be an integer"),
        ({}, "needs --dataset"),
    ]:
        with pytest.raises(TaskError, match=message):
            load_task(_TASK, allowed_modules=allowed, **options)
    bad = tmp_path / "bad"
    bad.mkdir()
    np.savez(bad / "blobs.npz", x=np.zeros((4, 2), np.float32), y=np.array([0, 1, 2, 3]))
    with pytest.raises(TaskError, match=r"labels must be in 0\.\.2"):
        load_task(_TASK, allowed_modules=allowed, path=str(bad)).train  # noqa: B018
    np.savez(bad / "blobs.npz", x=np.zeros((4, 3), np.float32), y=np.zeros(4, np.int64))
    with pytest.raises(TaskError, match="N x 2"):
        load_task(_TASK, allowed_modules=allowed, path=str(bad)).train  # noqa: B018


def test_user_task_trains_on_three_peers(
    make_cluster: Any, short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    section = _readme_section()
    # The README's config line, as given.
    toml = _block(section, "toml")
    assert f'task_modules = ["{_PACKAGE}"]' in toml
    data = short_tmp / "blobs"
    _write_dataset(data)
    # The daemons (LocalNode copies this environment) and their workers import it from here.
    monkeypatch.setenv("PYTHONPATH", str(_EXAMPLES))
    config = f'{toml}\n[datasets]\n"{_TASK}" = "{data}"\n'

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
    assert line is not None, "README's 'Bring your own model' shows no train start command"
    cmd = line.group(0).split()
    assert cmd[:4] == ["spirtctl", "train", "start", "--task"] and _TASK in cmd
    # The rounds are the task class's own default, not a flag.
    assert "--rounds" not in cmd
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
        assert s["job"]["task"] == _TASK
        # Blobs sets rounds = 40 and eval_every = 5; the rest are Task's.
        assert (s["job"]["rounds"], s["job"]["eval_every"]) == (40, 5), s["job"]
        assert (s["job"]["optimizer"], s["job"]["lr"], s["job"]["momentum"]) == ("sgd", 0.05, 0.9)
        assert s["round"] == 40
        # Every round had all three peers' gradients: the workers imported the task.
        assert all(len(h["contributors"]) == _PEERS for h in s["history"]), s["history"][-1]
        assert s["accuracy"] is not None and s["accuracy"] >= 0.9, s["accuracy"]
    assert len({s["model_digest"] for s in statuses}) == 1
