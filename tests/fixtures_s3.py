"""An S3 endpoint for tests: moto's server on 127.0.0.1 (AWS is not reachable from
the test machines), found by boto3, in this process and in the daemons and
functions it starts, through the environment."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto.server import ThreadedMotoServer


@contextmanager
def s3_endpoint(monkeypatch: pytest.MonkeyPatch, bucket: str) -> Iterator[Any]:
    """A running endpoint with ``bucket`` made; yields a boto3 S3 client for it."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://{host}:{port}")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        client = boto3.client("s3")
        client.create_bucket(Bucket=bucket)
        yield client
    finally:
        server.stop()


def upload_dir(client: Any, src: Path, bucket: str, prefix: str) -> None:
    for f in sorted(src.iterdir()):
        client.upload_file(str(f), bucket, f"{prefix}/{f.name}")
