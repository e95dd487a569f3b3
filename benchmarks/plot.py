"""Line charts as PNG with PIL alone (matplotlib is not a dependency): training curves of the ablation."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw

COLOURS = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207))


@dataclass(frozen=True)
class Series:
    label: str
    xs: Sequence[float]
    ys: Sequence[float]


def smooth(values: Sequence[float], window: int) -> list[float]:
    """Trailing moving average (the first points average what exists)."""
    out, total = [], 0.0
    for index, value in enumerate(values):
        total += value
        if index >= window:
            total -= values[index - window]
        out.append(total / min(index + 1, window))
    return out


def _panel(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], title: str, series: Sequence[Series],
           colour_of: dict[str, tuple[int, int, int]]) -> None:
    left, top, right, bottom = box
    plot = (left + 50, top + 22, right - 10, bottom - 28)
    draw.text((left + 50, top + 4), title, fill="black")
    points = [(x, y) for s in series for x, y in zip(s.xs, s.ys)]
    if not points:
        draw.text((plot[0] + 10, plot[1] + 10), "no data", fill="gray")
        return
    x_low, x_high = min(p[0] for p in points), max(p[0] for p in points)
    y_low, y_high = min(p[1] for p in points), max(p[1] for p in points)
    x_high, y_high = (x_high if x_high > x_low else x_low + 1), (y_high if y_high > y_low else y_low + 1e-6)
    draw.rectangle(plot, outline="black")
    for fraction in (0.0, 0.5, 1.0):
        y_value = y_low + fraction * (y_high - y_low)
        y = plot[3] - fraction * (plot[3] - plot[1])
        draw.line((plot[0] - 4, y, plot[0], y), fill="black")
        draw.text((left + 2, y - 6), f"{y_value:.3g}", fill="black")
        x_value = x_low + fraction * (x_high - x_low)
        x = plot[0] + fraction * (plot[2] - plot[0])
        draw.line((x, plot[3], x, plot[3] + 4), fill="black")
        draw.text((x - 10, plot[3] + 6), f"{x_value:.0f}", fill="black")
    draw.text(((plot[0] + plot[2]) // 2 - 10, plot[3] + 16), "step", fill="black")
    for s in series:
        colour = colour_of[s.label]
        scaled = [(plot[0] + (x - x_low) / (x_high - x_low) * (plot[2] - plot[0]),
                   plot[3] - (y - y_low) / (y_high - y_low) * (plot[3] - plot[1])) for x, y in zip(s.xs, s.ys)]
        if len(scaled) > 1:
            draw.line(scaled, fill=colour, width=2)


def line_charts(panels: dict[str, Sequence[Series]], out: Path, title: str, panel_size: tuple[int, int] = (420, 260)) -> Path:
    """One panel per entry of ``panels`` side by side (two per row), a shared legend, saved as PNG."""
    labels = list(dict.fromkeys(s.label for series in panels.values() for s in series))
    columns = 2
    rows = (len(panels) + columns - 1) // columns
    width, height = panel_size[0] * columns, panel_size[1] * rows + 30 + 18 * len(labels)
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((10, 8), title, fill="black")
    for index, (name, series) in enumerate(panels.items()):
        column, row = index % columns, index // columns
        box = (column * panel_size[0], 24 + row * panel_size[1], (column + 1) * panel_size[0], 24 + (row + 1) * panel_size[1])
        _panel(draw, box, name, series, {label: COLOURS[i % len(COLOURS)] for i, label in enumerate(labels)})
    legend_top = 24 + rows * panel_size[1] + 4
    for index, label in enumerate(labels):
        colour = COLOURS[index % len(COLOURS)]
        y = legend_top + 18 * index
        draw.line((20, y + 7, 50, y + 7), fill=colour, width=3)
        draw.text((58, y), label, fill="black")
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out)
    return out
