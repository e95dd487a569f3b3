"""HardBLINK-style relative-depth questions on the synthetic world, where the true depth is known.

For a world written by :func:`perceptio.sources.synth.generate_world`, each question marks 3, 4 or
5 points on distinct objects of one image (HardBLINK's red circles and letters) and asks which is
closest to the camera; the renderer's depth at the marked pixels decides the answer. The points
come from :mod:`perceptio.curate.marked_points`, the construction curation uses for training
questions: each point lies inside its object's eroded mask, points are at least
``min_distance_px`` apart, their true depths differ pairwise by at least ``min_relative_gap`` and
the nearest is nearer than the next by at least ``min_answer_gap``.

Two splits:

- *easy* (default): points drawn at random on the objects. Single cues answer many questions:
  the lowest point in the image is often the nearest, and so is the point on the largest object.
- *hard* (``hard=True``): each question is drawn to grant a wish about three cues (is the lowest
  point the nearest, is the point on the largest object, is the point on the object reaching lowest
  in the image), the wish lagging most behind its chance share first; then surplus questions are
  dropped so that every wish holds exactly its chance share
  (:class:`perceptio.curate.marked_points.CueBalancer`). Each of the three cues is then right
  1/n of the time on n-point questions, by construction.

The questions are written in the HardBLINK layout (see :mod:`perceptio.evaluate.hardblink`), so
``perceptio-evaluate hardblink --data DIR`` scores a model on them. Each question line also keeps
what the single-cue baselines of :func:`baselines` need (points, true depths, object areas and
bases, brightness at the points) and the source image, which :func:`token_ceiling` uses to answer
from the ground-truth depth tokens.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from perceptio.curate.marked_points import (
    HARDBLINK_MARKS,
    CueBalancer,
    MarkedPoint,
    MarkedPointsConfig,
    ObjectRegion,
    Target,
    check_mark_style,
    choose_points,
    draw_marked,
    object_regions,
    point_sets_by_outcome,
    question_record,
)
from perceptio.errors import PerceptioError
from perceptio.evaluate.hardblink import VARIANTS
from perceptio.io import atomic_directory

WORLD_FILE = "world.json"
LUMA_WINDOW_PX = 2  # brightness at a point = mean luma over a (2w+1)^2 window of the unmarked image


@dataclass(frozen=True)
class SynthBlinkConfig:
    variants: tuple[int, ...] = VARIANTS
    min_object_pixels: int = 120
    erosion_px: int = 3  # points keep this distance from their object's visible border
    min_distance_px: float = 24.0
    min_relative_gap: float = 0.05  # true depths of any two points differ by at least 5%
    # ... and the nearest point is nearer than the next by at least 25%: at smaller gaps the 10x10
    # depth tokens of a fitted tokenizer cannot tell the two apart (the ceiling drops towards chance).
    min_answer_gap: float = 0.25
    attempts: int = 200
    questions_per_image: int = 1  # per point count, each on its own draw of objects and points
    hard: bool = False  # balance the lowest-point and largest-object cues to chance
    mark_style: str = HARDBLINK_MARKS  # how the points are marked on the images (MARK_STYLES)
    seed: int = 0

    def __post_init__(self) -> None:
        check_mark_style(self.mark_style)

    def marked_points(self) -> MarkedPointsConfig:
        # Nearness is -log(depth): a relative depth gap of 5% is an absolute gap of log(1.05).
        return MarkedPointsConfig(min_distance_px=self.min_distance_px, min_gap=math.log1p(self.min_relative_gap),
                                  min_answer_gap=math.log1p(self.min_answer_gap),
                                  erosion_px=self.erosion_px, min_object_pixels=self.min_object_pixels,
                                  attempts=self.attempts, balanced=self.hard, mark_style=self.mark_style)


def _read_world(world: Path) -> list[dict[str, Any]]:
    world_file = world / WORLD_FILE
    if not world_file.is_file():
        raise PerceptioError(f"{world} is not a synthetic world (no {WORLD_FILE})")
    return json.loads(world_file.read_text())["images"]


def _true_nearness(depth_mm: np.ndarray) -> Callable[[int, int], float | None]:
    def at(x: int, y: int) -> float | None:
        value = depth_mm[y, x]
        return None if value <= 0 else -math.log(value / 1000.0)  # 0 mm marks invalid depth

    return at


def _luma(pixels: np.ndarray, x: int, y: int) -> float:
    w = LUMA_WINDOW_PX
    patch = pixels[max(0, y - w): y + w + 1, max(0, x - w): x + w + 1].astype(np.float64)
    return float((patch @ np.array([0.299, 0.587, 0.114])).mean())


def image_regions(world: Path, record: dict[str, Any], config: MarkedPointsConfig) -> tuple[list[ObjectRegion], np.ndarray]:
    """The objects of one world image that can hold a point, and its depth in millimetres."""
    instances = np.asarray(Image.open(world / record["instance_file"]))
    depth_mm = np.asarray(Image.open(world / record["depth_file"])).astype(np.float64)
    regions = object_regions([instances == obj["instance"] for obj in record["objects"]], config)
    return regions, depth_mm


def build_questions(world: str | Path, out: str | Path, config: SynthBlinkConfig = SynthBlinkConfig(),
                    limit_per_variant: int | None = None) -> dict[int, int]:
    """Write HardBLINK-layout questions for the images of ``world`` into ``out`` (replacing it whole,
    atomically); question counts per variant."""
    world = Path(world)
    records = _read_world(world)
    with atomic_directory(out) as staging:
        return _build(world, records, staging, config, limit_per_variant)


@dataclass
class _Drawn:
    """A question found but not yet written: its wish, its image and its json line."""

    target: Target
    record: dict[str, Any]
    row: dict[str, Any]
    answer: str


def _build(world: Path, records: list[dict[str, Any]], out: Path, config: SynthBlinkConfig,
           limit_per_variant: int | None) -> dict[int, int]:
    points_config = config.marked_points()
    rng = np.random.default_rng(config.seed)
    drawn: dict[int, list[_Drawn]] = {variant: [] for variant in config.variants}
    balancers = {variant: CueBalancer(variant) for variant in config.variants}

    def enough(variant: int) -> bool:
        if limit_per_variant is None:
            return False
        return (balancers[variant].balanced_size() if config.hard else len(drawn[variant])) >= limit_per_variant

    for record in records:
        if all(enough(variant) for variant in config.variants):
            break
        regions, depth_mm = image_regions(world, record, points_config)
        nearness = _true_nearness(depth_mm)
        with Image.open(world / record["file"]) as opened:
            pixels = np.asarray(opened.convert("RGB"))
        for variant in config.variants:
            for _ in range(config.questions_per_image):
                if enough(variant):
                    break
                if config.hard:
                    # Of the cue outcomes this image offers, the one lagging most behind its share.
                    offered = point_sets_by_outcome(regions, nearness, variant, rng, points_config)
                    target = balancers[variant].pick(offered)
                    picked = offered[target] if target is not None else None
                else:
                    target, picked = Target(), choose_points(regions, nearness, variant, rng, points_config)
                if target is None or picked is None:
                    continue
                if config.hard:
                    balancers[variant].add(target)
                drawn[variant].append(_question(picked, regions, rng, record, pixels, target, points_config.mark_style))
    counts = {}
    for variant in config.variants:
        kept = drawn[variant]
        if config.hard:
            kept = [kept[i] for i in balancers[variant].keep([d.target for d in kept], limit_per_variant)]
        elif limit_per_variant is not None:
            kept = kept[:limit_per_variant]
        _write_variant(world, out, variant, kept)
        counts[variant] = len(kept)
    return counts


def _question(picked: list[MarkedPoint], regions: list[ObjectRegion], rng: np.random.Generator,
              record: dict[str, Any], pixels: np.ndarray, target: Target, mark_style: str) -> _Drawn:
    question = question_record(picked, regions, rng, mark_style)
    row = {
        "text": question["text"], "category": "relative_depth",
        "source": record["stem"], "source_file": record["file"], "image_width": pixels.shape[1],
        "image_height": pixels.shape[0], "points": question["points"], "labels": question["labels"],
        "depths_m": [round(math.exp(-value), 4) for value in question["point_depths"]],
        "object_areas": question["object_areas"], "object_bases": question["object_bases"],
        "point_luma": [round(_luma(pixels, x, y), 2) for x, y in question["points"]],
        "mark_style": mark_style,
    }
    return _Drawn(target, record, row, question["answer"])


def _write_variant(world: Path, out: Path, variant: int, kept: list[_Drawn]) -> None:
    folder = out / "images" / f"blink{variant}pointscenter"
    folder.mkdir(parents=True, exist_ok=True)
    questions, answers = [], []
    for question_id, item in enumerate(kept):
        name = f"{question_id}.png"
        with Image.open(world / item.record["file"]) as opened:
            jpeg = draw_marked(opened.convert("RGB"), item.row["points"], item.row["labels"], item.row["mark_style"])
        Image.open(io.BytesIO(jpeg)).save(folder / name)  # PNG, as HardBLINK ships
        questions.append({"question_id": question_id, "image": name, **item.row})
        answers.append({"question_id": question_id, "text": f"({item.answer})"})
    for kind, rows in (("questions", questions), ("answers", answers)):
        path = out / kind / f"blink_{variant}pointscenter_{kind}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))


# ------------------------------------------------------------------------------------ baselines
def _argmax_label(values: Sequence[float], labels: Sequence[str]) -> str:
    return labels[int(np.argmax(values))]


def lower_is_nearer(points: Sequence[Sequence[int]], labels: Sequence[str]) -> str:
    """The point lowest in the image (largest y) is the nearest."""
    return _argmax_label([y for _, y in points], labels)


# name -> (what it says, the letter it picks from a question line)
HEURISTICS: dict[str, tuple[str, Callable[[dict[str, Any]], str]]] = {
    "lowest_point": ("the lowest point in the image is nearest", lambda q: lower_is_nearer(q["points"], q["labels"])),
    "largest_object": ("the point on the object with the largest mask is nearest",
                       lambda q: _argmax_label(q["object_areas"], q["labels"])),
    "lowest_object_base": ("the point on the object whose mask reaches lowest is nearest (ground contact)",
                           lambda q: _argmax_label(q["object_bases"], q["labels"])),
    "brightest_point": ("the brightest point is nearest", lambda q: _argmax_label(q["point_luma"], q["labels"])),
    "darkest_point": ("the darkest point is nearest", lambda q: _argmax_label([-v for v in q["point_luma"]], q["labels"])),
    "rightmost_point": ("the rightmost point is nearest", lambda q: _argmax_label([x for x, _ in q["points"]], q["labels"])),
    "most_central_point": ("the point nearest the image's vertical midline is nearest",
                           lambda q: _argmax_label([-abs(x - q["image_width"] / 2) for x, _ in q["points"]], q["labels"])),
}


def read_questions(out: str | Path) -> dict[int, list[tuple[dict[str, Any], str]]]:
    """(question line, answer letter) per variant of questions written by :func:`build_questions`."""
    out = Path(out)
    found: dict[int, list[tuple[dict[str, Any], str]]] = {}
    for path in sorted((out / "questions").glob("blink_*pointscenter_questions.jsonl")):
        variant = int(path.name.split("_")[1][0])
        answers_path = out / "answers" / path.name.replace("questions", "answers")
        answers = {row["question_id"]: row["text"].strip("()") for row in map(json.loads, answers_path.read_text().splitlines())}
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if rows:
            found[variant] = [(row, answers[row["question_id"]]) for row in rows]
    return found


def baselines(out: str | Path) -> dict[str, dict[int, float]]:
    """Accuracy of chance and of every single-cue heuristic of :data:`HEURISTICS`, per variant."""
    out = Path(out)
    scores: dict[str, dict[int, float]] = {"chance": {}, **{name: {} for name in HEURISTICS}}
    for variant, rows in read_questions(out).items():
        scores["chance"][variant] = 1.0 / variant
        for name, (_, pick) in HEURISTICS.items():
            scores[name][variant] = float(np.mean([pick(row) == answer for row, answer in rows]))
    return scores


def token_ceiling(out: str | Path, world: str | Path, tokenizer: Any) -> dict[int, float]:
    """Accuracy per variant of answering from the ground-truth depth tokens (issue 11's ceiling (a)).

    Each question's source image gets its tokens as curation would make them with the ground-truth
    teacher (true inverse depth, encoded by ``tokenizer``); the decoded map is read at the points
    (:func:`perceptio.evaluate.depth_answer.answer_from_codes`).
    """
    from perceptio.evaluate.depth_answer import answer_from_codes
    from perceptio.tokenize.teacher import OracleTeacher

    out, world = Path(out), Path(world)
    oracle = OracleTeacher(world / "depth")
    codes: dict[str, list[int]] = {}
    accuracy: dict[int, float] = {}
    for variant, rows in read_questions(out).items():
        hits = []
        for row, answer in rows:
            source = row["source_file"]
            if source not in codes:
                depth = oracle.predict_paths([world / source])[0]
                codes[source] = tokenizer.encode(depth)[0].tolist()
            size = (row["image_width"], row["image_height"])
            hits.append(answer_from_codes(tokenizer, codes[source], row["points"], row["labels"], size) == answer)
        accuracy[variant] = float(np.mean(hits))
    return accuracy
