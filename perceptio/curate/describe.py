"""One attribute-focused sentence per object, built from what is measured in the image.

The paper gives every kept RefCOCO sample "a one-sentence attribute-focused description of the
object". Without a captioning model we measure the attributes ourselves (category, dominant colour
by name, size relative to the image, position, depth relative to the image's other objects) and
phrase them; :class:`Captioner` is the seam where a learned captioner can replace the phrasing
(``--captioner package.module:ClassName``).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np

from perceptio.errors import PerceptioError

# Hue boundaries (degrees) of the chromatic colour names, checked in order.
_HUE_NAMES = ((15, "red"), (40, "orange"), (70, "yellow"), (160, "green"), (200, "cyan"), (260, "blue"),
              (300, "purple"), (340, "pink"), (361, "red"))


@dataclass(frozen=True)
class ObjectAttributes:
    """Measured attributes of one object of one image."""

    category: str
    colour: str  # a basic colour name, e.g. "red", "gray"
    area_fraction: float  # mask area / image area
    size: str  # "small" | "medium" | "large"
    horizontal: str  # "left" | "centre" | "right"
    vertical: str  # "top" | "middle" | "bottom"
    depth_median: float  # median normalised inverse depth inside the mask (larger = nearer)
    depth_rank: int  # 0 = the nearest of the image's objects
    num_objects: int
    nearer_category: str | None  # the next nearer object's category; None for the nearest


class Captioner(Protocol):
    """Turns measured attributes into one sentence; implementations may also look at the image."""

    def describe(self, attributes: ObjectAttributes, image: np.ndarray, mask: np.ndarray) -> str: ...


class AttributeCaptioner:
    """The built-in captioner: a fixed template over the measured attributes."""

    def describe(self, attributes: ObjectAttributes, image: np.ndarray, mask: np.ndarray) -> str:
        where = _position_phrase(attributes.horizontal, attributes.vertical)
        percent = max(1, round(100 * attributes.area_fraction))
        nearer = attributes.nearer_category
        if nearer == attributes.category:
            nearer = f"other {nearer}"
        if attributes.num_objects == 1:
            depth = "the only object measured"
        elif attributes.depth_rank == 0:
            depth = "the nearest object to the camera"
        elif attributes.depth_rank == attributes.num_objects - 1:
            depth = f"the farthest object, behind the {nearer}"
        else:
            depth = f"farther away than the {nearer}"
        return (f"A {attributes.size} {attributes.colour} {attributes.category} {where}, "
                f"covering about {percent}% of it, {depth}.")


def _position_phrase(horizontal: str, vertical: str) -> str:
    if horizontal == "centre":
        return "in the centre of the image" if vertical == "middle" else f"at the {vertical} of the image"
    if vertical == "middle":
        return f"on the {horizontal} of the image"
    return f"at the {vertical} {horizontal} of the image"


def load_captioner(spec: str) -> Captioner:
    """``"attributes"`` (built in) or ``"package.module:ClassName"`` (constructed with no arguments)."""
    if spec == "attributes":
        return AttributeCaptioner()
    module_name, _, class_name = spec.partition(":")
    try:
        return getattr(importlib.import_module(module_name), class_name)()
    except (ImportError, AttributeError, ValueError) as error:
        raise PerceptioError(f"cannot load captioner {spec!r}: {error}") from error


def colour_name(pixels: np.ndarray) -> str:
    """The most frequent basic colour name among (N, 3) uint8 RGB pixels."""
    rgb = pixels.astype(np.float32) / 255.0
    high, low = rgb.max(axis=1), rgb.min(axis=1)
    chroma = high - low
    saturation = np.where(high > 0, chroma / np.maximum(high, 1e-6), 0.0)
    red, green, blue = rgb[:, 0], rgb[:, 1], rgb[:, 2]
    safe = np.maximum(chroma, 1e-6)
    hue = np.select(
        [high == red, high == green],
        [((green - blue) / safe) % 6, (blue - red) / safe + 2],
        (red - green) / safe + 4,
    ) * 60.0
    names = np.empty(len(rgb), dtype=object)
    achromatic = (saturation < 0.2) | (high < 0.15)
    names[achromatic] = np.where(high[achromatic] < 0.25, "black", np.where(high[achromatic] > 0.8, "white", "gray"))
    chromatic = ~achromatic
    bounds = np.array([bound for bound, _ in _HUE_NAMES])
    hue_names = np.array([name for _, name in _HUE_NAMES], dtype=object)
    names[chromatic] = hue_names[np.searchsorted(bounds, hue[chromatic], side="right")]
    # Dark, weakly saturated orange reads as brown.
    brown = chromatic & (names == "orange") & (high < 0.6)
    names[brown] = "brown"
    values, counts = np.unique(names.astype(str), return_counts=True)
    return str(values[np.argmax(counts)])


def _third(centre: float, extent: int, names: tuple[str, str, str]) -> str:
    return names[min(2, int(3 * centre / max(extent, 1)))]


def depth_at_image_size(depth: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour lookup (pixel centres) of a square normalised depth map at every image pixel."""
    side_rows, side_cols = depth.shape
    rows = ((np.arange(height) + 0.5) * side_rows / height).astype(np.int64)
    cols = ((np.arange(width) + 0.5) * side_cols / width).astype(np.int64)
    return depth[rows][:, cols]


def measure_attributes(
    image: np.ndarray, masks: Sequence[np.ndarray], categories: Sequence[str], depth_full: np.ndarray
) -> list[ObjectAttributes]:
    """Attributes of every object of one image; depth ranks are relative to these objects alone.

    ``image`` is (H, W, 3) uint8, ``masks`` non-empty (H, W) binary masks, ``depth_full`` the
    normalised inverse depth at image size (larger = nearer).
    """
    height, width = image.shape[:2]
    medians = [float(np.median(depth_full[mask.astype(bool)])) for mask in masks]
    order = sorted(range(len(masks)), key=lambda i: (-medians[i], i))  # nearest first, ties by position
    rank = {index: position for position, index in enumerate(order)}
    attributes = []
    for index, (mask, category) in enumerate(zip(masks, categories)):
        ys, xs = np.nonzero(mask)
        fraction = len(ys) / float(height * width)
        nearer = order[rank[index] - 1] if rank[index] > 0 else None
        attributes.append(ObjectAttributes(
            category=category,
            colour=colour_name(image[ys, xs]),
            area_fraction=fraction,
            size="small" if fraction < 0.05 else "medium" if fraction < 0.25 else "large",
            horizontal=_third(float(xs.mean()), width, ("left", "centre", "right")),
            vertical=_third(float(ys.mean()), height, ("top", "middle", "bottom")),
            depth_median=medians[index],
            depth_rank=rank[index],
            num_objects=len(masks),
            nearer_category=categories[nearer] if nearer is not None else None,
        ))
    return attributes
