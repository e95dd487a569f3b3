"""The synthetic world's conversations, written in the LLaVA-1.5 and GranD-f formats.

:func:`write_conversations` reads a finished world (``world.json`` and the instance maps) and adds
two sets of files beside it, leaving every file of the world untouched:

- ``llava/synth_{split}.json``: LLaVA-1.5 records (``id``, ``image`` relative to the world root,
  ``conversations`` of human/gpt turns with one ``<image>``): two to four questions per image about
  colours, counts, left/right positions and sizes, each answered from ``world.json`` in a word or a
  number (so exact match is a fair score); plus text-only records (a count stated in words, asked
  back), as mix665k has text-only ShareGPT records.
- ``GranDf/annotations/train/GranDf_HA_GCG_{split}.json``: GranD-f's ``groundings`` layout; one
  caption per image whose phrases ("a red cube", "two blue spheres") point at the instance masks
  of those objects as COCO RLE, with ``file_name`` relative to the world root.

Splits follow the world's: a COCO image takes its ``refcocog-umd`` split, an ADE20k image its
training/validation folder (as ``train``/``val``). The text is a pure function of ``world.json``
(its seed drives the wording), so a world's conversations are byte-identical on every run.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from perceptio.sources.synth.layout import WORLD_FILE
from perceptio.sources.synth.scene import SHAPES, image_rng
from perceptio.errors import PerceptioError
from perceptio.io import write_text_atomic

LLAVA_DIR = PurePosixPath("llava")
GRANDF_DIR = PurePosixPath("GranDf/annotations/train")
CONVERSATION_STREAM = 2  # image_rng stream of the conversations (0 = scene, 1 = referring expressions)
SPLIT_SCHEME = "refcocog-umd"
ADE_SPLITS = {"training": "train", "validation": "val"}
NUMBER_WORDS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
MIN_SIZE_RATIO = 1.5  # "which is bigger" is asked only when the volumes differ this much
MIN_OFFSET_FRACTION = 0.1  # "left or right" only when the centres are this far apart (of the width)
TEXT_ONLY_EVERY = 4  # one text-only record per this many images


@dataclass(frozen=True)
class ConversationSummary:
    llava: dict[str, int]  # split -> records
    grandf: dict[str, int]  # split -> captions
    files: list[Path]


def _rle(mask: np.ndarray) -> dict[str, Any]:
    """Compressed COCO RLE with a str ``counts``, as GranD-f's ``rle_masks`` hold them."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def _plural(shape: str) -> str:
    return f"{shape}s"


def _one(colour: str, shape: str) -> str:
    return f"{'an' if colour[0] in 'aeiou' else 'a'} {colour} {shape}"


def unique_names(objects: list[dict[str, Any]]) -> dict[int, str]:
    """Instance -> "the red cube" for the objects whose colour and shape name them uniquely."""
    counts = Counter((obj["colour"], obj["shape"]) for obj in objects)
    return {obj["instance"]: f"the {obj['colour']} {obj['shape']}" for obj in objects
            if counts[(obj["colour"], obj["shape"])] == 1}


def image_questions(objects: list[dict[str, Any]], width: int, rng: np.random.Generator) -> list[tuple[str, str]]:
    """Every kind of question this image can answer unambiguously, one of each, in a random order."""
    named = unique_names(objects)
    shapes = Counter(obj["shape"] for obj in objects)
    asked: list[tuple[str, str]] = []
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    asked.append((f"How many {_plural(shape)} are there in the image?", str(shapes[shape])))
    alone = [obj for obj in objects if shapes[obj["shape"]] == 1]
    if alone:
        obj = alone[int(rng.integers(len(alone)))]
        asked.append((f"What colour is the {obj['shape']}?", obj["colour"]))
    pairs = [(a, b) for a in objects for b in objects if a["instance"] < b["instance"]
             and a["instance"] in named and b["instance"] in named]
    sideways = [(a, b) for a, b in pairs
                if abs(a["image_centre"][0] - b["image_centre"][0]) > MIN_OFFSET_FRACTION * width]
    if sideways:
        a, b = sideways[int(rng.integers(len(sideways)))]
        if rng.random() < 0.5:
            a, b = b, a
        side = "left" if a["image_centre"][0] < b["image_centre"][0] else "right"
        asked.append((f"Is {named[a['instance']]} to the left or to the right of {named[b['instance']]}?", side))
    distinct = [(a, b) for a, b in pairs
                if max(a["volume_m3"], b["volume_m3"]) > MIN_SIZE_RATIO * min(a["volume_m3"], b["volume_m3"])]
    if distinct:
        a, b = distinct[int(rng.integers(len(distinct)))]
        if rng.random() < 0.5:
            a, b = b, a
        bigger = a if a["volume_m3"] > b["volume_m3"] else b
        asked.append((f"Which is bigger, {named[a['instance']]} or {named[b['instance']]}?", named[bigger["instance"]]))
    order = rng.permutation(len(asked))
    return [asked[int(position)] for position in order]


def llava_record(record: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    """The LLaVA-1.5 record of one world image (``<image>`` leads the first question, as in mix665k)."""
    width = record["camera"]["width"]
    questions = image_questions(record["objects"], width, rng)[: int(rng.integers(2, 5))]
    turns = []
    for position, (question, answer) in enumerate(questions):
        turns.append({"from": "human", "value": f"<image>\n{question}" if position == 0 else question})
        turns.append({"from": "gpt", "value": answer})
    return {"id": f"synth-{record['stem']}", "image": record["file"], "conversations": turns}


def text_only_record(record: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    """A conversation without an image: a count stated in words is asked back as a number."""
    shapes = Counter(obj["shape"] for obj in record["objects"])
    listed = [f"{NUMBER_WORDS[count]} {_plural(shape) if count > 1 else shape}" for shape, count in sorted(shapes.items())]
    stated = listed[0] if len(listed) == 1 else ", ".join(listed[:-1]) + f" and {listed[-1]}"
    asked = SHAPES[int(rng.integers(len(SHAPES)))]
    return {
        "id": f"synth-text-{record['stem']}",
        "conversations": [
            {"from": "human", "value": f"A box holds {stated}. How many objects are in the box?"},
            {"from": "gpt", "value": str(sum(shapes.values()))},
            {"from": "human", "value": f"And how many of them are {_plural(asked)}?"},
            {"from": "gpt", "value": str(shapes[asked])},
        ],
    }


def grounded_record(record: dict[str, Any], instances: np.ndarray) -> dict[str, Any]:
    """The GranD-f record of one world image: a caption whose phrases point at instance masks.

    Objects are grouped by colour and shape, groups in left-to-right order of their leftmost
    object; a group of two or more is one plural phrase grounded by all of its masks.
    """
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for obj in sorted(record["objects"], key=lambda obj: (obj["image_centre"][0], obj["instance"])):
        groups.setdefault((obj["colour"], obj["shape"]), []).append(obj)
    phrases = []
    for (colour, shape), members in groups.items():
        count = len(members)
        phrases.append((_one(colour, shape) if count == 1 else f"{NUMBER_WORDS[count]} {colour} {_plural(shape)}", members))
    caption = "The scene shows "
    groundings = {}
    for position, (text, members) in enumerate(phrases):
        if position:
            caption += " and " if position == len(phrases) - 1 else ", "
        start = len(caption)
        caption += text
        masks = [_rle(instances == obj["instance"]) for obj in members]
        groundings[text] = {"token_positives": [start, len(caption)], "rle_masks": masks}
    return {"file_name": record["file"], "caption": caption + ".", "groundings": groundings}


def _split(record: dict[str, Any]) -> str:
    if "splits" in record:
        return record["splits"][SPLIT_SCHEME]
    return ADE_SPLITS[record["ade_split"]]


def write_conversations(world_root: str | Path) -> ConversationSummary:
    """Write the LLaVA and GranD-f files of the world in ``world_root`` (see the module docstring)."""
    root = Path(world_root)
    try:
        world = json.loads((root / WORLD_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise PerceptioError(f"{root} holds no readable synthetic world ({WORLD_FILE}: {error})") from error
    llava: dict[str, list[dict[str, Any]]] = {}
    grandf: dict[str, list[dict[str, Any]]] = {}
    for record in world["images"]:
        split = _split(record)
        rng = image_rng(world["seed"], record["index"], CONVERSATION_STREAM)
        llava.setdefault(split, []).append(llava_record(record, rng))
        if record["index"] % TEXT_ONLY_EVERY == 0:
            llava[split].append(text_only_record(record, rng))
        with Image.open(root / record["instance_file"]) as image:
            instances = np.asarray(image).astype(np.int64)
        grandf.setdefault(split, []).append(grounded_record(record, instances))
    files = []
    for folder, name, records in ((LLAVA_DIR, "synth_{}.json", llava), (GRANDF_DIR, "GranDf_HA_GCG_{}.json", grandf)):
        for split, items in sorted(records.items()):
            path = root / folder / name.format(split)
            write_text_atomic(path, json.dumps(items, indent=1) + "\n")
            files.append(path)
    return ConversationSummary({split: len(items) for split, items in sorted(llava.items())},
                               {split: len(items) for split, items in sorted(grandf.items())}, files)
