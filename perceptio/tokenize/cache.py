"""On-disk depth cache: no image goes through the same teacher twice (fit, curation, reruns).

An entry is keyed by the sha256 of the image file's bytes and by the teacher's ``identity``; it is
one float16 ``.npy`` file, ``ROOT/<sha256(identity)[:16]>/<hash[:2]>/<hash>.npy``, written
atomically. Each teacher folder holds ``identity.txt`` for people browsing the cache.

Float16 halves the disk (inverse depth needs ~3 significant digits). A fresh prediction is
rounded to float16 before it is returned, so a first run and a cached rerun give identical maps.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
from PIL import Image

from perceptio.errors import PerceptioError
from perceptio.io import atomic_path, write_text_atomic

if TYPE_CHECKING:  # the protocol only: the cache itself needs no torch
    from perceptio.tokenize.teacher import DepthTeacher

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def content_hash(image_bytes: bytes) -> str:
    return hashlib.sha256(image_bytes).hexdigest()


def default_cache_dir() -> Path:
    """``$PERCEPTIO_CACHE/depth`` or ``~/.cache/perceptio/depth``: one cache for fit and curation."""
    base = os.environ.get("PERCEPTIO_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "perceptio")
    return Path(base) / "depth"


def _image_hash(key: bytes | str) -> str:
    if isinstance(key, str):
        if not _SHA256.match(key):
            raise PerceptioError(f"depth cache keys are image bytes or sha256 hex digests, got {key[:80]!r}")
        return key
    return content_hash(bytes(key))


class DepthCache:
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.hits = 0
        self.misses = 0

    def teacher_dir(self, teacher: DepthTeacher) -> Path:
        folder = self.root / hashlib.sha256(teacher.identity.encode()).hexdigest()[:16]
        if not (folder / "identity.txt").is_file():
            write_text_atomic(folder / "identity.txt", teacher.identity + "\n")
        return folder

    def entry_path(self, teacher_dir: Path, image_hash: str) -> Path:
        return teacher_dir / image_hash[:2] / f"{image_hash}.npy"

    def predict(
        self,
        teacher: DepthTeacher,
        images: Sequence[Image.Image],
        image_bytes_or_hashes: Sequence[bytes | str],
    ) -> list[np.ndarray]:
        """Depth of each image, from the cache where present, else from ``teacher`` (then stored).

        ``image_bytes_or_hashes[i]`` is image i's file bytes or their sha256 hex digest. Images that
        hit the cache are never read, so lazily opened PIL images cost nothing then.
        """
        if len(images) != len(image_bytes_or_hashes):
            raise ValueError("images and image_bytes_or_hashes differ in length")
        hashes = [_image_hash(key) for key in image_bytes_or_hashes]
        folder = self.teacher_dir(teacher)
        paths = [self.entry_path(folder, image_hash) for image_hash in hashes]
        depths: list[np.ndarray | None] = [np.load(path) if path.is_file() else None for path in paths]
        # One teacher call per distinct image, even when the same bytes appear twice in a batch.
        missing = list({hashes[index]: index for index, depth in enumerate(depths) if depth is None}.values())
        self.hits += sum(depth is not None for depth in depths)
        self.misses += len(missing)
        if missing:
            predictions = teacher.predict([images[index] for index in missing])
            fresh: dict[str, np.ndarray] = {}
            for index, prediction in zip(missing, predictions):
                stored = np.asarray(prediction, dtype=np.float16)
                with atomic_path(paths[index]) as temporary:
                    with open(temporary, "wb") as handle:
                        np.save(handle, stored)
                fresh[hashes[index]] = stored
            depths = [fresh[image_hash] if depth is None else depth for depth, image_hash in zip(depths, hashes)]
        return [np.asarray(depth, dtype=np.float32) for depth in depths]
