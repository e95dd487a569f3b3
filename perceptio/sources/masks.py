"""COCO segmentations (polygons and RLE) to binary masks, exactly and without REFER's pitfalls.

A COCO ``segmentation`` is one of:

- a list of polygon parts, each a flat list ``[x1, y1, x2, y2, ...]`` (the RefCOCO annotations);
- an RLE dict ``{"size": [h, w], "counts": ...}`` with compressed (str/bytes) or uncompressed
  (list of run lengths) counts (crowd annotations);
- a list of such RLE dicts.

Two pitfalls of the original REFER code are avoided here. It summed the decoded parts, so pixels
where two parts overlap became 2; we merge parts by union (values stay 0/1). And it handed the
whole part list to ``pycocotools.mask.frPyObjects``, which decides the meaning of the list by the
length of its *first* part: a part of exactly 4 numbers (a two-point polygon) is taken for a
bounding box ``[x, y, w, h]`` (and recent pycocotools versions crash on it). We therefore rasterise
every part on its own and never pass a 4-number list. A polygon part needs at least 3 points
(6 numbers) to enclose any area; shorter parts are *degenerate*: they cover no pixel under COCO's
rasteriser, so they are skipped and reported, never guessed into a box.

ADE20k's scene-parsing maps name classes, not objects: :func:`segment_masks` cuts a class map into
object stand-ins (the connected parts of every thing class).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

MIN_POLYGON_NUMBERS = 6  # three points: the fewest that can enclose an area

# Issue kinds, also used as Problem kinds by the readers.
EMPTY = "empty_segmentation"
DEGENERATE = "degenerate_polygon"
MALFORMED = "malformed_segmentation"


@dataclass(frozen=True)
class SegmentationIssue:
    kind: str  # EMPTY, DEGENERATE or MALFORMED
    detail: str


@dataclass
class ParsedSegmentation:
    """The parts of a segmentation that can be rasterised, and what was wrong with the others."""

    polygons: list[list[float]]  # each at least 3 points of finite numbers
    rles: list[dict[str, Any]]
    issues: list[SegmentationIssue]

    @property
    def usable(self) -> bool:
        """True when at least one part can be drawn (a mask of only skipped parts would be empty)."""
        return bool(self.polygons or self.rles)


def _is_number(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)


def _all_numbers(values: list[Any]) -> bool:
    # Fast path for what JSON yields (plain int/float): a real dataset has ~200k polygons to check.
    if all(type(value) is float or type(value) is int for value in values):
        return math.isfinite(sum(values))
    return all(_is_number(value) for value in values)


def _check_polygon(index: int, part: list[Any]) -> SegmentationIssue | None:
    if not _all_numbers(part):
        return SegmentationIssue(MALFORMED, f"polygon part {index} holds values that are not finite numbers")
    if len(part) % 2:
        return SegmentationIssue(MALFORMED, f"polygon part {index} has an odd count of coordinates ({len(part)})")
    if len(part) < MIN_POLYGON_NUMBERS:
        return SegmentationIssue(
            DEGENERATE, f"polygon part {index} has {len(part) // 2} point(s); it encloses no area and was skipped"
        )
    return None


def _check_rle(index: int, part: dict[str, Any], height: int, width: int) -> SegmentationIssue | None:
    size, counts = part.get("size"), part.get("counts")
    if not (isinstance(size, (list, tuple)) and len(size) == 2) or counts is None:
        return SegmentationIssue(MALFORMED, f"RLE part {index} lacks a [h, w] size or counts")
    if [int(size[0]), int(size[1])] != [height, width]:
        return SegmentationIssue(
            MALFORMED, f"RLE part {index} is {size[0]}x{size[1]} (h x w) but the image is {height}x{width}"
        )
    if isinstance(counts, list):
        if not all(isinstance(run, int) and run >= 0 for run in counts) or sum(counts) != height * width:
            return SegmentationIssue(MALFORMED, f"RLE part {index}: run lengths do not cover {height}x{width} pixels")
    elif not isinstance(counts, (str, bytes)):
        return SegmentationIssue(MALFORMED, f"RLE part {index}: counts are neither a string nor a list of runs")
    return None


def parse_segmentation(segmentation: Any, height: int, width: int) -> ParsedSegmentation:
    """Sort the parts of a COCO segmentation into drawable polygons and RLEs, reporting the rest.

    This only inspects structure (no rasterising), so a reader can check every annotation of a
    dataset at load time cheaply.
    """
    parsed = ParsedSegmentation([], [], [])
    if isinstance(segmentation, dict):
        parts: list[Any] = [segmentation]
    elif isinstance(segmentation, list):
        # A bare flat list of numbers is one polygon (pycocotools accepts it too); wrap it so it
        # is checked like any other part instead of being mistaken for a box.
        parts = [segmentation] if segmentation and _all_numbers(segmentation) else segmentation
    else:
        parsed.issues.append(SegmentationIssue(MALFORMED, f"segmentation is a {type(segmentation).__name__}"))
        return parsed
    if not parts:
        parsed.issues.append(SegmentationIssue(EMPTY, "segmentation has no parts"))
        return parsed
    for index, part in enumerate(parts):
        if isinstance(part, list):
            issue = _check_polygon(index, part)
            if issue is None:
                parsed.polygons.append(part)
        elif isinstance(part, dict):
            issue = _check_rle(index, part, height, width)
            if issue is None:
                parsed.rles.append(part)
        else:
            issue = SegmentationIssue(MALFORMED, f"part {index} is a {type(part).__name__}")
        if issue is not None:
            parsed.issues.append(issue)
    if not parsed.usable and not any(issue.kind == MALFORMED for issue in parsed.issues):
        parsed.issues.append(SegmentationIssue(EMPTY, "no part of the segmentation encloses any area"))
    return parsed


def _compressed(rle: dict[str, Any], height: int, width: int) -> dict[str, Any]:
    counts = rle["counts"]
    if isinstance(counts, list):
        return mask_utils.frPyObjects(rle, height, width)
    return {"size": [height, width], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}


def segmentation_to_rle(segmentation: Any, height: int, width: int) -> dict[str, Any]:
    """The union of every drawable part as one compressed COCO RLE (an empty mask if none)."""
    parsed = parse_segmentation(segmentation, height, width)
    # One frPyObjects call per polygon: given several parts it would classify them all by the first.
    parts = [mask_utils.frPyObjects([polygon], height, width)[0] for polygon in parsed.polygons]
    parts += [_compressed(rle, height, width) for rle in parsed.rles]
    if not parts:
        return mask_utils.encode(np.zeros((height, width), dtype=np.uint8, order="F"))
    return mask_utils.merge(parts, intersect=False) if len(parts) > 1 else parts[0]


def segmentation_to_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    """Decode a COCO segmentation into a uint8 (height, width) mask with values 0/1 (parts united)."""
    return mask_utils.decode(segmentation_to_rle(segmentation, height, width)).astype(np.uint8)


def segment_masks(classes: np.ndarray, stuff: set[int] | frozenset[int]) -> list[np.ndarray]:
    """Object masks of a class map without instances: the connected parts of every thing class.

    ADE20k's scene-parsing maps name classes, not objects; a connected region of one thing class
    is the closest stand-in for an object (two touching chairs count as one, and get one point).
    Class 0 ("other") and the ``stuff`` classes (wall, floor, sky, ...) give no object.
    """
    from scipy import ndimage

    masks = []
    for value in np.unique(classes):
        if value == 0 or int(value) in stuff:
            continue
        labelled, count = ndimage.label(classes == value)
        masks.extend(labelled == index for index in range(1, count + 1))
    return masks
