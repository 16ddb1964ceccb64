"""`spirtctl`: the operator CLI (INTERFACES.md).

Daemon commands talk HTTP/JSON over DATA_DIR/api.sock; `ca` and `trust` work
offline on directories. Exit codes: 0 success, 1 the daemon answered with an
error, 2 usage error, 3 the daemon is unreachable.
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import sys
import time
from pathlib import Path
from typing import Any

from protocol.identity import node_id, parse_public_key
from spirtd.config import default_data_dir
from spirtd.keyfiles import CaDir, DataDir, KeyFileError, append_key_line, write_public

EXIT_OK, EXIT_DAEMON_ERROR, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
REQUEST_TIMEOUT_S = 30.0


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


def call(data_dir: Path, method: str, path: str, body: dict | None = None) -> Any:
    sock = DataDir(data_dir).api_socket
    conn = _UnixHTTPConnection(sock, REQUEST_TIMEOUT_S)
    try:
        payload = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if payload is not None else {}
        conn.request(method, path, body=payload, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
    except (FileNotFoundError, ConnectionRefusedError) as e:
        raise Unreachable(f"cannot reach spirtd at {sock}: {e.strerror}") from None
    except PermissionError:
        raise Unreachable(f"cannot reach spirtd at {sock}: permission denied") from None
    except TimeoutError:
        raise Unreachable(
            f"spirtd at {sock} did not answer within {REQUEST_TIMEOUT_S:.0f}s"
        ) from None
    except OSError as e:
        raise Unreachable(f"cannot reach spirtd at {sock}: {e}") from None
    finally:
        conn.close()
    ctype = resp.getheader("Content-Type", "")
    if resp.status >= 400:
        try:
            msg = json.loads(raw).get("error", raw.decode(errors="replace"))
        except ValueError:
            msg = raw.decode(errors="replace")
        raise DaemonError(msg)
    return json.loads(raw) if "json" in ctype else raw.decode()


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


def cmd_status(a: argparse.Namespace) -> str | dict:
    s = call(a.data_dir, "GET", "/v1/status")
    return s if a.json else render_status(s)


def cmd_peers(a: argparse.Namespace) -> str | dict:
    s = call(a.data_dir, "GET", "/v1/peers")
    return s if a.json else render_members(s["members"])


def cmd_metrics(a: argparse.Namespace) -> str | dict:
    text = call(a.data_dir, "GET", "/v1/metrics")
    return {"metrics": text} if a.json else text.rstrip("\n")


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
        }.items()
        if v is not None
    }
    if a.task_arg:
        body["task_options"] = dict(a.task_arg)
    r = call(a.data_dir, "POST", "/v1/train/start", body)
    if a.json:
        return r
    return (
        f"started job {r.get('job')}: {r.get('task')}, {r.get('rounds')} rounds, "
        f"{r.get('aggregator')} (f={r.get('f')}), {r.get('optimizer')} lr={r.get('lr')}\n"
        "follow it with `spirtctl train status`"
    )


def cmd_train_stop(a: argparse.Namespace) -> str | dict:
    r = call(a.data_dir, "POST", "/v1/train/stop", {})
    return r if a.json else f"stopped job {r.get('job')}"


def cmd_train_status(a: argparse.Namespace) -> str | dict:
    r = call(a.data_dir, "GET", "/v1/train/status")
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
    return "\n".join(head) + "\n\n" + table(rows, cols)


def cmd_pubsub_subscribe(a: argparse.Namespace) -> str | dict:
    r = call(a.data_dir, "POST", "/v1/pubsub/subscribe", {"topic": a.topic})
    return r if a.json else f"subscribed to {a.topic}; deliveries appear in `spirtctl pubsub inbox`"


def cmd_pubsub_publish(a: argparse.Namespace) -> str | dict:
    body: dict[str, Any] = {"topic": a.topic}
    if a.file is not None:
        # The daemon reads the file itself (same host, same user), so hundreds of
        # MB never pass through this process or the control socket.
        body["path"] = str(a.file.resolve())
    else:
        body["random_size"] = a.random_size
    r = call(a.data_dir, "POST", "/v1/pubsub/publish", body)
    return r if a.json else f"published {r.get('size')} bytes as {r.get('msg_id')}"


def cmd_pubsub_inbox(a: argparse.Namespace) -> str | dict:
    r = call(a.data_dir, "GET", "/v1/pubsub/inbox")
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
    pub = parse_public_key(a.pubkey)
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
    pub = parse_public_key(a.pubkey)
    crl = CaDir(a.ca_dir).revoke(pub)
    out = {
        "revoked": node_id(pub),
        "crl_version": crl.version,
        "crl": str(CaDir(a.ca_dir).crl_path),
    }
    return (
        out
        if a.json
        else (
            f"revoked {node_id(pub)}; revocation list v{crl.version} is {out['crl']}: copy it to "
            "each node's trust/crl (nodes pick it up within seconds)"
        )
    )


def cmd_ca_install_cert(a: argparse.Namespace) -> str | dict:
    raw = bytes.fromhex(a.certificate.strip())
    from protocol.identity import Certificate

    cert = Certificate.decode(raw)
    write_public(DataDir(a.data_dir).cert_path, raw)
    return (
        {"installed": node_id(cert.public_key)}
        if a.json
        else f"installed certificate for {node_id(cert.public_key)}"
    )


def cmd_trust(a: argparse.Namespace) -> str | dict:
    pub = parse_public_key(a.pubkey)
    d = DataDir(a.data_dir)
    d.ensure()
    added = append_key_line(d.allowlist_path, pub)
    out = {"node_id": node_id(pub), "added": added, "allowlist": str(d.allowlist_path)}
    return out if a.json else (f"{'added' if added else 'already trusted:'} {node_id(pub)}")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data-dir", type=Path, default=argparse.SUPPRESS, help="node data dir")
    common.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="JSON output"
    )

    p = argparse.ArgumentParser(prog="spirtctl", parents=[common], description="SPIRT operator CLI")
    sub = p.add_subparsers(dest="command", required=True)

    sub.add_parser(
        "status", parents=[common], help="this node, members, training, redis, functions"
    ).set_defaults(fn=cmd_status)
    sub.add_parser(
        "peers", parents=[common], help="members with state, address, incarnation"
    ).set_defaults(fn=cmd_peers)
    sub.add_parser("metrics", parents=[common], help="Prometheus text format").set_defaults(
        fn=cmd_metrics
    )

    train = sub.add_parser("train", help="training jobs").add_subparsers(
        dest="train_cmd", required=True
    )
    ts = train.add_parser("start", parents=[common])
    ts.add_argument("--task", required=True, help="digits, mnist, synthetic or module:attr")
    ts.add_argument(
        "--task-arg", action="append", type=_task_arg, metavar="KEY=VALUE", help="task option"
    )
    ts.add_argument("--rounds", type=int)
    ts.add_argument(
        "--aggregator",
        help="mean, median, trimmed_mean, krum, multi_krum, geomed, cclip, or nnm+RULE",
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
    ts.set_defaults(fn=cmd_train_start)
    train.add_parser("stop", parents=[common]).set_defaults(fn=cmd_train_stop)
    train.add_parser("status", parents=[common]).set_defaults(fn=cmd_train_status)

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
    cs.add_argument("pubkey")
    cs.set_defaults(fn=cmd_ca_sign)
    cr = ca.add_parser("revoke", parents=[common])
    cr.add_argument("--ca-dir", type=Path, required=True)
    cr.add_argument("pubkey")
    cr.set_defaults(fn=cmd_ca_revoke)
    cinst = ca.add_parser(
        "install", parents=[common], help="install a certificate printed by `ca sign`"
    )
    cinst.add_argument("certificate")
    cinst.set_defaults(fn=cmd_ca_install_cert)

    tr = sub.add_parser("trust", parents=[common], help="add a peer key to the allowlist (offline)")
    tr.add_argument("pubkey")
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
        print("spirtctl: ca enroll needs --data-dir NODE_DIR", file=sys.stderr)
        return EXIT_USAGE
    a.data_dir = explicit_dir or default_data_dir()
    a.node_dir = a.data_dir
    try:
        out = a.fn(a)
    except Unreachable as e:
        print(f"spirtctl: {e}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except DaemonError as e:
        print(f"spirtctl: {e}", file=sys.stderr)
        return EXIT_DAEMON_ERROR
    except (KeyFileError, ValueError, OSError) as e:
        print(f"spirtctl: {e}", file=sys.stderr)
        return EXIT_USAGE
    if isinstance(out, (dict, list)):
        print(json.dumps(out, indent=2))
    else:
        print(out)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
