"""The pub/sub control endpoints (``/v1/pubsub/*``, for spirtctl, tests and benches).

Apart from :mod:`spirtd.pubsub.service` so the gossip service itself knows nothing of
HTTP: these handlers turn JSON bodies into calls on :class:`PubSub` and its errors
into :class:`spirtd.nodeapi.ApiError`.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from protocol.errors import DecodeError
from protocol.gossip.transfer import TableBuilder
from spirtd.nodeapi import ApiError, Routes

if TYPE_CHECKING:
    from spirtd.pubsub.service import PubSub, Staged


def register(ps: PubSub, api: Routes) -> None:
    PubSubHttp(ps).register(api)


class PubSubHttp:
    def __init__(self, ps: PubSub) -> None:
        self.ps = ps

    def register(self, api: Routes) -> None:
        api.route("POST", "/v1/pubsub/subscribe", self.subscribe)
        api.route("POST", "/v1/pubsub/unsubscribe", self.unsubscribe)
        api.route("POST", "/v1/pubsub/stage", self.stage)
        api.route("POST", "/v1/pubsub/publish", self.publish)
        api.route("GET", "/v1/pubsub/inbox", self.inbox)
        api.route("POST", "/v1/pubsub/verify", self.verify)
        api.route("GET", "/v1/pubsub/status", self.status)

    async def subscribe(self, body: dict[str, Any]) -> dict[str, Any]:
        topic = _str_arg(body, "topic")
        _topic_call(lambda: self.ps.subscribe_inbox(topic))
        return {"subscribed": topic}

    async def unsubscribe(self, body: dict[str, Any]) -> dict[str, Any]:
        topic = _str_arg(body, "topic")
        _topic_call(lambda: self.ps.unsubscribe(topic))
        return {"unsubscribed": topic}

    async def stage(self, body: dict[str, Any]) -> dict[str, Any]:
        staged = await self._staged_from(body)
        return {"handle": staged.handle, "size": staged.size, "digest": staged.digest.hex()}

    async def _staged_from(self, body: dict[str, Any]) -> Staged:
        ps = self.ps
        try:
            if "path" in body:
                path = Path(_str_arg(body, "path"))
                if not path.is_file():
                    raise ApiError(400, f"path: {path} is not a readable file")
                return await ps.stage(path)
            if "random_size" in body:
                n = body["random_size"]
                if (
                    not isinstance(n, int)
                    or isinstance(n, bool)
                    or not 0 <= n <= ps.config.max_payload
                ):
                    raise ApiError(400, f"random_size: must be 0..{ps.config.max_payload}")
                # A load-generation aid: os.urandom in a thread, then staged as bytes.
                return await ps.stage(await asyncio.to_thread(os.urandom, n))
            if "data_hex" in body:
                return await ps.stage(bytes.fromhex(_str_arg(body, "data_hex")))
        except (ValueError, OSError) as e:
            raise ApiError(400, str(e)) from None
        raise ApiError(400, "give one of: path, random_size, data_hex, handle")

    async def publish(self, body: dict[str, Any]) -> dict[str, Any]:
        topic = _str_arg(body, "topic")
        try:
            meta = bytes.fromhex(body.get("meta_hex", "")) if "meta_hex" in body else b""
            if "handle" in body:
                staged = self.ps.staged(body["handle"])
                if staged is None:
                    raise ApiError(404, f"handle: no staged payload {body['handle']!r}")
            else:
                staged = await self._staged_from(body)
            return await self.ps.publish(topic, staged, meta=meta)
        except (ValueError, DecodeError) as e:
            raise ApiError(400, str(e)) from None

    async def inbox(self, body: dict[str, Any]) -> dict[str, Any]:
        return {"messages": list(self.ps.inbox)}

    async def verify(self, body: dict[str, Any]) -> dict[str, Any]:
        """Re-reads a stored body and recomputes its digests (an end-to-end check for
        tests and operators: the chunk-tree digest and an independent SHA-256)."""
        try:
            mid = bytes.fromhex(_str_arg(body, "msg_id"))
        except ValueError:
            raise ApiError(400, "msg_id: not hex") from None
        stored = self.ps.store.get(mid)
        if stored is None:
            raise ApiError(404, "msg_id: no such body held")

        def rehash() -> tuple[str, str]:
            b = TableBuilder(stored.chunk_size)
            sha = hashlib.sha256()
            for piece in stored.pieces():
                b.update(piece)
                sha.update(piece)
            return b.finish()[1].hex(), sha.hexdigest()

        digest, sha = await asyncio.to_thread(rehash)
        return {"msg_id": mid.hex(), "size": stored.size, "digest": digest, "sha256": sha}

    async def status(self, body: dict[str, Any]) -> dict[str, Any]:
        m = self.ps.m
        assert m is not None
        return {
            **m.status(),
            "store": self.ps.store.status(),
            "counters": dict(m.counters),
            "scores": m.scores.snapshot(),
        }


def _topic_call(fn: Callable[[], None]) -> None:
    try:
        fn()
    except DecodeError as e:
        raise ApiError(400, f"topic: {e.detail}") from None


def _str_arg(body: dict[str, Any], key: str) -> str:
    v = body.get(key)
    if not isinstance(v, str) or not v:
        raise ApiError(400, f"{key}: a non-empty string is required")
    return v
