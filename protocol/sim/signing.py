"""A cheap deterministic record-signing scheme for simulations.

Each node's key is derived from a per-run secret and its id; a signature is a
16-byte keyed BLAKE2b. Only the holder of the run secret can sign for a node, so
a simulated liar given only its own signer cannot forge others' records — the
property the machine relies on — at a tiny fraction of Ed25519's cost.
"""

from __future__ import annotations

import hashlib

from ..membership.signing import RecordSigner, RecordVerifier


class SimKeys:
    def __init__(self, secret: bytes) -> None:
        self._secret = secret
        self._keys: dict[str, bytes] = {}

    def _key(self, node_id: str) -> bytes:
        k = self._keys.get(node_id)
        if k is None:
            k = hashlib.blake2b(node_id.encode(), key=self._secret, digest_size=32).digest()
            self._keys[node_id] = k
        return k

    def signer(self, node_id: str) -> RecordSigner:
        key = self._key(node_id)

        def sign(data: bytes) -> bytes:
            return hashlib.blake2b(data, key=key, digest_size=16).digest()

        return sign

    def verifier(self) -> RecordVerifier:
        # Every node checks the same records: remember the good ones (a pure function,
        # so memoising changes no outcome, only the simulator's speed).
        good: set[tuple[str, bytes, bytes]] = set()

        def verify(node_id: str, data: bytes, sig: bytes) -> bool:
            k = (node_id, data, sig)
            if k in good:
                return True
            ok = hashlib.blake2b(data, key=self._key(node_id), digest_size=16).digest() == sig
            if ok:
                good.add(k)
            return ok

        return verify
