"""The synthetic world: official formats, exact ground truth, splits, expressions, determinism.

Expectations here are computed independently of the generator: paths from docs/architecture.md,
depth from the camera and object geometry recorded in world.json, masks by rasterising the written
polygons with pycocotools, and the meaning of every expression by parsing its words.
"""

from __future__ import annotations

import csv
import json
import pickle
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from perceptio.errors import PerceptioError
from perceptio.sources.synth import generate_world

REFER_FILES = {
    ("refcoco", "unc"): {"train", "val", "testA", "testB"},
    ("refcoco", "google"): {"train", "val", "test"},
    ("refcoco+", "unc"): {"train", "val", "testA", "testB"},
    ("refcocog", "umd"): {"train", "val", "test"},
    ("refcocog", "google"): {"train", "val"},
}
REF_KEYS = {"ref_id", "ann_id", "category_id", "image_id", "file_name", "split", "sent_ids", "sentences"}
SENTENCE_KEYS = {"raw", "sent", "sent_id", "tokens"}
COCO_DIR = Path("images/mscoco/images/train2014")
ADE_DIR = Path("ADEChallengeData2016")


@pytest.fixture(scope="session")
def world(synth_world: Path) -> Path:
    return synth_world  # tests/conftest.py builds it once per session


@pytest.fixture(scope="session")
def meta(world: Path) -> dict:
    return json.loads((world / "world.json").read_text())


def load_refs(world: Path, dataset: str, split_by: str) -> list[dict]:
    with open(world / dataset / f"refs({split_by}).p", "rb") as handle:
        return pickle.load(handle)


def instance_map(world: Path, stem: str) -> np.ndarray:
    return np.array(Image.open(world / "instances" / f"{stem}.png"))


def all_files(root: Path) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def polygon_mask(segmentation: list[list[float]], height: int, width: int) -> np.ndarray:
    """Union of the polygon parts, each rasterised on its own (as a careful reader does)."""
    mask = np.zeros((height, width), dtype=bool)
    for part in segmentation:
        assert len(part) >= 6 and len(part) % 2 == 0, "a polygon part needs >= 3 points"
        mask |= mask_utils.decode(mask_utils.frPyObjects([part], height, width))[:, :, 0] > 0
    return mask


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.logical_and(a, b).sum() / np.logical_or(a, b).sum())


# ------------------------------------------------------------------------------------ layout


def test_files_are_where_the_refer_and_ade_layouts_put_them(world: Path, meta: dict, synth_world_args: dict) -> None:
    coco = [image for image in meta["images"] if image["layout"] == "coco"]
    ade = [image for image in meta["images"] if image["layout"] == "ade"]
    images = synth_world_args["images"]
    assert len(coco) + len(ade) == images and len(ade) == images // 4
    for image in coco:
        stem = f"COCO_train2014_{image['image_id']:012d}"
        assert (world / COCO_DIR / f"{stem}.jpg").is_file()
        assert (world / "depth" / f"{stem}.png").is_file() and (world / "instances" / f"{stem}.png").is_file()
    ade_names = {
        split: sorted(p.name for p in (world / ADE_DIR / "images" / split).glob("*.jpg"))
        for split in ("training", "validation")
    }
    prefixes = {"training": "ADE_train", "validation": "ADE_val"}
    for split, names in ade_names.items():
        assert names == [f"{prefixes[split]}_{i:08d}.jpg" for i in range(1, len(names) + 1)]
        for name in names:
            stem = name[: -len(".jpg")]
            assert (world / ADE_DIR / "annotations" / split / f"{stem}.png").is_file()
            assert (world / "depth" / f"{stem}.png").is_file() and (world / "instances" / f"{stem}.png").is_file()
    assert sum(map(len, ade_names.values())) == len(ade) and ade_names["validation"]
    assert len(list((world / COCO_DIR).glob("*.jpg"))) == len(coco)
    for dataset, split_by in REFER_FILES:
        assert (world / dataset / "instances.json").is_file() and (world / dataset / f"refs({split_by}).p").is_file()


# ------------------------------------------------------------------------------------ formats


def test_instances_json_loads_with_pycocotools(world: Path, meta: dict) -> None:
    coco_ids = {image["image_id"] for image in meta["images"] if image["layout"] == "coco"}
    for dataset in ("refcoco", "refcoco+", "refcocog"):
        coco = COCO(str(world / dataset / "instances.json"))
        assert set(coco.imgs) == coco_ids
        assert {c["name"] for c in coco.cats.values()} == {"sphere", "cube", "cylinder", "cone"}
        for image in coco.imgs.values():
            assert image["file_name"] == f"COCO_train2014_{image['id']:012d}.jpg"
            with Image.open(world / COCO_DIR / image["file_name"]) as picture:
                assert picture.format == "JPEG" and picture.mode == "RGB"
                assert picture.size == (image["width"], image["height"])
        for ann in coco.anns.values():
            assert ann["iscrowd"] == 0 and len(ann["bbox"]) == 4 and ann["area"] > 0
            assert isinstance(ann["segmentation"], list) and ann["synth_instance"] >= 1
            assert coco.annToMask(ann).sum() > 0


def test_refs_pickles_have_the_real_structure(world: Path) -> None:
    for dataset, split_by in REFER_FILES:
        assert (world / dataset / f"refs({split_by}).p").read_bytes()[:2] == b"\x80\x02"  # protocol 2
        refs = load_refs(world, dataset, split_by)
        assert isinstance(refs, list) and refs
        anns = {ann["id"]: ann for ann in json.loads((world / dataset / "instances.json").read_text())["annotations"]}
        assert [ref["ref_id"] for ref in refs] == list(range(len(refs)))
        sent_ids = [s["sent_id"] for ref in refs for s in ref["sentences"]]
        assert len(set(sent_ids)) == len(sent_ids)
        for ref in refs:
            assert type(ref) is dict and set(ref) == REF_KEYS
            assert ref["file_name"] == f"COCO_train2014_{ref['image_id']:012d}_{ref['ann_id']}.jpg"
            ann = anns[ref["ann_id"]]
            assert ann["image_id"] == ref["image_id"] and ann["category_id"] == ref["category_id"]
            assert ref["sent_ids"] == [s["sent_id"] for s in ref["sentences"]]
            for sentence in ref["sentences"]:
                assert set(sentence) == SENTENCE_KEYS
                assert sentence["sent"] == " ".join(re.sub(r"[^a-z ]", " ", sentence["raw"].lower()).split())
                assert sentence["tokens"] == sentence["sent"].split()


def test_maps_are_16_bit_and_ade_labels_8_bit(world: Path, meta: dict) -> None:
    for image in meta["images"]:
        stem, camera = image["stem"], image["camera"]
        size = (camera["width"], camera["height"])
        for folder in ("depth", "instances"):
            with Image.open(world / folder / f"{stem}.png") as png:
                assert png.format == "PNG" and png.mode in ("I;16", "I") and png.size == size
                assert np.array(png).max() <= 65535
        instances = instance_map(world, stem)
        assert set(np.unique(instances)) == {0} | {obj["instance"] for obj in image["objects"]}
        for obj in image["objects"]:
            assert (instances == obj["instance"]).sum() == obj["area_px"]
        if image["layout"] == "ade":
            with Image.open(world / image["annotation_file"]) as png:
                assert png.mode == "L" and png.size == size


def test_ade_class_table_parses_like_the_real_one(world: Path, meta: dict) -> None:
    text = (world / ADE_DIR / "objectInfo150.csv").read_text()
    rows = list(csv.DictReader(text.splitlines()))
    assert list(rows[0]) == ["Idx", "Ratio", "Train", "Val", "Stuff", "Name"]
    assert [int(row["Idx"]) for row in rows] == list(range(1, len(rows) + 1))
    names = {int(row["Idx"]): row["Name"].split(";")[0] for row in rows}
    assert {"wall", "floor", "sky", "sphere", "cube", "cylinder", "cone"} == set(names.values())
    assert abs(sum(float(row["Ratio"]) for row in rows) - 1.0) < 0.01
    # Labels: each object's pixels carry its shape's class; the rest is wall, floor or sky.
    train_seen = np.zeros(len(rows) + 1, dtype=int)
    for image in (i for i in meta["images"] if i["layout"] == "ade"):
        labels = np.array(Image.open(world / image["annotation_file"]))
        instances = instance_map(world, image["stem"])
        for obj in image["objects"]:
            assert set(np.unique(labels[instances == obj["instance"]])) == {
                idx for idx, name in names.items() if name == obj["shape"]
            }
        background = set(np.unique(labels[instances == 0]).tolist())
        assert background <= {idx for idx, name in names.items() if name in ("wall", "floor", "sky")}
        if image["ade_split"] == "training":
            train_seen[np.unique(labels)] += 1
    assert [int(row["Train"]) for row in rows] == train_seen[1:].tolist()


def test_formats_match_the_real_ade20k_samples(world: Path, shared_data: Path) -> None:
    real = shared_data / "ade20k"
    real_text = (real / "objectInfo150.csv").read_text()
    ours = (world / ADE_DIR / "objectInfo150.csv").read_text()
    assert ours.splitlines()[0] == real_text.splitlines()[0]
    assert ours.endswith("\n") == real_text.endswith("\n") and "\r" not in ours and '"' not in ours
    real_png = next((real / "annotations" / "validation").glob("*.png"))
    our_png = next((world / ADE_DIR / "annotations" / "training").glob("*.png"))
    with Image.open(real_png) as theirs, Image.open(our_png) as mine:
        assert (mine.format, mine.mode) == (theirs.format, theirs.mode)
    with Image.open(next((real / "images" / "validation").glob("*.jpg"))) as theirs:
        with Image.open(next((world / ADE_DIR / "images" / "training").glob("*.jpg"))) as mine:
            assert (mine.format, mine.mode) == (theirs.format, theirs.mode)


# ------------------------------------------------------------------------------------ ground truth


def pixel_ray(camera: dict, col: int, row: int) -> np.ndarray:
    """World direction through a pixel centre, scaled to unit camera-z (so hit distance = depth)."""
    in_camera = np.array([(col + 0.5 - camera["cx"]) / camera["fx"], (row + 0.5 - camera["cy"]) / camera["fy"], 1.0])
    return np.asarray(camera["rotation"]).T @ in_camera


def test_depth_of_spheres_and_floor_follows_the_geometry(world: Path, meta: dict) -> None:
    checked_spheres = 0
    for image in meta["images"]:
        camera = image["camera"]
        origin = np.asarray(camera["position"])
        depth = np.array(Image.open(world / image["depth_file"])).astype(float) / 1000.0
        instances = instance_map(world, image["stem"])
        for obj in image["objects"]:
            if obj["shape"] != "sphere":
                continue
            u, v = obj["image_centre"]
            col, row = int(u), int(v)
            if instances[row, col] != obj["instance"]:
                continue  # the centre is hidden behind another object
            ray, offset = pixel_ray(camera, col, row), origin - np.asarray(obj["centre"])
            a, b, c = ray @ ray, ray @ offset, offset @ offset - obj["size_m"] ** 2
            expected = (-b - np.sqrt(b * b - a * c)) / a
            assert depth[row, col] == pytest.approx(expected, abs=0.002)
            assert expected < obj["centre_depth_m"]  # the visible surface is in front of the centre
            checked_spheres += 1
        # The floor: exact plane depth on the bottom row, and deeper towards the horizon.
        height = camera["height"]
        wall_z = image["scene"]["wall_z_m"]
        for col in range(0, camera["width"], 7):
            ray = pixel_ray(camera, col, height - 1)
            floor_depth = -origin[1] / ray[1]
            if instances[height - 1, col] == 0 and origin[2] + floor_depth * ray[2] < wall_z:
                assert depth[height - 1, col] == pytest.approx(floor_depth, abs=0.002)
        column = camera["width"] // 2
        floor_rows = [r for r in range(height) if instances[r, column] == 0 and pixel_ray(camera, column, r)[1] < 0]
        lower_floor = [r for r in floor_rows if r > height * 0.75]
        assert np.all(np.diff(depth[lower_floor, column]) <= 0) or not lower_floor
    assert checked_spheres >= 5


def test_polygons_rasterise_to_the_instance_masks(world: Path, meta: dict) -> None:
    anns = {ann["id"]: ann for ann in json.loads((world / "refcoco" / "instances.json").read_text())["annotations"]}
    images = {image.get("image_id"): image for image in meta["images"]}
    referred = {ref["ann_id"] for dataset, split_by in REFER_FILES for ref in load_refs(world, dataset, split_by)}
    assert referred <= set(anns)
    for ann_id in sorted(referred):
        ann = anns[ann_id]
        image = images[ann["image_id"]]
        instances = instance_map(world, image["stem"])
        truth = instances == ann["synth_instance"]
        drawn = polygon_mask(ann["segmentation"], *instances.shape)
        assert iou(drawn, truth) >= 0.9, f"ann {ann_id}"
        rows, cols = np.nonzero(truth)
        assert ann["bbox"] == [cols.min(), rows.min(), cols.max() - cols.min() + 1, rows.max() - rows.min() + 1]


# ------------------------------------------------------------------------------------ splits


def test_splits_are_the_official_ones_and_disjoint_by_image(world: Path, meta: dict) -> None:
    shapes = {(obj["ann_id"]): obj["shape"] for image in meta["images"] for obj in image["objects"] if "ann_id" in obj}
    for (dataset, split_by), expected_splits in REFER_FILES.items():
        refs = load_refs(world, dataset, split_by)
        by_split: dict[str, set[int]] = {}
        for ref in refs:
            by_split.setdefault(ref["split"], set()).add(ref["image_id"])
        assert set(by_split) == expected_splits, (dataset, split_by)
        splits = list(by_split.values())
        assert all(not (a & b) for i, a in enumerate(splits) for b in splits[i + 1 :])
        if split_by == "unc":  # testA names only the person-like shape, testB only the others
            assert {shapes[r["ann_id"]] for r in refs if r["split"] == "testA"} == {"sphere"}
            assert "sphere" not in {shapes[r["ann_id"]] for r in refs if r["split"] == "testB"}
        counts = meta["counts"]["refer"][f"{dataset}-{split_by}"]
        for split, images in by_split.items():
            in_split = [r for r in refs if r["split"] == split]
            assert counts[split] == {
                "refs": len(in_split),
                "sentences": sum(len(r["sentences"]) for r in in_split),
                "images": len(images),
            }
    # unc and google share the refs (same ids, same words), only the split differs.
    assert [r["sentences"] for r in load_refs(world, "refcoco", "unc")] == [
        r["sentences"] for r in load_refs(world, "refcoco", "google")
    ]


# ------------------------------------------------------------------------------------ expressions

COLOURS = {"red", "green", "blue", "yellow", "orange", "purple", "pink", "cyan", "white", "brown"}
SHAPE_WORDS = {w: s for s in ("sphere", "cube", "cylinder", "cone") for w in (s, s + "s")}
# word -> (world.json field, True when the largest value is meant)
RELATION_WORDS = {
    **dict.fromkeys(("left", "leftmost"), ("u", False)),
    **dict.fromkeys(("right", "rightmost"), ("u", True)),
    **dict.fromkeys(("closer", "closest", "nearer", "nearest"), ("centre_depth_m", False)),
    **dict.fromkeys(("farther", "farthest", "further", "furthest"), ("centre_depth_m", True)),
    **dict.fromkeys(("bigger", "biggest", "larger", "largest"), ("volume_m3", True)),
    **dict.fromkeys(("smaller", "smallest", "tiniest"), ("volume_m3", False)),
}
SPATIAL_WORDS = {w for w, (field, _) in RELATION_WORDS.items() if field != "volume_m3"} | {"front", "behind", "back"}


def referents(tokens: list[str], objects: list[dict]) -> list[dict]:
    """The objects a sentence can mean: colour and shape words filter, a relation word picks the
    extreme of what is left (by image x, depth or volume)."""
    colours = COLOURS.intersection(tokens)
    shapes = {SHAPE_WORDS[t] for t in tokens if t in SHAPE_WORDS}
    candidates = [
        o for o in objects if (not colours or o["colour"] in colours) and (not shapes or o["shape"] in shapes)
    ]
    relations = {RELATION_WORDS[t] for t in tokens if t in RELATION_WORDS}
    assert len(relations) <= 1, tokens
    for field, largest in relations:
        values = [o["image_centre"][0] if field == "u" else o[field] for o in candidates]
        candidates = [candidates[int(np.argmax(values) if largest else np.argmin(values))]]
    return candidates


def test_each_expression_picks_out_its_object_unless_marked_ambiguous(world: Path, meta: dict) -> None:
    objects = {image.get("image_id"): image["objects"] for image in meta["images"]}
    for dataset in ("refcoco", "refcoco+", "refcocog"):
        refs = load_refs(world, dataset, {"refcocog": "umd"}.get(dataset, "unc"))
        special = meta["refs"][dataset]
        ambiguous = set(special["ambiguous"])
        assert ambiguous and special["duplicates"], dataset
        for ref in refs:
            for sentence in ref["sentences"]:
                found = [o["ann_id"] for o in referents(sentence["tokens"], objects[ref["image_id"]])]
                if ref["ref_id"] in ambiguous:
                    assert len(found) >= 2 and ref["ann_id"] in found, sentence
                else:
                    assert found == [ref["ann_id"]], (dataset, sentence)
                if dataset == "refcoco+":
                    assert not SPATIAL_WORDS.intersection(sentence["tokens"]), sentence
        # Ambiguous refs come in pairs: the same words for two objects of one image.
        texts = {}
        for ref in refs:
            if ref["ref_id"] in ambiguous:
                texts.setdefault((ref["image_id"], ref["sentences"][0]["sent"]), set()).add(ref["ann_id"])
        assert all(len(anns) == 2 for anns in texts.values())
        for duplicate in special["duplicates"]:
            copy, original = refs[duplicate["ref_id"]], refs[duplicate["of"]]
            assert copy["ann_id"] == original["ann_id"] and copy["ref_id"] != original["ref_id"]
            assert [s["sent"] for s in copy["sentences"]] == [s["sent"] for s in original["sentences"]]


# ------------------------------------------------------------------------------------ generator


def test_same_seed_same_bytes_whatever_the_workers_and_other_seeds_differ(
    world: Path, synth_world_args: dict, tmp_path: Path
) -> None:
    again = tmp_path / "again"
    generate_world(again, workers=2, **synth_world_args)
    assert all_files(again) == all_files(world)
    other = tmp_path / "other"
    generate_world(other, images=4, seed=synth_world_args["seed"] + 1, workers=1)
    ours, theirs = all_files(world), all_files(other)
    image = str(COCO_DIR / "COCO_train2014_000000000001.jpg")
    assert ours[image] != theirs[image] and ours["world.json"] != theirs["world.json"]


def test_rebuilding_a_single_image_gives_the_same_files(world: Path, meta: dict, synth_world_args: dict) -> None:
    from perceptio.sources.synth.scene import SceneConfig
    from perceptio.sources.synth.world import build_image

    image = meta["images"][7]
    result = build_image(image["index"], seed=synth_world_args["seed"], config=SceneConfig())
    assert result.jpeg == (world / image["file"]).read_bytes()
    assert result.depth_png == (world / image["depth_file"]).read_bytes()


def test_regenerating_replaces_the_world_and_bad_out_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "w"
    generate_world(root, images=8, seed=0, workers=1)
    generate_world(root, images=4, seed=0, workers=1)
    assert len(list((root / COCO_DIR).glob("*.jpg"))) == 3 and len(list((root / "depth").glob("*.png"))) == 4
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging leftovers
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    with pytest.raises(PerceptioError, match="is a file"):
        generate_world(a_file, images=1)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(PerceptioError, match="not a synthetic world"):
        generate_world(foreign, images=1)
    assert (foreign / "notes.txt").read_text() == "mine"


def test_cli_reports_bad_out_in_one_line_and_help_lists_every_option(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from perceptio.curate.cli import main

    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    monkeypatch.setattr(sys, "argv", ["perceptio-curate", "synth", "--out", str(a_file)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "Traceback" not in err
    monkeypatch.setattr(sys, "argv", ["perceptio-curate", "synth", "--help"])
    with pytest.raises(SystemExit) as done:
        main()  # a console script ends with SystemExit, 0 after printing help
    assert done.value.code == 0
    help_text = capsys.readouterr().out
    for option in ("--out", "--images", "--seed", "--workers"):
        assert option in help_text


def test_cli_writes_a_world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from perceptio.curate.cli import main

    argv = ["perceptio-curate", "synth", "--out", str(tmp_path / "w"), "--images", "2", "--workers", "1"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as done:
        main()
    assert done.value.code == 0
    assert json.loads((tmp_path / "w" / "world.json").read_text())["counts"]["images"] == 2


# ------------------------------------------------------------------------------------ the readers


def test_refer_reader_reads_the_world_as_written(world: Path, meta: dict) -> None:
    refer = pytest.importorskip(
        "perceptio.sources.refer", reason="the REFER reader (perceptio/sources/refer.py) is not there yet"
    )
    images = {image.get("image_id"): image for image in meta["images"]}
    for dataset, split_by in REFER_FILES:
        reader = refer.ReferDataset(world, dataset=dataset, split_by=split_by)
        assert not reader.problems
        counts = reader.counts()
        assert counts == meta["counts"]["refer"][f"{dataset}-{split_by}"]
        for ref in reader.refs:
            ann = reader.annotations[ref.ann_id]
            truth = instance_map(world, images[ref.image_id]["stem"]) == ann["synth_instance"]
            assert iou(reader.ann_mask(ref.ann_id) > 0, truth) >= 0.9
