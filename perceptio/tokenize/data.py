"""What the tokenizer is fitted on: the images of a dataset, a fixed held-out split, their depth.

Images come from the project's readers (``ReferDataset`` train refs, ``ADE20kDataset`` training
samples) or, for ``synth``, from every image of the synthetic world that has ground-truth depth.
The data root may be an object-store URL (:mod:`perceptio.fs`): images are then locations (URLs)
rather than Paths, read through fsspec.
The held-out split is decided by a hash of each image's file stem, so it does not depend on the
order of the files or on which other images exist, and stays put as a dataset grows.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from perceptio import fs
from perceptio.errors import PerceptioError
from perceptio.sources.ade20k import ADE20kDataset
from perceptio.sources.masks import segment_masks
from perceptio.sources.refer import ReferDataset
from perceptio.tokenize.cache import DepthCache, content_hash
from perceptio.tokenize.teacher import DepthTeacher, OracleTeacher

# The split_by each REFER dataset's training images are read with (the splits the paper trains on).
REFER_SPLIT_BY = {"refcoco": "unc", "refcoco+": "unc", "refcocog": "umd"}
FIT_DATASETS = (*REFER_SPLIT_BY, "ade20k", "synth")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def list_images(data_root: str | os.PathLike[str], dataset: str) -> list[Path | str]:
    """The distinct training images of ``dataset`` under ``data_root``, sorted by path."""
    root = fs.as_location(data_root)
    if not fs.is_dir(root):
        raise PerceptioError(f"{root}: no such data root")
    if dataset in REFER_SPLIT_BY:
        refer = ReferDataset(root, dataset, REFER_SPLIT_BY[dataset])
        image_ids = {ref.image_id for ref in refer.refs_in_split("train")}
        paths = [refer.image_path(image_id) for image_id in image_ids]
    elif dataset == "ade20k":
        paths = [sample.image_path for sample in ADE20kDataset(root).samples("training")]
    elif dataset == "synth":
        paths = synth_images(root)
    else:
        raise PerceptioError(f"unknown dataset {dataset!r}; expected one of {', '.join(FIT_DATASETS)}")
    paths = sorted(set(paths), key=path_order)
    if not paths:
        raise PerceptioError(f"{root}: no {dataset} images found")
    return paths


def path_order(path: Path | str) -> list[str]:
    """Sort key of image locations: component by component, as ``Path`` sorts, so that a URL list and
    the local list of the same files come out in the same order (plain string order would not:
    ``a-b/x`` < ``a/x``)."""
    return str(path).split("/")


def synth_images(root: Path | str) -> list[Path | str]:
    """Every image of a synthetic world (COCO-style and ADE-style alike) that has ``depth/{stem}.png``."""
    depth_dir = fs.child(root, "depth")
    if not fs.is_dir(depth_dir):
        raise PerceptioError(f"{root}: not a synthetic world (no depth/ folder)")
    depths = set(fs.list_names(depth_dir))  # one listing instead of a lookup per image
    candidates = [*fs.find_files(fs.child(root, "images")), *fs.find_files(fs.child(root, "ADEChallengeData2016", "images"))]
    return [
        path
        for path in candidates
        if os.path.splitext(fs.name(path))[1].lower() in IMAGE_SUFFIXES and f"{fs.stem(path)}.png" in depths
    ]


def is_held_out(path: Path | str, fraction: float) -> bool:
    bucket = int(hashlib.sha256(fs.stem(path).encode()).hexdigest()[:8], 16) / 0x1_0000_0000
    return bucket < fraction


def split_held_out(paths: Sequence[Path | str], fraction: float) -> tuple[list[Path | str], list[Path | str]]:
    """(train, held_out) by stem hash; with two or more images, neither side is left empty."""
    held_out = [path for path in paths if is_held_out(path, fraction)]
    train = [path for path in paths if not is_held_out(path, fraction)]
    if len(paths) >= 2 and fraction > 0 and not held_out:
        held_out, train = train[-1:], train[:-1]
    if len(paths) >= 2 and not train:
        train, held_out = held_out[:1], held_out[1:]
    return train, held_out


class DepthSource:
    """Inverse depth for image files: the oracle reads it, a model teacher goes through the cache.

    The one rule for both the tokenizer's fit and curation: the oracle skips the cache (reading its
    PNG costs no more than reading a cache entry), a model teacher uses it when there is one.
    """

    def __init__(self, teacher: DepthTeacher | OracleTeacher, cache: DepthCache | None) -> None:
        self.teacher = teacher
        self.cache = cache

    def depths(
        self,
        paths: Sequence[str | os.PathLike[str]],
        images: Sequence[Image.Image] | None = None,
        hashes: Sequence[str] | None = None,
    ) -> list[np.ndarray]:
        """Depth of the images at ``paths``. A caller that has already decoded them passes ``images``
        (RGB, checked against the oracle's sizes) and the sha256 ``hashes`` of their file bytes, so
        that nothing is read twice."""
        if isinstance(self.teacher, OracleTeacher):
            sizes = [image.size for image in images] if images is not None else None
            return self.teacher.predict_paths(paths, sizes)
        if images is None:
            images, hashes = self._open(paths)
        if self.cache is None:
            return self.teacher.predict([image.convert("RGB") for image in images])
        if hashes is None:
            raise ValueError("decoded images need their file hashes to use the depth cache")
        return self.cache.predict(self.teacher, images, hashes)

    @staticmethod
    def _open(paths: Sequence[str | os.PathLike[str]]) -> tuple[list[Image.Image], list[str]]:
        images, hashes = [], []
        for path in paths:
            try:
                data = fs.read_bytes(path)
                hashes.append(content_hash(data))
                images.append(Image.open(io.BytesIO(data)))  # lazy: only cache misses decode pixels
            except OSError as error:
                raise PerceptioError(f"{path}: unreadable image ({error})") from error
        return images, hashes


class MaskSource:
    """The object masks of a dataset's images, for the object-pair order metric.

    - synth: one mask per instance of ``instances/{stem}.png`` (the world's exact objects);
    - ade20k: the connected parts of every thing class of the image's class map (no wall, floor,
      sky or other "stuff"; ADE20k's scene-parsing maps have no instances);
    - refcoco/+/g: the masks of the annotations the dataset's refs name in that image.
    """

    def __init__(self, data_root: str | os.PathLike[str], dataset: str) -> None:
        self.root, self.dataset = Path(data_root), dataset
        self._by_image: dict[Path, list[int]] = {}
        self._stuff: frozenset[int] = frozenset()
        if dataset in REFER_SPLIT_BY:
            self._refer = ReferDataset(self.root, dataset, REFER_SPLIT_BY[dataset])
            for ref in self._refer.refs:
                anns = self._by_image.setdefault(self._refer.image_path(ref.image_id), [])
                if ref.ann_id not in anns:
                    anns.append(ref.ann_id)
        elif dataset == "ade20k":
            self._stuff = frozenset(ade_class.idx for ade_class in ADE20kDataset(self.root).classes if ade_class.stuff)
        elif dataset != "synth":
            raise PerceptioError(f"unknown dataset {dataset!r}; expected one of {', '.join(FIT_DATASETS)}")

    @property
    def available(self) -> bool:
        """False for a depth-only folder posing as a synthetic world (no ``instances/``)."""
        return self.dataset != "synth" or (self.root / "instances").is_dir()

    def masks(self, path: Path) -> list[np.ndarray]:
        """Boolean (H, W) masks of the objects in the image at ``path`` (empty when it has none)."""
        if self.dataset == "synth":
            instances = np.asarray(Image.open(self.root / "instances" / f"{path.stem}.png"))
            return [instances == value for value in np.unique(instances) if value != 0]
        if self.dataset == "ade20k":
            annotation = path.parents[2] / "annotations" / path.parent.name / f"{path.stem}.png"
            return segment_masks(np.asarray(Image.open(annotation)), self._stuff)
        return [self._refer.ann_mask(ann_id).astype(bool) for ann_id in self._by_image.get(Path(path), [])]
