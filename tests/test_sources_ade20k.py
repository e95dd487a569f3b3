"""The ADE20k reader on the real samples in ../shared/data and on hand-made broken layouts."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from perceptio.errors import PerceptioError
from perceptio.sources.ade20k import ADE20kDataset
from perceptio.sources.problems import BadImage

CLASS_ROWS = [(1, "wall"), (2, "building;edifice"), (3, "sky")]


@pytest.fixture(scope="module")
def real_ade(shared_data) -> ADE20kDataset:
    return ADE20kDataset(shared_data / "ade20k")


def test_real_class_table(real_ade, shared_data):
    with open(shared_data / "ade20k" / "objectInfo150.csv", newline="") as handle:
        rows = list(csv.reader(handle))[1:]
    assert real_ade.num_classes == 150 == len(rows)
    assert [ade_class.idx for ade_class in real_ade.classes] == list(range(1, 151))
    building = real_ade.classes[1]
    assert (building.name, building.synonyms) == ("building", ["building", "edifice"])
    # Every synonym list, joined back, is the table's Name column.
    assert [";".join(ade_class.synonyms) for ade_class in real_ade.classes] == [row[5] for row in rows]


def test_real_samples_decode_at_image_size(real_ade, shared_data):
    assert real_ade.splits == ["validation"]
    samples = real_ade.samples("validation")
    assert [(sample.image_id, sample.name) for sample in samples] == [
        (number, f"ADE_val_{number:08d}") for number in (1, 2, 3)
    ]
    for sample in samples:
        segmentation = real_ade.load_segmentation(sample)
        image = real_ade.load_image(sample)
        assert segmentation.dtype == np.uint8 and segmentation.shape == (image.height, image.width)
        assert segmentation.max() <= 150
        # Same pixels as PIL reads from the file.
        np.testing.assert_array_equal(segmentation, np.asarray(Image.open(sample.annotation_path)))
    assert real_ade.samples("val") == samples
    assert real_ade.problems == []


def test_folder_containing_the_challenge_folder(shared_data, tmp_path):
    (tmp_path / "ADEChallengeData2016").symlink_to(shared_data / "ade20k", target_is_directory=True)
    dataset = ADE20kDataset(tmp_path)
    assert dataset.root == tmp_path / "ADEChallengeData2016"
    assert len(dataset.samples("validation")) == 3


def _write_layout(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "objectInfo150.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["Idx", "Ratio", "Train", "Val", "Stuff", "Name"])
        for idx, name in CLASS_ROWS:
            writer.writerow([idx, 0.1, 10, 1, 1, name])
    for folder in ("images/training", "annotations/training"):
        (root / folder).mkdir(parents=True)

    def add(name: str, size=(16, 12), label_size=None, max_class=3, image=True, label=True):
        width, height = size
        if image:
            Image.fromarray(np.full((height, width, 3), 90, np.uint8)).save(root / "images/training" / f"{name}.jpg")
        if label:
            label_width, label_height = label_size or size
            values = (np.arange(label_width * label_height) % (max_class + 1)).reshape(label_height, label_width)
            Image.fromarray(values.astype(np.uint8)).save(root / "annotations/training" / f"{name}.png")

    add("ADE_train_00000001")
    add("ADE_train_00000002", label=False)  # image without annotation
    add("ADE_train_00000003", image=False)  # annotation without image
    add("ADE_train_00000004", label_size=(8, 6))  # label map of another size
    add("ADE_train_00000005", max_class=7)  # class index above the table
    add("ADE_train_00000006")
    (root / "annotations/training/ADE_train_00000006.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    add("ADE_train_00000007")
    jpeg = root / "images/training/ADE_train_00000007.jpg"
    jpeg.write_bytes(jpeg.read_bytes()[:200])  # truncated
    add("cover")  # no image number
    return root


@pytest.fixture
def broken_ade(tmp_path) -> ADE20kDataset:
    return ADE20kDataset(_write_layout(tmp_path))


def test_pairing_problems_are_reported_and_skipped(broken_ade):
    samples = broken_ade.samples("train")
    assert [sample.image_id for sample in samples] == [1, 4, 5, 6, 7]
    assert {(problem.kind, problem.id) for problem in broken_ade.problems} == {
        ("missing_annotation", "ADE_train_00000002"),
        ("unknown_image", "ADE_train_00000003"),
        ("bad_name", "cover"),
    }
    assert broken_ade.splits == ["training"]
    with pytest.raises(PerceptioError, match="validation not found"):
        broken_ade.samples("validation")


@pytest.mark.parametrize(
    "image_id, kind",
    [(4, "size_mismatch"), (5, "corrupt_annotation"), (6, "corrupt_image")],
)
def test_bad_label_maps_raise_with_the_sample_name(broken_ade, image_id, kind):
    sample = next(sample for sample in broken_ade.samples("training") if sample.image_id == image_id)
    with pytest.raises(BadImage) as caught:
        broken_ade.load_segmentation(sample)
    assert (caught.value.problem.kind, caught.value.problem.id) == (kind, sample.name)


def test_good_and_truncated_images(broken_ade):
    by_id = {sample.image_id: sample for sample in broken_ade.samples("training")}
    segmentation = broken_ade.load_segmentation(by_id[1])
    expected = (np.arange(16 * 12) % 4).reshape(12, 16)
    np.testing.assert_array_equal(segmentation, expected)
    assert broken_ade.load_image(by_id[1]).size == (16, 12)
    with pytest.raises(BadImage) as caught:
        broken_ade.load_image(by_id[7])
    assert caught.value.problem.kind == "corrupt_image"


def test_count_warnings_give_numbers(broken_ade):
    assert broken_ade.count_warnings() == [
        "ade20k training: 5 of 20,210 images (<1%)",
        "ade20k validation: 0 of 2,000 images (0%)",
    ]


def test_missing_root_or_class_table_is_an_error(tmp_path):
    with pytest.raises(PerceptioError, match="not found"):
        ADE20kDataset(tmp_path / "nowhere")
    with pytest.raises(PerceptioError, match="neither images/ and annotations/"):
        ADE20kDataset(tmp_path)
    root = _write_layout(tmp_path / "ade")
    (root / "objectInfo150.csv").unlink()
    with pytest.raises(PerceptioError, match="class table .* not found"):
        ADE20kDataset(root)
    (root / "objectInfo150.csv").write_text("Idx,Name\n1,wall\n3,sky\n")
    with pytest.raises(PerceptioError, match="not 1..2 in order"):
        ADE20kDataset(root)


def test_a_root_on_an_object_store_reads_as_the_local_one(tmp_path, s3_copy):
    """The broken layout on a local S3 server, given as the dataset folder or as its parent."""
    local = ADE20kDataset(_write_layout(tmp_path / "parent" / "ADEChallengeData2016"))
    parent = s3_copy(tmp_path / "parent", "scenes")
    for root in (f"{parent}/ADEChallengeData2016", parent):  # the parent: found by listing the prefix
        remote = ADE20kDataset(root)
        assert remote.root == f"{parent}/ADEChallengeData2016" and remote.classes == local.classes
        pairs = [(sample.image_id, sample.name) for sample in remote.samples("training")]
        assert pairs == [(sample.image_id, sample.name) for sample in local.samples("training")]
        assert [(p.kind, p.id) for p in remote.problems] == [(p.kind, p.id) for p in local.problems]
        by_id = {sample.image_id: sample for sample in remote.samples("training")}
        local_by_id = {sample.image_id: sample for sample in local.samples("training")}
        np.testing.assert_array_equal(remote.load_segmentation(by_id[1]), local.load_segmentation(local_by_id[1]))
        np.testing.assert_array_equal(np.asarray(remote.load_image(by_id[1])), np.asarray(local.load_image(local_by_id[1])))
        for image_id, kind in ((4, "size_mismatch"), (5, "corrupt_annotation"), (6, "corrupt_image")):
            with pytest.raises(BadImage) as caught:
                remote.load_segmentation(by_id[image_id])
            assert caught.value.problem.kind == kind
    # A prefix holding neither layout: one line that asks for the dataset folder itself.
    with pytest.raises(PerceptioError, match="give --data-root as the dataset folder itself"):
        ADE20kDataset(f"{parent}/ADEChallengeData2016/images")
    with pytest.raises(PerceptioError, match="not found"):
        ADE20kDataset(f"{parent}-missing")
