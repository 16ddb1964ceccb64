"""deploy/systemd: the unit passes `systemd-analyze verify` and its offline
security review, the sysusers and tmpfiles snippets apply to a scratch root, and
the daemon really sends READY=1 (Type=notify) over $NOTIFY_SOCKET."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from spirtd.localcluster import LocalNode

REPO = Path(__file__).resolve().parent.parent
UNITS = REPO / "deploy" / "systemd"
ANALYZE = shutil.which("systemd-analyze")
needs_systemd = pytest.mark.skipif(
    ANALYZE is None, reason="systemd-analyze is not installed (Debian package: systemd)"
)


def unit_with_real_binary(tmp: Path) -> Path:
    """The unit, with ExecStart pointed at this checkout's spirtd entry point: verify
    checks that the command exists, and /opt/spirt is where an install puts it."""
    spirtd = Path(sys.executable).parent / "spirtd"
    assert spirtd.exists(), f"{spirtd}: install the package (pip install -e .) first"
    text = (UNITS / "spirtd.service").read_text()
    assert "ExecStart=/opt/spirt/bin/spirtd " in text
    out = tmp / "spirtd.service"
    out.write_text(text.replace("/opt/spirt/bin/spirtd", str(spirtd)))
    return out


def directives(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.lstrip().startswith(("#", "[")):
            k, _, v = line.partition("=")
            out.setdefault(k.strip(), []).append(v.strip())
    return out


def test_unit_has_the_promised_settings() -> None:
    d = directives((UNITS / "spirtd.service").read_text())
    assert d["Type"] == ["notify"] and d["NotifyAccess"] == ["main"]
    assert d["User"] == ["spirt"] and d["Restart"] == ["on-failure"]
    assert d["RestartPreventExitStatus"] == ["78"]
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ReadWritePaths": "/var/lib/spirt",
        "PrivateTmp": "yes",
        "ProtectHome": "yes",
        "PrivateDevices": "yes",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
    }.items():
        assert d.get(key) == [value], key
    # The data dir the unit writes is the one spirtd defaults to under systemd.
    assert d["StateDirectory"] == ["spirt"]
    assert "/var/lib/spirt 0700 spirt spirt" in (UNITS / "spirt.tmpfiles").read_text()


@needs_systemd
def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    unit = unit_with_real_binary(tmp_path)
    r = subprocess.run([ANALYZE, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "spirtd.service" not in r.stderr, r.stderr  # no warnings about the unit either


@needs_systemd
def test_security_exposure_stays_low(tmp_path: Path) -> None:
    unit = unit_with_real_binary(tmp_path)
    # --threshold: exit non-zero above an exposure of 2.0 (on systemd's 0-10 scale x 10).
    r = subprocess.run(
        [ANALYZE, "security", "--offline=yes", "--threshold=20", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr
    assert "Overall exposure level for spirtd.service" in r.stdout


@pytest.mark.skipif(
    shutil.which("systemd-sysusers") is None or shutil.which("systemd-tmpfiles") is None,
    reason="systemd-sysusers/systemd-tmpfiles are not installed (Debian package: systemd)",
)
def test_sysusers_and_tmpfiles_apply_to_a_scratch_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    r = subprocess.run(
        ["systemd-sysusers", f"--root={root}", str(UNITS / "spirt.sysusers")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    entry = next(
        x for x in (root / "etc/passwd").read_text().splitlines() if x.startswith("spirt:")
    )
    assert entry.endswith(":/var/lib/spirt:/usr/sbin/nologin")
    r = subprocess.run(
        ["systemd-tmpfiles", f"--root={root}", "--create", str(UNITS / "spirt.tmpfiles")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    data = root / "var/lib/spirt"
    assert data.is_dir() and data.stat().st_mode & 0o777 == 0o700
    assert data.stat().st_uid == int(entry.split(":")[2])


def test_daemon_sends_ready_over_notify_socket(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Type=notify: READY=1 arrives once the control socket answers, STOPPING=1 at SIGTERM."""
    addr = short_tmp / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(str(addr))
        s.settimeout(60)
        node = LocalNode(short_tmp / "n")
        monkeypatch.setenv("NOTIFY_SOCKET", str(addr))  # the daemon inherits it
        node.start()
        try:
            msg = s.recv(4096).decode()
            assert "READY=1" in msg.splitlines()
            # Ready means spirtctl works.
            assert (short_tmp / "n" / "api.sock").exists()
            assert node.status()["node_id"] == node.node_id
            assert node.stop() == 0
            assert "STOPPING=1" in s.recv(4096).decode().splitlines()
        finally:
            node.kill()
