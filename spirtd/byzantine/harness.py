"""Turns a running spirtd into a Byzantine peer: for experiments only.

The peer is the real daemon with its real admission certificate; only what it
publishes as its gradient changes. ``install`` plugs into the trainer's seams
(``TrainerEnv.gradient_source`` and ``gradient_publisher``, which the training
service hands every trainer it makes), in this process alone:

* the gradient source: when the honest local gradient is in Redis, the attack
  first waits (omniscient attacks) for the honest gradients of the round it has
  received and crafts its gradient(s); only then does the trainer report it ready,
  so the round cannot close on this peer before the crafted gradient is in place;
* the optimal attacks score their candidates with the job's rule (name and f
  from the job record), starting from the previous aggregate in Redis for a rule
  that keeps one; ``cclip_boundary`` measures its radius from there too;
* ``late``: the source holds the crafted gradient back until just before this
  peer's deadline for the round (see spirtd.byzantine.attacks);
* what is kept as its local gradient: the crafted one, so this peer aggregates
  what the others received and stays on their model (its next gradients then
  pass the base-digest check); not for NaN, Inf or equivocation;
* the publisher: NaN bytes that Redis would refuse, or two signed gradients for
  one round sent to two halves of the peers (equivocation);
* the control API: ``POST /v1/byzantine/attack`` switches the attack between
  jobs (a benchmark runs many cells on one cluster), ``GET`` shows it.

Only ``python -m spirtd.byzantine`` with its confirmation calls ``install``;
nothing in spirtd imports this package.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from protocol import compression, wire
from protocol.gossip.messages import Announcement
from protocol.wire import MsgType
from spirtd.byzantine.attacks import NONFINITE, OPTIMAL, Attack, AttackError, craft
from spirtd.nodeapi import ApiError
from spirtd.pubsub.service import PubSub
from spirtd.tasks import Task
from spirtd.tasks.sharding import minibatch
from spirtd.training.compute import minibatch_seed
from spirtd.training.messages import TRAIN_TOPIC, GradientMeta
from spirtd.training.service import TrainingService
from spirtd.training.trainer import Trainer

log = logging.getLogger("spirtd.byzantine")

CONFIRM_ENV = "SPIRT_I_UNDERSTAND_THIS_IS_AN_ATTACK"
CONFIRM_VALUE = "yes"
POLL_S = 0.02
# An omniscient attacker waits at most this share of its round's deadline for the
# honest gradients: late enough to have them, early enough to still count.
WAIT_SHARE = 0.5


class NotConfirmed(RuntimeError):
    pass


@dataclass
class HarnessState:
    attack: Attack = field(default_factory=Attack)
    colluders: frozenset[str] = frozenset()
    rounds_attacked: int = 0
    # (job, round) -> the crafted gradient(s), from the source to the publisher.
    crafted: dict[tuple[str, int], list[np.ndarray]] = field(default_factory=dict)


STATE = HarnessState()
_installed = False


def confirmed(environ: dict[str, str] | None = None) -> bool:
    env = os.environ if environ is None else environ
    return env.get(CONFIRM_ENV) == CONFIRM_VALUE


def install(attack: Attack, colluders: frozenset[str] = frozenset()) -> None:
    """Plugs the attack into this process's trainers and control API. Refuses
    without the confirmation in the environment, whoever calls it."""
    global _installed
    if not confirmed():
        raise NotConfirmed(f"set {CONFIRM_ENV}={CONFIRM_VALUE} to run an attack")
    STATE.attack, STATE.colluders = attack, colluders
    if _installed:
        return
    _installed = True
    _patch_service()


# --- the trainer's seams --------------------------------------------------------------------


async def craft_round(t: Trainer, r: int) -> None:
    """The gradient source: crafts this round's gradient(s) from the honest one."""
    attack = STATE.attack
    if attack.name == "none":
        return
    env, keys = t.env, t.keys
    try:
        own = await env.store.get(keys.local(r))
        if attack.name == "labelflip":
            theta = await env.store.get(keys.theta)
            rows = minibatch(
                len(env.task.train),
                minibatch_seed(t.spec.seed, r, env.node_id),
                t.spec.batch_size,
            )
            own = await asyncio.to_thread(flipped_gradient, env.task, theta, rows)
        honest = await _honest_gradients(t, r) if attack.omniscient else []
        n = max(len(t.m.status()["view"]), t.spec.f + 1)
        previous = None
        wants_previous = attack.name in OPTIMAL or attack.name == "cclip_boundary"
        if wants_previous and await env.store.exists(keys.agg_prev):
            previous = await env.store.get(keys.agg_prev)
        kw: dict[str, Any] = {
            "n": n,
            "f": t.spec.f,
            "round": r,
            "rng_key": zlib.crc32(env.node_id.encode()),
            "rule": t.spec.aggregator,
            "previous": previous,
        }
        # On the event loop, the optimal attacks' search too (it blocks this peer's
        # loop for its duration). In a worker thread each of the rule's many small
        # torch calls waits for the GIL behind the daemon's loop: in a Byzantine
        # daemon, one search (nnm+median, 4,810 parameters, 39 evaluations) took
        # 2.3-8.4 s from a thread and 0.06-0.33 s on the loop.
        variants = craft(attack, own, honest, **kw)
        if attack.name == "late":
            await _hold_until_deadline(t, r)
        if attack.name not in NONFINITE and attack.name != "equivocation":
            await env.store.put(keys.local(r), variants[0])
        for old in [k for k in STATE.crafted if k[0] != t.job_id or k[1] < r - 2]:
            del STATE.crafted[old]  # rounds whose publish never came (a sync)
        STATE.crafted[(t.job_id, r)] = variants
        STATE.rounds_attacked += 1
    except asyncio.CancelledError:
        raise
    except Exception as e:  # an attack that cannot run this round sends the honest one
        log.warning("attack %s failed in round %d: %s", attack.name, r, e)


async def publish_gradient(t: Trainer, r: int, body: bytes, meta: GradientMeta) -> None:
    """The publisher: the honest body (the crafted one is in Redis already), NaN
    bytes, or two gradients for one round to two halves of the peers."""
    variants = STATE.crafted.pop((t.job_id, r), None)
    encoded = meta.encode()
    if variants is None or (
        STATE.attack.name not in NONFINITE and STATE.attack.name != "equivocation"
    ):
        await t.env.pubsub.publish(TRAIN_TOPIC, body, meta=encoded)
        return
    if len(variants) == 1:
        await t.env.pubsub.publish(TRAIN_TOPIC, _body(t, variants[0]), meta=encoded)
        return
    me = t.env.node_id
    peers = sorted(set(t.m.status()["view"]) - {me})
    honest = [p for p in peers if p not in STATE.colluders]
    half = set(honest[: (len(honest) + 1) // 2]) | (set(peers) - set(honest))
    seq = await publish_to(t.env.pubsub, TRAIN_TOPIC, _body(t, variants[0]), encoded, half)
    await publish_to(
        t.env.pubsub,
        TRAIN_TOPIC,
        _body(t, variants[1]),
        encoded,
        set(peers) - half,
        seq=seq if STATE.attack.params.get("same_seq") else None,
    )


def _body(t: Trainer, v: np.ndarray) -> bytes:
    """``v`` in the job's wire format. A non-finite vector cannot be encoded as it
    is: its finite part is, and then the first block's scale (int8) or the first
    bad value (fp16) is made that value (NaN or Inf), which is what a liar can put
    on the wire."""
    fmt = t.spec.compression
    if fmt == "none":
        return v.astype("<f4").tobytes()
    bad = np.flatnonzero(~np.isfinite(v))
    body = bytearray(compression.encode(fmt, np.nan_to_num(v, nan=0.0, posinf=0.0, neginf=0.0)))
    if bad.size:
        at = 0 if fmt == "int8" else 2 * int(bad[0])
        x = v[bad[0]]
        lie = np.float32(x) if fmt == "int8" else np.float16(x)
        body[at : at + lie.nbytes] = lie.tobytes()
    return bytes(body)


# The longest ``late`` sleeps before giving up on the round's deadline: the
# daemon's default deadline ceiling, so a sleep is never unbounded.
LATE_CEILING_S = 120.0


async def _hold_until_deadline(t: Trainer, r: int) -> None:
    """``late``: on every ``every``-th round, sleeps until ``margin_s`` before this
    peer's deadline for round ``r`` (at most ``max_wait_s``), or until the round is
    over here (then there is nothing to be late for)."""
    p = STATE.attack.params
    if r % int(p["every"]):
        return
    start = time.monotonic()
    until = start + min(float(p["max_wait_s"]), LATE_CEILING_S)
    while t.m.round == r and t.m.deadline_at is not None:
        now = time.monotonic()
        if now >= min(until, t.m.deadline_at - float(p["margin_s"])):
            break
        await asyncio.sleep(POLL_S)


async def _honest_gradients(t: Trainer, r: int) -> list[np.ndarray]:
    """The honest gradients of round ``r`` this peer holds, waiting (bounded) for
    every honest member of its view."""
    me = t.env.node_id
    dl = t.m.deadline_at
    until = time.monotonic() + (WAIT_SHARE * max(0.0, dl - time.monotonic()) if dl else 1.0)
    have: set[str] = set()
    while True:
        st = t.m.status()
        if t.m.round != r:
            break
        want = set(st["view"]) - {me} - STATE.colluders
        have = set(st["have"]) - {me} - STATE.colluders
        if want <= have or time.monotonic() >= until:
            break
        await asyncio.sleep(POLL_S)
    out = []
    for origin in sorted(have):
        with contextlib.suppress(Exception):  # aggregated and deleted meanwhile
            out.append(await t.env.store.get(t.keys.peer(r, origin)))
    return out


def flipped_gradient(task: Task, params: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The mean-loss gradient over ``rows`` with every label y turned into C-1-y."""
    batch = task.train.take(rows)
    model = task.load_params(params)
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(batch.x)
    classes = int(out.shape[1])
    loss = task.loss(out, (classes - 1) - batch.y)
    loss.backward()
    grads = [
        (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
        for p in model.parameters()
    ]
    return torch.cat(grads).to(torch.float32).numpy().copy()


async def publish_to(
    pubsub: PubSub,
    topic: str,
    body: bytes,
    meta: bytes,
    peers: set[str],
    *,
    seq: int | None = None,
) -> int:
    """Publishes like ``PubSub.publish`` but sends the signed announcement only to
    ``peers`` (the rest learn of it, if at all, by gossip); ``seq`` signs it under
    that sequence number instead of a fresh one. Returns the seq used."""
    m = pubsub.m
    assert m is not None
    staged = await pubsub.stage(body)
    pubsub._staged.pop(staged.handle, None)  # published here, not by PubSub.publish
    ann = Announcement(topic, staged.size, staged.digest, staged.chunk_size, meta, staged.data)
    if seq is None:
        envelope = pubsub.node.seal(MsgType.GOSSIP_PUBLISH, ann.to_obj())
    else:
        envelope = wire.seal(
            pubsub.node.key, MsgType.GOSSIP_PUBLISH, seq, int(time.time() * 1000), ann.to_obj()
        )
    before = len(m._out)
    mid = m.publish(envelope, time.monotonic())
    m._out[before:] = [o for o in m._out[before:] if o.peer_id in peers]
    if staged.partial is not None:
        staged.partial.ann = ann
        pubsub.store.commit(mid, staged.partial, staged.table)
    pubsub._pump()
    pubsub._wake.set()
    return wire.decode(envelope, verify_signature=False).seq


# --- the control API ----------------------------------------------------------------------


def _patch_service() -> None:
    honest_start = TrainingService.start

    async def start(self: TrainingService) -> None:
        # Before the honest start: it may resume a saved job, whose trainer must
        # have the seams too.
        self.gradient_source = craft_round
        self.gradient_publisher = publish_gradient
        await honest_start(self)
        log.warning("EXPERIMENTAL: this peer is Byzantine: %s", describe())
        api = self.node.api
        if api is not None:
            api.route("POST", "/v1/byzantine/attack", _api_set)
            api.route("GET", "/v1/byzantine/attack", _api_get)

    TrainingService.start = start  # type: ignore[method-assign]


def describe() -> dict[str, Any]:
    a = STATE.attack
    return {
        "attack": a.name,
        "params": dict(a.params),
        "seed": a.seed,
        "colluders": sorted(STATE.colluders),
        "rounds_attacked": STATE.rounds_attacked,
    }


async def _api_get(body: dict[str, Any]) -> dict[str, Any]:
    return describe()


async def _api_set(body: dict[str, Any]) -> dict[str, Any]:
    name = body.get("attack")
    params = body.get("params") or {}
    colluders = body.get("colluders") or []
    seed = body.get("seed", 0)
    if not isinstance(name, str) or not isinstance(params, dict):
        raise ApiError(400, "attack: a name and a params object are required")
    if not isinstance(colluders, list) or not all(isinstance(c, str) for c in colluders):
        raise ApiError(400, "colluders: a list of node ids")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ApiError(400, "seed: an integer")
    try:
        attack = Attack.make(name, params, seed)
    except AttackError as e:
        raise ApiError(400, str(e)) from None
    STATE.attack, STATE.colluders = attack, frozenset(colluders)
    log.warning("attack switched to %s %s", attack.name, dict(attack.params))
    return describe()
