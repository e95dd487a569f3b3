"""Which referring expressions are fit for training: consistency, ambiguity and near-duplicate checks.

The paper filters RefCOCO/+/g for consistency and ambiguity and removes near-duplicates before
curation. Nothing is dropped silently: every check returns a reason string that the writer stores
next to the rejected ref in the shard's parquet and in ``manifest.parquet``.

Order matters and is applied by :func:`review_refs`: consistency first (a broken mask can neither
duplicate nor disambiguate anything), then near-duplicates (two refs of the same object with the
same words are redundant, not ambiguous), then ambiguity among what is left.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np

# Reason codes, stable strings: they are column values in every manifest.
CORRUPT_IMAGE = "corrupt_image"
INVALID_POLYGON = "invalid_polygon"
EMPTY_MASK = "empty_mask"
TINY_MASK = "tiny_mask"
MASK_BBOX_MISMATCH = "mask_bbox_mismatch"
NEAR_DUPLICATE = "near_duplicate"
AMBIGUOUS_EXPRESSION = "ambiguous_expression"
NO_SENTENCES = "no_sentences"


@dataclass(frozen=True)
class FilterConfig:
    """Thresholds of the filters; the defaults keep every ordinary RefCOCO object."""

    min_mask_pixels: int = 16  # smaller masks carry no usable segmentation signal
    min_bbox_iou: float = 0.5  # IoU between the mask's tight box and the annotated bbox
    duplicate_iou: float = 0.9  # mask IoU above which two refs with matching words are one sample


@dataclass(frozen=True)
class RefCandidate:
    """What the filters need to know about one ref of one image."""

    ref_id: int
    ann_id: int
    bbox: Sequence[float]  # COCO [x, y, w, h]
    sentences: Sequence[str]  # the raw or tokenised expressions; normalised here


_NON_WORD = re.compile(r"[^0-9a-z]+")


def normalize_expression(text: str) -> str:
    """Lower case, punctuation removed, whitespace collapsed: "The  man, left!" -> "the man left"."""
    return _NON_WORD.sub(" ", text.lower()).strip()


def mask_box(mask: np.ndarray) -> tuple[float, float, float, float] | None:
    """Tight [x, y, w, h] box of a binary mask in pixel-edge coordinates, None when empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return float(cols[0]), float(rows[0]), float(cols[-1] + 1 - cols[0]), float(rows[-1] + 1 - rows[0])


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    inter_w = max(0.0, min(ax + aw, bx + bw) - max(ax, bx))
    inter_h = max(0.0, min(ay + ah, by + bh) - max(ay, by))
    inter = inter_w * inter_h
    union = aw * ah + bw * bh - inter
    return inter / union if union > 0 else 0.0


def consistency_problem(mask: np.ndarray, bbox: Sequence[float], config: FilterConfig) -> str | None:
    """Why a decoded mask is unusable (empty, tiny, or elsewhere than its bbox), or None."""
    area = int(mask.sum())
    if area == 0:
        return EMPTY_MASK
    if area < config.min_mask_pixels:
        return f"{TINY_MASK}: {area} px < {config.min_mask_pixels}"
    box = mask_box(mask)
    iou = box_iou(box, bbox) if box is not None and all(map(math.isfinite, bbox)) else 0.0
    if iou < config.min_bbox_iou:
        return f"{MASK_BBOX_MISMATCH}: box IoU {iou:.2f} < {config.min_bbox_iou}"
    return None


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    a_bool, b_bool = a.astype(bool), b.astype(bool)
    union = np.logical_or(a_bool, b_bool).sum()
    return float(np.logical_and(a_bool, b_bool).sum() / union) if union else 0.0


def review_refs(
    refs: Sequence[RefCandidate],
    masks: Sequence[np.ndarray | None],
    early_reasons: Sequence[str | None],
    config: FilterConfig,
) -> list[str | None]:
    """The rejection reason of every ref of one image (None = kept), in the order given.

    ``masks[i]`` is the decoded mask of ``refs[i]`` (None when it could not be decoded) and
    ``early_reasons[i]`` a reason found before decoding (e.g. an invalid polygon). Among
    near-duplicates the ref with the smallest ref_id is kept, so the outcome does not depend on order.
    """
    reasons: list[str | None] = list(early_reasons)
    for index, (ref, mask) in enumerate(zip(refs, masks)):
        if reasons[index] is None and not ref.sentences:
            reasons[index] = NO_SENTENCES
        if reasons[index] is None:
            reasons[index] = EMPTY_MASK if mask is None else consistency_problem(mask, ref.bbox, config)

    expressions = [{normalize_expression(text) for text in ref.sentences} for ref in refs]
    by_ref_id = sorted((i for i in range(len(refs)) if reasons[i] is None), key=lambda i: refs[i].ref_id)
    for position, later in enumerate(by_ref_id):
        for earlier in by_ref_id[:position]:
            if reasons[earlier] is not None or not expressions[later] & expressions[earlier]:
                continue
            iou = mask_iou(masks[later], masks[earlier])  # type: ignore[arg-type]
            if iou > config.duplicate_iou:
                reasons[later] = f"{NEAR_DUPLICATE}: of ref {refs[earlier].ref_id} (mask IoU {iou:.2f})"
                break

    # An expression is ambiguous when, among the surviving refs, it names more than one object.
    objects_by_expression: dict[str, set[int]] = {}
    for index in (i for i in range(len(refs)) if reasons[i] is None):
        for expression in expressions[index]:
            objects_by_expression.setdefault(expression, set()).add(refs[index].ann_id)
    for index in (i for i in range(len(refs)) if reasons[i] is None):
        shared = sorted(e for e in expressions[index] if len(objects_by_expression[e]) > 1)
        if shared:
            reasons[index] = f"{AMBIGUOUS_EXPRESSION}: {shared[0]!r}"
    return reasons


def reason_code(reason: str) -> str:
    """The stable code of a reason ("tiny_mask: 3 px < 16" -> "tiny_mask"), for counting."""
    return reason.split(":", 1)[0]
