"""Referring expressions for the synthetic scenes, each checked to pick out exactly one object.

An expression is generated from a :class:`Descriptor` (optional colour, optional shape, optional
relation such as "leftmost" or "bigger"). :func:`resolve` says which objects a descriptor picks
out: filter by colour and shape, then take the extreme of the survivors along the relation. A
descriptor is used for an object only when it resolves to that object alone *and* the object wins
its relation by a clear margin, so that a person would agree. Three styles mimic the three datasets:
RefCOCO (short, any cue), RefCOCO+ (no location words: colour, shape and size only) and RefCOCOg
(longer sentences). Ambiguous expressions (a bare shape shared by two objects) are made on request.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

# relation -> (attribute of ObjectView, True when the largest value wins)
RELATIONS: dict[str, tuple[str, bool]] = {
    "left": ("u", False),
    "right": ("u", True),
    "nearest": ("depth", False),
    "farthest": ("depth", True),
    "larger": ("volume", True),
    "smaller": ("volume", False),
}
SPATIAL_RELATIONS = ("left", "right", "nearest", "farthest")
# A relation must separate the object from the runner-up by this much to be used.
MIN_IMAGE_X_GAP = 0.06  # fraction of the image width
MIN_DEPTH_GAP_M = 0.4
MIN_SIZE_RATIO = 1.2

# Short wordings per relation: (when two candidates compete, when three or more do); {s} = shape.
_SHORT: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "left": (("left {s}", "{s} on the left"), ("leftmost {s}", "{s} on the far left")),
    "right": (("right {s}", "{s} on the right"), ("rightmost {s}", "{s} on the far right")),
    "nearest": (("closer {s}", "nearer {s}"), ("closest {s}", "nearest {s}")),
    "farthest": (("farther {s}", "{s} further away"), ("farthest {s}", "{s} farthest away")),
    "larger": (("bigger {s}", "larger {s}"), ("biggest {s}", "largest {s}")),
    "smaller": (("smaller {s}",), ("smallest {s}", "tiniest {s}")),
}
# Long clauses (RefCOCOg); {S} = the shape's plural.
_LONG_CLAUSE = {
    "left": "on the left side of the picture",
    "right": "on the right side of the picture",
    "nearest": "that is closest to the camera",
    "farthest": "standing farthest from the camera",
    "larger": "which is the biggest of the {S}",
    "smaller": "which is the smallest of the {S}",
}
_LONG_FILLER = ("standing on the checkered floor", "in the middle of the room", "resting on the tiled floor")


@dataclass(frozen=True)
class ObjectView:
    """What expressions may say about an object: its identity and measurable properties."""

    instance: int
    shape: str
    colour: str
    volume: float
    depth: float  # camera z of the object's centre, metres
    u: float  # image x of the object's centre, pixels


@dataclass(frozen=True)
class Descriptor:
    colour: str | None = None
    shape: str | None = None
    relation: str | None = None


def _candidates(descriptor: Descriptor, objects: list[ObjectView]) -> list[ObjectView]:
    return [
        obj
        for obj in objects
        if (descriptor.colour is None or obj.colour == descriptor.colour)
        and (descriptor.shape is None or obj.shape == descriptor.shape)
    ]


def resolve(descriptor: Descriptor, objects: list[ObjectView]) -> list[ObjectView]:
    """The objects that ``descriptor`` picks out (more than one: ambiguous)."""
    candidates = _candidates(descriptor, objects)
    if descriptor.relation is None or not candidates:
        return candidates
    attribute, largest = RELATIONS[descriptor.relation]
    pick = max if largest else min
    return [pick(candidates, key=lambda obj: getattr(obj, attribute))]


def _clear_winner(descriptor: Descriptor, objects: list[ObjectView], image_width: int) -> bool:
    """True when the relation's winner beats the runner-up by a margin a person would see."""
    candidates = _candidates(descriptor, objects)
    if descriptor.relation is None:
        return True
    if len(candidates) < 2:
        return False  # "the leftmost sphere" with a single sphere is odd, not informative
    attribute, largest = RELATIONS[descriptor.relation]
    values = sorted((getattr(obj, attribute) for obj in candidates), reverse=largest)
    best, runner_up = values[0], values[1]
    if attribute == "u":
        return abs(best - runner_up) >= MIN_IMAGE_X_GAP * image_width
    if attribute == "depth":
        return abs(best - runner_up) >= MIN_DEPTH_GAP_M
    return max(best, runner_up) / min(best, runner_up) >= MIN_SIZE_RATIO


def unique_descriptors(
    target: ObjectView, objects: list[ObjectView], image_width: int, spatial: bool
) -> list[Descriptor]:
    """Every descriptor that picks out ``target`` alone, clearly; location relations only when
    ``spatial``."""
    relations = [None] + [name for name in RELATIONS if spatial or name not in SPATIAL_RELATIONS]
    found = []
    for colour in (target.colour, None):
        for shape in (target.shape, None):
            for relation in relations:
                descriptor = Descriptor(colour, shape, relation)
                if colour is None and shape is None and relation is None:
                    continue
                if colour is not None and relation is not None:
                    continue  # colours are distinct within a scene: a relation would add nothing
                if resolve(descriptor, objects) == [target] and _clear_winner(descriptor, objects, image_width):
                    found.append(descriptor)
    return found


def _plural(shape: str) -> str:
    return shape + "s"


def _short_text(descriptor: Descriptor, count: int, rng: np.random.Generator) -> str:
    noun = descriptor.shape or "object"
    if descriptor.relation is not None:
        options = _SHORT[descriptor.relation][0 if count == 2 else 1]
        return options[int(rng.integers(len(options)))].format(s=noun)
    if descriptor.shape is None:
        options = [f"{descriptor.colour} one", f"the {descriptor.colour} thing", descriptor.colour]
    elif descriptor.colour is None:
        options = [noun, f"the {noun}"]
    else:
        options = [f"{descriptor.colour} {noun}", f"the {descriptor.colour} {noun}"]
    return options[int(rng.integers(len(options)))]


def _long_text(descriptor: Descriptor, rng: np.random.Generator) -> str:
    noun = descriptor.shape or "object"
    head = f"the {descriptor.colour} {noun}" if descriptor.colour else f"the {noun}"
    if descriptor.relation is not None:
        clause = _LONG_CLAUSE[descriptor.relation].format(S=_plural(noun))
    else:
        clause = _LONG_FILLER[int(rng.integers(len(_LONG_FILLER)))]
    return f"{head} {clause}"


def describe(
    target: ObjectView, objects: list[ObjectView], style: str, image_width: int, rng: np.random.Generator, count: int
) -> list[str]:
    """Up to ``count`` distinct expressions in ``style`` that each pick out ``target`` alone."""
    descriptors = unique_descriptors(target, objects, image_width, spatial=style != "refcoco+")
    if style == "refcocog":
        # RefCOCOg sentences name the object fully; a relation clause is extra, true detail.
        descriptors = [d for d in descriptors if d.shape is not None]
    texts: list[str] = []
    for index in rng.permutation(len(descriptors)):
        descriptor = descriptors[int(index)]
        if style == "refcocog":
            if descriptor.relation is not None and rng.random() < 0.5:
                # Longer, still true: the colour alone already singles the object out.
                descriptor = replace(descriptor, colour=target.colour)
            text = _long_text(descriptor, rng)
        else:
            text = _short_text(descriptor, len(_candidates(descriptor, objects)), rng)
        if text not in texts:
            texts.append(text)
        if len(texts) == count:
            break
    return texts


def ambiguous_expression(shape: str, style: str, rng: np.random.Generator) -> str:
    """An expression naming only ``shape``: ambiguous in a scene with two objects of that shape."""
    if style == "refcocog":
        return f"a {shape} {_LONG_FILLER[int(rng.integers(len(_LONG_FILLER)))]}"
    return [shape, f"the {shape}"][int(rng.integers(2))]


def as_sentence(text: str, rng: np.random.Generator) -> dict[str, object]:
    """A REFER sentence: ``raw`` as a person typed it (varying case and a final full stop),
    ``sent`` cleaned to lower case without punctuation, ``tokens`` its words."""
    raw = text
    casing = rng.random()  # mostly as typed, some capitalised, a few shouted (as in RefCOCO)
    if casing > 0.9:
        raw = raw.upper()
    elif casing > 0.6:
        raw = raw[0].upper() + raw[1:]
    if rng.random() < 0.3:
        raw += "."
    sent = " ".join(raw.lower().replace(".", " ").replace(",", " ").split())
    return {"raw": raw, "sent": sent, "tokens": sent.split()}
