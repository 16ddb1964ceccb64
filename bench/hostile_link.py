"""bench.hostile_link: the CPU one admitted, hostile link can cost a real spirtd.

A victim daemon runs as its own process (LocalNode). For each attack, a fresh
attacker identity, enrolled with the victim's CA (so admitted: it has passed
the handshake), opens one link and sends, as fast as the link lets it, signed
envelopes of about ``--size`` bytes built to cost the receiver as much as the
type's decode path allows:

* gossip_items      a GOSSIP control whose bytes hold as many items as a
                    control's limits admit (empty arrays, each a step of the
                    scan), and no valid control;
* envelope_items    the same items in the envelope itself, not in its body;
* publish_items     the most items a GOSSIP_PUBLISH envelope admits;
* membership_items  a MEMBERSHIP envelope whose opaque body is a membership
                    message of as many empty updates as fit;
* membership_updates  the same with the shortest updates that decode (a
                    "left" of a one-letter member, unsigned) but one at the end;
* rounds_items      envelope_items in a ROUNDS envelope (no daemon handles it);
* bad_signature     envelope_items with a signature that does not verify.

The victim's process CPU (utime + stime from /proc, so the attacker's own work
in this process never counts) is read over the attack window and over an idle
window with the attacker connected but silent, side by side. The attack window
runs until the victim has read all that was sent and dropped the link, so the
start-up burst the link's budgets allow is spread over it: a longer window
gives the steady state. ``cores`` = attack CPU / window - idle CPU / idle
window: what the link cost. ``cpu_us_per_message`` is that cost per message
the victim took off the link. The target is ``worst_cores`` < 0.1. On a busy
machine the victim gets less CPU than it would alone (``machine.loadavg``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench import _util
from protocol import strictpack, wire
from protocol.gossip.messages import CONTROL_LIMITS
from protocol.identity import NodeKey
from protocol.membership.messages import M_GOSSIP, U_LEFT, WIRE_VERSION
from protocol.wire import MsgType
from spirtd.config import TransportConfig
from spirtd.keyfiles import CaDir, DataDir, load_or_create_key
from spirtd.localcluster import LocalNode, async_wait_for, linked_peers
from spirtd.net.link import Link, StreamSink
from spirtd.net.transport import Transport

ATTACKS = (
    "gossip_items",
    "envelope_items",
    "publish_items",
    "membership_items",
    "membership_updates",
    "rounds_items",
    "bad_signature",
)
TARGET_CORES = 0.1
_UNREAD = "gossip.graylisted_unread"
_TICKS = os.sysconf("SC_CLK_TCK")


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of one process (not its children)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS  # utime, stime


def _items(limits: strictpack.Limits, size: int) -> list[list[Any]]:
    """As many empty arrays as ``limits`` admit in about ``size`` bytes, in
    containers no longer than the limit allows."""
    n = min(size - 64, limits.max_items - size // max(1, limits.max_container) - 8)
    width = max(1, min(limits.max_container - 1, n))
    out: list[list[Any]] = []
    while n > 0:
        take = min(width, n)
        out.append([[] for _ in range(take)])
        n -= take + 1
    return out


def envelope(attack: str, key: NodeKey, seq: int, size: int) -> bytes:
    now_ms = int(time.time() * 1000)
    if attack == "gossip_items":
        body = strictpack.pack(_items(CONTROL_LIMITS, size))
        return wire.seal(key, MsgType.GOSSIP, seq, now_ms, body)
    if attack == "envelope_items":
        body = _items(strictpack.Limits(max_items=8192, max_container=2048), size)
        return wire.seal(key, MsgType.GOSSIP, seq, now_ms, body)
    if attack == "publish_items":
        body = _items(wire.TYPE_LIMITS[MsgType.GOSSIP_PUBLISH], size)
        return wire.seal(key, MsgType.GOSSIP_PUBLISH, seq, now_ms, body)
    if attack == "rounds_items":
        body = _items(strictpack.Limits(max_items=8192, max_container=2048), size)
        return wire.seal(key, MsgType.ROUNDS, seq, now_ms, body)
    if attack == "membership_items":
        body = strictpack.pack([WIRE_VERSION, M_GOSSIP, [[]] * (size - 64)])
        return wire.seal(key, MsgType.MEMBERSHIP, seq, now_ms, body)
    if attack == "membership_updates":
        left = [U_LEFT, "a", 0, b""]
        n = (size - 64) // len(strictpack.pack(left))
        body = strictpack.pack([WIRE_VERSION, M_GOSSIP, [left] * (n - 1) + [[]]])
        return wire.seal(key, MsgType.MEMBERSHIP, seq, now_ms, body)
    if attack == "bad_signature":
        good = envelope("envelope_items", key, seq, size)
        return good[:-1] + bytes([good[-1] ^ 1])
    raise ValueError(f"unknown attack {attack!r}")


class _Silent:
    def on_message(self, link: Link, data: bytes) -> None:
        return None

    def on_stream(self, link: Link, stream: int, total: int, meta: bytes) -> StreamSink | None:
        return None


async def _attack(
    victim: LocalNode, ca: CaDir, root: Path, attack: str, size: int, seconds: float
) -> dict[str, Any]:
    data = DataDir(root / f"attacker-{attack}")
    ca.enroll(data, now=time.time(), days=1)
    key, _ = load_or_create_key(data.key_path)
    transport = Transport(
        key,
        data.certificate(),
        data.trust_store(),
        TransportConfig(),
        _Silent(),
        counters=Counter(),
    )
    await transport.start("127.0.0.1:0")
    assert victim.proc is not None
    pid = victim.proc.pid
    # The victim's links are read once a second through its API, in both windows
    # alike, so what that costs the victim cancels out.
    seen: list[tuple[float, set[str]]] = [(0.0, set())]  # (when the read began, links)

    async def poll() -> None:
        while True:
            began = time.monotonic()
            seen[0] = (began, await asyncio.to_thread(linked_peers, victim))
            await asyncio.sleep(1.0)

    poller = asyncio.create_task(poll())
    try:
        link = await transport.connect(victim.address)
        t0, c0 = time.monotonic(), process_cpu_s(pid)
        await asyncio.sleep(min(seconds, 5.0))  # idle: the link is up, nothing is sent
        idle_cpu = process_cpu_s(pid) - c0
        idle_s = time.monotonic() - t0
        before = Counter(victim.status()["counters"])
        # Envelopes are built ahead: the attacker's own signing is not what is measured.
        pool = [envelope(attack, key, i + 1, size) for i in range(64)]
        sent = 0
        t0, c0 = time.monotonic(), process_cpu_s(pid)
        deadline = t0 + seconds
        while time.monotonic() < deadline and link.close_reason is None:
            try:
                async with asyncio.timeout(max(0.01, deadline - time.monotonic())):
                    await link.send(pool[sent % len(pool)])
            except TimeoutError:
                break  # the victim stopped reading: that is the budget at work
            sent += 1
        # What was sent but not yet read sits in socket buffers, and is decoded
        # after the window: the window ends when the victim has read it all and
        # dropped the link.
        await transport.stop()
        stopped = time.monotonic()
        await async_wait_for(
            lambda: seen[0][0] > stopped and key.node_id not in seen[0][1],
            120,
            "the victim to drain and drop the hostile link",
        )
        wall = time.monotonic() - t0
        attack_cpu = process_cpu_s(pid) - c0
        after = Counter(victim.status()["counters"])
    finally:
        poller.cancel()
        await transport.stop()
    delta = {k: after[k] - before[k] for k in after if after[k] != before[k]}
    # Every message the victim took off the link: decoded, refused, or dropped unread.
    handled = sum(
        n
        for k, n in delta.items()
        if (k.startswith("wire.") and not k.startswith("wire.out.")) or k == _UNREAD
    )
    cores = max(0.0, attack_cpu / wall - idle_cpu / idle_s)
    per_message = cores * wall / handled if handled else 0.0
    watched = ("wire.", "gossip.decode", "gossip.graylisted", "gossip.invalid", "membership.decode")
    return {
        "attack": attack,
        "envelope_bytes": len(pool[0]),
        "handled": handled,
        "window_s": round(wall, 3),
        "victim_cpu_s": round(attack_cpu, 3),
        "idle_window_s": round(idle_s, 3),
        "idle_cpu_s": round(idle_cpu, 3),
        "cores": round(cores, 4),
        "cpu_us_per_message": round(per_message * 1e6, 1),
        "victim_counters": {k: v for k, v in sorted(delta.items()) if k.startswith(watched)},
    }


async def run(attacks: list[str], size: int, seconds: float, root: Path) -> dict[str, Any]:
    ca = CaDir(root / "ca")
    ca.init("spirt")
    vdir = DataDir(root / "victim")
    ca.enroll(vdir, now=time.time(), days=1)
    victim = LocalNode(vdir.root, args=["--profile", "local"])
    victim.start(timeout=120)
    try:
        rows = []
        for a in attacks:
            rows.append(await _attack(victim, ca, root, a, size, seconds))
            r = rows[-1]
            print(f"{a}: {r['cores']} cores", file=sys.stderr, flush=True)
    finally:
        victim.kill()  # a graceful leave would only add to the run's time
    worst = max(r["cores"] for r in rows)
    return {
        "bench": "hostile_link",
        "inputs": {"attacks": attacks, "size": size, "seconds": seconds},
        "machine": _util.machine(),
        "attacks": rows,
        "worst_cores": worst,
        "target_cores": TARGET_CORES,
        "target": worst < TARGET_CORES,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=8192, help="bytes per hostile envelope")
    ap.add_argument("--seconds", type=float, default=10.0, help="attack (and idle) window")
    ap.add_argument("--attacks", default=",".join(ATTACKS), help="comma-separated subset")
    ap.add_argument("--json", action="store_true", help="print one JSON object last")
    args = ap.parse_args()
    attacks = [a for a in args.attacks.split(",") if a]
    unknown = set(attacks) - set(ATTACKS)
    if unknown:
        ap.error(f"unknown attacks {sorted(unknown)} (known: {', '.join(ATTACKS)})")
    with tempfile.TemporaryDirectory(prefix="spirt-hostile-") as tmp:
        result = asyncio.run(run(attacks, args.size, args.seconds, Path(tmp)))
    text = _util.table(
        result["attacks"],
        ["attack", "envelope_bytes", "handled", "window_s", "cpu_us_per_message", "cores"],
    )
    text += (
        f"\nworst: {result['worst_cores']:.3f} cores (target < {TARGET_CORES}): {result['target']}"
    )
    _util.emit(result, args.json, text)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
