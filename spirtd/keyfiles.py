"""Key and trust material on disk: the node's data dir and a CA's dir.

Data dir::

    node.key        Ed25519 seed, hex (mode 0600; refused if others can read it)
    node.cert       this node's certificate from the cluster CA (optional)
    trust/ca.pub    trusted CA public keys, hex, one per line
    trust/allowlist peer public keys admitted without a certificate, hex, one per line
    trust/crl       the newest revocation list seen from a trusted CA

CA dir::

    ca.key          the CA's Ed25519 seed, hex (mode 0600)
    ca.pub          its public key, hex
    ca.json         cluster name and the next certificate serial
    crl             the CA's current signed revocation list
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from protocol.errors import DecodeError
from protocol.identity import Certificate, NodeKey, RevocationList, TrustStore

DEFAULT_CLUSTER = "spirt"


class KeyFileError(RuntimeError):
    """A problem with key material; the message names the file."""


def write_secret(path: Path, data: bytes) -> None:
    """Creates ``path`` with mode 0600 from the start (never world-readable, even briefly)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        view = memoryview(data)
        while view:  # os.write may write less than asked for large buffers
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def write_public(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


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
        self.api_socket = root / "api.sock"

    def ensure(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)

    def certificate(self) -> Certificate | None:
        if not self.cert_path.exists():
            return None
        try:
            return Certificate.decode(self.cert_path.read_bytes())
        except (OSError, DecodeError) as e:
            raise KeyFileError(f"certificate {self.cert_path} is unreadable: {e}") from None

    def trust_store(self, cluster: str | None = None) -> TrustStore:
        """Builds the admission policy from disk. ``cluster`` defaults to the one
        named in our own certificate, else DEFAULT_CLUSTER."""
        cert = self.certificate()
        if cluster is None:
            cluster = cert.cluster if cert else DEFAULT_CLUSTER
        store = TrustStore(
            cluster,
            ca_keys=read_key_lines(self.ca_pub_path),
            allowlist=read_key_lines(self.allowlist_path),
        )
        if self.crl_path.exists():
            try:
                store.add_crl(RevocationList.decode(self.crl_path.read_bytes()))
            except (OSError, DecodeError) as e:
                raise KeyFileError(f"revocation list {self.crl_path} is unreadable: {e}") from None
        return store


class CaDir:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.key_path = root / "ca.key"
        self.pub_path = root / "ca.pub"
        self.meta_path = root / "ca.json"
        self.crl_path = root / "crl"

    def init(self, cluster: str) -> NodeKey:
        if self.key_path.exists():
            raise KeyFileError(f"a CA already exists in {self.root} (refusing to overwrite it)")
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        seed = os.urandom(32)
        key = NodeKey(seed)
        write_secret(self.key_path, (seed.hex() + "\n").encode())
        write_public(self.pub_path, (key.public_key.hex() + "\n").encode())
        self._write_meta({"cluster": cluster, "next_serial": 1})
        write_public(self.crl_path, RevocationList.issue(key, 1, frozenset()).encode())
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

    def revoke(self, public_key: bytes) -> RevocationList:
        old = self.crl()
        crl = RevocationList.issue(self.key(), old.version + 1, old.revoked | {public_key})
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
