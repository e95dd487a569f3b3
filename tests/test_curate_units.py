"""Curation building blocks without Ray: plan, filters, descriptions, marked-point questions."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from perceptio.curate.describe import AttributeCaptioner, colour_name, depth_at_image_size, load_captioner, measure_attributes
from perceptio.curate.filters import (
    AMBIGUOUS_EXPRESSION,
    EMPTY_MASK,
    MASK_BBOX_MISMATCH,
    NEAR_DUPLICATE,
    TINY_MASK,
    FilterConfig,
    RefCandidate,
    normalize_expression,
    reason_code,
    review_refs,
)
from perceptio.curate.marked_points import draw_marked
from perceptio.curate.plan import ImageItem, plan_shards
from perceptio.errors import PerceptioError


def _box_mask(x: int, y: int, w: int, h: int, size=(60, 80)) -> np.ndarray:
    mask = np.zeros(size, dtype=np.uint8)
    mask[y : y + h, x : x + w] = 1
    return mask


def _item(image_id: int, split: str = "train") -> ImageItem:
    return ImageItem("refcoco-unc", split, image_id, f"{image_id}.jpg", f"/x/{image_id}.jpg", 10, 10)


# ------------------------------------------------------------------------------------------- plan


def test_plan_sorts_ids_keeps_splits_apart_and_batches_stay_inside_shards():
    images = {"train": [_item(i) for i in (9, 2, 7, 4, 5)], "val": [_item(3, "val")]}
    shards = plan_shards(images, samples_per_shard=2)
    assert [s.name for s in shards] == [
        "refcoco-unc-train-000000", "refcoco-unc-train-000001", "refcoco-unc-train-000002", "refcoco-unc-val-000000"
    ]
    assert [[image.image_id for image in s.images] for s in shards] == [[2, 4], [5, 7], [9], [3]]
    # Same plan from a shuffled input: assignment depends on ids alone.
    again = plan_shards({"train": images["train"][::-1], "val": images["val"]}, samples_per_shard=2)
    assert [s.images for s in again] == [s.images for s in shards]
    batches = shards[0].batches(3)
    assert [len(b) for b in batches] == [2]  # a batch never takes images of the next shard


def test_plan_rejects_duplicates_and_bad_sizes():
    with pytest.raises(PerceptioError):
        plan_shards({"train": [_item(1), _item(1)]}, 10)
    with pytest.raises(PerceptioError):
        plan_shards({"train": [_item(1)]}, 0)


# ----------------------------------------------------------------------------------------- filters


def test_consistency_reasons():
    config = FilterConfig(min_mask_pixels=16, min_bbox_iou=0.5)
    refs = [RefCandidate(i, 100 + i, bbox, [f"thing {i}"]) for i, bbox in
            enumerate([(10, 10, 20, 10), (0, 0, 5, 5), (10, 10, 20, 10), (50, 40, 20, 10)])]
    masks = [_box_mask(10, 10, 20, 10), _box_mask(0, 0, 3, 3), np.zeros((60, 80), np.uint8), _box_mask(0, 0, 20, 10)]
    reasons = review_refs(refs, masks, [None] * 4, config)
    assert reasons[0] is None
    assert reason_code(reasons[1]) == TINY_MASK
    assert reasons[2] == EMPTY_MASK
    assert reason_code(reasons[3]) == MASK_BBOX_MISMATCH


def test_near_duplicates_and_ambiguity():
    config = FilterConfig()
    big = _box_mask(10, 10, 30, 30)
    almost = _box_mask(10, 10, 30, 29)  # IoU 0.967 with big
    other = _box_mask(45, 10, 30, 30)
    refs = [
        RefCandidate(5, 1, (10, 10, 30, 30), ["The red cube."]),
        RefCandidate(3, 1, (10, 10, 30, 29), ["the red cube", "left cube"]),  # duplicate of ref 5 (or 5 of 3)
        RefCandidate(7, 2, (45, 10, 30, 30), ["cube", "right cube"]),
        RefCandidate(8, 3, (10, 10, 30, 30), ["Cube!"]),  # same words as ref 7, another object
    ]
    reasons = review_refs(refs, [big, almost, other, big], [None] * 4, config)
    # The smaller ref_id survives among duplicates, whatever the input order.
    assert reasons[1] is None and reason_code(reasons[0]) == NEAR_DUPLICATE and "ref 3" in reasons[0]
    # Ref 8 overlaps ref 3's object (IoU > 0.9) but their words differ: not a duplicate; "cube" is
    # shared with ref 7 on another object: both ambiguous.
    assert reason_code(reasons[2]) == AMBIGUOUS_EXPRESSION and reason_code(reasons[3]) == AMBIGUOUS_EXPRESSION
    assert normalize_expression("  The RED, cube. ") == "the red cube"


# ---------------------------------------------------------------------------------------- describe


def test_colour_names_and_description():
    assert colour_name(np.tile([[200, 20, 20]], (50, 1)).astype(np.uint8)) == "red"
    assert colour_name(np.tile([[30, 40, 210]], (50, 1)).astype(np.uint8)) == "blue"
    assert colour_name(np.tile([[240, 240, 240]], (50, 1)).astype(np.uint8)) == "white"
    image = np.zeros((60, 90, 3), np.uint8)
    image[:, :30] = (200, 20, 20)
    image[:, 60:] = (20, 170, 40)
    left, right = _box_mask(0, 0, 30, 60, (60, 90)), _box_mask(60, 30, 30, 30, (60, 90))
    depth = np.linspace(1, -1, 90)[None, :].repeat(60, 0)  # nearer on the left
    attrs = measure_attributes(image, [left, right], ["box", "ball"], depth)
    assert (attrs[0].colour, attrs[0].horizontal, attrs[0].depth_rank) == ("red", "left", 0)
    assert (attrs[1].colour, attrs[1].horizontal, attrs[1].vertical, attrs[1].depth_rank) == ("green", "right", "bottom", 1)
    text = AttributeCaptioner().describe(attrs[1], image, right)
    assert "green ball" in text and "bottom right" in text and "behind the box" in text
    assert isinstance(load_captioner("perceptio.curate.describe:AttributeCaptioner"), AttributeCaptioner)
    with pytest.raises(PerceptioError):
        load_captioner("nowhere.module:Nothing")


def test_depth_lookup_repeats_each_cell_over_its_pixels():
    depth = np.arange(16, dtype=np.float32).reshape(4, 4)
    np.testing.assert_array_equal(depth_at_image_size(depth, 8, 12), np.kron(depth, np.ones((2, 3), np.float32)))
    np.testing.assert_array_equal(depth_at_image_size(depth, 4, 4), depth)


# ------------------------------------------------------------------------------------ marked points


def test_marked_image_has_red_marks_at_the_points():
    image = Image.new("RGB", (336, 336), (40, 90, 40))
    data = draw_marked(image, [[100, 200], [250, 80]], ["A", "B"])
    drawn = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)
    ring = drawn[198:203, 94:99].reshape(-1, 3)  # around the circle's left edge (radius 4)
    assert ((ring[:, 0] > 150) & (ring[:, 1] < 100)).any()
    assert not ((drawn[:, :, 0] > 150) & (drawn[:, :, 1] < 100))[:60, :60].any()  # nothing red elsewhere
    label_box = drawn[180:196, 80:96]  # the white label box up-left of point A
    assert (label_box.mean(axis=(0, 1)) > 150).all()


def test_prepare_rejects_invalid_polygons_and_a_corrupt_image(tmp_path):
    from perceptio.curate.plan import RefItem, SentenceItem
    from perceptio.curate.sample_builder import BuildConfig, prepare

    path = tmp_path / "image.jpg"
    Image.new("RGB", (80, 60), (90, 90, 90)).save(path)
    square = [10.0, 10.0, 40.0, 10.0, 40.0, 40.0, 10.0, 40.0]

    def ref(ref_id: int, segmentation, bbox=(10.0, 10.0, 30.0, 30.0)) -> RefItem:
        return RefItem(ref_id, 100 + ref_id, 1, "box", bbox, segmentation, (SentenceItem(ref_id, f"box {ref_id}", f"box {ref_id}"),))

    refs = (ref(1, [square]), ref(2, [square, [1.0, 2.0, 3.0]]), ref(3, [[50.0, 50.0, 52.0, 50.0, 52.0, 52.0]], (50, 50, 2, 2)))
    item = ImageItem("refcoco-unc", "train", 1, "image.jpg", str(path), 80, 60, refs)
    prepared = prepare(item, BuildConfig())
    assert prepared.reasons[0] is None and prepared.jpg == path.read_bytes()
    assert reason_code(prepared.reasons[1]) == "invalid_polygon"  # an odd coordinate count beside a good part
    assert reason_code(prepared.reasons[2]) == TINY_MASK
    path.write_bytes(path.read_bytes()[:300])
    broken = prepare(item, BuildConfig())
    assert broken.problem and all(reason_code(reason) == "corrupt_image" for reason in broken.reasons)


def test_the_depth_source_is_checked_where_the_teacher_is_described(tmp_path):
    from perceptio.curate.distributor import TeacherSpec

    with pytest.raises(PerceptioError, match="--depth-source must be one of model, gt"):
        TeacherSpec(source="midas")
    with pytest.raises(PerceptioError, match="ground-truth depth"):
        TeacherSpec(source="gt", depth_dir=str(tmp_path / "depth")).check()


def test_manifest_rows_of_reader_problems():
    from perceptio.shards import REJECTED, ManifestRow, manifest_table
    from perceptio.sources.problems import Problem

    ref = ManifestRow.from_problem("refcoco-unc", Problem("unknown_annotation", 7, "ann 9 is not in instances.json"))
    image = ManifestRow.from_problem("refcoco-unc", Problem("unknown_image", 12, "no such image"))
    assert (ref.ref_id, ref.status, ref.reason, ref.shard) == (7, REJECTED, "unknown_annotation", None)
    assert image.ref_id is None and image.detail == "unknown_image 12: no such image"
    table = manifest_table([ref, image])
    assert table.column_names == [name for name in ManifestRow.__dataclass_fields__]
    assert table.to_pylist()[0] == ref.as_dict()


# ----------------------------------------------------------------------------------------- output


def test_output_folder_per_dataset_refuses_another_and_overwrite_clears_only_ours(tmp_path):
    import json

    from perceptio.curate.output import dataset_out, prepare_out
    from perceptio.shards import DATASET_INFO_NAME, meta_folder

    assert dataset_out(tmp_path, "llava") == tmp_path / "llava"
    assert dataset_out(tmp_path / "llava", "llava") == tmp_path / "llava"  # already its folder
    out = tmp_path / "mine"
    prepare_out(out, "llava", overwrite=False)
    (out / DATASET_INFO_NAME).write_text(json.dumps({"settings": {"dataset": "llava"}}))
    assert dataset_out(out, "llava") == out  # named otherwise, but its dataset.json says llava
    with pytest.raises(PerceptioError, match="holds curated llava"):
        prepare_out(out, "ade20k", overwrite=False)
    (out / "llava-train-000000.tar").write_bytes(b"x")
    (out / "keep.txt").write_text("not ours")
    meta_folder(out).mkdir(exist_ok=True)
    (meta_folder(out) / "llava-train-000000_stats.json").write_text("{}")
    prepare_out(out, "llava", overwrite=True)
    assert sorted(path.name for path in out.iterdir()) == ["__meta__", "keep.txt"]
    assert list(meta_folder(out).iterdir()) == []
    (out / DATASET_INFO_NAME).write_text("{not json")
    with pytest.raises(PerceptioError, match="not valid json"):
        prepare_out(out, "llava", overwrite=False)


def test_shards_curated_before_a_build_setting_existed_resume_under_its_default(tmp_path):
    import dataclasses
    import json

    from perceptio.curate.marked_points import COLOURED_MARKS, MarkedPointsConfig
    from perceptio.curate.sample_builder import BuildConfig
    from perceptio.curate.writer import check_resumable
    from perceptio.shards import STATS_SUFFIX, meta_file

    def settings(build: BuildConfig) -> dict:
        return {"dataset": "ade20k", "samples_per_shard": 50, "batch_size": 8, "tokenizer": "t@1",
                "teacher_source": "gt", "build": dataclasses.asdict(build)}

    older = settings(BuildConfig())
    del older["build"]["marked_points"]["mark_style"]  # written before marks had a style
    stats = Path(meta_file(str(tmp_path), "ade20k-training-000000" + STATS_SUFFIX))
    stats.parent.mkdir(parents=True)
    stats.write_text(json.dumps({"settings": older, "teacher": "gt-depth"}))
    assert check_resumable(str(tmp_path), ["ade20k-training-000000"], settings(BuildConfig())) == "gt-depth"
    coloured = BuildConfig(marked_points=MarkedPointsConfig(mark_style=COLOURED_MARKS))
    with pytest.raises(PerceptioError, match="was curated with build="):
        check_resumable(str(tmp_path), ["ade20k-training-000000"], settings(coloured))
