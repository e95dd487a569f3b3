"""What the stages write is readable by the whole team: files 0644, folders 0755 (perceptio/io.py)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from perceptio.io import atomic_directory, write_text_atomic


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture()
def usual_umask():
    # Folders made on the way follow the umask, as every mkdir does; pin the usual one.
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def test_tokenizer_folder_depth_cache_and_parquet_are_shared(usual_umask, tmp_path: Path) -> None:
    from perceptio.curate.writer import write_rows
    from perceptio.shards import ManifestRow
    from perceptio.tokenize.cache import DepthCache
    from perceptio.tokenize.vqvae import DepthVQVAE, DepthVQVAEConfig

    DepthVQVAE(DepthVQVAEConfig(code_dim=8, hidden_channels=(8, 8, 8))).save_pretrained(tmp_path / "tok")

    class Teacher:  # a teacher whose depth is known, so that the cache writes an entry
        identity = "constant@test"

        def predict(self, images: list[Image.Image]) -> list[np.ndarray]:
            return [np.ones((image.height, image.width), np.float32) for image in images]

    DepthCache(tmp_path / "cache").predict(Teacher(), [Image.new("RGB", (4, 3))], [b"image bytes"])
    write_rows(tmp_path / "shards" / "x-train-000000.parquet", [ManifestRow(dataset="x")])

    files = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert {path.suffix for path in files} >= {".json", ".safetensors", ".npy", ".txt", ".parquet"}
    assert {str(path.relative_to(tmp_path)): oct(mode(path)) for path in files if mode(path) != 0o644} == {}
    folders = [path for path in tmp_path.rglob("*") if path.is_dir()]
    assert {str(path.relative_to(tmp_path)): oct(mode(path)) for path in folders if mode(path) != 0o755} == {}


def test_atomic_directory_is_shared_whatever_the_umask(tmp_path: Path) -> None:
    previous = os.umask(0o077)
    try:
        with atomic_directory(tmp_path / "world") as staging:
            (staging / "inner").mkdir()
            write_text_atomic(staging / "inner" / "a.txt", "a")
    finally:
        os.umask(previous)
    assert mode(tmp_path / "world") == mode(tmp_path / "world" / "inner") == 0o755
    assert mode(tmp_path / "world" / "inner" / "a.txt") == 0o644
    assert [path.name for path in tmp_path.iterdir()] == ["world"]  # nothing left beside it
