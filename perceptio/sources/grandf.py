"""Read GranD-f grounded conversation generation (GCG) files exactly as GLaMM distributes them.

GranD-f (``MBZUAI/GranD-f`` on the Hugging Face hub) is four annotation files per split, each a
caption whose phrases are tied to masks, in three different layouts. Layout and meaning as
documented in mbzuai-oryx/groundingLMM ``docs/datasets.md`` (commit
29a1e12bc16e6b40f2ad216b1b2c847dc4d1360b) and read by its ``dataset/gcg_datasets/GranDf_gcg_ds.py``
(commit 72ed3a8cb2ebb55cf8d5f6d2ef930f4530e79be7); we read them our own way::

    GranDf/annotations/train/GranDf_HA_GCG_train.json       images: GranDf_HA_images/train/
    GranDf/annotations/train/OpenPsgGCG_{train,val}.json     images: coco_2017/train2017/
    GranDf/annotations/train/RefCOCOg_GCG_{train,val}.json   images: coco_2014/train2014/
    GranDf/annotations/train/flickr_mergedGT_GCG_{train,val}.json  images: flikcr_30k/train/

- ``groundings`` layout (GranDf_HA, OpenPsg): a list of ``{"file_name", "caption", "groundings":
  {phrase: {"token_positives": [start, end], "rle_masks": [RLE, ...]}}}``; a phrase's masks are
  merged into one (e.g. "two people" points at both).
- ``refs`` layout (RefCOCOg_GCG): a list of one-key objects ``{name: {"img_file_name", "caption",
  "refs": [{"sentence", "segmentation": COCO polygons}]}}``; a phrase is its sentence found in the
  caption (case-insensitive); where two phrases overlap the earlier one ends where the next begins.
- ``coco`` layout (flickr_mergedGT): a COCO file whose ``images`` carry the ``caption`` and whose
  ``annotations`` carry ``tokens_positive`` (the first span is the phrase) and ``sam_mask`` (RLE);
  annotations marked ``ignore`` are left out.

Each record becomes one :class:`GroundedCaption`, phrases in caption order: the n-th phrase's
``[SEG]`` is the n-th ``[SEG]`` of the target. What the reader does with bad input (each case a
:class:`Problem`, the record left out):

- not the layout's shape: ``bad_record``; an empty caption: ``empty_conversation``;
- no phrase with a mask: ``no_phrases``;
- a phrase span outside the caption, a span whose text is not the phrase, a phrase without a mask,
  or two overlapping spans in the ``groundings``/``coco`` layouts (they could not each be followed
  by their own ``[SEG]``): ``phrase_mismatch``.

A RefCOCOg sentence that does not occur in its caption is dropped from that record and reported as
``phrase_not_in_caption`` (the record is kept when other phrases remain). Images and the masks'
pixels are checked lazily at curation, as in the other readers.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from perceptio.sources.problems import Problem, decode_image
from perceptio.errors import PerceptioError
from perceptio.sources.jsonfile import load_json, load_json_list

# File name prefix -> (subset name, layout). The dataset of a shard is ``grandf-<subset>``.
SUBSETS: dict[str, tuple[str, str]] = {
    "GranDf_HA_GCG": ("ha", "groundings"),
    "OpenPsgGCG": ("psg", "groundings"),
    "RefCOCOg_GCG": ("refcocog", "refs"),
    "flickr_mergedGT_GCG": ("flickr", "coco"),
}
FILE_NAME = re.compile(r"^(?P<prefix>.+?)_(?P<split>train|val|test)\.json$")


@dataclass(frozen=True)
class Phrase:
    text: str  # caption[start:end]
    start: int
    end: int
    segmentation: Any  # COCO segmentation (polygons, an RLE or a list of RLEs): the phrase's masks, merged


@dataclass(frozen=True)
class GroundedCaption:
    """One record: its position in the file (a unique integer id), the image, the caption, its phrases."""

    index: int
    id: str
    file_name: str  # relative to the images folder
    caption: str
    phrases: tuple[Phrase, ...]  # in caption order, not overlapping
    width: int | None = None  # as the annotation states it (coco layout only)
    height: int | None = None


def identify(json_path: Path) -> tuple[str, str, str]:
    """(subset, layout, split) of a GranD-f file from its distributed name."""
    match = FILE_NAME.match(json_path.name)
    if match is None or match["prefix"] not in SUBSETS:
        names = ", ".join(f"{prefix}_{{train,val}}.json" for prefix in SUBSETS)
        raise PerceptioError(f"{json_path.name} is not a GranD-f GCG file name; expected one of {names}")
    subset, layout = SUBSETS[match["prefix"]]
    return subset, layout, match["split"]


def _checked(index: int, record_id: str, file_name: Any, caption: Any, phrases: list[Phrase],
             size: tuple[int, int] | None = None, overlap_allowed: bool = False) -> GroundedCaption | Problem:
    """The checks every layout shares (see the module docstring)."""
    if not isinstance(file_name, str) or not file_name:
        return Problem("bad_record", record_id, "no image file name")
    if not isinstance(caption, str) or not caption.strip():
        return Problem("empty_conversation", record_id, "empty caption")
    if not phrases:
        return Problem("no_phrases", record_id, "no phrase is tied to a mask")
    for phrase in phrases:
        if not 0 <= phrase.start < phrase.end <= len(caption):
            return Problem("phrase_mismatch", record_id, f"span [{phrase.start}, {phrase.end}) of {phrase.text!r} "
                           f"is outside the {len(caption)}-character caption")
        if caption[phrase.start:phrase.end].strip().lower() != phrase.text.strip().lower():
            return Problem("phrase_mismatch", record_id, f"span [{phrase.start}, {phrase.end}) reads "
                           f"{caption[phrase.start:phrase.end]!r}, not the phrase {phrase.text!r}")
        if not phrase.segmentation:
            return Problem("phrase_mismatch", record_id, f"phrase {phrase.text!r} has no mask")
    ordered = sorted(phrases, key=lambda phrase: phrase.start)
    for before, after in zip(ordered, ordered[1:]):
        if before.end > after.start and not overlap_allowed:
            return Problem("phrase_mismatch", record_id, f"phrases {before.text!r} and {after.text!r} overlap")
    width, height = size or (None, None)
    return GroundedCaption(index, record_id, file_name, caption, tuple(ordered), width, height)


def _span(value: Any) -> tuple[int, int]:
    """``[start, end]``, or ``[[start, end], ...]`` (then the first span), as integers."""
    if isinstance(value, list) and value and isinstance(value[0], list):
        value = value[0]
    start, end = value
    return int(start), int(end)


def parse_groundings_record(index: int, record: Any) -> GroundedCaption | Problem:
    """A record of GranDf_HA / OpenPsg (``groundings`` layout)."""
    if not isinstance(record, dict) or not isinstance(record.get("groundings"), dict):
        return Problem("bad_record", index, "not an object with a 'groundings' object")
    record_id = str(record.get("file_name", f"#{index}"))
    caption = record.get("caption")
    caption = caption.strip('"').strip() if isinstance(caption, str) else caption
    phrases = []
    for text, grounding in record["groundings"].items():
        try:
            start, end = _span(grounding["token_positives"])
            masks = list(grounding["rle_masks"])
        except (KeyError, TypeError, ValueError) as error:
            return Problem("bad_record", record_id, f"phrase {text!r}: malformed grounding ({type(error).__name__}: {error})")
        phrases.append(Phrase(str(text), start, end, masks))
    return _checked(index, record_id, record.get("file_name"), caption, phrases)


def parse_refs_record(index: int, record: Any, problems: list[Problem]) -> GroundedCaption | Problem:
    """A record of RefCOCOg_GCG (``refs`` layout); sentences not in the caption go to ``problems``."""
    if isinstance(record, dict) and len(record) == 1 and "caption" not in record:
        record = next(iter(record.values()))
    if not isinstance(record, dict) or not isinstance(record.get("refs"), list):
        return Problem("bad_record", index, "not an object with a 'refs' list")
    record_id = str(record.get("img_file_name", f"#{index}"))
    caption = record.get("caption")
    if not isinstance(caption, str):
        return Problem("empty_conversation", record_id, "no caption")
    caption = caption.strip('"').strip()
    lowered = caption.lower()
    found = []
    for ref in record["refs"]:
        sentence = str(ref.get("sentence", "")) if isinstance(ref, dict) else ""
        start = lowered.find(sentence.lower()) if sentence else -1
        if start < 0 or len(lowered) != len(caption):
            problems.append(Problem("phrase_not_in_caption", record_id, f"{sentence!r} does not occur in the caption"))
            continue
        found.append(Phrase(caption[start:start + len(sentence)], start, start + len(sentence), ref.get("segmentation")))
    found.sort(key=lambda phrase: phrase.start)
    phrases = []
    for position, phrase in enumerate(found):
        following = found[position + 1].start if position + 1 < len(found) else len(caption)
        if phrase.end > following:  # overlapping sentences: the earlier ends where the next begins
            end = phrase.start + len(caption[phrase.start:following].rstrip())
            if end <= phrase.start:
                problems.append(Problem("phrase_not_in_caption", record_id, f"{phrase.text!r} is covered by the next phrase"))
                continue
            phrase = Phrase(caption[phrase.start:end], phrase.start, end, phrase.segmentation)
        phrases.append(phrase)
    return _checked(index, record_id, record.get("img_file_name"), caption, phrases)


def parse_coco_file(data: Any, path: Path) -> tuple[list[GroundedCaption], list[Problem]]:
    """The records of flickr_mergedGT (``coco`` layout): one per image, one phrase per annotation span."""
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not isinstance(data.get("annotations"), list):
        raise PerceptioError(f"{path} is not a COCO file (no images/annotations lists)")
    by_image: dict[Any, dict[tuple[int, int], list[Any]]] = {}
    for ann in data["annotations"]:
        if not isinstance(ann, dict) or ann.get("ignore"):
            continue
        try:
            span = _span(ann["tokens_positive"])
        except (KeyError, TypeError, ValueError):
            span = (-1, -1)  # reported with its record below, as a span outside the caption
        by_image.setdefault(ann.get("image_id"), {}).setdefault(span, []).append(ann.get("sam_mask"))
    captions, problems = [], []
    for index, image in enumerate(data["images"]):
        if not isinstance(image, dict):
            problems.append(Problem("bad_record", index, "an image entry that is not an object"))
            continue
        caption = image.get("caption")
        spans = by_image.get(image.get("id"), {})
        phrases = [
            Phrase(caption[start:end] if isinstance(caption, str) and start >= 0 else "", start, end,
                   [mask for mask in masks if mask])
            for (start, end), masks in sorted(spans.items())
        ]
        try:
            size = (int(image["width"]), int(image["height"]))
        except (KeyError, TypeError, ValueError):
            size = None
        parsed = _checked(index, str(image.get("file_name", f"#{index}")), image.get("file_name"), caption, phrases, size)
        (problems if isinstance(parsed, Problem) else captions).append(parsed)
    return captions, problems


class GrandfDataset:
    """The checked records of one GranD-f GCG file.

    >>> data = GrandfDataset("GranDf/annotations/train/GranDf_HA_GCG_train.json", "GranDf_HA_images/train")  # doctest: +SKIP
    >>> data.name, data.split                                                                        # doctest: +SKIP
    ('grandf-ha', 'train')
    """

    def __init__(self, json_path: str | os.PathLike[str], images: str | os.PathLike[str], split: str | None = None):
        self.json_path = Path(json_path)
        self.images = Path(images)
        subset, layout, file_split = identify(self.json_path)
        self.name = f"grandf-{subset}"
        self.split = split or file_split
        if not self.images.is_dir():
            raise PerceptioError(f"image folder {self.images} not found")
        self.problems: list[Problem] = []
        self.captions: list[GroundedCaption] = []
        if layout == "coco":
            data = load_json(self.json_path, "GranD-f annotation file")
            self.captions, self.problems = parse_coco_file(data, self.json_path)
            return
        for index, record in enumerate(load_json_list(self.json_path, "GranD-f annotation file")):
            if layout == "groundings":
                parsed = parse_groundings_record(index, record)
            else:
                parsed = parse_refs_record(index, record, self.problems)
            (self.problems if isinstance(parsed, Problem) else self.captions).append(parsed)

    def image_path(self, caption: GroundedCaption) -> Path:
        return self.images / caption.file_name

    def load_image(self, caption: GroundedCaption) -> Image.Image:
        """The decoded image; raises :class:`BadImage` when it is missing, corrupt or of another size."""
        size = (caption.width, caption.height) if caption.width and caption.height else None
        return decode_image(self.image_path(caption), caption.id, size)
