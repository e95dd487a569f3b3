"""The REFER reader on a hand-built REFER layout: exact masks, all five pairs, counts, bad input."""

from __future__ import annotations

import io
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tests.py2pickle import python2_pickle
from pycocotools import mask as mask_utils

from perceptio.errors import PerceptioError
from perceptio.sources import refer as refer_module
from perceptio.sources.masks import segmentation_to_mask
from perceptio.sources.refer import ReferDataset

# image_id -> (width, height)
IMAGES = {1: (40, 30), 2: (50, 40), 3: (20, 20), 4: (32, 24)}
RECT = [5, 5, 15, 5, 15, 20, 5, 20]  # x 5..15, y 5..20: pixels [5:20, 5:15] under COCO's rasteriser
SQUARE_A = [2, 2, 12, 2, 12, 12, 2, 12]
SQUARE_B = [8, 8, 18, 8, 18, 18, 8, 18]


def _rect_mask(height: int, width: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    mask = np.zeros((height, width), np.uint8)
    mask[y0:y1, x0:x1] = 1
    return mask


def _blob(height: int, width: int, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).random((height, width)) > 0.7).astype(np.uint8)


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """Run lengths over the column-major pixel order, starting with a run of zeros (written by hand)."""
    flat = mask.flatten(order="F")
    runs, current, length = [], 0, 0
    for value in flat:
        if value == current:
            length += 1
        else:
            runs.append(length)
            current, length = value, 1
    runs.append(length)
    return {"size": [mask.shape[0], mask.shape[1]], "counts": [int(run) for run in runs]}


def _ref(ref_id: int, ann_id: int, image_id: int, split: str, sentences: list[str]) -> dict:
    return {
        "ref_id": ref_id,
        "ann_id": ann_id,
        "image_id": image_id,
        "category_id": 1,
        "split": split,
        # The real files name a file that does not exist: the image name plus "_{ann_id}".
        "file_name": f"COCO_train2014_{image_id:012d}_{ann_id}.jpg",
        "sent_ids": [ref_id * 10 + index for index in range(len(sentences))],
        "sentences": [
            {"raw": text.upper(), "sent": text, "sent_id": ref_id * 10 + index, "tokens": text.split()}
            for index, text in enumerate(sentences)
        ],
    }


ANNOTATIONS = [
    (11, 1, [RECT]),
    (12, 1, [SQUARE_A, SQUARE_B]),
    (13, 1, [[1, 1, 3, 3], RECT]),  # a two-point part beside a good one
    (14, 1, [[2, 2, 30, 25]]),  # only a two-point part: would be a 28x23 box if read as a bbox
    (15, 2, "compressed"),
    (16, 2, "uncompressed"),
    (17, 99, [RECT]),  # image 99 does not exist
    (18, 2, []),  # empty segmentation
    (19, 3, [RECT]),  # image 3's file is missing
    (20, 4, [RECT]),  # image 4's file is a truncated JPEG
]
REFS = [
    _ref(101, 11, 1, "train", ["left box", "red box"]),
    _ref(102, 12, 1, "train", ["two squares"]),
    _ref(103, 13, 1, "val", ["box with a stray line"]),
    _ref(104, 14, 1, "val", ["degenerate"]),
    _ref(105, 15, 2, "testA", ["blob"]),
    _ref(106, 16, 2, "testB", ["other blob", "same blob"]),
    _ref(107, 18, 2, "testB", ["empty"]),
    _ref(108, 999, 2, "train", ["no such annotation"]),
    {"ref_id": 109, "split": "train"},
    _ref(110, 19, 3, "train", ["missing image"]),
    _ref(111, 20, 4, "train", ["truncated image"]),
]
PAIRS = [("refcoco", "unc"), ("refcoco", "google"), ("refcoco+", "unc"), ("refcocog", "umd"), ("refcocog", "google")]


def _segmentation(kind, height: int, width: int):
    if kind == "compressed":
        rle = mask_utils.encode(np.asfortranarray(_blob(height, width, 15)))
        return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
    if kind == "uncompressed":
        return _uncompressed_rle(_blob(height, width, 16))
    return kind


def _jpeg(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((height, width, 3), 120, np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def build_refer_root(root: Path, refs: list[dict] = REFS) -> Path:
    image_dir = root / "images" / "mscoco" / "images" / "train2014"
    image_dir.mkdir(parents=True)
    for image_id, (width, height) in IMAGES.items():
        data = _jpeg(width, height)
        if image_id == 3:
            continue
        truncated = data[: len(data) // 2]
        (image_dir / f"COCO_train2014_{image_id:012d}.jpg").write_bytes(truncated if image_id == 4 else data)
    instances = {
        "images": [
            {"id": image_id, "file_name": f"COCO_train2014_{image_id:012d}.jpg", "width": width, "height": height}
            for image_id, (width, height) in IMAGES.items()
        ],
        "annotations": [
            {
                "id": ann_id,
                "image_id": image_id,
                "category_id": 1,
                "segmentation": _segmentation(segmentation, *reversed(IMAGES.get(image_id, (40, 30)))),
                "bbox": [5, 5, 10, 15],
                "area": 150.0,
                "iscrowd": 0,
            }
            for ann_id, image_id, segmentation in ANNOTATIONS
        ],
        "categories": [{"id": 1, "name": "box", "supercategory": "thing"}],
    }
    for dataset, split_by in PAIRS:
        folder = root / dataset
        folder.mkdir(exist_ok=True)
        (folder / "instances.json").write_text(json.dumps(instances))
        (folder / f"refs({split_by}).p").write_bytes(python2_pickle(refs))
    return root


@pytest.fixture(scope="module")
def refer_root(tmp_path_factory) -> Path:
    return build_refer_root(tmp_path_factory.mktemp("refer"))


@pytest.fixture(scope="module")
def refcoco(refer_root) -> ReferDataset:
    return ReferDataset(refer_root, "refcoco", "unc")


def test_rectangle_polygon_is_pixel_exact(refcoco):
    mask = refcoco.ann_mask(11)
    assert mask.dtype == np.uint8 and mask.shape == (30, 40)
    np.testing.assert_array_equal(mask, _rect_mask(30, 40, 5, 5, 15, 20))


def test_overlapping_parts_are_united_not_summed(refcoco):
    mask = refcoco.ann_mask(12)
    expected = _rect_mask(30, 40, 2, 2, 12, 12) | _rect_mask(30, 40, 8, 8, 18, 18)
    np.testing.assert_array_equal(mask, expected)
    # The original REFER code sums the decoded parts: the 4x4 overlap would hold 2s.
    summed = mask_utils.decode(mask_utils.frPyObjects([SQUARE_A, SQUARE_B], 30, 40)).sum(axis=2)
    assert summed.max() == 2 and set(np.unique(mask)) == {0, 1}


def test_two_point_polygon_is_degenerate_not_a_box(refcoco):
    assert segmentation_to_mask([[2, 2, 30, 25]], 30, 40).sum() == 0
    kinds = {(problem.kind, problem.id) for problem in refcoco.problems}
    assert ("degenerate_polygon", 14) in kinds and ("degenerate_polygon", 13) in kinds
    # Ann 14 had nothing else to draw: its ref is gone. Ann 13 keeps its good part.
    assert 104 not in {ref.ref_id for ref in refcoco.refs}
    np.testing.assert_array_equal(refcoco.ann_mask(13), _rect_mask(30, 40, 5, 5, 15, 20))


def test_compressed_and_uncompressed_rle(refcoco):
    np.testing.assert_array_equal(refcoco.ann_mask(15), _blob(40, 50, 15))
    np.testing.assert_array_equal(refcoco.ann_mask(16), _blob(40, 50, 16))


def test_refs_fields_and_file_names(refcoco):
    ref = next(ref for ref in refcoco.refs if ref.ref_id == 101)
    assert (ref.ann_id, ref.image_id, ref.category_id, ref.split) == (11, 1, 1, "train")
    assert [(s.sent_id, s.raw, s.sent, s.tokens) for s in ref.sentences] == [
        (1010, "LEFT BOX", "left box", ["left", "box"]),
        (1011, "RED BOX", "red box", ["red", "box"]),
    ]
    assert ref.file_name == "COCO_train2014_000000000001.jpg"  # not the refs' "..._11.jpg"
    assert refcoco.image_path(1).is_file()
    assert refcoco.categories == {1: "box"} and refcoco.images[2].width == 50
    assert refcoco.load_image(1).size == (40, 30)


def test_bad_input_is_reported_with_ids(refcoco):
    found = {(problem.kind, problem.id) for problem in refcoco.problems}
    assert found == {
        ("degenerate_polygon", 13),
        ("degenerate_polygon", 14),
        ("empty_segmentation", 14),
        ("unknown_image", 17),
        ("empty_segmentation", 18),
        ("unusable_annotation", 104),
        ("unusable_annotation", 107),
        ("unknown_annotation", 108),
        ("bad_ref", 109),
        ("missing_image", 3),
    }
    assert [ref.ref_id for ref in refcoco.refs] == [101, 102, 103, 105, 106, 110, 111]
    # A dropped ref keeps the split its file gave it, so the manifest can count rejects per split.
    splits = {problem.id: problem.split for problem in refcoco.problems if problem.kind in ("unusable_annotation", "unknown_annotation", "bad_ref")}
    assert splits == {104: "val", 107: "testB", 108: "train", 109: "train"}


def test_missing_and_truncated_images_are_kept_and_fail_on_load(refcoco):
    assert refcoco.check_image(1) is None
    missing, truncated = refcoco.check_image(3), refcoco.check_image(4)
    assert (missing.kind, missing.id) == ("missing_image", 3)
    assert (truncated.kind, truncated.id) == ("corrupt_image", 4)
    assert str(refcoco.image_path(4)) in truncated.reason


def test_counts_per_split(refcoco):
    assert refcoco.splits == ["train", "val", "testA", "testB"]
    assert refcoco.counts() == {
        "train": {"refs": 4, "sentences": 5, "images": 3},
        "val": {"refs": 1, "sentences": 1, "images": 1},
        "testA": {"refs": 1, "sentences": 1, "images": 1},
        "testB": {"refs": 1, "sentences": 2, "images": 1},
    }
    assert [ref.ref_id for ref in refcoco.refs_in_split("testB")] == [106]
    with pytest.raises(PerceptioError, match="no split 'test'"):
        refcoco.refs_in_split("test")


def test_count_warnings_against_published_counts(refcoco, monkeypatch):
    published = json.loads((Path(refer_module.__file__).parents[2] / "manifests" / "refer_counts.json").read_text())
    warnings = refcoco.count_warnings()
    train = published["datasets"]["refcoco-unc"]["train"]
    assert f"refcoco-unc train: 4 of {train['refs']:,} refs (<1%)" in warnings
    assert f"refcoco-unc train: 5 of {train['sentences']:,} sentences (<1%)" in warnings
    # The shares are computed, not canned: against a table where our copy holds 11% of val.
    table = {"datasets": {"refcoco-unc": {"val": {"refs": 9, "sentences": None, "images": 1}, "test": {"refs": 5}}}}
    monkeypatch.setattr(refer_module, "load_recipe", lambda name: table)
    assert refcoco.count_warnings() == [
        "refcoco-unc val: 1 of 9 refs (11%)",
        "refcoco-unc test: split missing (published: 5 refs)",
        "refcoco-unc train: split is not in the published counts (4 refs)",
        "refcoco-unc testA: split is not in the published counts (1 refs)",
        "refcoco-unc testB: split is not in the published counts (1 refs)",
    ]


def test_published_counts_cover_all_five_pairs():
    published = json.loads((Path(refer_module.__file__).parents[2] / "manifests" / "refer_counts.json").read_text())
    assert published["source"]
    assert set(published["datasets"]) == {f"{dataset}-{split_by}" for dataset, split_by in PAIRS}
    # The unc/umd splits partition the images, so their image counts add up to the dataset's.
    assert sum(split["images"] for split in published["datasets"]["refcoco-unc"].values()) == 19994


@pytest.mark.parametrize("dataset, split_by", PAIRS)
def test_every_pair_loads(refer_root, dataset, split_by):
    refer = ReferDataset(refer_root, dataset, split_by)
    assert refer.name == f"{dataset}-{split_by}"
    assert len(refer.refs) == 7


def test_missing_root_files_and_bad_pairs_are_one_line_errors(refer_root, tmp_path):
    with pytest.raises(PerceptioError, match="not found"):
        ReferDataset(tmp_path / "nowhere", "refcoco", "unc")
    with pytest.raises(PerceptioError, match="has no 'google' split"):
        ReferDataset(refer_root, "refcoco+", "google")
    with pytest.raises(PerceptioError, match="unknown REFER dataset"):
        ReferDataset(refer_root, "refclef", "unc")
    broken = build_refer_root(tmp_path / "broken")
    (broken / "refcoco" / "instances.json").unlink()
    with pytest.raises(PerceptioError, match=r"instances\.json not found"):
        ReferDataset(broken, "refcoco", "unc")
    (broken / "refcocog" / "refs(umd).p").unlink()
    with pytest.raises(PerceptioError, match=r"refs\(umd\)\.p not found"):
        ReferDataset(broken, "refcocog", "umd")
    (broken / "refcoco+" / "instances.json").write_text("{not json")
    with pytest.raises(PerceptioError, match="not readable JSON"):
        ReferDataset(broken, "refcoco+", "unc")
    (broken / "images" / "mscoco" / "images" / "train2014").rename(broken / "elsewhere")
    with pytest.raises(PerceptioError, match="image folder .* not found"):
        ReferDataset(broken, "refcocog", "google")


def test_refs_pickle_that_runs_code_is_refused(tmp_path):
    class _Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    root = build_refer_root(tmp_path / "root")
    (root / "refcoco" / "refs(unc).p").write_bytes(pickle.dumps([_Evil()], protocol=2))
    with pytest.raises(PerceptioError, match=r"refs\(unc\)\.p: refused to load"):
        ReferDataset(root, "refcoco", "unc")
    assert not (tmp_path / "pwned").exists()


def test_a_data_root_on_an_object_store_reads_as_the_local_one(refer_root, refcoco, s3_copy):
    """The same REFER files on a local S3 server: the same refs, problems, masks and pixels."""
    url = s3_copy(refer_root, "refer")
    remote = ReferDataset(url, "refcoco", "unc")
    assert remote.refs == refcoco.refs and remote.images == refcoco.images and remote.splits == refcoco.splits
    assert remote.counts() == refcoco.counts() and remote.annotations == refcoco.annotations
    local_root = str(refcoco.image_dir)
    assert [(p.kind, p.id, p.split, p.reason.replace(str(remote.image_dir), local_root)) for p in remote.problems] == [
        (p.kind, p.id, p.split, p.reason) for p in refcoco.problems
    ]
    assert remote.image_path(1) == f"{url}/images/mscoco/images/train2014/COCO_train2014_000000000001.jpg"
    np.testing.assert_array_equal(np.asarray(remote.load_image(1)), np.asarray(refcoco.load_image(1)))
    np.testing.assert_array_equal(remote.ann_mask(11), refcoco.ann_mask(11))
    assert (remote.check_image(3).kind, remote.check_image(4).kind) == ("missing_image", "corrupt_image")
    with pytest.raises(PerceptioError, match="not found"):
        ReferDataset(f"{url}-missing", "refcoco", "unc")
