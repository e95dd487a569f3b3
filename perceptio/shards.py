"""The shard format: one WebDataset sample per image of one dataset split.

This module is the single definition of what a shard holds; curation writes it, and the trainer,
the evaluator and ``perceptio-inspect`` read it. docs/shard-format.md describes it for users.

Members of a sample with key ``{dataset}_{split}_{image_id:012d}``:

- ``jpg``: the original image bytes, verbatim.
- ``depth.npy``: float16 (320, 320), the teacher's depth under the tokenizer's normalisation.
- ``depth_tokens.npy``: int16 (n,), codebook indices in [0, K).
- ``json``: metadata (see :data:`META_FIELDS` and :data:`REF_FIELDS`).
- ``seg.png`` (ADE20k only): the 8-bit class map.
- ``marked.jpg`` (ADE20k only): the image with the question's points drawn.

Tars are written deterministically (fixed member order, mtime, owner and mode), to a temporary name
that is renamed when complete, so a re-run produces byte-identical files and a killed run leaves no
half-written shard under a final name.
"""

from __future__ import annotations

import io
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Iterator

import numpy as np

# Top-level json fields of every sample.
META_FIELDS = (
    "dataset",  # e.g. "refcoco-unc", "refcocog-umd", "ade20k"
    "split",  # official split name, e.g. "train", "val", "testA"
    "image_id",  # int
    "file_name",  # image file name as in the dataset
    "width",
    "height",
    "teacher",  # teacher identity, e.g. "depth-anything/Depth-Anything-V2-Small-hf" or "gt:<root>"
    "tokenizer",  # tokenizer identity: "<name>@<sha256 prefix>"
    "refs",  # list of ref dicts (REF_FIELDS); empty for ADE20k
)
# Fields of each entry of ``refs``.
REF_FIELDS = (
    "ref_id",
    "ann_id",
    "category_id",
    "category",
    "bbox",  # [x, y, w, h] as in COCO
    "mask",  # COCO RLE of the merged mask: {"size": [h, w], "counts": str}
    "sentences",  # [{"sent_id": int, "raw": str, "sent": str}]
    "description",  # one attribute-focused sentence about the object
    "depth",  # {"median": float normalised depth inside the mask, "rank": int, 0 = nearest object}
)
# ADE20k samples carry ``question``: {"text", "points": [[x, y], ...], "labels": ["A", ...],
# "answer": "B", "point_depths": [float, ...]} (normalised depth, larger = nearer).
QUESTION_FIELD = "question"

DEPTH_SIZE = 320
MEMBER_ORDER = ("jpg", "depth.npy", "depth_tokens.npy", "json", "seg.png", "marked.jpg")


def sample_key(dataset: str, split: str, image_id: int) -> str:
    """``{dataset}_{split}_{image_id:012d}``; webdataset splits keys at the first dot, so no dots."""
    key = f"{dataset}_{split}_{int(image_id):012d}"
    if "." in key:
        raise ValueError(f"sample key {key!r} must not contain a dot")
    return key


def mask_to_rle(mask: np.ndarray) -> dict[str, Any]:
    """Lossless COCO RLE of a binary (H, W) mask, json-ready."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def rle_to_mask(rle: dict[str, Any]) -> np.ndarray:
    """Decode a json RLE written by :func:`mask_to_rle` into a uint8 (H, W) 0/1 mask."""
    from pycocotools import mask as mask_utils

    counts = rle["counts"]
    encoded = {"size": list(rle["size"]), "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    return mask_utils.decode(encoded).astype(np.uint8)


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def npy_load(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


@dataclass
class ShardSample:
    """One image of one dataset split, as stored in a shard."""

    key: str
    jpg: bytes
    depth: np.ndarray  # float16 (320, 320)
    depth_tokens: np.ndarray  # int16 (n,)
    meta: dict[str, Any]
    seg_png: bytes | None = None
    marked_jpg: bytes | None = None
    extra: dict[str, bytes] = field(default_factory=dict)

    def to_members(self) -> dict[str, bytes]:
        import json

        members = {
            "jpg": self.jpg,
            "depth.npy": npy_bytes(np.asarray(self.depth, dtype=np.float16)),
            "depth_tokens.npy": npy_bytes(np.asarray(self.depth_tokens, dtype=np.int16)),
            "json": json.dumps(self.meta, sort_keys=True, separators=(",", ":")).encode("utf-8"),
        }
        if self.seg_png is not None:
            members["seg.png"] = self.seg_png
        if self.marked_jpg is not None:
            members["marked.jpg"] = self.marked_jpg
        members.update(self.extra)
        return members

    @classmethod
    def from_members(cls, key: str, members: dict[str, bytes]) -> "ShardSample":
        """Build from raw member bytes keyed by extension (a webdataset sample without decoding)."""
        import json

        known = set(MEMBER_ORDER)
        return cls(
            key=key,
            jpg=members["jpg"],
            depth=npy_load(members["depth.npy"]),
            depth_tokens=npy_load(members["depth_tokens.npy"]),
            meta=json.loads(members["json"]),
            seg_png=members.get("seg.png"),
            marked_jpg=members.get("marked.jpg"),
            extra={name: data for name, data in members.items() if name not in known},
        )

    @classmethod
    def from_webdataset(cls, sample: dict[str, Any]) -> "ShardSample":
        """Build from a sample of ``webdataset.WebDataset(...)`` read without a decoder."""
        members = {name: data for name, data in sample.items() if not name.startswith("__")}
        return cls.from_members(sample["__key__"], members)


def _ordered(members: dict[str, bytes]) -> list[tuple[str, bytes]]:
    rank = {name: index for index, name in enumerate(MEMBER_ORDER)}
    return sorted(members.items(), key=lambda item: (rank.get(item[0], len(rank)), item[0]))


class ShardWriter:
    """Write samples into one tar deterministically; the final name appears only on :meth:`close`.

    Use as a context manager. If the block raises, the temporary file is removed and no shard
    exists under the final name.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self.tmp_path = self.path.with_name(f".{self.path.name}.tmp")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tar = tarfile.open(self.tmp_path, "w", format=tarfile.GNU_FORMAT)
        self.count = 0

    def write(self, sample: ShardSample) -> None:
        for name, data in _ordered(sample.to_members()):
            info = tarfile.TarInfo(f"{sample.key}.{name}")
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(data))
        self.count += 1

    def close(self) -> Path:
        self._tar.close()
        with open(self.tmp_path, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(self.tmp_path, self.path)
        return self.path

    def abort(self) -> None:
        self._tar.close()
        self.tmp_path.unlink(missing_ok=True)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


# A tar ends with two 512-byte zero blocks; tarfile reads a tar cut at a member boundary silently.
END_OF_ARCHIVE = b"\0" * 1024


def iter_members(source: str | os.PathLike[str] | BinaryIO) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, raw members by extension) in stored order, with the standard library alone.

    ``source`` is a path or a seekable binary file object (e.g. an object-store file from
    :func:`perceptio.fs.open_input`). A key met again after another one comes out again (a duplicate
    is the caller's to judge). Raises ``tarfile.TarError``/``EOFError``/``OSError`` on a damaged
    tar, and ``EOFError`` when the tar lacks its end-of-archive marker (cut short exactly between
    members).
    """
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as handle:
            yield from iter_members(handle)
        return
    current_key: str | None = None
    members: dict[str, bytes] = {}
    with tarfile.open(fileobj=source, mode="r") as tar:
        for info in tar:
            if not info.isfile():
                continue
            key, _, extension = os.path.basename(info.name).partition(".")
            if key != current_key and current_key is not None:
                yield current_key, members
                members = {}
            current_key = key
            handle = tar.extractfile(info)
            members[extension] = handle.read() if handle else b""
        end = tar.offset
    if current_key is not None:
        yield current_key, members
    source.seek(end)
    if source.read(len(END_OF_ARCHIVE)) != END_OF_ARCHIVE:
        name = getattr(source, "name", "the tar")
        raise EOFError(f"{name}: no end-of-archive marker after byte {end}: the tar was cut short")


def iter_shard(path: str | os.PathLike[str]) -> Iterator[ShardSample]:
    """Read a shard's samples in stored order (no webdataset needed); errors as :func:`iter_members`."""
    for key, members in iter_members(path):
        yield ShardSample.from_members(key, members)
