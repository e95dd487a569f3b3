"""The per-image CPU work of curation, around the model stage: prepare before it, assemble after it.

:func:`prepare` reads and decodes one image, rasterises each ref's mask and applies the filters;
:func:`assemble` turns a prepared image plus its depth into the shard sample (descriptions, region
depth statistics, ADE20k marked-point questions and ``marked.jpg``) and into one manifest row per ref. Both are
plain functions of their inputs so that Ray can run them anywhere and a re-run gives the same bytes.
"""

from __future__ import annotations

import functools
import hashlib
import io
import time
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from perceptio import fs
from perceptio.curate.describe import Captioner, depth_at_image_size, measure_attributes
from perceptio.curate.filters import (
    CORRUPT_IMAGE,
    INVALID_POLYGON,
    FilterConfig,
    RefCandidate,
    reason_code,
    review_refs,
)
from perceptio.curate.marked_points import (
    MarkedPointsConfig,
    draw_marked,
    make_questions,
    object_regions,
    window_nearness,
)
from perceptio.curate.plan import ImageItem
from perceptio.shards import KEPT, REJECTED, ManifestRow, ShardSample, mask_to_rle, rle_to_mask
from perceptio.sources.masks import MALFORMED, parse_segmentation, segment_masks, segmentation_to_mask
from perceptio.sources.problems import BadImage, decode_image, read_image_bytes

@dataclass(frozen=True)
class BuildConfig:
    """Everything besides the models that decides a sample's bytes."""

    filters: FilterConfig = field(default_factory=FilterConfig)
    marked_points: MarkedPointsConfig = field(default_factory=MarkedPointsConfig)
    captioner: str = "attributes"  # see perceptio.curate.describe.load_captioner


@dataclass
class PreparedImage:
    """One image after the first CPU stage; ``problem`` set means it yields no sample."""

    item: ImageItem
    problem: str | None = None
    jpg: bytes = b""
    image_hash: str = ""
    pixels: np.ndarray | None = None  # (H, W, 3) uint8
    seg_png: bytes | None = None
    rles: list[dict[str, Any] | None] = field(default_factory=list)  # per ref, None when not drawable
    reasons: list[str | None] = field(default_factory=list)  # per ref, None = kept
    seconds: float = 0.0


@dataclass
class DepthResult:
    """The model stage's output for one image."""

    depth: np.ndarray  # float16 (320, 320), the tokenizer's normalisation of the teacher's depth
    tokens: np.ndarray  # int16 (n,)
    teacher: str
    tokenizer: str


@dataclass
class BuiltImage:
    """One image, ready for the writer: its shard sample (None = nothing to write) and its manifest rows."""

    key: str
    sample: ShardSample | None
    rows: list[ManifestRow]  # without the shard name, which the writer fills in
    seconds: dict[str, float]


@functools.lru_cache(maxsize=4)
def _ade_reader(root: str) -> Any:
    from perceptio.sources.ade20k import ADE20kDataset

    return ADE20kDataset(root)


def _ade_root(item: ImageItem) -> str:
    """.../ADEChallengeData2016 of .../ADEChallengeData2016/images/<split>/<file> (local path or URL)."""
    return str(fs.parent(fs.parent(fs.parent(item.image_path))))


def _read_ade_segmentation(item: ImageItem) -> bytes:
    """The class map's PNG bytes verbatim, after the reader has checked it against the image."""
    from perceptio.sources.ade20k import AdeSample

    image_path, seg_path = fs.as_location(item.image_path), fs.as_location(str(item.seg_path))
    reader = _ade_reader(_ade_root(item))
    reader.load_segmentation(AdeSample(item.image_id, item.split, fs.stem(image_path), image_path, seg_path))
    return fs.read_bytes(seg_path)


def prepare(item: ImageItem, config: BuildConfig) -> PreparedImage:
    """Decode the image and the masks and decide which refs are kept (CPU stage before the model)."""
    started = time.perf_counter()
    prepared = PreparedImage(item)
    size = (item.width, item.height) if item.width and item.height else None
    try:
        # Read once, decode from the bytes: a remote image is fetched once.
        prepared.jpg = read_image_bytes(item.image_path, item.image_id)
        image = decode_image(item.image_path, item.image_id, size, data=prepared.jpg)
        prepared.seg_png = _read_ade_segmentation(item) if item.seg_path else None
    except BadImage as bad:
        prepared.jpg = b""
        prepared.problem = f"{bad.problem.kind}: {bad.problem.reason}"
        prepared.reasons = [prepared.problem] * len(item.refs)
        return prepared
    prepared.image_hash = hashlib.sha256(prepared.jpg).hexdigest()
    prepared.pixels = np.asarray(image.convert("RGB"))
    height, width = prepared.pixels.shape[:2]

    masks: list[np.ndarray | None] = []
    early: list[str | None] = []
    for ref in item.refs:
        parsed = parse_segmentation(ref.segmentation, height, width)
        malformed = [issue.detail for issue in parsed.issues if issue.kind == MALFORMED]
        if malformed or not parsed.usable:
            masks.append(None)
            early.append(f"{INVALID_POLYGON}: {(malformed or [issue.detail for issue in parsed.issues] or ['no part'])[0]}")
            continue
        masks.append(segmentation_to_mask(ref.segmentation, height, width))
        early.append(None)
    candidates = [
        RefCandidate(ref.ref_id, ref.ann_id, ref.bbox, [sentence.sent or sentence.raw for sentence in ref.sentences])
        for ref in item.refs
    ]
    prepared.reasons = review_refs(candidates, masks, early, config.filters)
    prepared.rles = [mask_to_rle(mask) if mask is not None else None for mask in masks]
    prepared.seconds = time.perf_counter() - started
    return prepared


def _row(item: ImageItem, ref_index: int | None, reason: str | None, **measured: Any) -> ManifestRow:
    """The manifest row of one ref (or of the image, for ``ref_index`` None); ``measured`` for kept refs."""
    ref = item.refs[ref_index] if ref_index is not None else None
    return ManifestRow(
        key=item.key,
        dataset=item.dataset,
        split=item.split,
        image_id=item.image_id,
        ref_id=ref.ref_id if ref else None,
        ann_id=ref.ann_id if ref else None,
        category=ref.category if ref else None,
        sentences=len(ref.sentences) if ref else 0,
        bbox=[float(value) for value in ref.bbox] if ref and ref.bbox is not None else None,
        sentence_texts=[sentence.sent or sentence.raw for sentence in ref.sentences] if ref else None,
        status=REJECTED if reason else KEPT,
        reason=reason_code(reason) if reason else None,
        detail=reason,
        # The decoded image's size when there is one (ADE20k states none), else the dataset's.
        **{"width": item.width, "height": item.height, **measured},
    )


def _seed(item: ImageItem) -> int:
    """A per-image seed that does not depend on Python's hash randomisation."""
    return zlib.crc32(item.key.encode())


def _ade_questions(item: ImageItem, seg_png: bytes, depth_full: np.ndarray,
                   config: MarkedPointsConfig) -> list[dict[str, Any]]:
    """The marked-point questions of one ADE20k image: points on its thing segments, teacher depth decides."""
    with Image.open(io.BytesIO(seg_png)) as seg:
        classes = np.asarray(seg)
    stuff = frozenset(ade_class.idx for ade_class in _ade_reader(_ade_root(item)).classes if ade_class.stuff)
    regions = object_regions(segment_masks(classes, stuff), config)
    return make_questions(regions, window_nearness(depth_full, config), item.key, _seed(item), config)


def assemble(prepared: PreparedImage, depth: DepthResult | None, config: BuildConfig, captioner: Captioner) -> BuiltImage:
    """The shard sample and manifest rows of one image (CPU stage after the model)."""
    started = time.perf_counter()
    item = prepared.item
    timings = {"prepare": prepared.seconds}
    if prepared.problem is not None or depth is None or prepared.pixels is None:
        reason = prepared.problem or f"{CORRUPT_IMAGE}: no depth"
        rows = [_row(item, index, reason) for index in range(len(item.refs))] or [_row(item, None, reason)]
        return BuiltImage(item.key, None, rows, timings)

    pixels = prepared.pixels
    height, width = pixels.shape[:2]
    depth_full = depth_at_image_size(depth.depth.astype(np.float32), height, width)
    meta: dict[str, Any] = {
        "dataset": item.dataset,
        "split": item.split,
        "image_id": item.image_id,
        "file_name": item.file_name,
        "width": width,
        "height": height,
        "teacher": depth.teacher,
        "tokenizer": depth.tokenizer,
        "refs": [],
    }
    kept = [index for index, reason in enumerate(prepared.reasons) if reason is None]
    # Objects are annotations, not refs: two refs of one object must not rank against each other.
    object_ids = sorted({item.refs[index].ann_id for index in kept})
    object_masks = {ann_id: rle_to_mask(prepared.rles[next(i for i in kept if item.refs[i].ann_id == ann_id)])  # type: ignore[arg-type]
                    for ann_id in object_ids}
    categories = {item.refs[index].ann_id: item.refs[index].category for index in kept}
    attributes = dict(zip(object_ids, measure_attributes(
        pixels, [object_masks[ann_id] for ann_id in object_ids], [categories[ann_id] for ann_id in object_ids], depth_full
    )))
    rows = []
    for index, ref in enumerate(item.refs):
        reason = prepared.reasons[index]
        if reason is not None:
            rows.append(_row(item, index, reason, width=width, height=height))
            continue
        mask = object_masks[ref.ann_id]
        measured = attributes[ref.ann_id]
        description = captioner.describe(measured, pixels, mask)
        region_depth = {"median": round(measured.depth_median, 6), "rank": measured.depth_rank}
        meta["refs"].append({
            "ref_id": ref.ref_id,
            "ann_id": ref.ann_id,
            "category_id": ref.category_id,
            "category": ref.category,
            "bbox": list(ref.bbox),
            "mask": prepared.rles[index],
            "sentences": [{"sent_id": s.sent_id, "raw": s.raw, "sent": s.sent} for s in ref.sentences],
            "description": description,
            "depth": region_depth,
        })
        rows.append(_row(item, index, None, mask_area=int(mask.sum()), depth_median=region_depth["median"],
                         depth_rank=measured.depth_rank, description=description, width=width, height=height))

    marked_jpg = None
    if item.seg_path is not None and prepared.seg_png is not None:
        questions = _ade_questions(item, prepared.seg_png, depth_full, config.marked_points)
        # ``question`` (the first one) and its ``marked.jpg`` stay for readers of the one-question
        # format and as a preview; the trainer draws the marks of every question at load time.
        meta["questions"] = questions
        meta["question"] = questions[0] if questions else None
        if questions:
            marked_jpg = draw_marked(Image.fromarray(pixels), questions[0]["points"], questions[0]["labels"],
                                     questions[0]["mark_style"])
        rows.append(_row(item, None, None, width=width, height=height))
    elif not kept:
        timings["assemble"] = time.perf_counter() - started
        return BuiltImage(item.key, None, rows, timings)

    sample = ShardSample(
        key=item.key,
        jpg=prepared.jpg,
        depth=depth.depth,
        depth_tokens=depth.tokens,
        meta=meta,
        seg_png=prepared.seg_png,
        marked_jpg=marked_jpg,
    )
    timings["assemble"] = time.perf_counter() - started
    return BuiltImage(item.key, sample, rows, timings)


def image_for_teacher(prepared: PreparedImage) -> Image.Image:
    """The decoded RGB pixels as a PIL image, for a model teacher."""
    return Image.fromarray(prepared.pixels)
