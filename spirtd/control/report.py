"""The training report: loss and accuracy against round and wall time, as a PNG,
with each node's cumulative function cost (USD, right axis of the accuracy plots)
when its history rows carry ``cost`` objects.

Drawn from `train status` documents (``GET /v1/train/status``), one per node the
operator can reach: every node's history carries each contributor's minibatch loss
as its gradient message reported it, so one node's status already has a loss curve
per peer; test accuracy is what each reachable node evaluated itself. Events from
every document are marked: membership changes, state syncs and exclusions.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Pixels of the PNG: FIGSIZE inches at DPI.
FIGSIZE = (12.0, 8.0)
DPI = 100
SIZE_PX = (int(FIGSIZE[0] * DPI), int(FIGSIZE[1] * DPI))

# Event kinds (train status ``events``) drawn as markers, with their style.
MARKERS: dict[str, tuple[str, str, str]] = {
    # kind: (label, colour, line style)
    "member_joined": ("member joined", "tab:green", ":"),
    "member_left": ("member left", "tab:red", ":"),
    "sync_started": ("sync started", "tab:orange", "--"),
    "synced": ("synced", "tab:purple", "--"),
    "excluded": ("peer excluded", "black", "-"),
}


class ReportError(ValueError):
    """The documents hold nothing to draw; the message says why."""


def _short(node_id: str) -> str:
    return node_id[-8:]


def _series(statuses: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per-peer loss points and per-node accuracy points, by round and wall time."""
    loss: dict[str, dict[int, tuple[float, float]]] = {}
    acc: dict[str, list[tuple[int, float, float]]] = {}
    cost: dict[str, list[tuple[int, float, float]]] = {}
    events: dict[tuple[str, float], dict[str, Any]] = {}
    for st in statuses:
        me = st.get("node_id", "")
        pts = _cumulative_cost(st)
        if pts:
            cost[me] = pts
        for h in st.get("history") or []:
            t = h.get("closed_at")
            if t is None:
                continue
            for peer, v in (h.get("peer_losses") or {}).items():
                loss.setdefault(peer, {})[h["round"]] = (t, v)
            if h.get("accuracy") is not None:
                acc.setdefault(me, []).append((h["round"], t, h["accuracy"]))
        for e in st.get("events") or []:
            if e.get("kind") in MARKERS:
                # The same join is seen by every node: one marker per (kind, second).
                events.setdefault((e["kind"], round(e["t"])), e)
    if not loss and not acc:
        raise ReportError("no rounds to draw: the job has not closed a round on these nodes")
    return {"loss": loss, "accuracy": acc, "cost": cost, "events": list(events.values())}


def _usd(doc: Any) -> float | None:
    usd = doc.get("usd") if isinstance(doc, dict) else None
    return float(usd) if isinstance(usd, int | float) and not isinstance(usd, bool) else None


def _cumulative_cost(st: dict[str, Any]) -> list[tuple[int, float, float]]:
    """(round, closed_at, USD so far) from the rows' ``cost`` objects; the rows
    shown may not be the job's first (the history is bounded), so the curve starts
    from the job's total (``cost``) less what the rows shown add up to."""
    rows = sorted(
        (h for h in st.get("history") or [] if h.get("closed_at") is not None),
        key=lambda h: h["round"],
    )
    costs = [(h, _usd(h.get("cost"))) for h in rows]
    costs = [(h, c) for h, c in costs if c is not None]
    if not costs:
        return []
    shown = sum(c for _, c in costs)
    total = _usd(st.get("cost"))
    running = max(0.0, total - shown) if total is not None else 0.0
    out = []
    for h, c in costs:
        running += c
        out.append((h["round"], h["closed_at"], running))
    return out


def _draw_cost(
    cost: dict[str, list[tuple[int, float, float]]], by_round: Any, by_time: Any, t0: float
) -> None:
    """Each node's cumulative cost on a right-hand axis of the accuracy plots."""
    right_r, right_t = by_round.twinx(), by_time.twinx()
    right_r.sharey(right_t)
    for i, (node, pts) in enumerate(sorted(cost.items())):
        usd = [p[2] for p in pts]
        # Colours past the accuracy lines' (C0, C1, ...), so the two never look alike.
        colour = f"C{(i + 5) % 10}"
        right_r.plot(
            [p[0] for p in pts], usd, ls="--", lw=1.0, color=colour, label=f"{_short(node)} $"
        )
        right_t.plot([p[1] - t0 for p in pts], usd, ls="--", lw=1.0, color=colour)
    right_t.set_ylabel("cumulative function cost (USD, dashed)")
    right_r.legend(fontsize=7, title="cost of", title_fontsize=7, loc="center right")


def render(statuses: Sequence[dict[str, Any]], out: Path, *, title: str = "") -> Path:
    """Writes the report PNG to ``out`` (SIZE_PX pixels); returns ``out``."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a server; must precede pyplot
    from matplotlib import pyplot as plt

    data = _series(statuses)
    t0 = min(
        [t for pts in data["loss"].values() for t, _ in pts.values()]
        + [t for pts in data["accuracy"].values() for _, t, _ in pts]
    )
    fig, axes = plt.subplots(2, 2, figsize=FIGSIZE, dpi=DPI, sharey="row")
    try:
        (loss_r, loss_t), (acc_r, acc_t) = axes
        for peer, pts in sorted(data["loss"].items()):
            rounds = sorted(pts)
            ys = [pts[r][1] for r in rounds]
            loss_r.plot(rounds, ys, lw=0.8, label=_short(peer))
            loss_t.plot([pts[r][0] - t0 for r in rounds], ys, lw=0.8, label=_short(peer))
        for node, pts in sorted(data["accuracy"].items()):
            pts.sort()
            acc_r.plot([p[0] for p in pts], [p[2] for p in pts], marker=".", label=_short(node))
            acc_t.plot([p[1] - t0 for p in pts], [p[2] for p in pts], marker=".")
        seen: set[str] = set()
        for e in sorted(data["events"], key=lambda e: e["t"]):
            label, colour, style = MARKERS[e["kind"]]
            for ax, x in ((loss_r, e["round"]), (acc_r, e["round"])):
                ax.axvline(x, color=colour, ls=style, lw=0.9, alpha=0.7)
            for ax in (loss_t, acc_t):
                ax.axvline(e["t"] - t0, color=colour, ls=style, lw=0.9, alpha=0.7)
            if label not in seen:
                seen.add(label)
                loss_t.plot([], [], color=colour, ls=style, label=label)
        if data["cost"]:
            _draw_cost(data["cost"], acc_r, acc_t, t0)
        loss_r.set(ylabel="training loss (per peer)", xlabel="round")
        loss_t.set(xlabel="wall time (s)")
        acc_r.set(ylabel="test accuracy", xlabel="round")
        acc_t.set(xlabel="wall time (s)")
        for ax in (loss_r, loss_t, acc_r, acc_t):
            ax.grid(alpha=0.3)
        loss_r.set_yscale("log")
        if data["loss"]:
            loss_t.legend(fontsize=7, ncol=2, loc="upper right")
        if data["accuracy"]:
            acc_r.legend(fontsize=7, title="evaluated on", title_fontsize=7, loc="lower right")
        fig.suptitle(title or "SPIRT training")
        fig.tight_layout()
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=DPI, format="png")
    finally:
        plt.close(fig)
    return out
