"""Where each image of the synthetic world goes: COCO or ADE20k, its id, file names and splits.

Every fourth image (index % 4 == 3) goes to the ADE20k layout, the others to the COCO / REFER
layout, so a world of N images has N - N // 4 COCO images and N // 4 ADE20k images (distinct
pictures, as the real datasets are). Splits are assigned by position, in blocks of ten COCO images
(or five ADE images), so that even a small world has every split; they are per image, so no image
is in two splits of one split scheme. Paths follow docs/architecture.md exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePosixPath

COCO_IMAGE_DIR = PurePosixPath("images/mscoco/images/train2014")
ADE_ROOT = PurePosixPath("ADEChallengeData2016")
DEPTH_DIR = PurePosixPath("depth")
INSTANCE_DIR = PurePosixPath("instances")
WORLD_FILE = "world.json"

ADE_EVERY = 4  # every fourth image is an ADE20k image
ADE_VAL_EVERY = 5  # every fifth ADE image is a validation image

# Split of the COCO image at position p (0-based among COCO images), by p % 10, per split scheme.
_SPLIT_CYCLES: dict[str, tuple[str, ...]] = {
    "refcoco-unc": ("train",) * 7 + ("val", "testA", "testB"),
    "refcoco-google": ("train",) * 8 + ("test", "val"),
    "refcoco+-unc": ("train",) * 7 + ("val", "testA", "testB"),
    "refcocog-umd": ("train",) * 8 + ("val", "test"),
    "refcocog-google": ("train",) * 9 + ("val",),
}
# (dataset folder, split_by) pairs written, in the order REFER users know them.
REFER_SETS: tuple[tuple[str, str], ...] = (
    ("refcoco", "unc"),
    ("refcoco", "google"),
    ("refcoco+", "unc"),
    ("refcocog", "umd"),
    ("refcocog", "google"),
)
# The split scheme that decides which objects a test image's refs may name (testA / testB).
TEST_AB_SCHEME = "refcoco-unc"


@dataclass(frozen=True)
class ImagePlan:
    index: int  # position in the world, 0-based
    layout: str  # "coco" or "ade"
    stem: str  # file stem shared by the image, depth/ and instances/
    image_path: PurePosixPath  # relative to DATA_ROOT
    image_id: int | None = None  # COCO only
    coco_position: int | None = None  # COCO only: 0-based position among COCO images
    ade_split: str | None = None  # ADE only: "training" or "validation"
    ade_annotation_path: PurePosixPath | None = None

    def split(self, scheme: str) -> str:
        """The split of this COCO image under ``scheme`` (e.g. "refcoco-unc")."""
        if self.coco_position is None:
            raise ValueError(f"image {self.index} is not a COCO image")
        cycle = _SPLIT_CYCLES[scheme]
        return cycle[self.coco_position % len(cycle)]

    @property
    def depth_path(self) -> PurePosixPath:
        return DEPTH_DIR / f"{self.stem}.png"

    @property
    def instance_path(self) -> PurePosixPath:
        return INSTANCE_DIR / f"{self.stem}.png"


def coco_ann_id(image_id: int, instance: int) -> int:
    """Annotation ids are derived from the image, so an image can be rebuilt alone."""
    return image_id * 100 + instance


def plan_image(index: int) -> ImagePlan:
    if index % ADE_EVERY == ADE_EVERY - 1:
        ade_position = index // ADE_EVERY
        if ade_position % ADE_VAL_EVERY == ADE_VAL_EVERY - 1:
            split, prefix, number = "validation", "ADE_val", ade_position // ADE_VAL_EVERY + 1
        else:
            split, prefix, number = "training", "ADE_train", ade_position - ade_position // ADE_VAL_EVERY + 1
        stem = f"{prefix}_{number:08d}"
        return ImagePlan(
            index=index,
            layout="ade",
            stem=stem,
            image_path=ADE_ROOT / "images" / split / f"{stem}.jpg",
            ade_split=split,
            ade_annotation_path=ADE_ROOT / "annotations" / split / f"{stem}.png",
        )
    image_id = index + 1
    stem = f"COCO_train2014_{image_id:012d}"
    return ImagePlan(
        index=index,
        layout="coco",
        stem=stem,
        image_path=COCO_IMAGE_DIR / f"{stem}.jpg",
        image_id=image_id,
        coco_position=index - (index + 1) // ADE_EVERY,
    )
