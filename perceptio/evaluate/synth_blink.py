"""HardBLINK-style relative-depth questions on the synthetic world, where the true depth is known.

For a world written by :func:`perceptio.sources.synth.generate_world`, each question marks 3, 4 or
5 points on distinct objects of one image (HardBLINK's red circles and letters, drawn by
:func:`perceptio.curate.marked_points.draw_marked`) and asks which is closest to the camera; the
renderer's depth at the marked pixels decides the answer. Points sit well inside their object
(eroded mask), at least ``min_distance_px`` apart, and their true depths differ by at least
``min_relative_gap`` so that every answer is unambiguous. Letters follow a random draw of the objects, so the answer letter is uniform.

The questions are written in the HardBLINK layout (see :mod:`perceptio.evaluate.hardblink`), so
``perceptio-evaluate hardblink --data DIR`` scores a model on them; each question line also keeps
the points, their letters and true depths (metres) for baselines such as "lower in the image is
nearer".
"""

from __future__ import annotations

import io
import json
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from perceptio.curate.marked_points import QUESTION_TEXT, draw_marked
from perceptio.errors import PerceptioError
from perceptio.evaluate.hardblink import VARIANTS

WORLD_FILE = "world.json"


@dataclass(frozen=True)
class SynthBlinkConfig:
    variants: tuple[int, ...] = VARIANTS
    min_object_pixels: int = 120
    erosion_px: int = 3  # points keep this distance from their object's visible border
    min_distance_px: float = 24.0
    min_relative_gap: float = 0.05  # true depths of any two points differ by at least 5%
    attempts: int = 60
    seed: int = 0


def _eroded(mask: np.ndarray, steps: int) -> np.ndarray:
    """The mask shrunk by ``steps`` pixels (4-neighbourhood), with numpy shifts alone."""
    core = mask.copy()
    for _ in range(steps):
        padded = np.pad(core, 1)
        core = core & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return core


def object_point(mask: np.ndarray, erosion_px: int) -> tuple[int, int] | None:
    """(x, y) of the eroded mask's pixel nearest its centroid; None when nothing survives erosion."""
    core = _eroded(mask, erosion_px)
    rows, cols = np.nonzero(core)
    if len(rows) == 0:
        return None
    nearest = np.argmin((rows - rows.mean()) ** 2 + (cols - cols.mean()) ** 2)
    return int(cols[nearest]), int(rows[nearest])


@dataclass(frozen=True)
class Candidate:
    x: int
    y: int
    depth_m: float


def image_candidates(world: Path, record: dict[str, Any], config: SynthBlinkConfig) -> list[Candidate]:
    """One candidate point per visible object of an image, with the true depth at that pixel."""
    instances = np.asarray(Image.open(world / record["instance_file"]))
    depth_mm = np.asarray(Image.open(world / record["depth_file"])).astype(np.float64)
    candidates = []
    for obj in record["objects"]:
        mask = instances == obj["instance"]
        if mask.sum() < config.min_object_pixels:
            continue
        point = object_point(mask, config.erosion_px)
        if point is None or depth_mm[point[1], point[0]] <= 0:  # 0 mm marks invalid depth
            continue
        candidates.append(Candidate(point[0], point[1], depth_mm[point[1], point[0]] / 1000.0))
    return candidates


def _choose(candidates: list[Candidate], count: int, rng: np.random.Generator, config: SynthBlinkConfig) -> list[Candidate] | None:
    """``count`` candidates far apart in the image and clearly different in depth, or None."""
    if len(candidates) < count:
        return None
    for _ in range(config.attempts):
        picked = [candidates[i] for i in rng.choice(len(candidates), size=count, replace=False)]
        depths = sorted(c.depth_m for c in picked)
        gaps_ok = all(far / near - 1 >= config.min_relative_gap for near, far in zip(depths, depths[1:]))
        apart = all(
            np.hypot(a.x - b.x, a.y - b.y) >= config.min_distance_px for i, a in enumerate(picked) for b in picked[i + 1 :]
        )
        if gaps_ok and apart:
            return picked
    return None


def build_questions(world: str | Path, out: str | Path, config: SynthBlinkConfig = SynthBlinkConfig(),
                    limit_per_variant: int | None = None) -> dict[int, int]:
    """Write HardBLINK-layout questions for every image of ``world`` into ``out``; question counts per variant."""
    world, out = Path(world), Path(out)
    world_file = world / WORLD_FILE
    if not world_file.is_file():
        raise PerceptioError(f"{world} is not a synthetic world (no {WORLD_FILE})")
    records = json.loads(world_file.read_text())["images"]
    rng = np.random.default_rng(config.seed)
    questions: dict[int, list[dict[str, Any]]] = {variant: [] for variant in config.variants}
    answers: dict[int, list[dict[str, Any]]] = {variant: [] for variant in config.variants}
    for record in records:
        candidates = image_candidates(world, record, config)
        with Image.open(world / record["file"]) as opened:
            picture = opened.convert("RGB")
        for variant in config.variants:
            if limit_per_variant is not None and len(questions[variant]) >= limit_per_variant:
                continue
            picked = _choose(candidates, variant, rng, config)
            if picked is None:
                continue
            labels = list(string.ascii_uppercase[:variant])
            answer = labels[int(np.argmin([c.depth_m for c in picked]))]
            question_id = len(questions[variant])
            name = f"{question_id}.png"
            folder = out / "images" / f"blink{variant}pointscenter"
            folder.mkdir(parents=True, exist_ok=True)
            jpeg = draw_marked(picture, [[c.x, c.y] for c in picked], labels)
            Image.open(io.BytesIO(jpeg)).save(folder / name)  # PNG, as HardBLINK ships
            questions[variant].append({
                "question_id": question_id, "image": name, "text": QUESTION_TEXT, "category": "relative_depth",
                "source": record["stem"], "points": [[c.x, c.y] for c in picked], "labels": labels,
                "depths_m": [round(c.depth_m, 4) for c in picked],
            })
            answers[variant].append({"question_id": question_id, "text": f"({answer})"})
    for variant in config.variants:
        for kind, rows in (("questions", questions[variant]), ("answers", answers[variant])):
            path = out / kind / f"blink_{variant}pointscenter_{kind}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return {variant: len(questions[variant]) for variant in config.variants}


def lower_is_nearer(points: Sequence[Sequence[int]], labels: Sequence[str]) -> str:
    """The heuristic baseline: the point lowest in the image (largest y) is the nearest."""
    return labels[int(np.argmax([y for _, y in points]))]


def baselines(out: str | Path) -> dict[str, dict[int, float]]:
    """Chance and "lower in the image is nearer" accuracy per variant of questions written by :func:`build_questions`."""
    out = Path(out)
    scores: dict[str, dict[int, float]] = {"chance": {}, "lower_is_nearer": {}}
    for path in sorted((out / "questions").glob("blink_*pointscenter_questions.jsonl")):
        variant = int(path.name.split("_")[1][0])
        answers_path = out / "answers" / path.name.replace("questions", "answers")
        answers = {row["question_id"]: row["text"].strip("()") for row in map(json.loads, answers_path.read_text().splitlines())}
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        if not rows:
            continue
        hits = [lower_is_nearer(row["points"], row["labels"]) == answers[row["question_id"]] for row in rows]
        scores["chance"][variant] = 1.0 / variant
        scores["lower_is_nearer"][variant] = float(np.mean(hits))
    return scores
