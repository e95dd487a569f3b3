"""Which images a tokenizer is fitted on, and the held-out split, on a real synthetic world."""

from __future__ import annotations

from pathlib import Path

import pytest

from perceptio.errors import PerceptioError
from perceptio.tokenize.data import DepthSource, is_held_out, list_images, split_held_out
from perceptio.tokenize.teacher import OracleTeacher


@pytest.fixture(scope="session")
def world(synth_world: Path) -> Path:
    return synth_world  # tests/conftest.py builds it once per session


def test_every_dataset_lists_images_of_the_world(world: Path, synth_world_args: dict) -> None:
    everything = list_images(world, "synth")
    depth_stems = {path.stem for path in (world / "depth").glob("*.png")}
    assert {path.stem for path in everything} == depth_stems and len(everything) == synth_world_args["images"]
    for dataset in ("refcoco", "refcoco+", "refcocog", "ade20k"):
        images = list_images(world, dataset)
        assert images and set(images) <= set(everything), dataset
    assert all("ADE_train_" in path.name for path in list_images(world, "ade20k"))


def test_the_oracle_source_reads_each_listed_image(world: Path) -> None:
    paths = list_images(world, "refcoco")[:3]
    depths = DepthSource(OracleTeacher(world / "depth"), cache=None).depths(paths)
    assert [depth.shape for depth in depths] == [OracleTeacher(world / "depth").predict_paths([path])[0].shape for path in paths]
    assert all(depth.max() > 0 for depth in depths)


def test_held_out_split_is_stable_and_by_stem(world: Path) -> None:
    paths = list_images(world, "synth")
    train, held_out = split_held_out(paths, 0.3)
    assert set(train).isdisjoint(held_out) and set(train) | set(held_out) == set(paths)
    assert held_out and set(split_held_out(paths[::-1], 0.3)[1]) == set(held_out)  # order does not matter
    # Membership depends on the stem alone: the same file in another folder keeps its side.
    assert [is_held_out(Path("elsewhere") / path.name, 0.3) for path in paths] == [path in held_out for path in paths]
    assert split_held_out(paths[:2], 0.0)[1] == []


def test_unknown_dataset_and_missing_root_are_user_errors(world: Path, tmp_path) -> None:
    with pytest.raises(PerceptioError):
        list_images(world, "coco-stuff")
    with pytest.raises(PerceptioError):
        list_images(tmp_path / "absent", "synth")
    with pytest.raises(PerceptioError):
        list_images(tmp_path, "synth")  # no depth/ folder
