"""Prometheus metrics of one node, served at /v1/metrics and by `spirtctl metrics`.

Most of what an operator wants is already counted by the services (the node's
``counters``, each service's ``status()``, the invoker's stats, the round
machine's rejections). ``NodeCollector`` reads those at scrape time and turns
them into metric families, so the services need no metrics code of their own.
Only distributions need a hook where the observation happens: the trainer calls
``for_node(node_id).observe_round(...)`` when a round ends, which feeds the round
and phase histograms below.

Every family is named ``spirt_<what>_<unit>`` with ``_total`` on counters
(prometheus_client adds the suffix to the exposed samples). Counters that the
services keep per job (the round machine's rejections) restart at zero with a
new job; Prometheus's ``rate()`` treats that as a counter reset.
"""

from __future__ import annotations

import re
import threading
import weakref
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client import (
    CollectorRegistry,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from spirtd.net.link import Link

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# A `_created` gauge per histogram series only doubles the exposition; the
# daemon's start time is already spirt_uptime_seconds.
disable_created_metrics()

MEMBER_STATES = ("alive", "suspect", "dead", "left")
# Envelope types as the wire names them (protocol.wire.MsgType), lower-cased.
MESSAGE_TYPES = ("membership", "gossip", "gossip_publish", "rounds", "state")

# Rounds take from ~10 ms (a tiny model on loopback) to minutes (a deadline at
# its 120 s ceiling), so the buckets span that range roughly geometrically.
ROUND_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
# Phases and single Redis commands are shorter: sub-millisecond digests up to
# functions that run for seconds.
PHASE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)

# Round phases whose time is one in-database operation (the trainer times the
# Redis call), and the operation's name in spirt_redis_operation_duration_seconds.
REDIS_OPERATIONS = {
    "averaging_s": "mean",
    "aggregation_s": "aggregate",
    "update_s": "update",
    "digest_s": "digest",
}


class RoundHistograms:
    """The per-observation part of a node's metrics: round and phase durations."""

    def __init__(self) -> None:
        # registry=None: each NodeMetrics registers these in its own registry.
        self.round = Histogram(
            "spirt_round_duration_seconds",
            "Training rounds by duration, from the round's start to the new model's digest.",
            buckets=ROUND_BUCKETS,
            registry=None,
        )
        self.phase = Histogram(
            "spirt_round_phase_duration_seconds",
            "Time spent in each phase of a training round "
            "(functions, averaging, publish, dissemination, aggregation, update, digest, "
            "checkpoint).",
            ["phase"],
            buckets=PHASE_BUCKETS,
            registry=None,
        )
        self.redis_op = Histogram(
            "spirt_redis_operation_duration_seconds",
            "In-database operations of a round (SPIRT module commands, or the client-side "
            "fallback on a plain Redis), as timed by the trainer.",
            ["operation"],
            buckets=PHASE_BUCKETS,
            registry=None,
        )
        for phase in (
            "functions",
            "averaging",
            "publish",
            "dissemination",
            "aggregation",
            "update",
            "digest",
            "checkpoint",
        ):
            self.phase.labels(phase=phase)  # present (at zero) before the first round
        for op in REDIS_OPERATIONS.values():
            self.redis_op.labels(operation=op)

    def observe_round(self, duration_s: float, phases: Mapping[str, float]) -> None:
        self.round.observe(duration_s)
        for key, seconds in phases.items():
            if not key.endswith("_s"):
                continue
            self.phase.labels(phase=key[:-2]).observe(seconds)
            op = REDIS_OPERATIONS.get(key)
            if op is not None:
                self.redis_op.labels(operation=op).observe(seconds)

    def collectors(self) -> list[Collector]:
        return [self.round, self.phase, self.redis_op]


_lock = threading.Lock()
_by_node: dict[str, RoundHistograms] = {}


def for_node(node_id: str) -> RoundHistograms:
    """The histograms of ``node_id`` (one process usually runs one node; tests may run
    several trainers in one process, and each node keeps its own)."""
    with _lock:
        h = _by_node.get(node_id)
        if h is None:
            h = _by_node[node_id] = RoundHistograms()
        return h


class MetricsSource(Protocol):
    """What the collector reads of the node (``spirtd.node.Node`` provides it)."""

    def status(self) -> dict[str, Any]: ...
    def members(self) -> list[dict[str, Any]]: ...


class LinkBytes:
    """Bytes over peer links, monotonic across link closes: a closed link's final
    counts move into a running total when the node reports it down."""

    def __init__(self) -> None:
        self.closed_in = 0
        self.closed_out = 0
        self._counted: weakref.WeakSet[Link] = weakref.WeakSet()

    def on_link(self, link: Link, up: bool) -> None:
        if up or link in self._counted:
            return
        self._counted.add(link)
        self.closed_in += link.bytes_in
        self.closed_out += link.bytes_out

    def totals(self, live: Iterable[Link]) -> tuple[int, int]:
        bin_, bout = self.closed_in, self.closed_out
        for link in live:
            if link not in self._counted:
                bin_ += link.bytes_in
                bout += link.bytes_out
        return bin_, bout


class NodeCollector(Collector):
    """Reads the node's own counters and status at scrape time."""

    def __init__(self, node: MetricsSource, link_bytes: LinkBytes) -> None:
        self.node = node
        self.link_bytes = link_bytes

    def collect(self) -> Iterator[Metric]:
        status = self.node.status()
        counters: dict[str, int] = status.get("counters", {})
        yield from _identity(status)
        yield from _members(self.node.members())
        yield from self._links()
        yield from _messages(counters)
        yield from _handshakes(counters)
        yield from _gossip(counters)
        yield from _training(status.get("training", {}), counters, self._round_machine())
        yield from _functions(status.get("functions", {}), counters, self._invoker_stats())
        yield from _redis(status.get("redis", {}))
        yield from _plain(counters)
        yield from _events(counters)

    def _service(self, name: str) -> Any:
        for svc in getattr(self.node, "services", []):
            if getattr(svc, "name", None) == name:
                return svc
        return None

    def _round_machine(self) -> dict[str, Any]:
        trainer = getattr(self._service("training"), "trainer", None)
        machine = getattr(trainer, "m", None)
        return machine.status() if machine is not None else {}

    def _invoker_stats(self) -> dict[str, int]:
        invoker = getattr(self._service("functions"), "invoker", None)
        stats = getattr(invoker, "stats", None)
        return dict(vars(stats)) if stats is not None else {}

    def _links(self) -> Iterator[Metric]:
        transport = getattr(self.node, "transport", None)
        live = list(transport.links.values()) if transport is not None else []
        yield GaugeMetricFamily("spirt_peer_links", "Open encrypted links to peers.", len(live))
        bin_, bout = self.link_bytes.totals(live)
        c = CounterMetricFamily(
            "spirt_link_bytes",
            "Bytes received and sent over peer links (record headers and ciphertext).",
            labels=["direction"],
        )
        c.add_metric(["in"], bin_)
        c.add_metric(["out"], bout)
        yield c


def _identity(status: dict[str, Any]) -> Iterator[Metric]:
    info = InfoMetricFamily("spirt_node", "This node's identity and software version.")
    info.add_metric(
        [],
        {
            "node_id": str(status.get("node_id", "")),
            "cluster": str(status.get("cluster") or ""),
            "version": str(status.get("version", "")),
        },
    )
    yield info
    yield GaugeMetricFamily(
        "spirt_uptime_seconds", "Seconds since the daemon started.", status.get("uptime_s", 0.0)
    )


def _members(members: list[dict[str, Any]]) -> Iterator[Metric]:
    g = GaugeMetricFamily(
        "spirt_members", "Cluster members by state, this node included.", labels=["state"]
    )
    counts = {s: 0 for s in MEMBER_STATES}
    for m in members:
        counts[m.get("state", "alive")] = counts.get(m.get("state", "alive"), 0) + 1
    for state, n in counts.items():
        g.add_metric([state], n)
    yield g


# Counters exposed one to one: (metric family, the services' counter, help).
_PLAIN_COUNTERS: tuple[tuple[str, str, str], ...] = (
    ("spirt_links_opened", "transport.links_opened", "Peer links established since start."),
    ("spirt_gossip_published", "gossip.published", "Messages this node published."),
    (
        "spirt_gossip_graylisted_unread",
        "gossip.graylisted_unread",
        "Gossip envelopes from graylisted peers dropped before they were decoded.",
    ),
    (
        "spirt_gossip_body_received_bytes",
        "gossip.body_bytes_in",
        "Bytes of gossip bodies (gradients) pulled from peers.",
    ),
    (
        "spirt_training_rounds",
        "training.rounds",
        "Training rounds this node completed since start.",
    ),
    (
        "spirt_state_syncs_served",
        "training.sync_served",
        "State transfers this node served to peers.",
    ),
    ("spirt_checkpoints", "training.checkpoints", "State checkpoints written to the data dir."),
    (
        "spirt_checkpoint_loads",
        "training.checkpoint_loads",
        "Times the state was restored from a checkpoint.",
    ),
    (
        "spirt_training_redis_trouble",
        "training.redis_trouble",
        "Rounds abandoned because this node's Redis failed under them.",
    ),
    (
        "spirt_function_slices_failed",
        "training.slice_failed",
        "Gradient slices that failed for good (their round went on without them).",
    ),
)


def _plain(counters: Mapping[str, int]) -> Iterator[Metric]:
    for name, key, text in _PLAIN_COUNTERS:
        yield CounterMetricFamily(name, text, counters.get(key, 0))


def _with_prefix(counters: Mapping[str, int], prefix: str) -> dict[str, int]:
    return {k[len(prefix) :]: v for k, v in counters.items() if k.startswith(prefix)}


def _label(name: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", name)


# Per envelope type, the handler-level rejections the services count (each is one
# message refused before its handler went on; their names are the reasons).
_HANDLER_REJECTIONS = {
    "membership": ("membership.origin_mismatch", "membership.bad_body", "membership.decode."),
    "gossip": ("gossip.origin_mismatch", "gossip.decode."),
    "state": ("training.sync_bad_message",),
}
_SEND_DROPS = {
    "membership": "membership.send_dropped",
    "gossip": "gossip.send_dropped",
    "state": "training.sync_send_dropped",
}


def _messages(counters: Mapping[str, int]) -> Iterator[Metric]:
    received = CounterMetricFamily(
        "spirt_messages_received",
        "Signed envelopes received from peers, by type and outcome: accepted, or the reason "
        "it was refused (type 'unknown' when the envelope itself did not decode).",
        labels=["type", "outcome"],
    )
    dispatched = _with_prefix(counters, "wire.in.")
    for mtype in MESSAGE_TYPES:
        refused: dict[str, int] = {}
        for spec in _HANDLER_REJECTIONS.get(mtype, ()):
            if spec.endswith("."):
                for reason, n in _with_prefix(counters, spec).items():
                    refused[_label(reason)] = refused.get(_label(reason), 0) + n
            elif counters.get(spec):
                refused[_label(spec.rsplit(".", 1)[1])] = counters[spec]
        accepted = max(0, dispatched.get(mtype, 0) - sum(refused.values()))
        received.add_metric([mtype, "accepted"], accepted)
        for reason, n in sorted(refused.items()):
            received.add_metric([mtype, reason], n)
    for reason, n in sorted(_with_prefix(counters, "wire.").items()):
        if reason.startswith(("in.", "out.")):
            continue
        received.add_metric(["unknown", _label(reason)], n)
    yield received

    sent = CounterMetricFamily(
        "spirt_messages_sent",
        "Envelopes this node signed and queued for peers, by type and outcome "
        "(sent, or dropped because a link's queue was full or the link was gone).",
        labels=["type", "outcome"],
    )
    signed = _with_prefix(counters, "wire.out.")
    for mtype in MESSAGE_TYPES:
        sent.add_metric([mtype, "sent"], signed.get(mtype, 0))
        drop_key = _SEND_DROPS.get(mtype)
        if drop_key is not None:
            sent.add_metric([mtype, "dropped"], counters.get(drop_key, 0))
    yield sent


def _handshakes(counters: Mapping[str, int]) -> Iterator[Metric]:
    c = CounterMetricFamily(
        "spirt_handshake_failures",
        "Link handshakes refused or abandoned, by reason (peer_untrusted, peer_revoked, "
        "wrong_cluster, timeout, ...).",
        labels=["reason"],
    )
    for reason, n in sorted(_with_prefix(counters, "handshake.").items()):
        c.add_metric([_label(reason)], n)
    yield c
    s = CounterMetricFamily(
        "spirt_session_errors",
        "Records refused on established links, by reason (tampered_frame, replayed_frame, ...).",
        labels=["reason"],
    )
    for reason, n in sorted(_with_prefix(counters, "session.").items()):
        s.add_metric([_label(reason)], n)
    yield s


def _gossip(counters: Mapping[str, int]) -> Iterator[Metric]:
    c = CounterMetricFamily(
        "spirt_gossip_messages",
        "Published gossip messages (announcements) received, by outcome: accepted, duplicate, "
        "ignored_*, invalid_*.",
        labels=["outcome"],
    )
    for key, n in sorted(_with_prefix(counters, "gossip.").items()):
        if key in ("accepted", "duplicate") or key.startswith(("ignored.", "invalid.")):
            c.add_metric([_label(key)], n)
    yield c


def _training(
    training: Mapping[str, Any], counters: Mapping[str, int], machine: Mapping[str, Any]
) -> Iterator[Metric]:
    yield GaugeMetricFamily(
        "spirt_training_round",
        "Completed rounds of the current training job.",
        training.get("round") or 0,
    )
    states = GaugeMetricFamily(
        "spirt_training_state",
        "The training state of this node (1 for the current one).",
        labels=["state"],
    )
    current = str(training.get("state") or "idle")
    for s in dict.fromkeys(("idle", "syncing", "running", "stopped", "done", current)):
        states.add_metric([_label(s)], 1.0 if current == s else 0.0)
    yield states
    for key in ("loss", "accuracy"):
        if training.get(key) is not None:
            yield GaugeMetricFamily(
                f"spirt_training_{key}",
                "The last round's training loss (mean over contributors)."
                if key == "loss"
                else "The last test accuracy.",
                float(training[key]),
            )
    closed = CounterMetricFamily(
        "spirt_training_rounds_closed",
        "Rounds by how they closed (complete, deadline).",
        labels=["closed_by"],
    )
    for how, n in sorted(_with_prefix(counters, "training.rounds_closed.").items()):
        closed.add_metric([_label(how)], n)
    yield closed

    rejected = CounterMetricFamily(
        "spirt_gradients_rejected",
        "Peers' gradients refused by reason (job, stale, future, digest, size, duplicate, "
        "nonfinite, ...); the round machine's share restarts with each job.",
        labels=["reason"],
    )
    reasons: dict[str, int] = dict(_with_prefix(counters, "training.gradient_rejected."))
    for reason, n in (machine.get("rejected") or {}).items():
        reasons[reason] = reasons.get(reason, 0) + int(n)
    for reason, n in sorted(reasons.items()):
        rejected.add_metric([_label(reason)], n)
    yield rejected

    excluded = CounterMetricFamily(
        "spirt_peers_excluded",
        "Peers proven Byzantine and excluded for the rest of their job, by proof (equivocation, "
        "nonfinite) and by how this node learned it (detected here, evidence from a peer).",
        labels=["reason", "how"],
    )
    for reason in ("equivocation", "nonfinite"):
        for how in ("detected", "evidence"):
            excluded.add_metric([reason, how], counters.get(f"training.{reason}.{how}", 0))
    yield excluded

    syncs = CounterMetricFamily(
        "spirt_state_syncs",
        "State syncs this node ran, by outcome (started, done, failed, bad_state: the state did "
        "not match its digest, unvouched).",
        labels=["outcome"],
    )
    for outcome in ("started", "done", "failed", "bad_state", "unvouched"):
        key = {"started": "syncs_started", "done": "syncs_done"}.get(outcome, f"sync_{outcome}")
        syncs.add_metric([outcome], counters.get(f"training.{key}", 0))
    yield syncs


def _functions(
    functions: Mapping[str, Any], counters: Mapping[str, int], stats: Mapping[str, int]
) -> Iterator[Metric]:
    inv = CounterMetricFamily(
        "spirt_function_invocations",
        "Gradient function invocations (each attempt, retries included) by outcome.",
        labels=["outcome"],
    )
    outcomes = {
        "ok": "succeeded",
        "function_error": "function_errors",
        "environment_failure": "environment_failures",
        "throttled": "throttled",
        "server_error": "server_errors",
        "transport_error": "transport_errors",
    }
    for outcome, key in outcomes.items():
        inv.add_metric([outcome], stats.get(key, 0))
    yield inv
    yield CounterMetricFamily(
        "spirt_function_retries",
        "Invocations retried after a throttle, a server error or a timeout.",
        stats.get("retries", 0),
    )
    billed = CounterMetricFamily(
        "spirt_function_billed_invocations",
        "Invocations that ran and were billed, by where the billed duration came from: "
        "the function's REPORT line, or the call's wall time when it had none.",
        labels=["source"],
    )
    billed.add_metric(["report"], stats.get("billed", 0) - stats.get("billed_by_wall_time", 0))
    billed.add_metric(["wall_time"], stats.get("billed_by_wall_time", 0))
    yield billed
    yield CounterMetricFamily(
        "spirt_function_billed_gb_seconds",
        "Billed duration x configured memory of those invocations (AWS Lambda's GB-seconds).",
        stats.get("billed_mb_ms", 0) / 1024 / 1000,
    )
    yield CounterMetricFamily(
        "spirt_function_cold_starts",
        "Local function workers started (a cold start each); 0 with --functions lambda.",
        functions.get("cold_starts", 0),
    )
    yield GaugeMetricFamily(
        "spirt_function_invocations_in_flight",
        "Invocations running now.",
        functions.get("in_flight", 0),
    )


def _redis(redis: Mapping[str, Any]) -> Iterator[Metric]:
    yield GaugeMetricFamily(
        "spirt_redis_up",
        "1 if this node's Redis answered its last health check.",
        1.0 if redis.get("ok") else 0.0,
    )
    yield GaugeMetricFamily(
        "spirt_redis_module_loaded",
        "1 if the SPIRT module is loaded (in-database aggregation); 0: client-side fallback.",
        1.0 if redis.get("module") else 0.0,
    )
    yield CounterMetricFamily(
        "spirt_redis_restarts",
        "Restarts of the managed redis-server after it died.",
        redis.get("restarts", 0),
    )


def _events(counters: Mapping[str, int]) -> Iterator[Metric]:
    c = CounterMetricFamily(
        "spirt_events",
        "Every internal counter of the node by name (the raw material of the families above).",
        labels=["event"],
    )
    for name, n in sorted(counters.items()):
        c.add_metric([name], n)
    yield c


class NodeMetrics:
    """A node's registry: its collector, its round histograms and the process's own
    CPU, memory and file descriptor figures."""

    def __init__(self, node: MetricsSource, node_id: str) -> None:
        # The node counts its links' bytes itself (its rounds report them too).
        own = getattr(node, "link_bytes", None)
        self.link_bytes = own if isinstance(own, LinkBytes) else LinkBytes()
        add_listener = getattr(node, "add_link_listener", None)
        if own is None and add_listener is not None:
            add_listener(self.link_bytes.on_link)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(NodeCollector(node, self.link_bytes))
        for c in for_node(node_id).collectors():
            self.registry.register(c)
        ProcessCollector(registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)
