"""Small shards in the curation schema (perceptio/shards.py) for the trainer's tests and benchmark.

Images are tiny JPEGs of a coloured box on a background; the box is the ref's mask and its depth
codes follow the box position, so a model can learn something from them. ADE20k-style samples carry
a marked-point question instead of refs.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from perceptio.shards import DEPTH_SIZE, ShardSample, ShardWriter, mask_to_rle, sample_key

IMAGE_SIZE = (64, 48)  # width, height
NUM_DEPTH_TOKENS = 100


def _jpeg(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def make_sample(dataset: str, split: str, image_id: int, refs: int = 2, sentences: int = 2, question: bool = False,
                questions: bool = False, num_codes: int = 128, encode_depth: Callable[[np.ndarray], np.ndarray] | None = None) -> ShardSample:
    """One image sample; everything is a function of (dataset, image_id).

    ``encode_depth`` (a depth tokenizer's encoder) gives the depth codes of the depth map; without
    it a stand-in grid marks the box's cells.
    """
    rng = np.random.default_rng([image_id, len(dataset)])
    width, height = IMAGE_SIZE
    background = rng.integers(0, 256, 3)
    image = np.full((height, width, 3), background, dtype=np.uint8)
    x0, y0 = int(rng.integers(0, width // 2)), int(rng.integers(0, height // 2))
    box = (slice(y0, y0 + height // 2), slice(x0, x0 + width // 2))
    image[box] = rng.integers(0, 256, 3)
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[box] = 1
    # Normalised inverse depth: the box is nearest (+1) before a far background (-1); already
    # min-max normalised, so a tokenizer's own normalisation leaves it as it is.
    depth = np.full((DEPTH_SIZE, DEPTH_SIZE), -1.0, dtype=np.float32)
    depth[y0 * DEPTH_SIZE // height : (y0 + height // 2) * DEPTH_SIZE // height,
          x0 * DEPTH_SIZE // width : (x0 + width // 2) * DEPTH_SIZE // width] = 1.0
    if encode_depth is not None:
        depth_tokens = np.asarray(encode_depth(depth), dtype=np.int16)
    else:  # a stand-in code grid a model can read off the image: the background's brightness, 100 in the box
        grid = np.full((10, 10), int(background.mean()) // 32, dtype=np.int16)
        grid[y0 * 10 // height : (y0 + height // 2) * 10 // height, x0 * 10 // width : (x0 + width // 2) * 10 // width] = 100
        depth_tokens = (grid.reshape(-1) % num_codes).astype(np.int16)
    meta = {
        "dataset": dataset, "split": split, "image_id": image_id, "file_name": f"{image_id}.jpg",
        "width": width, "height": height, "teacher": "test", "tokenizer": "test@000000000000", "refs": [],
    }
    marked = None
    if question or questions:
        asked = {"text": "Which point is closest to the camera? (A) (B) (C)", "points": [[1, 1], [2, 2], [3, 3]],
                 "labels": ["A", "B", "C"], "answer": "ABC"[image_id % 3], "point_depths": [0.1, 0.2, 0.3]}
        if questions:  # ADE20k's layout: a list of questions whose marks the trainer draws
            meta["questions"] = [asked]
        else:  # the older one: one question on a marked copy of the image
            meta["question"] = asked
            marked = _jpeg(255 - image)
    else:
        meta["refs"] = [
            {"ref_id": image_id * 10 + r, "ann_id": image_id * 10 + r, "category_id": 1, "category": "box",
             "bbox": [x0, y0, width // 2, height // 2], "mask": mask_to_rle(mask),
             "sentences": [{"sent_id": image_id * 100 + r * 10 + s, "raw": f"Box {r} {s}", "sent": f"box {r} {s}"}
                           for s in range(sentences)],
             "description": f"a box at {x0} {y0}", "depth": {"median": 0.0, "rank": r}}
            for r in range(refs)
        ]
    return ShardSample(sample_key(dataset, split, image_id), _jpeg(image), depth.astype(np.float16), depth_tokens, meta,
                       marked_jpg=marked)


def write_shards(folder: Path, dataset: str, split: str = "train", shards: int = 2, images_per_shard: int = 3,
                 first_image_id: int = 1, **sample_options) -> list[Path]:
    """``{dataset}-{split}-{index:06d}.tar`` files with consecutive image ids."""
    paths = []
    image_id = first_image_id
    for index in range(shards):
        with ShardWriter(Path(folder) / f"{dataset}-{split}-{index:06d}.tar") as writer:
            for _ in range(images_per_shard):
                writer.write(make_sample(dataset, split, image_id, **sample_options))
                image_id += 1
        paths.append(writer.path)
    return paths


def write_tiny_tokenizer(folder: Path) -> Path:
    """A small random-weight depth VQ-VAE (K = 128, n = 100) saved to ``folder``, always the same."""
    import torch

    from perceptio.tokenize.vqvae import DepthVQVAE, DepthVQVAEConfig

    torch.manual_seed(0)
    DepthVQVAE(DepthVQVAEConfig(input_pool=8, hidden_channels=(4, 4), code_dim=8, num_res_blocks=1)).save_pretrained(folder)
    return Path(folder)
