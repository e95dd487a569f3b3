"""Read RefCOCO, RefCOCO+ and RefCOCOg exactly as the REFER toolkit distributes them (Python 3).

Layout under ``data_root`` (as ``lichengunc/refer`` expects it)::

    refcoco/instances.json  refcoco/refs(unc).p  refcoco/refs(google).p
    refcoco+/instances.json refcoco+/refs(unc).p
    refcocog/instances.json refcocog/refs(umd).p refcocog/refs(google).p
    images/mscoco/images/train2014/COCO_train2014_{image_id:012d}.jpg
    (or the folder recorded in perceptio-data.json by ``perceptio-curate download --images-dir``)

``instances.json`` is COCO (``images``, ``annotations``, ``categories``); ``refs(<split_by>).p`` is a
Python 2 pickle of a list of refs, loaded here with a restricted unpickler (safe_pickle.py).

What the reader does with bad input (each case becomes a :class:`Problem` in ``.problems``):

- a ref whose annotation or image is not in instances.json, or whose annotation belongs to another
  image, or that lacks fields: the ref is dropped (nothing could be drawn for it);
- an annotation pointing at an image that is not in instances.json: the annotation is dropped;
- an empty or entirely degenerate / malformed segmentation: the annotation's refs are dropped;
  degenerate parts beside usable ones are skipped and reported, the ref is kept;
- an image file that is missing: the ref is *kept* and the problem recorded, so that counts
  describe the annotation files; :meth:`ReferDataset.load_image` then raises
  :class:`~perceptio.sources.problems.BadImage` for it, as for a truncated or corrupt JPEG.
  Curation calls ``load_image`` once per image and skips (and records) the images that raise.

A missing ``data_root``, annotation file or image folder, or an unreadable annotation file, is a
:class:`~perceptio.errors.PerceptioError`. ``data_root`` may be an object-store URL
(``s3://bucket/refer``): every file is then read through :mod:`perceptio.fs`.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from perceptio import fs
from perceptio.errors import PerceptioError
from perceptio.recipes import load_recipe
from perceptio.sources.data_root import coco_image_dir
from perceptio.sources.jsonfile import load_json
from perceptio.sources.masks import parse_segmentation, segmentation_to_mask
from perceptio.sources.problems import BadImage, Problem, decode_image, percent_text
from perceptio.sources.safe_pickle import load_plain_pickle

# The five (dataset, split_by) pairs that the REFER data provides.
SPLIT_BYS = {"refcoco": ("unc", "google"), "refcoco+": ("unc",), "refcocog": ("umd", "google")}
# Official split order; any other split found in a file is listed after these, alphabetically.
SPLIT_ORDER = ("train", "val", "test", "testA", "testB", "testC")
COUNTS_RECIPE = "refer_counts.json"
REF_KEYS = ("ref_id", "ann_id", "image_id", "category_id", "split", "sentences")


@dataclass(frozen=True)
class Sentence:
    sent_id: int
    raw: str
    sent: str
    tokens: list[str]


@dataclass(frozen=True)
class Ref:
    """One referred object with its expressions.

    ``file_name`` is the image's file name from instances.json. The refs pickles carry
    ``COCO_train2014_{image_id:012d}_{ann_id}.jpg``, which names no file, so it is not kept.
    """

    ref_id: int
    ann_id: int
    image_id: int
    category_id: int
    split: str
    file_name: str
    sentences: list[Sentence]


@dataclass(frozen=True)
class ImageInfo:
    image_id: int
    file_name: str
    width: int
    height: int


def coco_train2014_name(image_id: int) -> str:
    return f"COCO_train2014_{image_id:012d}.jpg"


def _sentence(raw: dict[str, Any]) -> Sentence:
    sent = str(raw.get("sent", ""))
    return Sentence(int(raw["sent_id"]), str(raw.get("raw", sent)), sent, [str(token) for token in raw.get("tokens", [])])


class ReferDataset:
    """One (dataset, split_by) pair of the REFER data, indexed and checked.

    >>> refer = ReferDataset("data", "refcoco", "unc")      # doctest: +SKIP
    >>> ref = refer.refs_in_split("val")[0]                 # doctest: +SKIP
    >>> mask = refer.ann_mask(ref.ann_id)                   # uint8 (H, W), 0/1  # doctest: +SKIP
    """

    def __init__(self, data_root: str | os.PathLike[str], dataset: str = "refcoco", split_by: str = "unc"):
        if dataset not in SPLIT_BYS:
            raise PerceptioError(f"unknown REFER dataset {dataset!r}; expected one of {', '.join(SPLIT_BYS)}")
        if split_by not in SPLIT_BYS[dataset]:
            raise PerceptioError(
                f"{dataset} has no {split_by!r} split; it has {' and '.join(SPLIT_BYS[dataset])}"
            )
        self.data_root = fs.as_location(data_root)
        if not fs.is_dir(self.data_root):
            raise PerceptioError(f"REFER data root {self.data_root} not found")
        self.dataset = dataset
        self.split_by = split_by
        self.name = f"{dataset}-{split_by}"
        self.image_dir = coco_image_dir(self.data_root)
        if not fs.is_dir(self.image_dir):
            raise PerceptioError(
                f"image folder {self.image_dir} not found (COCO train2014: perceptio-curate download coco2014, or --images-dir)"
            )
        self.problems: list[Problem] = []
        self._unusable_annotations: set[int] = set()

        instances_path = fs.child(self.data_root, dataset, "instances.json")
        instances = load_json(instances_path, "annotation file")
        refs_path = fs.child(self.data_root, dataset, f"refs({split_by}).p")
        raw_refs = load_plain_pickle(refs_path)
        if not isinstance(instances, dict) or not all(key in instances for key in ("images", "annotations")):
            raise PerceptioError(f"{instances_path} is not a COCO file (no images/annotations)")
        if not isinstance(raw_refs, list):
            raise PerceptioError(f"{refs_path} holds a {type(raw_refs).__name__}, not a list of refs")

        try:
            self.images = self._index_images(instances["images"])
            self.categories = {int(cat["id"]): str(cat["name"]) for cat in instances.get("categories", [])}
            self.annotations = self._index_annotations(instances["annotations"])
        except (KeyError, TypeError, ValueError) as error:
            raise PerceptioError(f"{instances_path}: malformed COCO entry ({type(error).__name__}: {error})") from error
        self.refs = self._index_refs(raw_refs)
        self._report_missing_images()
        present = {ref.split for ref in self.refs}
        self.splits = [split for split in SPLIT_ORDER if split in present] + sorted(present - set(SPLIT_ORDER))

    # -- loading -------------------------------------------------------------------------------

    def _report(self, kind: str, item_id: int | str, reason: str, split: Any = None) -> None:
        self.problems.append(Problem(kind, item_id, reason, str(split) if split is not None else None))

    def _index_images(self, images: list[dict[str, Any]]) -> dict[int, ImageInfo]:
        indexed = {}
        for image in images:
            image_id = int(image["id"])
            file_name = image.get("file_name") or coco_train2014_name(image_id)
            indexed[image_id] = ImageInfo(image_id, file_name, int(image["width"]), int(image["height"]))
        return indexed

    def _index_annotations(self, annotations: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
        indexed = {}
        for ann in annotations:
            ann_id = int(ann["id"])
            image = self.images.get(int(ann.get("image_id", -1)))
            if image is None:
                self._report("unknown_image", ann_id, f"on image {ann.get('image_id')}, not in instances.json; dropped")
                continue
            parsed = parse_segmentation(ann.get("segmentation"), image.height, image.width)
            self.problems.extend(Problem(issue.kind, ann_id, issue.detail) for issue in parsed.issues)
            if parsed.usable:
                indexed[ann_id] = ann
            else:
                self._unusable_annotations.add(ann_id)
        return indexed

    def _index_refs(self, raw_refs: list[Any]) -> list[Ref]:
        refs = []
        for position, raw in enumerate(raw_refs):
            ref = self._make_ref(position, raw)
            if ref is not None:
                refs.append(ref)
        return refs

    def _make_ref(self, position: int, raw: Any) -> Ref | None:
        if not isinstance(raw, dict) or any(key not in raw for key in REF_KEYS):
            missing = [key for key in REF_KEYS if not isinstance(raw, dict) or key not in raw]
            ref_id = raw.get("ref_id", f"#{position}") if isinstance(raw, dict) else f"#{position}"
            split = raw.get("split") if isinstance(raw, dict) else None
            self._report("bad_ref", ref_id, f"ref lacks {', '.join(missing)}; dropped", split)
            return None
        try:
            return self._checked_ref(raw)
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            self._report("bad_ref", raw["ref_id"], f"malformed ref ({type(error).__name__}: {error}); dropped", raw["split"])
            return None

    def _checked_ref(self, raw: dict[str, Any]) -> Ref | None:
        ref_id, ann_id, image_id = int(raw["ref_id"]), int(raw["ann_id"]), int(raw["image_id"])
        split = raw["split"]
        ann = self.annotations.get(ann_id)
        if ann is None:
            if ann_id in self._unusable_annotations:
                self._report("unusable_annotation", ref_id, f"annotation {ann_id} has nothing to draw; ref dropped", split)
            else:
                self._report("unknown_annotation", ref_id, f"annotation {ann_id} is not in instances.json; ref dropped", split)
            return None
        if image_id not in self.images:
            self._report("unknown_image", ref_id, f"image {image_id} is not in instances.json; ref dropped", split)
            return None
        if int(ann["image_id"]) != image_id:
            why = f"annotation {ann_id} is on image {ann['image_id']}, the ref says {image_id}; ref dropped"
            self._report("image_mismatch", ref_id, why, split)
            return None
        sentences = [_sentence(sentence) for sentence in raw["sentences"]]
        file_name = self.images[image_id].file_name
        return Ref(ref_id, ann_id, image_id, int(raw["category_id"]), str(split), file_name, sentences)

    def _report_missing_images(self) -> None:
        # One directory listing instead of a stat per image: train2014 holds ~83k files.
        present = set(fs.list_dir(self.image_dir))
        referred = sorted({ref.image_id for ref in self.refs})
        for image_id in referred:
            file_name = self.images[image_id].file_name
            if file_name not in present:
                self._report("missing_image", image_id, f"{fs.child(self.image_dir, file_name)} does not exist; refs kept")

    # -- access --------------------------------------------------------------------------------

    def refs_in_split(self, split: str) -> list[Ref]:
        if split not in self.splits:
            raise PerceptioError(f"{self.name} has no split {split!r}; it has {', '.join(self.splits)}")
        return [ref for ref in self.refs if ref.split == split]

    def image_path(self, image_id: int) -> Path | str:
        """The image's location: a Path under a local data root, a URL under a remote one."""
        return fs.child(self.image_dir, self.images[image_id].file_name)

    def load_image(self, image_id: int) -> Image.Image:
        """The decoded image; raises :class:`BadImage` (missing, truncated, corrupt, wrong size)."""
        info = self.images[image_id]
        return decode_image(self.image_path(image_id), image_id, (info.width, info.height))

    def check_image(self, image_id: int) -> Problem | None:
        """The problem that :meth:`load_image` would raise, or None when the image is good."""
        try:
            self.load_image(image_id)
        except BadImage as bad:
            return bad.problem
        return None

    def ann_mask(self, ann_id: int) -> np.ndarray:
        """uint8 (H, W) mask with values 0/1: polygon parts united, RLE decoded, degenerate parts skipped."""
        ann = self.annotations[ann_id]
        image = self.images[int(ann["image_id"])]
        return segmentation_to_mask(ann["segmentation"], image.height, image.width)

    # -- counts --------------------------------------------------------------------------------

    def counts(self) -> dict[str, dict[str, int]]:
        """Per split: refs, sentences and distinct images, over the refs that were kept."""
        refs, sentences = Counter(), Counter()
        images: dict[str, set[int]] = {split: set() for split in self.splits}
        for ref in self.refs:
            refs[ref.split] += 1
            sentences[ref.split] += len(ref.sentences)
            images[ref.split].add(ref.image_id)
        return {
            split: {"refs": refs[split], "sentences": sentences[split], "images": len(images[split])}
            for split in self.splits
        }

    def count_warnings(self) -> list[str]:
        """Differences from the published counts (manifests/refer_counts.json), one line each, with numbers.

        A warning, not an error: a partial copy (or the small synthetic world) is still usable.
        """
        published = load_recipe(COUNTS_RECIPE)["datasets"].get(self.name, {})
        ours = self.counts()
        warnings = []
        for split, expected in published.items():
            if split not in ours:
                warnings.append(f"{self.name} {split}: split missing (published: {expected['refs']:,} refs)")
                continue
            for what, want in expected.items():
                have = ours[split][what]
                if want is not None and have != want:
                    warnings.append(f"{self.name} {split}: {have:,} of {want:,} {what} ({percent_text(have, want)})")
        warnings += [
            f"{self.name} {split}: split is not in the published counts ({ours[split]['refs']:,} refs)"
            for split in ours
            if split not in published
        ]
        return warnings
