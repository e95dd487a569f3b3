"""The shard format: one WebDataset sample per image of one dataset split.

This module is the single definition of what a shard holds; curation writes it, and the trainer,
the evaluator and ``perceptio-inspect`` read it. docs/shard-format.md describes it for users.

Members of a sample with key ``{dataset}_{split}_{image_id:012d}``:

- ``jpg``: the original image bytes, verbatim (absent for a text-only conversation).
- ``depth.npy``: float16 (320, 320), the teacher's depth under the tokenizer's normalisation.
- ``depth_tokens.npy``: int16 (n,), codebook indices in [0, K).
- ``json``: metadata (see :data:`META_TYPES` and :data:`REF_TYPES`).

The two depth members are absent when a sample was curated without a depth teacher (LLaVA and
GranD-f conversations by default); its json then has ``teacher`` and ``tokenizer`` null.
:func:`required_members` says which members a sample's json promises.
- ``seg.png`` (ADE20k only): the 8-bit class map.
- ``marked.jpg`` (ADE20k only): the image with the first question's points drawn (a preview; the
  trainer draws every question's points on ``jpg`` when it loads the example).

Tars are written deterministically (fixed member order, mtime, owner and mode), to a temporary name
that is renamed when complete, so a re-run produces byte-identical files and a killed run leaves no
half-written shard under a final name.

The folder around the tars is defined here too: the shard file name ``{dataset}-{split}-{index:06d}.tar``
(:data:`SHARD_NAME`, :class:`ShardFile`, :func:`list_shards`), its side files (``NAME.parquet``, one
:class:`ManifestRow` per ref, and ``NAME_stats.json``, the done marker), the folder's
``manifest.parquet`` (:func:`manifest_schema`) and ``dataset.json``, and the row statuses
:data:`KEPT` / :data:`REJECTED`.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import secrets
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Iterator, Sequence

import numpy as np

from perceptio import fs
from perceptio.errors import PerceptioError
from perceptio.io import FILE_MODE
from perceptio.sources.problems import Problem

if TYPE_CHECKING:
    import pyarrow as pa

# Top-level json fields of every sample, with their json types.
META_TYPES: dict[str, type] = {
    "dataset": str,  # e.g. "refcoco-unc", "refcocog-umd", "ade20k"
    "split": str,  # official split name, e.g. "train", "val", "testA"
    "image_id": int,
    "file_name": str,  # image file name as in the dataset
    "width": int,
    "height": int,
    "teacher": str,  # teacher identity, e.g. "depth-anything/Depth-Anything-V2-Small-hf" or "gt:<root>"
    "tokenizer": str,  # tokenizer identity: "<name>@<sha256 prefix>"
    "refs": list,  # list of ref dicts (REF_TYPES); empty for ADE20k and conversations
}
# Null in a sample without depth members (teacher, tokenizer) or without an image (the other three).
NULLABLE_META = ("file_name", "width", "height", "teacher", "tokenizer")
# Fields of each entry of ``refs``.
REF_TYPES: dict[str, type] = {
    "ref_id": int,
    "ann_id": int,
    "category_id": int,
    "category": str,
    "bbox": list,  # [x, y, w, h] as in COCO
    "mask": dict,  # COCO RLE of the merged mask: {"size": [h, w], "counts": str}
    "sentences": list,  # [{"sent_id": int, "raw": str, "sent": str}]
    "description": str,  # one attribute-focused sentence about the object
    "depth": dict,  # {"median": float normalised depth inside the mask, "rank": int, 0 = nearest object}
}
# ADE20k samples carry ``questions``: a list of marked-point questions, each on points of distinct
# objects (perceptio/curate/marked_points.py), with the QUESTION_TYPES fields plus "object_areas"
# (pixels of each point's object), "object_bases" (lowest row of each point's object) and "target":
# "direct" | "depth" (how the trainer writes the answer: the letter alone, or the depth span first).
# ``question`` is the first of them (None when no question could be asked of the image), the field
# of the older one-question format.
QUESTIONS_FIELD = "questions"
QUESTION_FIELD = "question"
QUESTION_TYPES: dict[str, type] = {
    "text": str,
    "points": list,  # [[x, y], ...]
    "labels": list,  # ["A", ...]
    "answer": str,  # "B"
    "point_depths": list,  # normalised depth per point, larger = nearer
}
# LLaVA-style samples carry ``conversation``: [{"role": "user" | "assistant", "text": str}, ...],
# alternating from the user and ending with an answer; the image (if any) leads the first user turn.
CONVERSATION_FIELD = "conversation"
# GranD-f-style samples carry ``grounded_caption``: {"caption": str, "phrases": [{"text", "start", "end",
# "mask"}]}, phrases in caption order, ``mask`` a COCO RLE like a ref's; the n-th phrase's [SEG] is
# the n-th [SEG] of the target.
GROUNDED_FIELD = "grounded_caption"
PHRASE_TYPES: dict[str, type] = {"text": str, "start": int, "end": int, "mask": dict}
# Both carry ``source_id``: the record's own id in the distributed file (image_id is its position).
SOURCE_ID_FIELD = "source_id"
DEPTH_SIZE = 320
MEMBER_ORDER = ("jpg", "depth.npy", "depth_tokens.npy", "json", "seg.png", "marked.jpg")


def required_members(meta: dict[str, Any]) -> tuple[str, ...]:
    """The members a sample with this json must have (``seg.png`` and ``marked.jpg`` aside)."""
    image = ("jpg",) if meta.get("file_name") is not None else ()
    depth = ("depth.npy", "depth_tokens.npy") if meta.get("teacher") is not None else ()
    return (*image, *depth, "json")


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
    jpg: bytes | None  # None: a text-only conversation
    depth: np.ndarray | None  # float16 (320, 320); None: curated without a depth teacher
    depth_tokens: np.ndarray | None  # int16 (n,); None with depth
    meta: dict[str, Any]
    seg_png: bytes | None = None
    marked_jpg: bytes | None = None
    extra: dict[str, bytes] = field(default_factory=dict)

    def to_members(self) -> dict[str, bytes]:
        import json

        members = {"json": json.dumps(self.meta, sort_keys=True, separators=(",", ":")).encode("utf-8")}
        if self.jpg is not None:
            members["jpg"] = self.jpg
        if self.depth is not None and self.depth_tokens is not None:
            members["depth.npy"] = npy_bytes(np.asarray(self.depth, dtype=np.float16))
            members["depth_tokens.npy"] = npy_bytes(np.asarray(self.depth_tokens, dtype=np.int16))
        if self.seg_png is not None:
            members["seg.png"] = self.seg_png
        if self.marked_jpg is not None:
            members["marked.jpg"] = self.marked_jpg
        members.update(self.extra)
        return dict(_ordered(members))  # the order written to tars, so raw copies keep it too

    @classmethod
    def from_members(cls, key: str, members: dict[str, bytes]) -> "ShardSample":
        """Build from raw member bytes keyed by extension (a webdataset sample without decoding)."""
        import json

        known = set(MEMBER_ORDER)
        return cls(
            key=key,
            jpg=members.get("jpg"),
            depth=npy_load(members["depth.npy"]) if "depth.npy" in members else None,
            depth_tokens=npy_load(members["depth_tokens.npy"]) if "depth_tokens.npy" in members else None,
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
        # Unique per writer: a shard task orphaned by a killed run may still be finishing the same
        # shard as the task of the re-run for a moment; each renames only its own whole file.
        self.tmp_path = self.path.with_name(f".{self.path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
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
        os.chmod(self.tmp_path, FILE_MODE)  # whatever the umask: shards are for the whole team
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


# ------------------------------------------------------------------------------- the shard folder

# ``{dataset}-{split}-{index:06d}.tar``: dataset names contain dashes ("refcoco-unc"), split names do
# not, so the split is the last field before the index.
SHARD_NAME = re.compile(r"^(?P<dataset>.+)-(?P<split>[^-]+)-(?P<index>\d{6})\.tar$")
STATS_SUFFIX = "_stats.json"  # NAME_stats.json: the shard's counts and settings, written last
MANIFEST_NAME = "manifest.parquet"  # every shard's rows, then the refs the readers rejected
DATASET_INFO_NAME = "dataset.json"  # command, versions, teacher and tokenizer identity, counts
# Side tables (NAME.parquet, NAME_stats.json, manifest.parquet, wids indexes) live in this subfolder:
# Hugging Face datasets' file discovery skips "__" folders, so it sees the tars as the data.
META_DIR = "__meta__"


def meta_folder(folder: str | os.PathLike[str]) -> Path:
    return Path(folder) / META_DIR


def manifest_path(folder: str | os.PathLike[str]) -> Path:
    return meta_folder(folder) / MANIFEST_NAME


def meta_location(folder: str | os.PathLike[str]) -> str:
    """:func:`meta_folder` for a folder that may be an object-store URL (perceptio.fs)."""
    return fs.join(folder, META_DIR)


def meta_file(folder: str | os.PathLike[str], name: str) -> str:
    """The side file ``name`` of a shard folder that may be an object-store URL."""
    return fs.join(folder, META_DIR, name)


def holds_shards(folder: Path) -> bool:
    return any(ShardFile.parse(path) is not None for path in folder.glob("*.tar"))


def dataset_folders(location: str | os.PathLike[str]) -> list[Path | str]:
    """The shard folders at ``location``: itself when it holds shards, else each subfolder that does.

    Curation writes one folder per dataset (``shards/refcoco-unc/``, ``shards/ade20k/``), so every
    command that reads shards accepts either one of them or their parent.
    """
    if fs.is_remote(location):  # an object store: the folder of one dataset, as given
        return [os.fspath(location)]
    location = Path(location)
    if not location.is_dir() or holds_shards(location):
        return [location]
    children: list[Path | str] = sorted(child for child in location.iterdir() if child.is_dir() and holds_shards(child))
    return children or [location]


KEPT = "kept"  # the status of a kept ref (or a kept ADE20k image) in the parquet tables
REJECTED = "rejected"


def shard_name(dataset: str, split: str, index: int) -> str:
    """The shard's name without ``.tar``; the stem of all its files."""
    return f"{dataset}-{split}-{index:06d}"


@dataclass(frozen=True)
class ShardFile:
    """One tar of a shard folder, what its name says, and where its side files are."""

    path: Path | str  # a local path, or the URL of a shard on an object store (perceptio.fs)
    dataset: str  # from the file name; every sample's json "dataset" must agree
    split: str
    index: int

    @classmethod
    def parse(cls, path: str | os.PathLike[str]) -> "ShardFile | None":
        """The shard a path or URL names, or None when the name does not follow :data:`SHARD_NAME`."""
        location = path if fs.is_remote(path) else Path(path)
        match = SHARD_NAME.match(fs.name(location))
        if match is None:
            return None
        return cls(location, match["dataset"], match["split"], int(match["index"]))

    @property
    def name(self) -> str:
        return fs.name(self.path)[: -len(".tar")]

    @property
    def stats_path(self) -> Path:
        return meta_folder(self.path.parent) / f"{self.name}{STATS_SUFFIX}"

    @property
    def table_path(self) -> Path:
        return meta_folder(self.path.parent) / f"{self.name}.parquet"

    @property
    def done(self) -> bool:
        return self.stats_path.is_file()

    def stats(self) -> dict[str, Any] | None:
        """The done marker's content, or None when the shard has none (or it is not json)."""
        try:
            return json.loads(self.stats_path.read_text())
        except (OSError, ValueError):
            return None

    def table(self) -> list[dict[str, Any]] | None:
        """The rows curation wrote for this shard, or None when there is no table."""
        return read_parquet_rows(self.table_path) if self.table_path.is_file() else None

    def may_hold(self, key: str) -> bool:
        """Whether a sample key can be in this shard (keys start with ``{dataset}_{split}_``)."""
        return self.split == "?" or key.startswith(f"{self.dataset}_{self.split}_")

    def count(self) -> int:
        """How many samples the shard holds, from the tar headers alone (no member is read)."""
        try:
            with tarfile.open(self.path, "r") as tar:
                return len({Path(info.name).name.partition(".")[0] for info in tar if info.isfile()})
        except (tarfile.TarError, EOFError, OSError) as error:
            raise PerceptioError(f"cannot read {self.path}: {error} (run `perceptio-inspect validate`)") from error


def list_shards(folder: str | os.PathLike[str], splits: Sequence[str] | None = None) -> list[ShardFile]:
    """The shards directly in ``folder`` (all, or those of ``splits``), sorted by path.

    ``folder`` may be an object-store URL; there a tar counts only once its done marker is there
    too (the marker is uploaded last: the commit point of a shard), so a reader never takes a
    shard whose upload is still under way. A local tar appears under its name only when whole.
    """
    names = fs.list_names(folder)
    if fs.is_remote(folder):
        markers = set(fs.list_names(meta_location(folder)))
        names = [name for name in names if f"{name.removesuffix('.tar')}{STATS_SUFFIX}" in markers]
    shards = (ShardFile.parse(fs.join(folder, name)) for name in names if name.endswith(".tar"))
    return [shard for shard in shards if shard is not None and (splits is None or shard.split in splits)]


def read_parquet_rows(path: Path) -> list[dict[str, Any]]:
    """A parquet table as a list of dicts; a damaged file is a one-line :class:`PerceptioError`."""
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except Exception as error:  # pyarrow raises several types for a damaged file
        raise PerceptioError(f"cannot read {path}: {error}") from error


def _column(arrow_type: str, default: Any = None) -> Any:
    """A manifest column: its pyarrow type name travels in the field's metadata."""
    return field(default=default, metadata={"arrow": arrow_type})


@dataclass(frozen=True)
class ManifestRow:
    """One row of a shard's parquet table and of ``manifest.parquet``: a ref (or an ADE20k image)
    that was kept or rejected, and why. Field order is column order."""

    shard: str | None = _column("string")  # None: rejected by the reader, before any shard
    key: str | None = _column("string")
    dataset: str | None = _column("string")
    split: str | None = _column("string")
    image_id: int | None = _column("int64")
    ref_id: int | None = _column("int64")
    ann_id: int | None = _column("int64")
    category: str | None = _column("string")
    sentences: int = _column("int32", 0)
    status: str = _column("string", KEPT)  # KEPT or REJECTED
    reason: str | None = _column("string")  # a short reason code
    detail: str | None = _column("string")  # the full reason
    mask_area: int | None = _column("int64")
    depth_median: float | None = _column("float64")
    depth_rank: int | None = _column("int32")
    description: str | None = _column("string")
    width: int | None = _column("int32")  # of the image
    height: int | None = _column("int32")
    bbox: list[float] | None = _column("list<float64>")  # COCO [x, y, w, h] of the ref's annotation
    sentence_texts: list[str] | None = _column("list<string>")  # the ref's expressions

    @classmethod
    def from_problem(cls, dataset: str, problem: Problem) -> "ManifestRow":
        """The row of a ref or image a dataset reader rejected before planning."""
        # An unknown image's id is an image id, not a ref id.
        ref_id = problem.id if isinstance(problem.id, int) and problem.kind != "unknown_image" else None
        return cls(dataset=dataset, split=problem.split, ref_id=ref_id, status=REJECTED, reason=problem.kind, detail=str(problem))

    def as_dict(self) -> dict[str, Any]:
        return {column.name: getattr(self, column.name) for column in dataclasses.fields(self)}


def manifest_schema() -> "pa.Schema":
    """The pyarrow schema of :class:`ManifestRow` (pyarrow is imported only by those who write or read tables)."""
    import pyarrow as pa

    def arrow_type(name: str) -> "pa.DataType":
        inner = name.removeprefix("list<").removesuffix(">")
        return pa.list_(getattr(pa, inner)()) if inner != name else getattr(pa, name)()

    return pa.schema([(column.name, arrow_type(column.metadata["arrow"])) for column in dataclasses.fields(ManifestRow)])


def manifest_table(rows: Sequence[ManifestRow]) -> "pa.Table":
    import pyarrow as pa

    return pa.Table.from_pylist([row.as_dict() for row in rows], schema=manifest_schema())
