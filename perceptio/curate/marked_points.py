"""HardBLINK-style relative-depth questions ("which point is closest to the camera") on object surfaces.

After AURORA, the paper trains on ADE20k images with 2-5 points marked on them and asks which point
is nearest; HardBLINK, the benchmark, puts its points on objects. This module builds such questions
from any image that comes with object masks and a depth map, so that curation (ADE20k segments and
the teacher's depth) and the synthetic benchmark (world instances and true depth) share one
construction:

- one point per object, inside the object's mask shrunk by ``erosion_px`` (never on floor, wall,
  sky or another "stuff" region, never on an outline where "which is nearer" hangs on a pixel);
- points at least ``min_distance_px`` apart, and nearness values (larger = nearer, in the caller's
  units) that differ pairwise by at least ``min_gap``, so that the answer is well defined;
- letters follow a random order of the points, so the answer letter is uniform;
- optionally *balanced* (:class:`Target`): the caller asks whether the lowest point in the image,
  the point on the largest-looking object and the point on the object reaching lowest in the image
  (its ground contact) should be the nearest one, and draws those wishes so that each cue is right
  exactly as often as chance (:func:`cue_combinations`, :class:`CueBalancer`). No one of these
  cues then tells the answer.

Marks are drawn as in HardBLINK (a red ring, the letter in a white box beside it), or *coloured*: a
disc in a colour of its own per letter (:data:`LETTER_COLOURS`) with the letter inside, for models
too small to read an 8-pixel glyph, such as the miniature (README section 4). A question records
its style (``mark_style``) so that every reader draws it alike: :func:`draw_marks` on a decoded
image (the trainer draws at load time), :func:`draw_marked` for JPEG bytes.
"""

from __future__ import annotations

import io
import itertools
import math
import string
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from perceptio.errors import PerceptioError
from perceptio.tokens import MAX_MARKS

QUESTION_TEXT = (
    "Multiple points are circled on the image, labeled by letters beside each circle. "
    "Which point is the closest to the camera?"
)
# How a training question's target is written: the letter alone, or the depth span then the letter
# (the paper's two ADE20k variants, "answered directly or after writing the depth tokens").
DIRECT, WITH_DEPTH = "direct", "depth"
TARGET_VARIANTS = (DIRECT, WITH_DEPTH)
# How marks are drawn: HardBLINK's red rings and white boxes, or a disc in a colour per letter.
HARDBLINK_MARKS, COLOURED_MARKS = "hardblink", "coloured"
MARK_STYLES = (HARDBLINK_MARKS, COLOURED_MARKS)
# Far apart in hue and all unlike the world's floor and walls; letter k takes colour k (cycling).
LETTER_COLOURS = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (255, 225, 25), (145, 30, 180))


@dataclass(frozen=True)
class MarkedPointsConfig:
    """How the points of a question are chosen (pixels of the image the points are drawn on)."""

    min_points: int = 2
    max_points: int = 5
    questions_per_image: int = 3  # the paper's ~60K ADE20k questions on its ~20K training images
    min_distance_px: float = 20.0
    # Nearness gap between any two points. Curation's nearness is the tokenizer's normalised
    # inverse depth in [-1, 1]; the synthetic benchmark passes -log(depth), where 0.049 = 5%.
    min_gap: float = 0.1
    # The nearest point must be nearer than every other by at least this (same units): how clear the
    # answer itself is. 0 = min_gap alone.
    min_answer_gap: float = 0.0
    erosion_px: int = 3  # points keep this distance from their object's visible border
    min_object_pixels: int = 120
    border_px: int = 12  # keep circles and labels inside the image
    window_px: int = 2  # nearness at a point = median over a (2w+1)^2 window
    max_local_spread: float = 0.1  # a window that varies more straddles a depth edge: no point there
    attempts: int = 200
    balanced: bool = False  # "hard" questions: lowest point, largest object and lowest object base at chance
    mark_style: str = HARDBLINK_MARKS  # how the questions' marks are drawn (MARK_STYLES)

    def __post_init__(self) -> None:
        check_mark_style(self.mark_style)


@dataclass(frozen=True)
class ObjectRegion:
    """One object of an image: where a point may go (its eroded mask) and what cues it gives."""

    core: np.ndarray  # (k, 2) int (x, y) of the pixels a point may take
    area: int  # visible pixels of the whole object (the apparent-size cue)
    base_y: int  # lowest image row of the object (the ground-contact cue)


@dataclass(frozen=True)
class MarkedPoint:
    x: int
    y: int
    nearness: float  # larger = nearer
    region: int  # index of its ObjectRegion


@dataclass(frozen=True)
class Target:
    """What the balanced construction wants of one question: is the lowest point the nearest, is
    the point on the largest object the nearest, is the point on the object reaching lowest the
    nearest (None: no wish)."""

    lowest_is_nearest: bool | None = None
    largest_is_nearest: bool | None = None
    lowest_base_is_nearest: bool | None = None


NearnessFn = Callable[[int, int], "float | None"]


def eroded(mask: np.ndarray, steps: int) -> np.ndarray:
    """The mask shrunk by ``steps`` pixels (4-neighbourhood), with numpy shifts alone."""
    core = mask.astype(bool)
    for _ in range(steps):
        padded = np.pad(core, 1)
        core = core & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return core


def object_regions(masks: Sequence[np.ndarray], config: MarkedPointsConfig) -> list[ObjectRegion]:
    """The regions of the masks big enough to hold a point away from their border and the image's."""
    regions = []
    for mask in masks:
        area = int(mask.sum())
        if area < config.min_object_pixels:
            continue
        core = eroded(mask, config.erosion_px)
        border = config.border_px
        core[:border], core[-border:], core[:, :border], core[:, -border:] = False, False, False, False
        rows, cols = np.nonzero(core)
        if len(rows) == 0:
            continue
        base_y = int(np.nonzero(mask.any(axis=1))[0].max())
        regions.append(ObjectRegion(np.stack([cols, rows], axis=1), area, base_y))
    return regions


def window_nearness(nearness_map: np.ndarray, config: MarkedPointsConfig) -> NearnessFn:
    """Nearness at a point from a dense map: the window median, None on a depth edge."""

    def at(x: int, y: int) -> float | None:
        w = config.window_px
        patch = nearness_map[max(0, y - w): y + w + 1, max(0, x - w): x + w + 1]
        if float(patch.max() - patch.min()) > config.max_local_spread:
            return None
        return float(np.median(patch))

    return at


def cue_outcome(points: Sequence[MarkedPoint], regions: Sequence[ObjectRegion]) -> Target | None:
    """Which cues pick the nearest of these points; None when a cue is tied (undefined)."""
    nearest = int(np.argmax([point.nearness for point in points]))
    picks = []
    for values in ([point.y for point in points], [regions[point.region].area for point in points],
                   [regions[point.region].base_y for point in points]):
        if len(set(values)) < len(values):
            return None
        picks.append(int(np.argmax(values)) == nearest)
    return Target(*picks)


def _meets(points: list[MarkedPoint], regions: Sequence[ObjectRegion], target: Target) -> bool:
    if target == Target():
        return True
    outcome = cue_outcome(points, regions)
    return outcome is not None and all(
        wish is None or wish == got
        for wish, got in zip((target.lowest_is_nearest, target.largest_is_nearest, target.lowest_base_is_nearest),
                             (outcome.lowest_is_nearest, outcome.largest_is_nearest, outcome.lowest_base_is_nearest))
    )


def _draw_set(regions: Sequence[ObjectRegion], nearness: NearnessFn, count: int, rng: np.random.Generator,
              config: MarkedPointsConfig) -> list[MarkedPoint] | None:
    """One random try: ``count`` points on distinct objects, far apart and clearly ordered; or None."""
    points = []
    for index in rng.choice(len(regions), size=count, replace=False):
        x, y = (int(v) for v in regions[index].core[rng.integers(len(regions[index].core))])
        value = nearness(x, y)
        if value is None:
            return None
        points.append(MarkedPoint(x, y, value, int(index)))
    values = sorted(point.nearness for point in points)
    if any(b - a < config.min_gap for a, b in zip(values, values[1:])) or values[-1] - values[-2] < config.min_answer_gap:
        return None
    if any(np.hypot(p.x - q.x, p.y - q.y) < config.min_distance_px for i, p in enumerate(points) for q in points[i + 1:]):
        return None
    return points


def choose_points(regions: Sequence[ObjectRegion], nearness: NearnessFn, count: int, rng: np.random.Generator,
                  config: MarkedPointsConfig, target: Target = Target()) -> list[MarkedPoint] | None:
    """``count`` points on distinct objects, far apart, clearly ordered in depth and meeting ``target``; or None."""
    if len(regions) < count:
        return None
    for _ in range(config.attempts):
        points = _draw_set(regions, nearness, count, rng, config)
        if points is not None and _meets(points, regions, target):
            return points
    return None


def point_sets_by_outcome(regions: Sequence[ObjectRegion], nearness: NearnessFn, count: int, rng: np.random.Generator,
                          config: MarkedPointsConfig) -> dict[Target, list[MarkedPoint]]:
    """The first point set found for every cue outcome this image gives, in ``config.attempts`` tries."""
    found: dict[Target, list[MarkedPoint]] = {}
    if len(regions) < count:
        return found
    for _ in range(config.attempts):
        points = _draw_set(regions, nearness, count, rng, config)
        outcome = None if points is None else cue_outcome(points, regions)
        if outcome is not None and outcome not in found:
            found[outcome] = points  # type: ignore[assignment]
    return found


def cue_combinations(count: int) -> list[tuple[Target, float]]:
    """Every wish for a ``count``-point question with how often chance grants it.

    By chance each cue picks the nearest of ``count`` points with probability 1/count, the three
    independently: a wish's share is the product of 1/count for each cue that is to be right and
    (count - 1)/count for each that is to be wrong.
    """
    combinations = []
    for lowest_ok, largest_ok, base_ok in itertools.product((True, False), repeat=3):
        share = math.prod(1 / count if ok else (count - 1) / count for ok in (lowest_ok, largest_ok, base_ok))
        combinations.append((Target(lowest_ok, largest_ok, base_ok), share))
    return combinations


class CueBalancer:
    """Keeps a set of ``count``-point questions at chance on every cue, for one whole split.

    :meth:`pick` takes, of the outcomes an image offers, the one lagging most behind its chance
    share, so rare outcomes are taken whenever an image has one; :meth:`keep` then drops surplus
    questions of the common outcomes
    so that each wish holds its share exactly (up to rounding to whole questions): every cue is
    right as often as chance by construction.
    """

    def __init__(self, count: int) -> None:
        self.combinations = cue_combinations(count)
        self.have = {target: 0 for target, _ in self.combinations}

    def pick(self, available: Iterable[Target]) -> Target | None:
        """Of the outcomes an image offers, the one lagging most behind its chance share; None when
        every one of them is already at or above its share (the question would only be dropped)."""
        total = sum(self.have.values()) + 1
        shares = dict(self.combinations)
        lags = {target: shares[target] * total - self.have[target] for target in available}
        best = max(lags, key=lags.__getitem__, default=None)
        return best if best is not None and lags[best] > 0 else None

    def add(self, target: Target) -> None:
        self.have[target] += 1

    def _quotas(self, total: int) -> dict[Target, int]:
        """Each outcome's share of ``total`` questions in whole numbers that add up to ``total``
        (largest remainders get the questions rounding left over)."""
        exact = {target: share * total for target, share in self.combinations}
        quotas = {target: math.floor(value) for target, value in exact.items()}
        by_remainder = sorted(exact, key=lambda target: quotas[target] - exact[target])
        for target in by_remainder[: total - sum(quotas.values())]:
            quotas[target] += 1
        return quotas

    def balanced_size(self) -> int:
        """The most questions a balanced subset of those added so far can hold."""
        total = sum(self.have.values())
        while total and any(quota > self.have[target] for target, quota in self._quotas(total).items()):
            total -= 1
        return total

    def keep(self, targets: Sequence[Target], size: int | None = None) -> list[int]:
        """Indices (in order) of the questions to keep, given each question's wish."""
        quotas = self._quotas(self.balanced_size() if size is None else min(size, self.balanced_size()))
        kept = []
        for index, target in enumerate(targets):
            if quotas[target] > 0:
                quotas[target] -= 1
                kept.append(index)
        return kept


def question_record(points: Sequence[MarkedPoint], regions: Sequence[ObjectRegion], rng: np.random.Generator,
                    mark_style: str = HARDBLINK_MARKS) -> dict[str, Any]:
    """The json of one question: letters in a random order of the points, the answer, the cues, and
    how its marks are drawn."""
    order = [points[i] for i in rng.permutation(len(points))]
    labels = list(string.ascii_uppercase[: len(order)])
    nearest = int(np.argmax([point.nearness for point in order]))
    return {
        "text": QUESTION_TEXT,
        "points": [[point.x, point.y] for point in order],
        "labels": labels,
        "answer": labels[nearest],
        "point_depths": [round(point.nearness, 6) for point in order],
        "object_areas": [regions[point.region].area for point in order],
        "object_bases": [regions[point.region].base_y for point in order],
        "mark_style": mark_style,
    }


def target_variant(key: str) -> str:
    """The target variant of a training question, a stable function of its key (half direct, half with depth)."""
    return TARGET_VARIANTS[zlib.crc32(key.encode("utf-8")) % len(TARGET_VARIANTS)]


def make_questions(regions: Sequence[ObjectRegion], nearness: NearnessFn, key: str, seed: int,
                   config: MarkedPointsConfig) -> list[dict[str, Any]]:
    """Up to ``config.questions_per_image`` questions about one image, deterministic in ``seed``.

    Each question draws its own point count (``min_points``..``max_points``) and point set. With
    ``config.balanced`` the image keeps a :class:`CueBalancer` per point count: of the cue outcomes
    its objects offer, each question takes the one lagging most behind chance's share among the
    image's questions so far, and none when every offered outcome is already over its share. An
    image whose cues always tell the answer then gives one question, not ``questions_per_image``,
    so the cues lose most of their pull (the rates are measured, not exact: an exact balance needs
    the whole split at once, as :mod:`perceptio.evaluate.synth_blink` does). A question whose points
    cannot be found (too few objects, no depth contrast) is left out.
    """
    rng = np.random.default_rng(seed)
    balancers: dict[int, CueBalancer] = {}
    questions = []
    for _ in range(config.questions_per_image):
        count = int(rng.integers(config.min_points, config.max_points + 1))
        if config.balanced:
            balancer = balancers.setdefault(count, CueBalancer(count))
            offered = point_sets_by_outcome(regions, nearness, count, rng, config)
            target = balancer.pick(offered)
            if target is None:
                continue
            balancer.add(target)
            points: list[MarkedPoint] | None = offered[target]
        else:
            points = choose_points(regions, nearness, count, rng, config)
        if points is None:
            continue
        record = question_record(points, regions, rng, config.mark_style)
        record["target"] = target_variant(f"{key}/q{len(questions)}")
        questions.append(record)
    return questions


# Reading questions: the nearest cell's mean nearness exceeds the next by this much (normalised
# units: a tenth of the map's [-1, 1] range), so that a decoded span names the same cell.
READING_ANSWER_GAP = 0.2


def _pixel_in_cell(cell: int, offset: float, extent: int, grid: int) -> int:
    """The pixel at ``offset`` (in cells, from the cell's centre) in ``cell`` of ``grid`` along an
    image side of ``extent`` pixels, kept inside the cell (pixel * grid // extent == cell)."""
    first, last = math.ceil(cell * extent / grid), math.ceil((cell + 1) * extent / grid) - 1
    return min(max(int((cell + 0.5 + offset) * extent / grid), first), last)


def point_cell(point: Sequence[int], size: tuple[int, int], grid: int) -> int:
    """The row-major cell of a ``grid`` x ``grid`` map (the depth tokens') that image point (x, y) of a
    (width, height) image falls in."""
    (x, y), (width, height) = point, size
    return min(grid - 1, int(y) * grid // height) * grid + min(grid - 1, int(x) * grid // width)


def cell_names(points: Sequence[Sequence[int]], size: tuple[int, int], grid: int) -> list[str]:
    """Each point's cell of a ``grid`` x ``grid`` map as text, "row column" ("3 7"): how a question
    written in text (``--reading-in-text``) and a readout (``--readout-cells``) name a mark's place."""
    return [" ".join(map(str, divmod(point_cell(point, size, grid), grid))) for point in points]


def grid_side(codes: Sequence[int]) -> int:
    """The side of the square grid a depth span's codes cover (10 for the paper's 100 tokens)."""
    return int(round(len(codes) ** 0.5))


def codes_at_points(codes: Sequence[int], points: Sequence[Sequence[int]], size: tuple[int, int]) -> list[int]:
    """The code of each point's cell in a row-major square grid of codes (a depth span's), for
    points of a (width, height) image."""
    return [codes[point_cell(point, size, grid_side(codes))] for point in points]


def reading_question(nearness: np.ndarray, size: tuple[int, int], rng: np.random.Generator,
                     spread: float, mark_style: str = HARDBLINK_MARKS, min_points: int = 2,
                     max_points: int = MAX_MARKS) -> dict[str, Any] | None:
    """A marked-point question on ``min_points``..``max_points`` random cells of an image, answered by
    the cells' mean nearness (``nearness``: (G, G), larger = nearer, e.g. the pooled depth map the
    depth tokens describe), or None when the draw finds no clear nearest cell.

    Unlike :func:`make_questions` the points may fall on any cell, floor and wall included, and the
    answer is the nearest cell of the map the depth span describes (with the gap below, a decoded
    span names the same cell for 99% of such questions): a curriculum for reading the span, which a
    small language model learns from such questions and not from object points alone (README
    section 4, "The reading link alone"). Each point falls in the central ``spread`` (0-1) of its
    cell's width and height (``StreamConfig.reading_spread``); letters follow a random order, so the
    answer letter is uniform. The question records its points' cells (``cells``, row-major, in letter
    order).
    """
    grid = nearness.shape[0]
    width, height = size
    count = int(rng.integers(min_points, max_points + 1))
    cells = rng.choice(grid * grid, size=count, replace=False)
    values = nearness.reshape(-1)[cells]
    ordered = np.sort(values)
    if ordered[-1] - ordered[-2] < READING_ANSWER_GAP:
        return None
    offsets = rng.uniform(-spread / 2, spread / 2, size=(count, 2))
    points = [[_pixel_in_cell(int(cell % grid), dx, width, grid), _pixel_in_cell(int(cell // grid), dy, height, grid)]
              for cell, (dx, dy) in zip(cells, offsets)]
    labels = list(string.ascii_uppercase[:count])
    return {"text": QUESTION_TEXT, "points": points, "labels": labels, "answer": labels[int(np.argmax(values))],
            "mark_style": mark_style, "cells": [int(cell) for cell in cells]}


def swapped_reading_question(question: dict[str, Any], codes: Sequence[int], nearness: np.ndarray,
                             rng: np.random.Generator) -> tuple[dict[str, Any], list[int]]:
    """A reading question (:func:`reading_question`) asked after a span whose codes at the marked cells
    are shuffled among those cells, and answered by that span: the question and the shuffled codes.

    The picture still shows the true depth, so whatever it tells about which point is nearest (the
    lowest point, the floor against the wall) names the span's answer only as often as chance
    (1 / points, a uniform shuffle): only reading the span at the marked cells answers it. Every
    other cell keeps its code, so the span stays the picture's elsewhere.
    """
    cells = question["cells"]
    order = rng.permutation(len(cells))  # the cell whose code each marked cell now holds
    shuffled = list(codes)
    for cell, source in zip(cells, order):
        shuffled[cell] = codes[cells[source]]
    values = nearness.reshape(-1)[[cells[source] for source in order]]
    return {**question, "answer": question["labels"][int(np.argmax(values))]}, shuffled


def check_mark_style(style: str) -> str:
    """``style`` when it is one of :data:`MARK_STYLES`; a PerceptioError otherwise."""
    if style not in MARK_STYLES:
        raise PerceptioError(f"mark style must be one of {', '.join(MARK_STYLES)}, not {style!r}")
    return style


def draw_marks(image: Image.Image, points: Sequence[Sequence[int]], labels: Sequence[str],
               style: str = HARDBLINK_MARKS) -> Image.Image:
    """A copy of the image with a mark on each point: HardBLINK's (a red ring, the letter in a white
    box up-left) or, ``COLOURED_MARKS``, a disc in the letter's own colour centred on the point, the
    letter inside (all of the mark within the point's grid cell, where a small vision tower looks)."""
    check_mark_style(style)
    canvas = image.convert("RGB")
    if canvas is image:
        canvas = image.copy()
    draw = ImageDraw.Draw(canvas)
    scale = max(canvas.size) / 336.0  # HardBLINK images are 336 px; keep marks the same relative size
    font = ImageFont.load_default(size=max(10, round(12 * scale)))
    for (x, y), label in zip(points, labels):
        left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
        if style == COLOURED_MARKS:
            radius = max(4, round(7 * scale))  # holds the letter
            # ord("A") % 5 == 0: A, B, C, ... take colours 0, 1, 2, ... (any label gets one)
            colour = LETTER_COLOURS[ord(label[:1] or " ") % len(LETTER_COLOURS)]
            draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=colour)
            draw.text((x - (left + right) / 2, y - (top + bottom) / 2), label, fill=(0, 0, 0), font=font)
            continue
        radius = max(3, round(4 * scale))
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), outline=(255, 0, 0), width=max(2, round(2 * scale)))
        box_w, box_h = right - left + 4, bottom - top + 4
        box_x = min(max(0, x - radius - box_w), canvas.width - box_w)
        box_y = min(max(0, y - radius - box_h - 2), canvas.height - box_h)
        draw.rectangle((box_x, box_y, box_x + box_w, box_y + box_h), fill=(255, 255, 255))
        draw.text((box_x + 2 - left, box_y + 2 - top), label, fill=(0, 0, 0), font=font)
    return canvas


def draw_marked(image: Image.Image, points: Sequence[Sequence[int]], labels: Sequence[str],
                style: str = HARDBLINK_MARKS) -> bytes:
    """JPEG bytes of :func:`draw_marks`."""
    buffer = io.BytesIO()
    draw_marks(image, points, labels, style).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def cue_rates(questions: Sequence[dict[str, Any]]) -> dict[str, float]:
    """How often each single cue names the answer over questions with the fields of :func:`question_record`,
    against chance (the mean of 1/points); e.g. to check curated training questions."""
    cues = {"lowest_point": lambda q: [y for _, y in q["points"]], "largest_object": lambda q: q["object_areas"],
            "lowest_object_base": lambda q: q["object_bases"]}
    rates = {"chance": float(np.mean([1 / len(q["points"]) for q in questions])) if questions else float("nan")}
    for name, values in cues.items():
        hits = [q["labels"][int(np.argmax(values(q)))] == q["answer"] for q in questions]
        rates[name] = float(np.mean(hits)) if hits else float("nan")
    return rates
