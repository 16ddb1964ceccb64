"""spirtd and spirtctl as processes: config precedence, fatal misconfiguration,
exit codes, and graceful shutdown."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from spirtd.config import ConfigError, load
from spirtd.localcluster import LocalNode

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def run(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=ENV
    )


def test_sample_config_loads_and_flags_win(tmp_path):
    cfg = load(REPO / "deploy" / "spirtd.toml", {"listen": "127.0.0.1:1234"})
    assert cfg.listen == "127.0.0.1:1234"
    assert cfg.transport.idle_timeout_s == 30.0


def test_unknown_config_key_names_the_key(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('listne = "x"\n')
    with pytest.raises(ConfigError, match="listne: unknown setting"):
        load(f, {})
    f.write_text("[transport]\nidle_timeout_s = 'soon'\n")
    with pytest.raises(ConfigError, match="idle_timeout_s"):
        load(f, {})


def test_pubsub_memory_settings_are_checked(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("[pubsub]\nmemory_mb = 256\nreserve_mb = 300\n")
    with pytest.raises(ConfigError, match=r"reserve_mb: 300 exceeds pubsub\.memory_mb"):
        load(f, {})
    f.write_text("[pubsub]\ndisk_mb = -1\n")
    with pytest.raises(ConfigError, match=r"pubsub\.disk_mb"):
        load(f, {})
    f.write_text("[pubsub]\nmemory_mb = 256\nreserve_mb = 64\n")
    cfg = load(f, {})
    assert (cfg.pubsub.memory_mb, cfg.pubsub.reserve_mb) == (256, 64)


def test_port_in_use_is_one_clear_line(short_tmp):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    port = s.getsockname()[1]
    try:
        r = run("-m", "spirtd", "--data-dir", str(short_tmp / "n"), "--listen", f"127.0.0.1:{port}")
    finally:
        s.close()
    assert r.returncode == 78
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("spirtd: listen:") and "in use" in lines[-1]


def test_unreadable_key_is_one_clear_line(short_tmp):
    d = short_tmp / "n"
    d.mkdir()
    (d / "node.key").write_text("not a key\n")
    os.chmod(d / "node.key", 0o600)
    r = run("-m", "spirtd", "--data-dir", str(d), "--listen", "127.0.0.1:0")
    assert r.returncode == 78
    assert "node.key" in r.stderr.strip().splitlines()[-1]


def test_missing_module_build_is_one_clear_line(short_tmp):
    """A checkout whose module was never built (no pip install) is a setup error (78)
    that says how to build it, not a traceback. The copy of the packages leaves the
    built .so out; PYTHONPATH puts the copy ahead of the installed one."""
    src = short_tmp / "src"
    for pkg in ("spirtd", "protocol"):
        shutil.copytree(REPO / pkg, src / pkg, ignore=shutil.ignore_patterns("*.so"))
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "spirtd",
            "--data-dir",
            str(short_tmp / "n"),
            "--listen",
            "127.0.0.1:0",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(src)},
        cwd=src,
    )
    assert r.returncode == 78, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("spirtd: redis:") and "install-venv.sh" in last
    assert "Traceback" not in r.stderr


def test_bad_flag_value_names_the_setting(short_tmp):
    r = run("-m", "spirtd", "--data-dir", str(short_tmp), "--listen", "nonsense")
    assert r.returncode == 78 and "listen" in r.stderr


def test_new_identity_first_lines_spirtctl_and_sigterm_exit_0(short_tmp):
    # One daemon for both: its start-up and exit, and spirtctl's answers while it runs.
    n = LocalNode(short_tmp / "n").start()
    assert n.node_id.startswith("12D3KooW")
    assert n.address.startswith("127.0.0.1:")
    assert len(bytes.fromhex(n.public_key)) == 32
    assert (short_tmp / "n" / "node.key").stat().st_mode & 0o777 == 0o600
    assert (short_tmp / "n" / "api.sock").stat().st_mode & 0o777 == 0o600
    # Admission is closed by default, and the log says so.
    assert "admission is closed" in n.log_tail()
    # A second daemon on the same data dir is refused.
    r = run("-m", "spirtd", "--data-dir", str(short_tmp / "n"), "--listen", "127.0.0.1:0")
    assert r.returncode == 78 and "in use by another spirtd" in r.stderr
    try:
        _spirtctl_exit_codes(n, short_tmp)
    except BaseException:
        n.kill()  # no daemon left behind by a failed check
        raise
    assert n.stop() == 0


def _spirtctl_exit_codes(n: LocalNode, short_tmp: Path) -> None:
    # 3: unreachable, naming the socket.
    r = run("-m", "spirtd.control.ctl", "status", "--data-dir", str(short_tmp / "none"))
    assert r.returncode == 3 and "api.sock" in r.stderr
    # 2: usage.
    assert run("-m", "spirtd.control.ctl", "frobnicate").returncode == 2
    r = run("-m", "spirtd.control.ctl", "status", "--json", "--data-dir", str(n.data_dir))
    assert r.returncode == 0
    s = json.loads(r.stdout)
    assert s["node_id"] == n.node_id
    r = run("-m", "spirtd.control.ctl", "peers", "--data-dir", str(n.data_dir))
    assert r.returncode == 0 and n.node_id in r.stdout and "STATE" in r.stdout
    r = run("-m", "spirtd.control.ctl", "metrics", "--data-dir", str(n.data_dir))
    assert r.returncode == 0 and 'spirt_members{state="alive"} 1.0' in r.stdout


def test_ca_and_trust_commands(short_tmp):
    ca = str(short_tmp / "ca")
    assert run("-m", "spirtd.control.ctl", "ca", "init", "--ca-dir", ca).returncode == 0
    r = run("-m", "spirtd.control.ctl", "ca", "init", "--ca-dir", ca)
    assert r.returncode == 1 and "already exists" in r.stderr
    r = run(
        "-m",
        "spirtd.control.ctl",
        "ca",
        "enroll",
        "--ca-dir",
        ca,
        "--data-dir",
        str(short_tmp / "n"),
        "--json",
    )
    assert r.returncode == 0
    pub = json.loads(r.stdout)["public_key"]
    r = run("-m", "spirtd.control.ctl", "ca", "sign", "--ca-dir", ca, pub)
    assert r.returncode == 0 and len(bytes.fromhex(r.stdout.strip())) > 100
    r = run("-m", "spirtd.control.ctl", "ca", "revoke", "--ca-dir", ca, pub, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["crl_version"] == 2
    r = run("-m", "spirtd.control.ctl", "trust", "--data-dir", str(short_tmp / "m"), pub, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["added"] is True
    assert pub in (short_tmp / "m" / "trust" / "allowlist").read_text()
    r = run("-m", "spirtd.control.ctl", "trust", "--data-dir", str(short_tmp / "m"), "zz")
    assert r.returncode == 2 and "not a public key" in r.stderr


def test_spirtctl_pubsub_round_trip(make_cluster, short_tmp):
    from spirtd.localcluster import all_see, wait_for

    c = make_cluster(2, args=["--profile", "local"]).start()
    a, b = c.nodes
    wait_for(lambda: all_see(c.nodes, {a.node_id: "alive", b.node_id: "alive"}), 30, "cluster")

    def ctl(node, *args: str) -> subprocess.CompletedProcess[str]:
        return run("-m", "spirtd.control.ctl", "pubsub", *args, "--data-dir", str(node.data_dir))

    assert ctl(b, "subscribe", "--topic", "t").returncode == 0
    payload = short_tmp / "payload"
    payload.write_bytes(os.urandom(2_000_000))
    r = ctl(a, "publish", "--topic", "t", "--file", str(payload), "--json")
    assert r.returncode == 0, r.stderr
    msg_id = json.loads(r.stdout)["msg_id"]

    def delivered() -> bool:
        r = ctl(b, "inbox", "--json")
        return any(m["msg_id"] == msg_id for m in json.loads(r.stdout)["messages"])

    wait_for(delivered, 30, "b to receive the file")
    r = ctl(a, "publish", "--topic", "t", "--file", str(short_tmp / "missing"))
    assert r.returncode == 1 and "not a readable file" in r.stderr
