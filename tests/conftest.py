"""Shared test setup: no network, and the real sample data in ../shared/data when present."""

from __future__ import annotations

import os
import urllib.request
from pathlib import Path

import pytest

# A test that reaches for a model hub is a bug: fail fast instead of waiting on a timeout.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (real samples nobody on the team made); skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present (it is only in the team's checkouts)")
    return SHARED_DATA


@pytest.fixture
def s3_bucket(monkeypatch) -> str:
    """``s3://perceptio-test``: a bucket on a local S3-compatible server (moto) on 127.0.0.1.

    The server runs in a thread of this process on a free port; the credentials and endpoint are
    set in the environment, so subprocesses the test starts (a trainer, Ray workers) reach it too.
    """
    pytest.importorskip("s3fs")
    server_module = pytest.importorskip("moto.server")
    import boto3
    import fsspec

    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    # moto keeps its buckets in module globals, shared by every server of this process: start empty.
    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST")).close()
    for variable, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                            "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint,
                            "AWS_ENDPOINT_URL_S3": endpoint}.items():
        monkeypatch.setenv(variable, value)
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="perceptio-test")
    # fsspec keeps one filesystem object per set of arguments: drop those that know another server.
    fsspec.get_filesystem_class("s3").clear_instance_cache()
    try:
        yield "s3://perceptio-test"
    finally:
        fsspec.get_filesystem_class("s3").clear_instance_cache()
        server.stop()
