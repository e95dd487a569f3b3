"""Object-pair order: does a depth map keep which of two objects is nearer (synth, ADE20k segments)?"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from perceptio.tokenize.cli import app
from perceptio.tokenize.data import MaskSource
from perceptio.tokenize.fit import evaluate_pairs
from perceptio.tokenize.metrics import LOWER_IS_NEARER, object_pair_order
from perceptio.tokenize.vqvae import DepthVQVAE, DepthVQVAEConfig


def _box(shape, top, left, height, width):
    mask = np.zeros(shape, bool)
    mask[top:top + height, left:left + width] = True
    return mask


def test_pairs_count_only_clear_depth_differences_and_keep_the_order():
    shape = (40, 60)
    inverse = np.full(shape, 0.1)
    masks = [_box(shape, 25, 2, 10, 10), _box(shape, 5, 20, 10, 10), _box(shape, 10, 40, 10, 10)]
    for mask, value in zip(masks, (0.5, 0.25, 0.26)):  # A nearest; B and C within 5% of each other
        inverse[mask] = value
    right = np.where(inverse > 0.3, 1.0, -1.0)  # A near, the rest one far value: ties B/C (no pair anyway)
    wrong = -inverse  # near and far swapped
    small = np.zeros((8, 8))
    small[5:8, 0:2] = 1.0  # a coarse map stretched over the image, A's corner near
    pairs, kept = object_pair_order(masks, inverse, {"right": right, "wrong": wrong, "coarse": small})
    assert pairs == 2, "A-B and A-C; B-C differ by 4%"
    assert kept == {"right": 2, "wrong": 0, "coarse": 2, LOWER_IS_NEARER: 2}
    inverse[masks[0]] = 0.0  # an object without valid depth takes part in no pair
    assert object_pair_order(masks, inverse, {"right": right})[0] == 0


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    from perceptio.sources.synth import generate_world

    root = tmp_path_factory.mktemp("pairs") / "world"
    generate_world(root, images=8, seed=11, workers=1)
    return root


def test_synthetic_world_pairs_through_the_eval_command(world: Path, tmp_path: Path):
    tokenizer = tmp_path / "tok"
    DepthVQVAE(DepthVQVAEConfig(input_pool=8, hidden_channels=(4, 4), code_dim=8, num_res_blocks=1)).save_pretrained(tokenizer)
    result = CliRunner().invoke(app, ["eval", str(tokenizer), "--data-root", str(world), "--depth-source", "gt",
                                      "--split", "all", "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    pairs = json.loads(result.stdout)["object_pairs"]["synth all"]
    assert pairs["images"] == 8 and pairs["pairs"] >= 20
    # The normalised input is the true inverse depth up to a monotone map and clipping: it keeps
    # (nearly) every pair; a random tokenizer's reconstruction and the heuristic are just shares.
    assert pairs["normalised input"] >= 0.95
    assert 0.0 <= pairs["decoded"] <= 1.0 and 0.0 <= pairs[LOWER_IS_NEARER] <= 1.0
    masks = MaskSource(world, "synth").masks(next((world / "depth").glob("*.png")))
    assert masks and all(mask.dtype == bool and mask.any() for mask in masks)


def test_ade20k_segments_when_present(shared_data: Path):
    root = shared_data / "ade20k"
    if not (root / "objectInfo150.csv").is_file():
        pytest.skip("no ADE20k samples in ../shared/data")
    from perceptio.sources.ade20k import ADE20kDataset

    dataset = ADE20kDataset(root)
    stuff = {ade_class.idx for ade_class in dataset.classes if ade_class.stuff}
    samples = [sample for split in dataset.splits for sample in dataset.samples(split)]
    source = MaskSource(root, "ade20k")
    depths, all_masks = [], []
    for sample in samples:
        masks = source.masks(sample.image_path)
        classes = np.asarray(Image.open(sample.annotation_path))
        assert masks, sample.name
        for mask in masks:
            assert mask.shape == classes.shape and len(np.unique(classes[mask])) == 1
            assert int(classes[mask][0]) not in stuff and int(classes[mask][0]) != 0
        # A stand-in teacher: inverse depth growing towards the image bottom, as on a floor.
        depths.append(np.linspace(0.1, 1.0, classes.shape[0])[:, None].repeat(classes.shape[1], 1))
        all_masks.append(masks)
    tokenizer = DepthVQVAE(DepthVQVAEConfig(input_pool=8, hidden_channels=(4, 4), code_dim=8, num_res_blocks=1))
    scores = evaluate_pairs(tokenizer, depths, all_masks)
    assert scores["images"] == len(samples) and scores["pairs"] > 0
    assert scores["normalised input"] >= 0.95
