"""Shared test setup: no network, and the real sample data in ../shared/data when present."""

from __future__ import annotations

import os
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


# ------------------------------------------------------------------------------------ train fixtures
@pytest.fixture(scope="session")
def vqvae_dir(tmp_path_factory) -> Path:
    """The small random-weight depth VQ-VAE of ``tests.train_factory``, written once per session."""
    from tests.train_factory import write_tiny_tokenizer

    return write_tiny_tokenizer(tmp_path_factory.mktemp("vqvae"))
