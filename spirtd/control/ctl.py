"""`spirtctl`: the operator CLI (INTERFACES.md).

Daemon commands talk HTTP/JSON over DATA_DIR/api.sock (or, with --api
HOST:PORT, over TCP with the node's token); `ca` and `trust` work offline on
directories. Exit codes: 0 success, 1 the daemon answered with an error (or a
followed job did not finish, or an offline command failed), 2 usage error (the
command line itself is wrong), 3 the daemon is unreachable.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from protocol.errors import DecodeError
from protocol.identity import Certificate, node_id, parse_public_key
from spirtd import rules
from spirtd.config import default_data_dir
from spirtd.control import report
from spirtd.keyfiles import CaDir, DataDir, KeyFileError, append_key_line, write_public

EXIT_OK, EXIT_DAEMON_ERROR, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
EXIT_INTERRUPTED = 130
REQUEST_TIMEOUT_S = 30.0
FOLLOW_POLL_S = 1.0
SYSTEM_DATA_DIR = Path("/var/lib/spirt")  # the unit's StateDirectory


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(str(self._path))
        self.sock = sock


class Unreachable(Exception):
    pass


class DaemonError(Exception):
    pass


def call(
    data_dir: Path,
    method: str,
    path: str,
    body: dict | None = None,
    *,
    api: str | None = None,
    token: str | None = None,
) -> Any:
    """One control API request: over DATA_DIR/api.sock, or over TCP to ``api``
    (HOST:PORT) with ``token``. Raises Unreachable or DaemonError."""
    sock = DataDir(data_dir).api_socket
    conn: http.client.HTTPConnection
    if api is not None:
        host, _, port = api.rpartition(":")
        conn = http.client.HTTPConnection(host.strip("[]"), int(port), timeout=REQUEST_TIMEOUT_S)
        where = f"tcp {api}"
    else:
        conn = _UnixHTTPConnection(sock, REQUEST_TIMEOUT_S)
        where = str(sock)
    try:
        payload = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if payload is not None else {}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        conn.request(method, path, body=payload, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
    except (FileNotFoundError, ConnectionRefusedError) as e:
        raise Unreachable(
            f"cannot reach spirtd at {where}: {e.strerror}. {_start_hint(data_dir, api)}"
        ) from None
    except PermissionError as e:
        raise Unreachable(
            f"cannot reach spirtd at {where}: {e.strerror or 'permission denied'}. This user "
            "may not open the data dir or its socket (mode 0600, owned by the daemon's user): "
            "run spirtctl as that user (e.g. `sudo -u spirt spirtctl ...`)"
        ) from None
    except TimeoutError:
        raise Unreachable(
            f"spirtd at {where} did not answer within {REQUEST_TIMEOUT_S:.0f}s; it may be "
            "overloaded or stuck (check its log: `journalctl -u spirtd`)"
        ) from None
    except OSError as e:
        raise Unreachable(
            f"cannot reach spirtd at {where}: {e}. {_start_hint(data_dir, api)}"
        ) from None
    finally:
        conn.close()
    ctype = resp.getheader("Content-Type", "")
    if resp.status == 401:
        raise DaemonError(
            "the daemon refused the token: pass the node's DATA_DIR/api.token with --token-file"
        )
    if resp.status >= 400:
        try:
            msg = json.loads(raw).get("error", raw.decode(errors="replace"))
        except ValueError:
            msg = raw.decode(errors="replace")
        raise DaemonError(msg)
    return json.loads(raw) if "json" in ctype else raw.decode()


def _start_hint(data_dir: Path, api: str | None) -> str:
    if api is not None:
        return (
            "Is [control] listen_tcp set on that node, and is the port reachable from here? "
            "Or use spirtctl on the node itself."
        )
    return (
        f"Is spirtd running on this data dir? Start it with `spirtd --data-dir {data_dir}` "
        "(or `systemctl start spirtd`), or point spirtctl at the right one with --data-dir."
    )


def _ctl_data_dir() -> Path:
    """spirtctl's data dir without --data-dir: $SPIRT_DATA_DIR, else this user's
    default, else the system unit's /var/lib/spirt when a daemon listens there."""
    env = os.environ.get("SPIRT_DATA_DIR")
    if env:
        return Path(env).expanduser()
    mine = default_data_dir()
    if not _may_exist(DataDir(mine).api_socket) and _may_exist(DataDir(SYSTEM_DATA_DIR).api_socket):
        return SYSTEM_DATA_DIR
    return mine


def _may_exist(path: Path) -> bool:
    """Whether ``path`` exists, or might: a directory this user may not search
    (the daemon's 0700 data dir) hides it, and connecting then says so."""
    try:
        return path.exists()
    except PermissionError:
        return True


# -- rendering ---------------------------------------------------------------------------


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    out = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True))]
    out += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(line.rstrip() for line in out)


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def render_status(s: dict[str, Any]) -> str:
    t = s["training"]
    r = s["redis"]
    f = s["functions"]
    lines = [
        f"node       {s['node_id']}",
        f"address    {s['address']}",
        f"cluster    {s.get('cluster', '-')}",
        f"training   {t['state']} job={_cell(t['job'])} round={t['round']} "
        f"loss={_cell(t['loss'])} accuracy={_cell(t['accuracy'])}",
        f"model      digest={_cell(t['model_digest'])}",
        f"redis      ok={r['ok']} module={r['module']}",
        f"functions  backend={f['backend']} in_flight={f['in_flight']}",
        "",
        render_members(s["members"]),
    ]
    return "\n".join(lines)


def render_members(members: list[dict[str, Any]]) -> str:
    rows = [{**m, "node_id": m["node_id"] + (" (self)" if m.get("self") else "")} for m in members]
    return table(rows, ["node_id", "state", "address", "incarnation", "last_heard_s"])


# -- commands ----------------------------------------------------------------------------


def _call(a: argparse.Namespace, method: str, path: str, body: dict | None = None) -> Any:
    return call(a.data_dir, method, path, body, api=a.api, token=a.token)


def cmd_status(a: argparse.Namespace) -> str | dict:
    s = _call(a, "GET", "/v1/status")
    return s if a.json else render_status(s)


def cmd_peers(a: argparse.Namespace) -> str | dict:
    s = _call(a, "GET", "/v1/peers")
    return s if a.json else render_members(s["members"])


def cmd_metrics(a: argparse.Namespace) -> str | dict:
    text = _call(a, "GET", "/v1/metrics")
    if not a.json:
        return text.rstrip("\n")
    from prometheus_client.parser import text_string_to_metric_families

    families = [
        {
            "name": fam.name,
            "type": fam.type,
            "help": fam.documentation,
            "samples": [
                {"name": smp.name, "labels": smp.labels, "value": smp.value} for smp in fam.samples
            ],
        }
        for fam in text_string_to_metric_families(text)
    ]
    return {"families": families, "text": text}


def _task_arg(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    value: Any = raw
    for conv in (int, float):
        try:
            value = conv(raw)
            break
        except ValueError:
            continue
    if raw.lower() in ("true", "false"):
        value = raw.lower() == "true"
    return key, value


def cmd_train_start(a: argparse.Namespace) -> str | dict:
    body: dict[str, Any] = {
        k: v
        for k, v in {
            "task": a.task,
            "rounds": a.rounds,
            "aggregator": a.aggregator,
            "f": a.f,
            "batch_size": a.batch_size,
            "functions_per_round": a.functions_per_round,
            "optimizer": a.optimizer,
            "lr": a.lr,
            "momentum": a.momentum,
            "weight_decay": a.weight_decay,
            "seed": a.seed,
            "eval_every": a.eval_every,
            "inner_steps": a.inner_steps,
            "compression": a.compression,
            "outer_lr": a.outer_lr,
            "outer_momentum": a.outer_momentum,
        }.items()
        if v is not None
    }
    if a.task_arg:
        body["task_options"] = dict(a.task_arg)
    r = _call(a, "POST", "/v1/train/start", body)
    started = (
        f"started job {r.get('job')}: {r.get('task')}, {r.get('rounds')} rounds, "
        f"{r.get('aggregator')} (f={r.get('f')}), {r.get('optimizer')} lr={r.get('lr')}"
    )
    if (r.get("inner_steps") or 1) > 1 or r.get("compression", "none") != "none":
        started += f", {r.get('inner_steps')} inner steps per round, {r.get('compression')}"
    if a.follow:
        _progress(a, started)
        final = follow(a, str(r.get("job")))
        return {**r, "final": final} if a.json else _follow_summary(final)
    if a.json:
        return r
    return started + "\nfollow it with `spirtctl train status --follow`"


def cmd_train_stop(a: argparse.Namespace) -> str | dict:
    try:
        r = _call(a, "POST", "/v1/train/stop", {})
    except DaemonError as e:
        raise DaemonError(f"{e} (see `spirtctl train status`)") from None
    return r if a.json else f"stopped job {r.get('job')} on every member"


class JobNotFinished(Exception):
    """A followed job ended without completing (stopped or failed)."""


def _progress(a: argparse.Namespace, line: str) -> None:
    # With --json, stdout carries only the final document; progress goes to stderr.
    print(line, file=sys.stderr if a.json else sys.stdout, flush=True)


def follow(a: argparse.Namespace, job: str | None = None) -> dict[str, Any]:
    """Prints each round as it completes until the job ends; returns the last status.
    Raises JobNotFinished when the job ended without completing."""
    seen = 0
    last_state = ""
    while True:
        r = _call(a, "GET", "/v1/train/status")
        spec = r.get("job") or {}
        if job is not None and spec.get("id") not in (None, job):
            raise JobNotFinished(f"job {job} was replaced by job {spec.get('id')}")
        total = spec.get("rounds", "?")
        for h in r.get("history", []):
            if h["round"] > seen:
                seen = h["round"]
                _progress(a, _round_line(h, total))
        state = str(r.get("state"))
        if state != last_state and state in ("syncing", "idle"):
            detail = f" ({r['detail']})" if r.get("detail") else ""
            _progress(a, f"{state}{detail}")
        last_state = state
        if state == "done":
            return r
        if state == "stopped":
            detail = f": {r['detail']}" if r.get("detail") else ""
            raise JobNotFinished(
                f"job {spec.get('id')} stopped at round {r.get('round')}/{total}{detail}"
            )
        if not spec:
            raise JobNotFinished("no training job (start one with `spirtctl train start`)")
        time.sleep(FOLLOW_POLL_S)


def _round_line(h: dict[str, Any], total: Any) -> str:
    acc = f" accuracy={h['accuracy']:.4f}" if h.get("accuracy") is not None else ""
    loss = f"{h['loss']:.4f}" if h.get("loss") is not None else "-"
    return (
        f"round {h['round']}/{total} loss={loss}{acc} "
        f"contributors={len(h.get('contributors', []))} duration={h.get('duration_s', 0):.3f}s"
    )


def _follow_summary(r: dict[str, Any]) -> str:
    return (
        f"job {r['job']['id']} done: round {r.get('round')}, loss {_cell(r.get('loss'))}, "
        f"accuracy {_cell(r.get('accuracy'))}, model {_cell(r.get('model_digest'))}"
    )


def cmd_train_status(a: argparse.Namespace) -> str | dict:
    if a.follow:
        final = follow(a)
        return final if a.json else _follow_summary(final)
    r = _call(a, "GET", "/v1/train/status")
    if a.json:
        return r
    job = r.get("job")
    if job is None:
        return "no training job (start one with `spirtctl train start --task digits`)"
    head = [
        f"job      {job['id']}  {job['task']}  {job['aggregator']} f={job['f']}  "
        f"{job['optimizer']} lr={job['lr']}",
        f"state    {r.get('state')}  round {r.get('round')}/{job['rounds']}"
        + (f"  ({r['detail']})" if r.get("detail") else ""),
        f"model    {_cell(r.get('model_digest'))}",
    ]
    h = job.get("inner_steps") or 1
    if h > 1 or job.get("compression", "none") != "none":
        head.insert(
            2,
            f"steps    {r.get('steps', 0)}  ({h} inner steps per round, "
            f"{job.get('compression')} bodies, outer lr={job.get('outer_lr')} "
            f"momentum={job.get('outer_momentum')})",
        )
    cost = r.get("cost")
    if cost:
        head.append(
            f"cost     ${cost['usd']:.6f}  {cost['gb_s']:.3f} GB-s  {cost['requests']} requests"
        )
    for ex in r.get("excluded") or []:
        what = "sent a non-finite gradient" if ex.get("reason") == "nonfinite" else "equivocated"
        head.append(
            f"excluded {ex['node_id']}: {what} in round {ex['round']} "
            f"({'seen here' if ex.get('how') == 'detected' else 'proof from a peer'})"
        )
    rounds = r.get("rounds") or {}
    if rounds.get("waiting_for_quorum"):
        head.append(
            f"waiting  for a quorum: {len(rounds.get('have', []))} of {rounds.get('quorum')} "
            "gradients"
        )
    rows = [
        {**h, "contributors": len(h.get("contributors", []))} for h in r.get("history", [])[-20:]
    ]
    cols = ["round", "loss", "accuracy", "contributors", "duration_s", "closed_by"]
    if h > 1:
        cols += ["bytes_sent", "bytes_received"]
    return "\n".join(head) + "\n\n" + table(rows, cols)


def cmd_train_report(a: argparse.Namespace) -> str | dict:
    st = _call(a, "GET", "/v1/train/status")
    job = st.get("job")
    if job is None:
        raise DaemonError(
            "no training job to report on (start one with `spirtctl train start --task digits`)"
        )
    st["node_id"] = _call(a, "GET", "/v1/status")["node_id"]
    try:
        out = report.render([st], a.out, title=f"job {job['id'][:12]}: {job['task']}")
    except report.ReportError as e:
        raise DaemonError(f"{e}; try again once a round has closed") from None
    peers = {p for h in st.get("history", []) for p in h.get("contributors", [])}
    r = {
        "out": str(out),
        "size_px": list(report.SIZE_PX),
        "job": job["id"],
        "rounds": len(st.get("history", [])),
        "peers": len(peers),
        "events": len(st.get("events", [])),
    }
    if a.json:
        return r
    return (
        f"wrote {out} ({r['size_px'][0]}x{r['size_px'][1]}): {r['rounds']} rounds, "
        f"{r['peers']} peers, {r['events']} events marked"
    )


def cmd_pubsub_subscribe(a: argparse.Namespace) -> str | dict:
    r = _call(a, "POST", "/v1/pubsub/subscribe", {"topic": a.topic})
    return r if a.json else f"subscribed to {a.topic}; deliveries appear in `spirtctl pubsub inbox`"


def cmd_pubsub_publish(a: argparse.Namespace) -> str | dict:
    body: dict[str, Any] = {"topic": a.topic}
    if a.file is not None:
        # The daemon reads the file itself (same host, same user), so hundreds of
        # MB never pass through this process or the control socket.
        body["path"] = str(a.file.resolve())
    else:
        body["random_size"] = a.random_size
    r = _call(a, "POST", "/v1/pubsub/publish", body)
    return r if a.json else f"published {r.get('size')} bytes as {r.get('msg_id')}"


def cmd_pubsub_inbox(a: argparse.Namespace) -> str | dict:
    r = _call(a, "GET", "/v1/pubsub/inbox")
    if a.json:
        return r
    rows = [
        {**m, "origin": str(m.get("origin", ""))[-12:], "msg_id": str(m.get("msg_id", ""))[:16]}
        for m in r.get("messages", [])
    ]
    return table(rows, ["topic", "origin", "size", "msg_id", "source"])


def cmd_ca_init(a: argparse.Namespace) -> str | dict:
    ca = CaDir(a.ca_dir)
    key = ca.init(a.cluster)
    out = {"ca_dir": str(a.ca_dir), "cluster": a.cluster, "public_key": key.public_key.hex()}
    return (
        out
        if a.json
        else f"created CA for cluster {a.cluster!r} in {a.ca_dir}\npublic key {out['public_key']}"
    )


def cmd_ca_enroll(a: argparse.Namespace) -> str | dict:
    key, cert = CaDir(a.ca_dir).enroll(DataDir(a.node_dir), now=time.time(), days=a.days)
    out = {
        "node_id": key.node_id,
        "public_key": key.public_key.hex(),
        "cluster": cert.cluster,
        "serial": cert.serial,
        "expires_at": cert.expires_at,
    }
    return (
        out
        if a.json
        else (
            f"enrolled {key.node_id} in cluster {cert.cluster!r} (serial {cert.serial}, "
            f"expires {time.strftime('%Y-%m-%d', time.gmtime(cert.expires_at))})"
        )
    )


def cmd_ca_sign(a: argparse.Namespace) -> str | dict:
    pub = a.pubkey
    cert = CaDir(a.ca_dir).sign(pub, now=time.time(), days=a.days)
    text = cert.encode().hex()
    if a.json:
        return {
            "node_id": node_id(pub),
            "serial": cert.serial,
            "expires_at": cert.expires_at,
            "certificate": text,
        }
    return text


def cmd_ca_revoke(a: argparse.Namespace) -> str | dict:
    pub = a.pubkey
    crl = CaDir(a.ca_dir).revoke(pub, now=time.time(), days=a.days)
    out = {
        "revoked": node_id(pub),
        "crl_version": crl.version,
        "crl_next_update": crl.next_update,
        "crl": str(CaDir(a.ca_dir).crl_path),
    }
    return (
        out
        if a.json
        else (
            f"revoked {node_id(pub)}; revocation list v{crl.version} is {out['crl']}: copy it to "
            "each node's trust/crl (nodes pick it up within seconds). Issue the next list "
            f"before {time.strftime('%Y-%m-%d', time.gmtime(crl.next_update))}"
        )
    )


def cmd_ca_install_cert(a: argparse.Namespace) -> str | dict:
    raw, cert = a.certificate
    write_public(DataDir(a.data_dir).cert_path, raw)
    return (
        {"installed": node_id(cert.public_key)}
        if a.json
        else f"installed certificate for {node_id(cert.public_key)}"
    )


def cmd_trust(a: argparse.Namespace) -> str | dict:
    pub = a.pubkey
    d = DataDir(a.data_dir)
    d.ensure()
    added = append_key_line(d.allowlist_path, pub)
    out = {"node_id": node_id(pub), "added": added, "allowlist": str(d.allowlist_path)}
    return out if a.json else (f"{'added' if added else 'already trusted:'} {node_id(pub)}")


def cmd_redis_tls(a: argparse.Namespace) -> str | dict:
    """The TLS listener's material for the node's Redis ([redis] tls_port): a server
    certificate for the names functions reach the node by, signed by a TLS CA kept
    beside the cluster CA (--ca-dir; made there on first use) or in the node's own
    DATA_DIR/redis-tls/ca. An operator's own certificate needs no command: point
    [redis] tls_cert, tls_key and tls_ca at it."""
    import shutil

    from spirtd.redis.process import default_tls_files
    from spirtd.tls_material import Issued, issue, make_ca

    cert, key, ca_copy = default_tls_files(a.data_dir)
    ca_dir = a.ca_dir if a.ca_dir is not None else cert.parent / "ca"
    ca = Issued(ca_dir / "tls-ca.crt", ca_dir / "tls-ca.key")
    if not ca.key.exists():
        ca = make_ca(ca_dir)
    issue(ca, cert, key, a.name, days=a.days)
    shutil.copyfile(ca.cert, ca_copy)
    out: dict[str, Any] = {
        "cert": str(cert),
        "key": str(key),
        "ca": str(ca_copy),
        "names": a.name,
        "function_password": str(a.data_dir / "redis" / "function-password"),
    }
    if a.client_dir is not None:
        client = issue(
            ca,
            a.client_dir / "client.crt",
            a.client_dir / "client.key",
            [a.client_name],
            client=True,
            days=a.days,
        )
        out["client_cert"], out["client_key"] = str(client.cert), str(client.key)
    if a.json:
        return out
    lines = [
        f"server certificate for {', '.join(a.name)}: {cert} (key {key}, 0600)",
        f"CA: {ca_copy}",
        "set [redis] tls_port (and tls_bind); give each function host the CA and the "
        f"functions' password ({out['function_password']}, once the node has started)",
    ]
    if a.client_dir is not None:
        lines.append(f"client certificate: {out['client_cert']} (key {out['client_key']})")
    return "\n".join(lines)


# A malformed key or certificate on the command line is a usage error (exit 2), so
# they are parsed by argparse; failures in doing the command exit 1.
def _pubkey_arg(text: str) -> bytes:
    try:
        return parse_public_key(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _certificate_arg(text: str) -> tuple[bytes, Certificate]:
    try:
        raw = bytes.fromhex(text.strip())
        return raw, Certificate.decode(raw)
    except (ValueError, DecodeError) as e:
        raise argparse.ArgumentTypeError(
            f"not a certificate printed by `spirtctl ca sign`: {e}"
        ) from None


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data-dir", type=Path, default=argparse.SUPPRESS, help="node data dir")
    common.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="JSON output"
    )
    common.add_argument(
        "--api",
        metavar="HOST:PORT",
        default=argparse.SUPPRESS,
        help="reach the daemon over TCP ([control] listen_tcp) instead of DATA_DIR/api.sock",
    )
    common.add_argument(
        "--token-file",
        type=Path,
        default=argparse.SUPPRESS,
        help="the node's API token for --api (default: DATA_DIR/api.token)",
    )

    p = argparse.ArgumentParser(prog="spirtctl", parents=[common], description="SPIRT operator CLI")
    sub = p.add_subparsers(dest="command", required=True)

    sub.add_parser(
        "status", parents=[common], help="this node, members, training, redis, functions"
    ).set_defaults(fn=cmd_status)
    sub.add_parser(
        "peers", parents=[common], help="members with state, address, incarnation"
    ).set_defaults(fn=cmd_peers)
    sub.add_parser(
        "metrics", parents=[common], help="Prometheus text format (--json: parsed families)"
    ).set_defaults(fn=cmd_metrics)

    train = sub.add_parser("train", help="training jobs").add_subparsers(
        dest="train_cmd", required=True
    )
    ts = train.add_parser(
        "start", parents=[common], help="start a job on every member; prints its id"
    )
    ts.add_argument("--task", required=True, help="digits, mnist, synthetic or module:attr")
    ts.add_argument(
        "--task-arg", action="append", type=_task_arg, metavar="KEY=VALUE", help="task option"
    )
    ts.add_argument("--rounds", type=int)
    ts.add_argument(
        "--aggregator",
        help=f"{', '.join(rules.names())}, or nnm+RULE (default: mean, or nnm+median when --f > 0)",
    )
    ts.add_argument("--f", type=int, help="Byzantine peers to tolerate")
    ts.add_argument("--batch-size", type=int, help="per-peer batch per round")
    ts.add_argument("--functions-per-round", type=int)
    ts.add_argument("--optimizer", choices=["sgd", "adam"])
    ts.add_argument("--lr", type=float)
    ts.add_argument("--momentum", type=float)
    ts.add_argument("--weight-decay", type=float)
    ts.add_argument("--seed", type=int)
    ts.add_argument("--eval-every", type=int)
    ts.add_argument(
        "--inner-steps",
        type=int,
        metavar="H",
        help="local steps per round; > 1 exchanges pseudo-gradients every H steps (DiLoCo)",
    )
    ts.add_argument(
        "--compression",
        choices=["none", "fp16", "int8"],
        help="what each peer publishes: float32, fp16, or blockwise int8 (error feedback)",
    )
    ts.add_argument("--outer-lr", type=float, help="outer Nesterov SGD step (H > 1)")
    ts.add_argument("--outer-momentum", type=float, help="outer Nesterov momentum (H > 1)")
    ts.add_argument(
        "--follow", action="store_true", help="print each round until the job ends (exit 0: done)"
    )
    ts.set_defaults(fn=cmd_train_start)
    train.add_parser("stop", parents=[common], help="stop the job on every member").set_defaults(
        fn=cmd_train_stop
    )
    tst = train.add_parser("status", parents=[common], help="the job and its round history")
    tst.add_argument(
        "--follow", action="store_true", help="print each round until the job ends (exit 0: done)"
    )
    tst.set_defaults(fn=cmd_train_status)
    trp = train.add_parser(
        "report", parents=[common], help="loss and accuracy against round and time, as a PNG"
    )
    trp.add_argument("--out", type=Path, required=True, help="the PNG file to write")
    trp.set_defaults(fn=cmd_train_report)

    ps = sub.add_parser("pubsub", help="publish and inspect gossip topics").add_subparsers(
        dest="pubsub_cmd", required=True
    )
    pss = ps.add_parser("subscribe", parents=[common])
    pss.add_argument("--topic", required=True)
    pss.set_defaults(fn=cmd_pubsub_subscribe)
    psp = ps.add_parser("publish", parents=[common])
    psp.add_argument("--topic", required=True)
    src = psp.add_mutually_exclusive_group(required=True)
    src.add_argument("--file", type=Path, help="publish this file's bytes")
    src.add_argument("--random-size", type=int, help="publish N random bytes (load testing)")
    psp.set_defaults(fn=cmd_pubsub_publish)
    ps.add_parser("inbox", parents=[common]).set_defaults(fn=cmd_pubsub_inbox)

    ca = sub.add_parser("ca", help="cluster CA (offline)").add_subparsers(
        dest="ca_cmd", required=True
    )
    ci = ca.add_parser("init", parents=[common])
    ci.add_argument("--ca-dir", type=Path, required=True)
    ci.add_argument("--cluster", default="spirt", help="cluster name (default: spirt)")
    ci.set_defaults(fn=cmd_ca_init)
    ce = ca.add_parser("enroll", parents=[common])
    ce.add_argument("--ca-dir", type=Path, required=True)
    ce.add_argument("--days", type=float, default=365.0)
    ce.set_defaults(fn=cmd_ca_enroll, needs_node_dir=True)
    cs = ca.add_parser("sign", parents=[common])
    cs.add_argument("--ca-dir", type=Path, required=True)
    cs.add_argument("--days", type=float, default=365.0)
    cs.add_argument("pubkey", type=_pubkey_arg)
    cs.set_defaults(fn=cmd_ca_sign)
    cr = ca.add_parser("revoke", parents=[common])
    cr.add_argument("--ca-dir", type=Path, required=True)
    cr.add_argument(
        "--days", type=float, default=30.0, help="days until the list's next update (default 30)"
    )
    cr.add_argument("pubkey", type=_pubkey_arg)
    cr.set_defaults(fn=cmd_ca_revoke)
    cinst = ca.add_parser(
        "install", parents=[common], help="install a certificate printed by `ca sign`"
    )
    cinst.add_argument("certificate", type=_certificate_arg)
    cinst.set_defaults(fn=cmd_ca_install_cert)

    rt = sub.add_parser(
        "redis-tls",
        parents=[common],
        help="certificates for the node's Redis TLS listener ([redis] tls_port; offline)",
    )
    rt.add_argument(
        "--name",
        action="append",
        required=True,
        help="an address or DNS name functions reach this node by (repeatable)",
    )
    rt.add_argument("--ca-dir", type=Path, help="keep the TLS CA here (e.g. beside the cluster CA)")
    rt.add_argument("--days", type=int, default=825)
    rt.add_argument(
        "--client-dir",
        type=Path,
        help="also write a client certificate here (for [redis] tls_client_certs)",
    )
    rt.add_argument("--client-name", default="spirt-functions")
    rt.set_defaults(fn=cmd_redis_tls, needs_node_dir=True)

    tr = sub.add_parser("trust", parents=[common], help="add a peer key to the allowlist (offline)")
    tr.add_argument("pubkey", type=_pubkey_arg)
    tr.set_defaults(fn=cmd_trust)
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    try:
        a = p.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0) and EXIT_USAGE
    a.json = getattr(a, "json", False)
    explicit_dir = getattr(a, "data_dir", None)
    if getattr(a, "needs_node_dir", False) and explicit_dir is None:
        name = "ca enroll" if a.command == "ca" else a.command
        print(f"spirtctl: {name} needs --data-dir NODE_DIR", file=sys.stderr)
        return EXIT_USAGE
    a.data_dir = explicit_dir or _ctl_data_dir()
    a.node_dir = a.data_dir
    a.api = getattr(a, "api", None)
    a.token = None
    if a.api is not None:
        host, sep, port = a.api.rpartition(":")
        if not sep or not host or not port.isdigit():
            print(f"spirtctl: --api: expected HOST:PORT, got {a.api!r}", file=sys.stderr)
            return EXIT_USAGE
        token_file = getattr(a, "token_file", None) or a.data_dir / "api.token"
        try:
            a.token = token_file.read_text().strip()
        except OSError as e:
            print(
                f"spirtctl: --token-file: cannot read {token_file}: {e.strerror} (copy the "
                "node's DATA_DIR/api.token here, mode 0600)",
                file=sys.stderr,
            )
            return EXIT_DAEMON_ERROR
    try:
        out = a.fn(a)
    except Unreachable as e:
        print(f"spirtctl: {e}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except (DaemonError, JobNotFinished) as e:
        print(f"spirtctl: {e}", file=sys.stderr)
        return EXIT_DAEMON_ERROR
    except (KeyFileError, ValueError, OSError) as e:
        # The command line was fine (argparse checked it); doing the command failed.
        print(f"spirtctl: {e}", file=sys.stderr)
        return EXIT_DAEMON_ERROR
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    if isinstance(out, (dict, list)):
        print(json.dumps(out, indent=2))
    else:
        print(out)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
