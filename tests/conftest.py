"""Shared fixtures. Test data is generated here, never copied from ../shared."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"


def shared_dataset(name: str) -> Path:
    """Path to a real dataset in ../shared/datasets, or skip the test cleanly."""
    p = SHARED / name
    if not p.exists():
        pytest.skip(f"{p} is absent (real-data test)")
    return p


# --- S3-protocol server on loopback (moto), shared by every test that touches s3:// -------
class _S3Server:
    """A running ``ThreadedMotoServer``: ``endpoint_url`` and ``make_bucket() -> 's3://name'``."""

    def __init__(self, endpoint_url: str) -> None:
        self.endpoint_url = endpoint_url
        self._n = 0

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name="us-east-1")

    def make_bucket(self) -> str:
        import uuid

        self._n += 1
        name = f"test-{self._n}-{uuid.uuid4().hex[:8]}"
        self.client().create_bucket(Bucket=name)
        return f"s3://{name}"


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1 (free port), dummy credentials, SEGCORE_S3_ENDPOINT_URL
    set for the session; stopped (and the environment restored) at the end."""
    import socket

    pytest.importorskip("moto.server")
    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "SEGCORE_S3_ENDPOINT_URL": f"http://127.0.0.1:{port}",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield _S3Server(env["SEGCORE_S3_ENDPOINT_URL"])
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
