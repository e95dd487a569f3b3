"""The on-disk formats of the synthetic world, byte for byte like the official distributions.

- COCO ``instances.json`` (as in the REFER zips: compact json with ``info``, ``images``,
  ``licenses``, ``annotations``, ``categories``); annotations carry an extra ``synth_instance``.
- REFER ``refs(<splitBy>).p``: a pickle (protocol 2) of a list of plain dicts.
- ADE20k ``objectInfo150.csv``: ``Idx,Ratio,Train,Val,Stuff,Name``, no quoting, ``\\n`` line ends
  and no newline after the last row, as in the original file.
- Images: RGB JPEG; depth and instance maps as 16-bit greyscale PNG; ADE class maps as 8-bit
  greyscale ("L") PNG.
"""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from perceptio.sources.synth.render import CLASS_NAMES, STUFF_CLASSES
from perceptio.sources.synth.scene import SHAPES

JPEG_QUALITY = 90
REFER_PICKLE_PROTOCOL = 2  # the protocol of the distributed refs(*).p files
MAX_DEPTH_MM = 65535

COCO_CATEGORIES = [{"supercategory": "shape", "id": index + 1, "name": shape} for index, shape in enumerate(SHAPES)]
CATEGORY_ID = {category["name"]: category["id"] for category in COCO_CATEGORIES}


def encode_jpeg(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb, mode="RGB").save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def encode_png(array: np.ndarray) -> bytes:
    """uint16 arrays become 16-bit greyscale PNGs, uint8 arrays 8-bit ("L") ones."""
    if array.dtype not in (np.uint8, np.uint16):
        raise TypeError(f"PNG maps must be uint8 or uint16, not {array.dtype}")
    buffer = io.BytesIO()
    # Fast compression: these maps are large and flat, and a level-1 file is within ~10 % of level 6.
    Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def depth_to_millimetres(depth_m: np.ndarray) -> np.ndarray:
    """uint16 millimetres; 0 where depth is invalid (no surface) or beyond the format's range."""
    millimetres = np.round(depth_m * 1000.0)
    valid = (depth_m > 0) & (millimetres <= MAX_DEPTH_MM)
    return np.where(valid, np.maximum(millimetres, 1), 0).astype(np.uint16)


def coco_instances(images: list[dict[str, Any]], annotations: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "info": {"description": "perceptio synthetic world (COCO 2014 layout)", "version": "1.0"},
        "images": images,
        "licenses": [],
        "annotations": annotations,
        "categories": COCO_CATEGORIES,
    }


def write_json(path: Path, payload: Any, indent: int | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    separators = (",", ":") if indent is None else (",", ": ")
    path.write_text(json.dumps(payload, indent=indent, separators=separators))


def write_refs(path: Path, refs: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Pickle memoises objects by identity, so which equal strings happen to be one object (that
    # differs between in-process and pool-made refs) would change the bytes. A json round trip
    # rebuilds every value afresh: the same refs always give the same file.
    fresh = json.loads(json.dumps(refs))
    path.write_bytes(pickle.dumps(fresh, protocol=REFER_PICKLE_PROTOCOL))


def ade_class_table(pixel_counts: np.ndarray, train_images: np.ndarray, val_images: np.ndarray) -> str:
    """objectInfo150.csv text for the world's classes. ``pixel_counts[c]`` is the number of pixels
    of class c over all ADE images; ``train_images[c]`` / ``val_images[c]`` how many images of
    each split contain it (the real file's Ratio, Train and Val columns)."""
    total = max(int(pixel_counts.sum()), 1)
    rows = ["Idx,Ratio,Train,Val,Stuff,Name"]
    for idx, name in sorted(CLASS_NAMES.items()):
        stuff = int(idx in STUFF_CLASSES)
        ratio = pixel_counts[idx] / total
        rows.append(f"{idx},{ratio:.4f},{int(train_images[idx])},{int(val_images[idx])},{stuff},{name}")
    return "\n".join(rows)
