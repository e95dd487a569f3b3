"""HardBLINK-style relative-depth questions for ADE20k images ("which point is closest to the camera").

After AURORA, the paper trains on ADE20k images with 2-5 points marked on them and asks which point
is nearest. Points are drawn as in HardBLINK (a small red circle, a letter in a white box beside
it) so that the trained model meets the benchmark's look. The points are chosen from the teacher's
normalised inverse depth (larger = nearer): at least ``min_distance_px`` apart and with depths that
differ clearly, so that the letter answer is not a coin toss on teacher noise.
"""

from __future__ import annotations

import io
import string
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

QUESTION_TEXT = (
    "Multiple points are circled on the image, labeled by letters beside each circle. "
    "Which point is the closest to the camera?"
)


@dataclass(frozen=True)
class MarkedPointsConfig:
    """How the points of one question are chosen."""

    min_points: int = 2
    max_points: int = 5
    min_distance_px: float = 20.0
    min_depth_gap: float = 0.1  # in normalised depth units ([-1, 1]): a clear difference
    border_px: int = 16  # keep circles and labels inside the image
    window_px: int = 2  # depth at a point = median over a (2w+1)^2 window
    # A point must sit inside a surface: its window's depth varies less than the gap that separates
    # points, so that no point lands on an object's outline where "which is nearer" hangs on a pixel.
    max_local_spread: float = 0.1
    attempts: int = 400


def _point_depth(depth_full: np.ndarray, x: int, y: int, config: MarkedPointsConfig) -> float | None:
    """Median depth around (x, y), or None when the point is on a depth edge."""
    window = config.window_px
    patch = depth_full[max(0, y - window): y + window + 1, max(0, x - window): x + window + 1]
    if float(patch.max() - patch.min()) > config.max_local_spread:
        return None
    return float(np.median(patch))


def choose_points(depth_full: np.ndarray, seed: int, config: MarkedPointsConfig) -> list[tuple[int, int, float]]:
    """Up to a seeded 2..5 points ``(x, y, depth)``, pairwise far apart and clearly different in depth.

    Returns fewer than ``config.min_points`` (then no question is asked) when the image has no
    depth contrast to ask about, e.g. a flat wall. Deterministic in ``seed``.
    """
    rng = np.random.default_rng(seed)
    height, width = depth_full.shape
    wanted = int(rng.integers(config.min_points, config.max_points + 1))
    low_x, high_x = min(config.border_px, width // 2), max(width - config.border_px, width // 2 + 1)
    low_y, high_y = min(config.border_px, height // 2), max(height - config.border_px, height // 2 + 1)
    chosen: list[tuple[int, int, float]] = []
    for _ in range(config.attempts):
        if len(chosen) == wanted:
            break
        x, y = int(rng.integers(low_x, high_x)), int(rng.integers(low_y, high_y))
        depth = _point_depth(depth_full, x, y, config)
        if depth is not None and all(
            np.hypot(x - cx, y - cy) >= config.min_distance_px and abs(depth - cd) >= config.min_depth_gap
            for cx, cy, cd in chosen
        ):
            chosen.append((x, y, depth))
    return chosen


def make_question(depth_full: np.ndarray, seed: int, config: MarkedPointsConfig) -> dict[str, Any] | None:
    """The ``question`` field of an ADE20k sample (see perceptio/shards.py), or None."""
    points = choose_points(depth_full, seed, config)
    if len(points) < config.min_points:
        return None
    labels = list(string.ascii_uppercase[: len(points)])
    nearest = max(range(len(points)), key=lambda i: points[i][2])
    return {
        "text": QUESTION_TEXT,
        "points": [[x, y] for x, y, _ in points],
        "labels": labels,
        "answer": labels[nearest],
        "point_depths": [round(depth, 6) for _, _, depth in points],
    }


def draw_marked(image: Image.Image, points: list[list[int]], labels: list[str]) -> bytes:
    """JPEG bytes of the image with HardBLINK-like marks: red ring, letter in a white box up-left."""
    canvas = image.convert("RGB")
    draw = ImageDraw.Draw(canvas)
    scale = max(canvas.size) / 336.0  # HardBLINK images are 336 px; keep marks the same relative size
    radius = max(3, round(4 * scale))
    font = ImageFont.load_default(size=max(10, round(12 * scale)))
    for (x, y), label in zip(points, labels):
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), outline=(255, 0, 0), width=max(2, round(2 * scale)))
        left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
        box_w, box_h = right - left + 4, bottom - top + 4
        box_x = min(max(0, x - radius - box_w), canvas.width - box_w)
        box_y = min(max(0, y - radius - box_h - 2), canvas.height - box_h)
        draw.rectangle((box_x, box_y, box_x + box_w, box_y + box_h), fill=(255, 255, 255))
        draw.text((box_x + 2 - left, box_y + 2 - top), label, fill=(0, 0, 0), font=font)
    buffer = io.BytesIO()
    canvas.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()
