"""Shared test setup: no network, the real sample data in ../shared/data when present, and what
several test modules need built once per session (the synthetic world, a tiny Depth Anything)."""

from __future__ import annotations

import itertools
import os
import sys
import urllib.request
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

# A test that reaches for a model hub is a bug: fail fast instead of waiting on a timeout.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# `make test` must end within its time budget on 2 cores, so slow tests run last and only while the
# budget (seconds since the session started, PERCEPTIO_TEST_BUDGET_S) lasts; `make test-slow` runs
# them all. Unset, every test runs.
_SESSION_START = time.monotonic()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("PERCEPTIO_TEST_BUDGET_S"):
        items.sort(key=lambda item: item.get_closest_marker("slow") is not None)  # stable: order kept


def pytest_runtest_setup(item: pytest.Item) -> None:
    budget = os.environ.get("PERCEPTIO_TEST_BUDGET_S")
    if budget and item.get_closest_marker("slow") is not None:
        spent = time.monotonic() - _SESSION_START
        if spent > float(budget):
            pytest.skip(f"slow test: make test's budget of {float(budget):.0f} s is spent ({spent:.0f} s); run make test-slow")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (real samples nobody on the team made); skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present (it is only in the team's checkouts)")
    return SHARED_DATA


# The shared synthetic world: every split of RefCOCO/+/g and ADE20k, ambiguous and duplicate refs.
SYNTH_IMAGES = 20  # 15 COCO + 5 ADE20k images (the 20th is the first ADE20k validation image)
SYNTH_SEED = 3


@pytest.fixture(scope="session")
def synth_world_args() -> dict[str, int]:
    """How :func:`synth_world` was generated (for tests that regenerate it)."""
    return {"images": SYNTH_IMAGES, "seed": SYNTH_SEED}


@pytest.fixture(scope="session")
def synth_world(tmp_path_factory: pytest.TempPathFactory, synth_world_args: dict[str, int]) -> Path:
    """One synthetic world for the whole session. Read it, never change it: copy it first."""
    from perceptio.sources.synth import generate_world

    root = tmp_path_factory.mktemp("synth") / "world"
    generate_world(root, workers=1, **synth_world_args)
    return root


_tiny_depth_anything_seeds = itertools.count()


def _save_tiny_depth_anything(folder: Path) -> Path:
    """A Depth Anything V2 model with a 4-layer, 32-wide DINOv2 backbone and random weights.

    Each call draws other weights from its own seed (independent of the test order). The output is
    rescaled to about 1, like the real model's: a random head gives ~1e-8, which float16 (the depth
    cache's type) cannot hold.
    """
    import torch
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config
    from perceptio.train.shapes import depth_anything_processor

    backbone = Dinov2Config(
        image_size=56,
        patch_size=14,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=64,
        out_features=["stage1", "stage2", "stage3", "stage4"],
        reshape_hidden_states=False,
    )
    config = DepthAnythingConfig(
        backbone_config=backbone,
        reassemble_hidden_size=32,
        neck_hidden_sizes=[8, 16, 32, 32],
        fusion_hidden_size=16,
        head_hidden_size=8,
    )
    torch.manual_seed(next(_tiny_depth_anything_seeds))
    model = DepthAnythingForDepthEstimation(config).eval()
    with torch.no_grad():
        typical = model(pixel_values=torch.randn(2, 3, 56, 56)).predicted_depth.mean()
        # The head ends in conv3 -> ReLU, so scaling conv3 scales the output.
        model.head.conv3.weight /= typical
        model.head.conv3.bias /= typical
    model.save_pretrained(folder)
    # The real model's preprocessing, scaled down to a 56-pixel input.
    depth_anything_processor(56).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def make_tiny_depth_anything() -> Callable[[Path], Path]:
    """Save a new tiny random Depth Anything into a folder (each call draws new weights)."""
    return _save_tiny_depth_anything


@pytest.fixture(scope="session")
def tiny_depth_anything(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny random Depth Anything for the session, in a folder named ``depth-anything``."""
    return _save_tiny_depth_anything(tmp_path_factory.mktemp("models") / "depth-anything")


# ------------------------------------------------------------------------------------ train fixtures
@pytest.fixture(scope="session")
def vqvae_dir(tmp_path_factory) -> Path:
    """The small random-weight depth VQ-VAE of ``tests.train_factory``, written once per session."""
    from tests.train_factory import write_tiny_tokenizer

    return write_tiny_tokenizer(tmp_path_factory.mktemp("vqvae"))


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


@pytest.fixture
def s3_copy(s3_bucket) -> Callable[[Path, str], str]:
    """Upload every file under a local folder to ``s3://perceptio-test/<name>/...``; returns that URL."""
    from perceptio import fs

    def upload(folder: Path, name: str) -> str:
        url = f"{s3_bucket}/{name}"
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                fs.upload(path, fs.join(url, *path.relative_to(folder).parts))
        return url

    return upload


@dataclass
class Done:
    """What a console command run in-process gave: exit code, stdout, stderr."""

    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def evaluate(capsys, monkeypatch) -> Callable[..., Done]:
    """Run ``perceptio-evaluate``'s entry point in this process (exit code, stdout, stderr)."""
    from perceptio.evaluate.cli import main

    def run(*arguments: str) -> Done:
        monkeypatch.setattr(sys, "argv", ["perceptio-evaluate", *arguments])
        code = 0
        try:
            main()
        except SystemExit as exit_:
            code = exit_.code
        captured = capsys.readouterr()
        return Done(code, captured.out, captured.err)

    return run


@pytest.fixture(scope="module")
def one_torch_thread():
    """The tiny models run fastest on one thread of a busy CPU (decoding several times faster); for a
    module that asks for it (``pytest.mark.usefixtures``), restored afterwards."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
