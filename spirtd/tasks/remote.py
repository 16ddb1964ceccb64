"""A dataset kept in S3 (``s3://bucket/prefix``), copied into a local directory.

Functions on Lambda or on another host cannot read the node's disk, so a node may
name an S3 location for a dataset (``--dataset mnist=s3://bucket/mnist``). The
daemon (for its evaluation) and each function (for its slices) copy the files
directly under that prefix into a cache directory once, then load them like a
local directory: the task code never sees S3. The job record still names only the
dataset; the location is each node's own configuration.

Credentials and the endpoint come from boto3's usual chain (the function's role on
Lambda; ``AWS_*`` variables, ``AWS_ENDPOINT_URL_S3`` for an S3-compatible
service). The listing is checked before anything is downloaded: at most
``MAX_FILES`` plain file names, at most ``max_bytes`` in all, and each file must
arrive with the size the listing gave it. A copy is used only once complete: it is
written beside the cache and renamed into place, so a worker that dies mid-copy
leaves nothing another one would load. Torch-free on purpose (the daemon's config
check imports it).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

S3_SCHEME = "s3://"
MAX_FILES = 64
DEFAULT_MAX_BYTES = 4 << 30  # MNIST's four files are 55 MB; a bound, not a quota
# What a function uses for its copies (Lambda's /tmp by default).
CACHE_ENV = "SPIRT_DATASET_CACHE"
COMPLETE = ".complete"
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class RemoteDataError(ValueError):
    """The S3 location is malformed, unreachable, empty or over the limits."""


def is_s3(location: str) -> bool:
    return location.startswith(S3_SCHEME)


def parse_s3(uri: str) -> tuple[str, str]:
    """(bucket, prefix ending in "/" or empty) of ``s3://bucket[/prefix]``."""
    if not is_s3(uri):
        raise RemoteDataError(f"{uri!r} is not an s3:// location")
    bucket, _, prefix = uri[len(S3_SCHEME) :].partition("/")
    if not _BUCKET.fullmatch(bucket) or ".." in bucket:
        raise RemoteDataError(f"{uri!r}: {bucket!r} is not a valid S3 bucket name")
    prefix = prefix.strip("/")
    if prefix and any(part in ("", ".", "..") for part in prefix.split("/")):
        raise RemoteDataError(f"{uri!r}: the prefix has an empty, '.' or '..' part")
    if len(prefix) > 512:
        raise RemoteDataError(f"{uri!r}: the prefix is over 512 characters")
    return bucket, (prefix + "/" if prefix else "")


def default_cache() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path(tempfile.gettempdir()) / "spirt-datasets")


def _client() -> Any:
    import boto3  # only where a dataset is in S3

    return boto3.client("s3")


def _listing(s3: Any, uri: str, bucket: str, prefix: str) -> list[tuple[str, int, str]]:
    """(name, size, etag) of each object directly under the prefix, checked."""
    found: list[tuple[str, int, str]] = []
    pages = s3.get_paginator("list_objects_v2").paginate(
        Bucket=bucket, Prefix=prefix, Delimiter="/"
    )
    for page in pages:
        for obj in page.get("Contents", []):
            name = obj["Key"][len(prefix) :]
            if not name:
                continue  # the "directory" object some tools create
            if not _NAME.fullmatch(name):
                raise RemoteDataError(f"{uri}: object name {name!r} is not a plain file name")
            found.append((name, int(obj["Size"]), str(obj.get("ETag", ""))))
            if len(found) > MAX_FILES:
                raise RemoteDataError(f"{uri}: more than {MAX_FILES} objects")
    if not found:
        raise RemoteDataError(f"{uri}: no objects under this prefix")
    return sorted(found)


def localize(uri: str, cache: Path, *, max_bytes: int = DEFAULT_MAX_BYTES) -> Path:
    """A local directory holding the files under ``uri``: the cached copy if the
    listing is unchanged, else a fresh one (older copies of ``uri`` are removed)."""
    bucket, prefix = parse_s3(uri)
    s3 = _client()
    try:
        listing = _listing(s3, uri, bucket, prefix)
    except RemoteDataError:
        raise
    except Exception as e:  # botocore's errors, credentials, the endpoint
        raise RemoteDataError(f"{uri}: cannot list: {e}") from None
    total = sum(size for _, size, _ in listing)
    if total > max_bytes:
        raise RemoteDataError(
            f"{uri}: {total:,} bytes in {len(listing)} objects, over the {max_bytes:,} allowed"
        )
    where = hashlib.blake2b(uri.encode(), digest_size=8).hexdigest()
    what = hashlib.blake2b(repr(listing).encode(), digest_size=8).hexdigest()
    final = cache / f"{where}-{what}"
    if (final / COMPLETE).is_file():
        return final
    cache.mkdir(parents=True, exist_ok=True, mode=0o700)
    part = Path(tempfile.mkdtemp(dir=cache, prefix=".partial-"))
    try:
        for name, size, _ in listing:
            target = part / name
            try:
                s3.download_file(bucket, prefix + name, str(target))
            except Exception as e:
                raise RemoteDataError(f"{uri}: cannot download {name}: {e}") from None
            got = target.stat().st_size
            if got != size:
                raise RemoteDataError(
                    f"{uri}: {name} changed while copied ({got:,} bytes, listed {size:,})"
                )
        (part / COMPLETE).write_text(uri + "\n")
        try:
            part.rename(final)
        except OSError:
            if not (final / COMPLETE).is_file():
                raise
            # Another worker finished the same copy first: use theirs.
    finally:
        shutil.rmtree(part, ignore_errors=True)
    # The copies of earlier listings of this location are stale for good.
    for old in cache.glob(f"{where}-*"):
        if old != final:
            with contextlib.suppress(OSError):
                shutil.rmtree(old)
    return final
