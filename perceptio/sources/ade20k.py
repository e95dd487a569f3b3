"""Read ADE20k scene parsing in the ADEChallengeData2016 layout (SceneParsing, 150 classes).

Layout (``root`` is the ADEChallengeData2016 folder, or any folder that contains it)::

    images/{training,validation}/ADE_{train,val}_{n:08d}.jpg
    annotations/{training,validation}/ADE_{train,val}_{n:08d}.png   # uint8, 0 = other, 1..150
    objectInfo150.csv   # Idx,Ratio,Train,Val,Stuff,Name; Name = ';'-separated synonyms

Images and annotations are paired by file stem. An image without an annotation, an annotation
without an image, or a file name without a trailing number becomes a :class:`Problem` and the
sample is left out. Pixels are checked lazily: :meth:`ADE20kDataset.load_segmentation` and
:meth:`ADE20kDataset.load_image` raise :class:`~perceptio.sources.problems.BadImage` for a missing,
corrupt or mismatched file (curation calls them once per sample and records what they raise).
A missing root, class table or split folder is a :class:`~perceptio.errors.PerceptioError`.

``root`` may be an object-store URL (``s3://bucket/ADEChallengeData2016``), read through
:mod:`perceptio.fs`. Looking for ``ADEChallengeData2016/`` inside it needs a store that lists
prefixes as folders; where that finds nothing, the error asks for the dataset folder itself.
"""

from __future__ import annotations

import csv
import io
import os
import posixpath
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from perceptio import fs
from perceptio.errors import PerceptioError
from perceptio.recipes import load_recipe
from perceptio.sources.problems import BadImage, Problem, decode_image, percent_text

FOLDER_NAME = "ADEChallengeData2016"
CLASS_TABLE = "objectInfo150.csv"
SPLITS = ("training", "validation")
SPLIT_ALIASES = {"train": "training", "val": "validation"}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_TRAILING_NUMBER = re.compile(r"(\d+)$")


@dataclass(frozen=True)
class AdeClass:
    idx: int  # 1..N; 0 is "other" and has no row
    name: str  # the first synonym
    synonyms: list[str]
    stuff: bool = False  # the table's Stuff column: wall, floor, sky, ... (regions, not objects)


@dataclass(frozen=True)
class AdeSample:
    image_id: int  # the number at the end of the file stem (unique within a split)
    split: str
    name: str  # file stem, e.g. "ADE_val_00000001"
    image_path: Path | str  # a URL under a remote root
    annotation_path: Path | str


def resolve_root(root: str | os.PathLike[str]) -> Path | str:
    """The folder holding images/ and annotations/: ``root`` itself or ``root/ADEChallengeData2016``."""
    root = fs.as_location(root)
    if not fs.is_dir(root):
        raise PerceptioError(f"ADE20k root {root} not found")
    for candidate in (fs.child(root, FOLDER_NAME), root):
        if fs.is_dir(fs.child(candidate, "images")) and fs.is_dir(fs.child(candidate, "annotations")):
            return candidate
    if fs.is_remote(root):
        raise PerceptioError(f"{root} holds neither images/ and annotations/ nor {FOLDER_NAME}/ as this store lists "
                             f"it; give --data-root as the dataset folder itself (.../{FOLDER_NAME})")
    raise PerceptioError(f"{root} holds neither images/ and annotations/ nor {FOLDER_NAME}/")


def read_class_table(path: Path | str) -> list[AdeClass]:
    """Parse objectInfo150.csv; the classes must be numbered 1..N without gaps."""
    if not fs.is_file(path):
        raise PerceptioError(f"class table {path} not found")
    try:
        with fs.open_input(path) as raw, io.TextIOWrapper(raw, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
        classes = []
        for row in rows:
            synonyms = [name.strip() for name in row["Name"].split(";") if name.strip()]
            classes.append(AdeClass(int(row["Idx"]), synonyms[0], synonyms, row.get("Stuff", "0").strip() == "1"))
    except (KeyError, ValueError, IndexError, TypeError) as error:
        raise PerceptioError(f"{path} is not an Idx,...,Name class table ({type(error).__name__}: {error})") from error
    if [ade_class.idx for ade_class in classes] != list(range(1, len(classes) + 1)):
        raise PerceptioError(f"{path}: class indices are not 1..{len(classes)} in order")
    return classes


def _files_by_stem(folder: Path | str, suffixes: tuple[str, ...]) -> dict[str, Path | str]:
    """The files of ``folder`` with one of ``suffixes`` (any case), by file stem."""
    files = {}
    for name in fs.list_dir(folder):
        stem, suffix = posixpath.splitext(name)
        if suffix.lower() in suffixes:
            files[stem] = fs.child(folder, name)
    return files


class ADE20kDataset:
    """The ADEChallengeData2016 samples of each split present, with the class table."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = resolve_root(root)
        self.classes = read_class_table(fs.child(self.root, CLASS_TABLE))
        self.splits = [split for split in SPLITS if fs.is_dir(fs.child(self.root, "images", split))]
        self.problems: list[Problem] = []
        self._samples: dict[str, list[AdeSample]] = {}

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def samples(self, split: str) -> list[AdeSample]:
        """The paired samples of ``split`` ("training"/"validation", or "train"/"val"), by file name."""
        split = SPLIT_ALIASES.get(split, split)
        if split not in self._samples:
            self._samples[split] = self._pair(split)
        return self._samples[split]

    def _pair(self, split: str) -> list[AdeSample]:
        image_dir, annotation_dir = fs.child(self.root, "images", split), fs.child(self.root, "annotations", split)
        if split not in self.splits:
            raise PerceptioError(f"{image_dir} not found; splits present: {', '.join(self.splits) or 'none'}")
        if not fs.is_dir(annotation_dir):
            raise PerceptioError(f"{annotation_dir} not found (annotations for the {split} images)")
        images = _files_by_stem(image_dir, IMAGE_SUFFIXES)
        annotations = _files_by_stem(annotation_dir, (".png",))
        for stem in sorted(annotations.keys() - images.keys()):
            self.problems.append(Problem("unknown_image", stem, f"{annotations[stem]} has no image in {image_dir}"))
        samples = []
        for stem in sorted(images):
            if stem not in annotations:
                reason = f"{images[stem]} has no annotation in {annotation_dir}"
                self.problems.append(Problem("missing_annotation", stem, reason))
                continue
            number = _TRAILING_NUMBER.search(stem)
            if number is None:
                self.problems.append(Problem("bad_name", stem, "file name does not end in an image number"))
                continue
            samples.append(AdeSample(int(number.group(1)), split, stem, images[stem], annotations[stem]))
        return samples

    def load_image(self, sample: AdeSample) -> Image.Image:
        """The decoded RGB image; raises :class:`BadImage` when it is missing or corrupt."""
        return decode_image(sample.image_path, sample.name)

    def load_segmentation(self, sample: AdeSample) -> np.ndarray:
        """uint8 (H, W) class map, 0 = other, 1..N; raises :class:`BadImage` for a bad label map.

        Checked: it decodes, it is single-channel 8-bit, its size equals the image's (read from the
        image header only) and no value exceeds the number of classes.
        """
        label_map = decode_image(sample.annotation_path, sample.name)
        if label_map.mode not in ("L", "P"):
            reason = f"{sample.annotation_path} is {label_map.mode}, not 8-bit"
            raise BadImage(Problem("corrupt_annotation", sample.name, reason))
        segmentation = np.asarray(label_map, dtype=np.uint8)
        try:  # a seekable handle: PIL reads the header only (a few range reads on an object store)
            with fs.open_input(sample.image_path) as handle, Image.open(handle) as image:
                image_size = image.size
        except (OSError, ValueError) as error:
            raise BadImage(Problem("corrupt_image", sample.name, f"{sample.image_path}: {error}")) from error
        if label_map.size != image_size:
            raise BadImage(
                Problem(
                    "size_mismatch",
                    sample.name,
                    f"annotation is {label_map.width}x{label_map.height}, image is {image_size[0]}x{image_size[1]}",
                )
            )
        if segmentation.size and int(segmentation.max()) > self.num_classes:
            reason = f"class index {int(segmentation.max())} > {self.num_classes}"
            raise BadImage(Problem("corrupt_annotation", sample.name, reason))
        return segmentation

    def count_warnings(self) -> list[str]:
        """Split sizes that differ from the published ones (manifests/ade20k.json); a warning only."""
        published = load_recipe("ade20k.json")["splits"]
        warnings = []
        for split, want in published.items():
            have = len(self.samples(split)) if split in self.splits else 0
            if have != want:
                warnings.append(f"ade20k {split}: {have:,} of {want:,} images ({percent_text(have, want)})")
        return warnings
