"""Which images of which split go into which shard, and in which model batches they are processed.

The plan is a pure function of the dataset and of ``--samples-per-shard`` / ``--batch-size``: images
are sorted by id within each official split (splits never share a shard), cut into shards, and
each shard into model batches. Batches never cross a shard boundary, so the depth teacher sees
exactly the same batches whether a shard is curated in a full run or redone alone after a kill;
that is what makes a resumed run byte-identical to an uninterrupted one (a batched forward pass
pads images to a common size, so an image's depth may depend on its batch companions).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from perceptio import fs
from perceptio.errors import PerceptioError
from perceptio.shards import sample_key, shard_name


@dataclass(frozen=True)
class SentenceItem:
    sent_id: int
    raw: str
    sent: str


@dataclass(frozen=True)
class RefItem:
    """One referring expression set with the COCO annotation it refers to."""

    ref_id: int
    ann_id: int
    category_id: int
    category: str
    bbox: tuple[float, float, float, float]
    segmentation: Any  # COCO polygons or RLE, rasterised by perceptio.sources.masks in a worker
    sentences: tuple[SentenceItem, ...]


@dataclass(frozen=True)
class ImageItem:
    """One image of one dataset split: everything a worker needs, without the dataset reader."""

    dataset: str  # e.g. "refcoco-unc", "ade20k"
    split: str
    image_id: int
    file_name: str
    image_path: str
    width: int | None  # None when the dataset does not state it (ADE20k): taken from the image
    height: int | None
    refs: tuple[RefItem, ...] = ()
    seg_path: str | None = None  # ADE20k class map

    @property
    def key(self) -> str:
        return sample_key(self.dataset, self.split, self.image_id)


@dataclass(frozen=True)
class ShardPlan:
    """One output shard: ``{dataset}-{split}-{index:06d}`` and its images in key order."""

    dataset: str
    split: str
    index: int
    images: tuple[ImageItem, ...]

    @property
    def name(self) -> str:
        return shard_name(self.dataset, self.split, self.index)

    def batches(self, batch_size: int) -> list[tuple[ImageItem, ...]]:
        return [self.images[start : start + batch_size] for start in range(0, len(self.images), batch_size)]


def plan_shards(images_by_split: dict[str, Sequence[ImageItem]], samples_per_shard: int) -> list[ShardPlan]:
    """Shards of every split in the order given, each split's images sorted by image id."""
    if samples_per_shard < 1:
        raise PerceptioError(f"--samples-per-shard must be >= 1, got {samples_per_shard}")
    shards = []
    for split, images in images_by_split.items():
        ordered = sorted(images, key=lambda image: image.image_id)
        ids = [image.image_id for image in ordered]
        if len(set(ids)) != len(ids):
            raise PerceptioError(f"split {split!r} lists an image twice; one sample per image and split is the contract")
        for index, start in enumerate(range(0, len(ordered), samples_per_shard)):
            chunk = tuple(ordered[start : start + samples_per_shard])
            shards.append(ShardPlan(chunk[0].dataset, split, index, chunk))
    return shards


def refer_images(reader: Any, split: str) -> list[ImageItem]:
    """The images of one split of a ``ReferDataset``, each with all of its refs (sorted by ref id)."""
    refs_by_image: dict[int, list[RefItem]] = {}
    for ref in reader.refs_in_split(split):
        ann = reader.annotations[ref.ann_id]
        refs_by_image.setdefault(ref.image_id, []).append(RefItem(
            ref_id=ref.ref_id,
            ann_id=ref.ann_id,
            category_id=ref.category_id,
            category=reader.categories.get(ref.category_id, str(ref.category_id)),
            bbox=tuple(float(value) for value in ann.get("bbox", (0, 0, 0, 0))),
            segmentation=ann["segmentation"],
            sentences=tuple(SentenceItem(s.sent_id, s.raw, s.sent) for s in ref.sentences),
        ))
    images = []
    for image_id, refs in refs_by_image.items():
        info = reader.images[image_id]
        images.append(ImageItem(
            dataset=reader.name,
            split=split,
            image_id=image_id,
            file_name=info.file_name,
            image_path=str(reader.image_path(image_id)),
            width=info.width,
            height=info.height,
            refs=tuple(sorted(refs, key=lambda ref: ref.ref_id)),
        ))
    return images


def ade_images(reader: Any, split: str, dataset: str = "ade20k") -> list[ImageItem]:
    """The images of one split of an ``ADE20kDataset`` with their class maps."""
    return [
        ImageItem(
            dataset=dataset,
            split=split,
            image_id=sample.image_id,
            file_name=fs.name(sample.image_path),
            image_path=str(sample.image_path),
            width=None,
            height=None,
            seg_path=str(sample.annotation_path),
        )
        for sample in reader.samples(split)
    ]
