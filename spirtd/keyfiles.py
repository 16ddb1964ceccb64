"""Key and trust material on disk: the node's data dir and a CA's dir.

Data dir::

    node.key        Ed25519 seed, hex (mode 0600; refused if others can read it)
    node.cert       this node's certificate from the cluster CA (optional)
    trust/ca.pub    trusted CA public keys, hex, one per line
    trust/allowlist peer public keys admitted without a certificate, hex, one per line
    trust/crl       the revocation list the operator installs (copied from the CA)
    trust/crl.held/ the newest list accepted from each CA, one file per CA named by
                    its key in hex (mode 0600). It is what is enforced: an older
                    trust/crl, or none at all, cannot undo a revocation

CA dir::

    ca.key          the CA's Ed25519 seed, hex (mode 0600)
    ca.pub          its public key, hex
    ca.json         cluster name and the next certificate serial
    crl             the CA's current signed revocation list
"""

from __future__ import annotations

import json
import logging
import os
import stat
import tempfile
import time
from pathlib import Path

from protocol.errors import DecodeError
from protocol.identity import (
    CRL_VALIDITY_DAYS,
    Certificate,
    NodeKey,
    RevocationList,
    TrustStore,
)

DEFAULT_CLUSTER = "spirt"

log = logging.getLogger("spirtd.keyfiles")


class KeyFileError(RuntimeError):
    """A problem with key material; the message names the file."""


def write_secret(path: Path, data: bytes) -> None:
    """Creates ``path`` with mode 0600 from the start (never world-readable, even briefly)."""
    _write_atomic(path, data, 0o600)


def write_public(path: Path, data: bytes) -> None:
    _write_atomic(path, data, 0o644)


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Writes ``path`` whole or not at all. The temporary file has an unpredictable
    name and is created exclusively without following symlinks (mkstemp), so a
    planted file or link cannot redirect the write; the rename replaces a link at
    ``path`` rather than writing through it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:  # os.write may write less than asked for large buffers
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_secret_seed(path: Path) -> bytes:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise KeyFileError(f"key file {path} does not exist") from None
    except OSError as e:
        raise KeyFileError(f"key file {path} is unreadable: {e.strerror}") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(
            f"key file {path} is accessible by group or others (mode "
            f"{stat.S_IMODE(st.st_mode):04o}); run: chmod 600 {path}"
        )
    try:
        text = path.read_text().strip()
        seed = bytes.fromhex(text)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise KeyFileError(f"key file {path} is unreadable: {e}") from None
    if len(seed) != 32:
        raise KeyFileError(f"key file {path} does not hold a 32-byte Ed25519 seed")
    return seed


def load_or_create_key(path: Path) -> tuple[NodeKey, bool]:
    """Returns the key at ``path``, creating it on first use. The bool says if it was new."""
    if path.exists():
        return NodeKey(read_secret_seed(path)), False
    seed = os.urandom(32)
    write_secret(path, (seed.hex() + "\n").encode())
    return NodeKey(seed), True


def read_key_lines(path: Path) -> set[bytes]:
    """Reads hex public keys, one per line; '#' starts a comment."""
    keys: set[bytes] = set()
    if not path.exists():
        return keys
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            key = bytes.fromhex(line)
        except ValueError:
            key = b""
        if len(key) != 32:
            raise KeyFileError(f"{path}:{n}: not a 32-byte hex public key")
        keys.add(key)
    return keys


def append_key_line(path: Path, key: bytes) -> bool:
    keys = read_key_lines(path)
    if key in keys:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(key.hex() + "\n")
    return True


class DataDir:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.key_path = root / "node.key"
        self.cert_path = root / "node.cert"
        self.trust_dir = root / "trust"
        self.ca_pub_path = self.trust_dir / "ca.pub"
        self.allowlist_path = self.trust_dir / "allowlist"
        self.crl_path = self.trust_dir / "crl"
        self.crl_held_dir = self.trust_dir / "crl.held"
        self.api_socket = root / "api.sock"

    def ensure(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)

    def check_trust_writable(self) -> None:
        """Raises KeyFileError unless this process can keep revocation lists in
        trust/crl.held: a list it cannot hold would be enforced only until the next
        start, so a node that cannot write there must not start at all."""
        try:
            self.trust_dir.mkdir(exist_ok=True, mode=0o700)
            self.crl_held_dir.mkdir(exist_ok=True, mode=0o700)
            fd, probe = tempfile.mkstemp(prefix=".probe.", dir=self.crl_held_dir)
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            where = e.filename or self.crl_held_dir
            raise KeyFileError(
                f"trust directory {self.trust_dir} is not writable by uid {os.geteuid()} "
                f"({where}: {e.strerror}): spirtd keeps revocation lists in "
                f"{self.crl_held_dir}; make {self.trust_dir} a directory owned by the "
                "daemon's user (e.g. chown -R spirt:spirt)"
            ) from None

    def certificate(self) -> Certificate | None:
        if not self.cert_path.exists():
            return None
        try:
            return Certificate.decode(self.cert_path.read_bytes())
        except (OSError, DecodeError) as e:
            raise KeyFileError(f"certificate {self.cert_path} is unreadable: {e}") from None

    def trust_store(self, cluster: str | None = None) -> TrustStore:
        """Builds the admission policy from disk. ``cluster`` defaults to the one
        named in our own certificate, else DEFAULT_CLUSTER.

        Revocation lists only move forward: the held lists (trust/crl.held) are
        loaded first, and trust/crl replaces one only if it is newer; then it is
        held in turn. An older or missing trust/crl is refused with an error log,
        and the held list stays in force."""
        cert = self.certificate()
        if cluster is None:
            cluster = cert.cluster if cert else DEFAULT_CLUSTER
        store = TrustStore(
            cluster,
            ca_keys=read_key_lines(self.ca_pub_path),
            allowlist=read_key_lines(self.allowlist_path),
        )
        for crl in self._held_crls():
            store.add_crl(crl)
        offered = self._read_crl(self.crl_path)
        if offered is None:
            for held in store.crls.values():
                log.error(
                    "revocation list %s is missing; keeping the held list v%d (%s)",
                    self.crl_path,
                    held.version,
                    self._held_path(held.issuer),
                )
            return store
        held = store.crls.get(offered.issuer)
        if store.add_crl(offered):
            try:
                write_secret(self._held_path(offered.issuer), offered.encode())
            except OSError as e:
                # Enforced now regardless; only its survival across a restart is at stake.
                log.error(
                    "revocation list %s is enforced but cannot be held in %s (%s): a "
                    "restart would refuse to start until that directory is writable",
                    self.crl_path,
                    self.crl_held_dir,
                    e.strerror,
                )
        elif held is not None and offered.version < held.version:
            log.error(
                "revocation list %s is v%d, older than the held v%d: refused (a rollback?); "
                "keeping the held list",
                self.crl_path,
                offered.version,
                held.version,
            )
        elif held is None:
            log.error("revocation list %s is not signed by a trusted CA; ignored", self.crl_path)
        return store

    def _held_path(self, issuer: bytes) -> Path:
        return self.crl_held_dir / issuer.hex()

    def _held_crls(self) -> list[RevocationList]:
        if not self.crl_held_dir.is_dir():
            return []
        out = []
        for path in sorted(self.crl_held_dir.iterdir()):
            crl = self._read_crl(path)
            if crl is not None and path.name == crl.issuer.hex():
                out.append(crl)
        return out

    @staticmethod
    def _read_crl(path: Path) -> RevocationList | None:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise KeyFileError(f"revocation list {path} is unreadable: {e.strerror}") from None
        try:
            return RevocationList.decode(data)
        except DecodeError as e:
            raise KeyFileError(f"revocation list {path} is unreadable: {e}") from None


class CaDir:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.key_path = root / "ca.key"
        self.pub_path = root / "ca.pub"
        self.meta_path = root / "ca.json"
        self.crl_path = root / "crl"

    def init(self, cluster: str, *, now: float | None = None) -> NodeKey:
        if self.key_path.exists():
            raise KeyFileError(f"a CA already exists in {self.root} (refusing to overwrite it)")
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        seed = os.urandom(32)
        key = NodeKey(seed)
        write_secret(self.key_path, (seed.hex() + "\n").encode())
        write_public(self.pub_path, (key.public_key.hex() + "\n").encode())
        self._write_meta({"cluster": cluster, "next_serial": 1})
        first = RevocationList.issue(key, 1, frozenset(), now=_now(now))
        write_public(self.crl_path, first.encode())
        return key

    def key(self) -> NodeKey:
        return NodeKey(read_secret_seed(self.key_path))

    def meta(self) -> dict:
        try:
            meta = json.loads(self.meta_path.read_text())
        except (OSError, ValueError) as e:
            raise KeyFileError(f"CA metadata {self.meta_path} is unreadable: {e}") from None
        if not isinstance(meta.get("cluster"), str) or not isinstance(meta.get("next_serial"), int):
            raise KeyFileError(f"CA metadata {self.meta_path} is malformed")
        return meta

    def _write_meta(self, meta: dict) -> None:
        write_public(self.meta_path, (json.dumps(meta, indent=1) + "\n").encode())

    def sign(self, public_key: bytes, *, now: float, days: float) -> Certificate:
        key = self.key()
        meta = self.meta()
        cert = Certificate.issue(
            key, meta["cluster"], public_key, now=now, days=days, serial=meta["next_serial"]
        )
        meta["next_serial"] += 1
        self._write_meta(meta)
        return cert

    def crl(self) -> RevocationList:
        try:
            return RevocationList.decode(self.crl_path.read_bytes())
        except (OSError, DecodeError) as e:
            raise KeyFileError(f"revocation list {self.crl_path} is unreadable: {e}") from None

    def revoke(
        self, public_key: bytes, *, now: float | None = None, days: float = CRL_VALIDITY_DAYS
    ) -> RevocationList:
        """Issues the next list with ``public_key`` added (revoking a key again just
        issues a fresh list: the way to renew one before its next update)."""
        old = self.crl()
        crl = RevocationList.issue(
            self.key(), old.version + 1, old.revoked | {public_key}, now=_now(now), days=days
        )
        write_public(self.crl_path, crl.encode())
        return crl

    def enroll(self, data_dir: DataDir, *, now: float, days: float) -> tuple[NodeKey, Certificate]:
        data_dir.ensure()
        node_key, _ = load_or_create_key(data_dir.key_path)
        cert = self.sign(node_key.public_key, now=now, days=days)
        write_public(data_dir.cert_path, cert.encode())
        ca_pub = self.key().public_key
        append_key_line(data_dir.ca_pub_path, ca_pub)
        write_public(data_dir.crl_path, self.crl().encode())
        return node_key, cert


def _now(now: float | None) -> float:
    return time.time() if now is None else now
