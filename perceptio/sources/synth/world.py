"""Build the whole synthetic world: render every image, then write the COCO/REFER/ADE20k files.

Each image is a pure function of (seed, index) (:func:`build_image`), so images are rendered in a
process pool in any order and the result does not depend on the number of workers. The main
process writes everything into a hidden folder next to ``out`` and swaps it into place at the end,
so a failed or interrupted run never leaves a half-written world under the final name, and
re-generating a world replaces it completely (no stale files from a bigger earlier world).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np
from pycocotools import mask as mask_utils

from perceptio.errors import PerceptioError
from perceptio.io import atomic_directory
from perceptio.sources.synth.expressions import ObjectView, ambiguous_expression, as_sentence, describe
from perceptio.sources.synth.layout import (
    ADE_ROOT,
    REFER_SETS,
    TEST_AB_SCHEME,
    WORLD_FILE,
    ImagePlan,
    coco_ann_id,
    plan_image,
)
from perceptio.sources.synth.polygons import mask_to_polygons
from perceptio.sources.synth.render import CLASS_NAMES, Rendering, render
from perceptio.sources.synth.scene import (
    COLOURS,
    TEST_A_SHAPE,
    Scene,
    SceneConfig,
    composition_ok,
    image_rng,
    sample_scene,
)
from perceptio.sources.synth.writers import (
    CATEGORY_ID,
    ade_class_table,
    coco_instances,
    depth_to_millimetres,
    encode_jpeg,
    encode_png,
    write_json,
    write_refs,
)

WORLD_FORMAT = "perceptio-synth-world"
WORLD_VERSION = 1
MAX_SCENE_ATTEMPTS = 200
# The polygon written for an object must cover its rendered mask this well (tests ask >= 0.9).
MIN_POLYGON_IOU = 0.92
# Sentences per ref, (low, high) inclusive, per dataset style (RefCOCO averages ~2.8 per ref).
SENTENCES_PER_REF = {"refcoco": (1, 3), "refcoco+": (1, 2), "refcocog": (1, 2)}
# On COCO images at these positions (mod 5) each dataset gets an ambiguous pair / a duplicate.
AMBIGUOUS_POSITION, DUPLICATE_POSITION, FLAG_CYCLE = 1, 3, 5
SPLIT_ORDER = ("train", "val", "testA", "testB", "test")  # as the REFER papers list them
_WORDING_STREAM = 1  # image_rng stream of the referring expressions (0 = the scene)


@dataclass
class RefDraft:
    """A ref before ids are assigned: which object, what is said, and why it is special."""

    instance: int
    sentences: list[dict[str, Any]]  # {"raw", "sent", "tokens"}; ids are given by the writer
    kind: str = "unique"  # "unique", "ambiguous" or "duplicate"
    duplicate_of: int | None = None  # index of the copied draft within the image


@dataclass
class ImageResult:
    plan: ImagePlan
    jpeg: bytes
    depth_png: bytes
    instance_png: bytes
    class_png: bytes | None  # ADE images only
    class_pixels: np.ndarray | None  # ADE images only: pixels per class index
    record: dict[str, Any]  # the image's entry in world.json
    annotations: list[dict[str, Any]]  # COCO images only
    drafts: dict[str, list[RefDraft]] = field(default_factory=dict)  # dataset -> drafts


@dataclass
class WorldSummary:
    root: Path
    seed: int
    images: int
    coco_images: int
    ade_images: dict[str, int]  # ADE split -> images
    refs: dict[str, int]  # dataset -> refs
    sentences: dict[str, int]  # dataset -> sentences
    seconds: float


# ---------------------------------------------------------------------------------- one image


def _polygon_iou(polygons: list[list[float]], mask: np.ndarray) -> float:
    if not polygons:
        return 0.0
    height, width = mask.shape
    drawn = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))) > 0
    union = np.logical_or(drawn, mask).sum()
    return float(np.logical_and(drawn, mask).sum() / union) if union else 0.0


def _visible_scene(rng: np.random.Generator, config: SceneConfig) -> tuple[Scene, Rendering, list[list[list[float]]]]:
    """Sample until every object is clearly visible and its polygon round-trips; objects hidden
    behind others are dropped when the rest still makes a valid scene."""
    min_area = config.min_visible_fraction * config.width * config.height
    for _ in range(MAX_SCENE_ATTEMPTS):
        scene = sample_scene(rng, config)
        if scene is None:
            continue
        rendering = render(scene)
        areas = np.bincount(rendering.instances.ravel(), minlength=len(scene.objects) + 1)[1:]
        if (areas < min_area).any():
            kept = tuple(obj for obj, area in zip(scene.objects, areas) if area >= min_area)
            if not composition_ok(kept, config):
                continue
            scene = replace(scene, objects=kept)
            rendering = render(scene)
            areas = np.bincount(rendering.instances.ravel(), minlength=len(kept) + 1)[1:]
            if (areas < min_area).any():
                continue
        masks = [rendering.instances == index + 1 for index in range(len(scene.objects))]
        polygons = [mask_to_polygons(mask) for mask in masks]
        if all(_polygon_iou(parts, mask) >= MIN_POLYGON_IOU for parts, mask in zip(polygons, masks)):
            return scene, rendering, polygons
    raise RuntimeError(f"no valid scene in {MAX_SCENE_ATTEMPTS} attempts; the SceneConfig ranges are too tight")


def _rounded(values: Any, digits: int = 6) -> Any:
    if isinstance(values, (list, tuple, np.ndarray)):
        return [_rounded(value, digits) for value in values]
    return round(float(values), digits)


def _object_records(
    scene: Scene, rendering: Rendering, plan: ImagePlan
) -> tuple[list[dict[str, Any]], list[ObjectView]]:
    records, views = [], []
    for index, obj in enumerate(scene.objects):
        instance = index + 1
        rows, cols = np.nonzero(rendering.instances == instance)
        u, v, depth = scene.camera.project(np.array(obj.centre))
        record = {
            "instance": instance,
            "shape": obj.shape,
            "colour": obj.colour,
            "rgb": [int(round(c * 255)) for c in COLOURS[obj.colour]],
            "size_m": _rounded(obj.size),  # radius, or half edge for cubes
            "height_m": _rounded(obj.extent),
            "lift_m": _rounded(obj.lift),  # height of its bottom above the floor
            "yaw_deg": _rounded(np.degrees(obj.yaw)),
            "centre": _rounded(obj.centre),
            "centre_depth_m": _rounded(depth),
            "image_centre": _rounded([u, v]),
            "volume_m3": _rounded(obj.volume),
            "area_px": int(rows.size),
            "bbox": [
                int(cols.min()),
                int(rows.min()),
                int(cols.max() - cols.min() + 1),
                int(rows.max() - rows.min() + 1),
            ],
        }
        if plan.image_id is not None:
            record["ann_id"] = coco_ann_id(plan.image_id, instance)
            record["category_id"] = CATEGORY_ID[obj.shape]
        records.append(record)
        views.append(ObjectView(instance, obj.shape, obj.colour, obj.volume, depth, u))
    return records, views


def _camera_record(scene: Scene) -> dict[str, Any]:
    camera = scene.camera
    return {
        "position": _rounded(camera.position),
        "rotation": _rounded(camera.rotation),
        "fx": _rounded(camera.fx),
        "fy": _rounded(camera.fy),
        "cx": _rounded(camera.cx),
        "cy": _rounded(camera.cy),
        "width": camera.width,
        "height": camera.height,
        "yaw_deg": _rounded(camera.yaw_deg),
        "pitch_deg": _rounded(camera.pitch_deg),
    }


def _eligible(views: list[ObjectView], dataset: str, plan: ImagePlan) -> list[ObjectView]:
    """Objects a ref may name. As in RefCOCO(+)'s testA (people) / testB (other objects), a test
    image's refs name only the world's person-like shape, or only the others."""
    if dataset == "refcocog":
        return views
    split = plan.split(TEST_AB_SCHEME)
    if split == "testA":
        return [view for view in views if view.shape == TEST_A_SHAPE]
    if split == "testB":
        return [view for view in views if view.shape != TEST_A_SHAPE]
    return views


def _ref_drafts(
    views: list[ObjectView], plan: ImagePlan, rng: np.random.Generator, width: int
) -> dict[str, list[RefDraft]]:
    assert plan.coco_position is not None
    drafts: dict[str, list[RefDraft]] = {}
    for dataset in dict.fromkeys(name for name, _ in REFER_SETS):
        eligible = _eligible(views, dataset, plan)
        low, high = SENTENCES_PER_REF[dataset]
        image_drafts = []
        for view in eligible:
            count = int(rng.integers(low, high + 1))
            texts = describe(view, views, dataset, width, rng, count)
            if texts:
                sentences = [as_sentence(text, rng) for text in texts]
                image_drafts.append(RefDraft(view.instance, sentences))
        flag = plan.coco_position % FLAG_CYCLE
        if flag == AMBIGUOUS_POSITION:
            shared = sorted({v.shape for v in eligible if sum(w.shape == v.shape for w in eligible) >= 2})
            if shared:
                shape = shared[int(rng.integers(len(shared)))]
                pair = [v for v in eligible if v.shape == shape][:2]
                sentence = as_sentence(ambiguous_expression(shape, dataset, rng), rng)
                image_drafts.extend(RefDraft(v.instance, [dict(sentence)], kind="ambiguous") for v in pair)
        elif flag == DUPLICATE_POSITION and image_drafts:
            original = int(rng.integers(len(image_drafts)))
            copy = image_drafts[original]
            sentences = [dict(sentence) for sentence in copy.sentences]
            image_drafts.append(RefDraft(copy.instance, sentences, kind="duplicate", duplicate_of=original))
        drafts[dataset] = image_drafts
    return drafts


def build_image(index: int, seed: int, config: SceneConfig) -> ImageResult:
    """Render image ``index`` of the world of ``seed`` and prepare everything written about it."""
    plan = plan_image(index)
    scene, rendering, polygons = _visible_scene(image_rng(seed, index), config)
    objects, views = _object_records(scene, rendering, plan)
    record = {
        "index": index,
        "layout": plan.layout,
        "stem": plan.stem,
        "file": str(plan.image_path),
        "depth_file": str(plan.depth_path),
        "instance_file": str(plan.instance_path),
        "camera": _camera_record(scene),
        "scene": {
            "wall_z_m": _rounded(scene.wall_z),
            "wall_height_m": _rounded(scene.wall_height),
            "floor_tile_m": _rounded(scene.floor_tile_m),
            "light_direction": _rounded(scene.light_direction),
        },
        "objects": objects,
    }
    annotations: list[dict[str, Any]] = []
    drafts: dict[str, list[RefDraft]] = {}
    if plan.layout == "coco":
        assert plan.image_id is not None
        record["image_id"] = plan.image_id
        record["splits"] = {
            f"{dataset}-{split_by}": plan.split(f"{dataset}-{split_by}") for dataset, split_by in REFER_SETS
        }
        for obj, parts in zip(objects, polygons):
            height, width = rendering.instances.shape
            area = float(mask_utils.area(mask_utils.merge(mask_utils.frPyObjects(parts, height, width))))
            annotations.append(
                {
                    "segmentation": parts,
                    "area": area,
                    "iscrowd": 0,
                    "image_id": plan.image_id,
                    "bbox": [float(value) for value in obj["bbox"]],
                    "category_id": obj["category_id"],
                    "id": obj["ann_id"],
                    "synth_instance": obj["instance"],
                }
            )
        drafts = _ref_drafts(views, plan, image_rng(seed, index, _WORDING_STREAM), config.width)
    else:
        record["ade_split"] = plan.ade_split
        record["annotation_file"] = str(plan.ade_annotation_path)
    return ImageResult(
        plan=plan,
        jpeg=encode_jpeg(rendering.rgb),
        depth_png=encode_png(depth_to_millimetres(rendering.depth_m)),
        instance_png=encode_png(rendering.instances),
        class_png=encode_png(rendering.classes) if plan.layout == "ade" else None,
        class_pixels=np.bincount(rendering.classes.ravel(), minlength=max(CLASS_NAMES) + 1)
        if plan.layout == "ade"
        else None,
        record=record,
        annotations=annotations,
        drafts=drafts,
    )


# ---------------------------------------------------------------------------------- the world


def check_out_dir(out: Path) -> None:
    """Refuse to overwrite anything that is not a synthetic world."""
    if out.exists() and not out.is_dir():
        raise PerceptioError(f"--out {out} is a file; give a new or empty folder, or an existing world")
    if out.is_dir() and any(out.iterdir()):
        marker = out / WORLD_FILE
        try:
            is_world = json.loads(marker.read_text()).get("format") == WORLD_FORMAT
        except (OSError, ValueError, AttributeError):
            is_world = False
        if not is_world:
            raise PerceptioError(
                f"--out {out} is a non-empty folder that is not a synthetic world (no {WORLD_FILE}); "
                "give a new or empty folder"
            )


class _WorldWriter:
    """Collects the per-image results (in index order) and writes the dataset files."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.coco_images: list[dict[str, Any]] = []
        self.annotations: list[dict[str, Any]] = []
        self.records: list[dict[str, Any]] = []
        self.refs: dict[str, list[dict[str, Any]]] = {dataset: [] for dataset, _ in REFER_SETS}
        self.ref_splits: dict[str, list[dict[str, str]]] = {dataset: [] for dataset, _ in REFER_SETS}
        self.special: dict[str, dict[str, list[Any]]] = {
            dataset: {"ambiguous": [], "duplicates": []} for dataset in self.refs
        }
        self.next_sent_id = {dataset: 0 for dataset in self.refs}
        self.class_pixels = np.zeros(max(CLASS_NAMES) + 1, dtype=np.int64)
        self.class_images = {
            "training": np.zeros_like(self.class_pixels),
            "validation": np.zeros_like(self.class_pixels),
        }

    def _write(self, relative: Any, data: bytes) -> None:
        path = self.root / str(relative)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    def add(self, result: ImageResult) -> None:
        plan = result.plan
        self._write(plan.image_path, result.jpeg)
        self._write(plan.depth_path, result.depth_png)
        self._write(plan.instance_path, result.instance_png)
        self.records.append(result.record)
        if plan.layout == "ade":
            assert result.class_png is not None and result.class_pixels is not None and plan.ade_split is not None
            self._write(plan.ade_annotation_path, result.class_png)
            self.class_pixels += result.class_pixels
            self.class_images[plan.ade_split] += result.class_pixels > 0
            return
        camera = result.record["camera"]
        self.coco_images.append(
            {
                "file_name": plan.image_path.name,
                "height": camera["height"],
                "width": camera["width"],
                "id": plan.image_id,
            }
        )
        self.annotations.extend(result.annotations)
        for dataset, drafts in result.drafts.items():
            self._add_refs(dataset, drafts, result)

    def _add_refs(self, dataset: str, drafts: list[RefDraft], result: ImageResult) -> None:
        plan = result.plan
        assert plan.image_id is not None
        category = {obj["instance"]: obj["category_id"] for obj in result.record["objects"]}
        ref_ids = []
        for draft in drafts:
            ref_id = len(self.refs[dataset])
            ref_ids.append(ref_id)
            ann_id = coco_ann_id(plan.image_id, draft.instance)
            sentences = []
            for sentence in draft.sentences:
                sent_id = self.next_sent_id[dataset]
                self.next_sent_id[dataset] += 1
                sentences.append(
                    {"tokens": sentence["tokens"], "raw": sentence["raw"], "sent_id": sent_id, "sent": sentence["sent"]}
                )
            self.refs[dataset].append(
                {
                    "sent_ids": [sentence["sent_id"] for sentence in sentences],
                    "file_name": f"{plan.stem}_{ann_id}.jpg",
                    "ann_id": ann_id,
                    "ref_id": ref_id,
                    "image_id": plan.image_id,
                    "split": "",  # filled per split scheme when the pickles are written
                    "sentences": sentences,
                    "category_id": category[draft.instance],
                }
            )
            self.ref_splits[dataset].append(
                {split_by: plan.split(f"{dataset}-{split_by}") for name, split_by in REFER_SETS if name == dataset}
            )
            if draft.kind == "ambiguous":
                self.special[dataset]["ambiguous"].append(ref_id)
            elif draft.kind == "duplicate":
                assert draft.duplicate_of is not None
                self.special[dataset]["duplicates"].append({"ref_id": ref_id, "of": ref_ids[draft.duplicate_of]})

    def finish(self, seed: int, config: SceneConfig) -> dict[str, Any]:
        counts: dict[str, Any] = {
            "images": len(self.records),
            "coco_images": len(self.coco_images),
            "ade_images": {
                split: sum(r.get("ade_split") == split for r in self.records) for split in self.class_images
            },
            "refer": {},
        }
        instances = coco_instances(self.coco_images, self.annotations)
        for dataset in self.refs:  # the three datasets share the images, as RefCOCO and RefCOCO+ do
            write_json(self.root / dataset / "instances.json", instances)
        for dataset, split_by in REFER_SETS:
            refs = [
                dict(ref, split=splits[split_by]) for ref, splits in zip(self.refs[dataset], self.ref_splits[dataset])
            ]
            write_refs(self.root / dataset / f"refs({split_by}).p", refs)
            counts["refer"][f"{dataset}-{split_by}"] = _split_counts(refs)
        ade = self.root / ADE_ROOT
        for split in ("training", "validation"):  # the layout exists even when a split is empty
            (ade / "images" / split).mkdir(parents=True, exist_ok=True)
            (ade / "annotations" / split).mkdir(parents=True, exist_ok=True)
        table = ade_class_table(self.class_pixels, self.class_images["training"], self.class_images["validation"])
        (ade / "objectInfo150.csv").write_text(table)
        world = {
            "format": WORLD_FORMAT,
            "version": WORLD_VERSION,
            "seed": seed,
            "config": {"width": config.width, "height": config.height},
            "depth": "uint16 PNG, millimetres along the optical axis (camera z), 0 = invalid (sky)",
            "instances": "uint16 PNG, object instance index, 0 = floor, wall or sky",
            "counts": counts,
            "refs": self.special,
            "images": self.records,
        }
        write_json(self.root / WORLD_FILE, world, indent=1)
        return counts


def _split_counts(refs: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """{split: {"refs", "sentences", "images"}} in the official split order."""
    counts: dict[str, dict[str, int]] = {}
    for split in sorted({ref["split"] for ref in refs}, key=SPLIT_ORDER.index):
        in_split = [ref for ref in refs if ref["split"] == split]
        counts[split] = {
            "refs": len(in_split),
            "sentences": sum(len(ref["sentences"]) for ref in in_split),
            "images": len({ref["image_id"] for ref in in_split}),
        }
    return counts


def generate_world(
    out: str | Path,
    images: int = 200,
    seed: int = 0,
    workers: int | None = None,
    config: SceneConfig | None = None,
    progress: Callable[[int], None] | None = None,
) -> WorldSummary:
    """Write the synthetic world of ``images`` images for ``seed`` under ``out`` (replacing an
    earlier world there). ``progress`` is called with the number of images done so far."""
    started = time.perf_counter()
    out = Path(out)
    if images < 1:
        raise PerceptioError(f"--images must be at least 1, got {images}")
    check_out_dir(out)
    config = config or SceneConfig()
    workers = max(1, min(workers or os.cpu_count() or 1, images))
    # The world is built in a hidden folder beside ``out`` and renamed over it when complete.
    with atomic_directory(out) as staging:
        writer = _WorldWriter(staging)
        job = partial(build_image, seed=seed, config=config)
        if workers == 1:
            results = map(job, range(images))
            _collect(results, writer, progress)
        else:
            with multiprocessing.get_context().Pool(workers) as pool:
                _collect(pool.imap(job, range(images), chunksize=2), writer, progress)
        counts = writer.finish(seed, config)
    return WorldSummary(
        root=out,
        seed=seed,
        images=images,
        coco_images=counts["coco_images"],
        ade_images=counts["ade_images"],
        refs={dataset: len(refs) for dataset, refs in writer.refs.items()},
        sentences={dataset: writer.next_sent_id[dataset] for dataset in writer.refs},
        seconds=time.perf_counter() - started,
    )


def _collect(results: Any, writer: _WorldWriter, progress: Callable[[int], None] | None) -> None:
    for done, result in enumerate(results, start=1):
        writer.add(result)
        if progress is not None:
            progress(done)
