"""``perceptio-evaluate diagnose``: the three probes of where a model's learning chain breaks.

One tiny random checkpoint and a few grounding shards per module. The probes are checked on
models whose links are cut on purpose: a zeroed [SEG] projector (the decoder cannot see its prompt:
reliance exactly 0) against an amplified one (the masks follow the prompt), a zeroed vision
projector (the language model cannot see the picture: the rolled images cost exactly nothing).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
from pathlib import Path

import pytest
import torch

from perceptio.evaluate.benchmarks import read_shard_examples
from perceptio.evaluate.diagnose import (
    PROMPT_RELIANCE_MIN,
    Probes,
    diagnose,
    image_partners,
    interleave_by_image,
    mask_agreement,
    picture_key,
    readings,
    seg_spread,
)
from perceptio.train.data import Example
from tests.train_factory import write_shards


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, vqvae_dir) -> Path:
    from perceptio.train.config import PerceptioConfig
    from perceptio.train.model import PerceptioModel

    torch.manual_seed(0)
    config = PerceptioConfig(model="tiny", sam_model="tiny", tokenizer=str(vqvae_dir), lora_rank=4, lora_alpha=8)
    return PerceptioModel.from_config(config).save_pretrained(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def model(checkpoint):
    from perceptio.train.model import PerceptioModel

    return PerceptioModel.from_pretrained(checkpoint).eval()


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("shards")
    write_shards(folder, "refcoco-unc", split="train", shards=1, images_per_shard=3, refs=2, sentences=2)
    return folder


@pytest.fixture(scope="module")
def examples(shards) -> list[Example]:
    return read_shard_examples([shards], "train")


def probe(model, examples, batch_size: int = 4) -> dict[str, float | None]:
    """The readings' values by quantity."""
    probes = diagnose(model, examples, batch_size, torch.device("cpu"), contextlib.nullcontext)
    rows, _ = readings(probes, model.segmenter is not None, model.config.use_depth_tokens)
    return {row.quantity: row.value for row in rows}


# ------------------------------------------------------------------------------------------ parts
def fake(key: str, picture: bytes) -> Example:
    return Example(key, "test", (), picture, (), None)


def test_pictures_are_interleaved_and_each_sample_gets_another_picture():
    examples = [fake("a1", b"A"), fake("a2", b"A"), fake("a3", b"A"), fake("b1", b"B"), fake("c1", b"C")]
    dealt = interleave_by_image(examples)
    assert [example.key for example in dealt] == ["a1", "b1", "c1", "a2", "a3"]
    keys = [picture_key(example) for example in dealt]
    partners = image_partners(keys)
    assert partners == [1, 2, 3, 1, 1]  # a2 and a3 wrap around past a1 to b1
    assert all(keys[index] != keys[partner] for index, partner in enumerate(partners))
    assert image_partners([picture_key(fake("x", b"X"))] * 3) is None


def test_seg_spread_of_known_states():
    same = torch.tensor([[1.0, 2.0], [1.0, 2.0], [1.0, 2.0]])
    assert seg_spread(same) == (0.0, pytest.approx(1.0))
    # e1 and e2: mean (0.5, 0.5), std (0.5, 0.5) per dimension: the same norm; orthogonal.
    spread, cosine = seg_spread(torch.eye(2))
    assert spread == pytest.approx(1.0) and cosine == pytest.approx(0.0)
    assert seg_spread(torch.ones(1, 4)) == (None, None)


def test_mask_agreement_counts_pixels():
    truth = torch.zeros(2, 4, 4)
    truth[:, :2] = 1  # 8 pixels each
    logits = torch.full((2, 4, 4), -1.0)
    logits[0, :2] = 1.0  # exactly the truth
    logits[1, :1] = 1.0  # half of it
    iou, dice = mask_agreement(logits, truth)
    assert iou.tolist() == [1.0, 0.5]
    assert dice.tolist() == pytest.approx([1.0, 2 * 4 / (4 + 8)])


# ------------------------------------------------------------------------------------------ probes
def test_zeroed_prompt_path_gives_zero_reliance_and_a_prompt_following_decoder_is_detected(model, examples):
    blind = copy.deepcopy(model)
    with torch.no_grad():
        for parameter in blind.segmenter.projector.parameters():
            parameter.zero_()
    values = probe(blind, examples)
    assert values["mean |logit change| / std"] == 0.0
    assert values["prompt change ||p - p_rolled|| / ||p||"] == 0.0
    assert values["mask IoU, own prompts"] == values["mask IoU, rolled prompts"]

    following = copy.deepcopy(model)
    with torch.no_grad():  # a prompt a hundred times louder: the decoder's output follows it
        following.segmenter.projector[2].weight.mul_(100.0)
    values = probe(following, examples)
    assert values["mean |logit change| / std"] >= PROMPT_RELIANCE_MIN
    assert 0.0 < values["prompt change ||p - p_rolled|| / ||p||"] <= 2.0


def test_blind_vision_path_costs_nothing_when_images_are_rolled(model, examples):
    values = probe(model, examples)
    # A random model sees the picture a little: rolling it changes the loss, if only slightly.
    assert values["rolled - true"] != 0.0 and values["span: rolled - true"] != 0.0
    blind = copy.deepcopy(model)
    with torch.no_grad():
        for parameter in blind.adapter.vision_modules()[-1].parameters():
            parameter.zero_()  # every image token the same: the picture cannot reach the text
    values = probe(blind, examples)
    assert values["rolled - true"] == 0.0
    assert values["span: rolled - true"] == 0.0


def test_models_without_a_head_or_depth_tokens_skip_those_probes(examples):
    readings_ = readings(Probes(), has_segmenter=False, has_depth_tokens=False)[0]
    notes = {row.quantity: row.reading for row in readings_}
    assert notes["depth span"] == "skipped: the model has no depth tokens"
    assert notes["[SEG] states"] == notes["mask decoder"] == "skipped: the model has no segmentation head"


def test_model_without_segmentation_runs_the_image_probe_only(examples):
    from perceptio.train.config import PerceptioConfig
    from perceptio.train.model import PerceptioModel

    torch.manual_seed(0)
    config = PerceptioConfig(model="tiny", use_segmentation=False, use_depth_tokens=False, use_depth_recon=False,
                             use_depth_loss=False, tokenizer="")
    plain = PerceptioModel.from_config(config).eval()
    probes = diagnose(plain, examples, 4, torch.device("cpu"), contextlib.nullcontext)
    rows, _ = readings(probes, has_segmenter=False, has_depth_tokens=False)
    assert math.isfinite(probes.nll_true.value) and probes.span_true.count == 0 and not probes.seg_states
    assert [row.reading for row in rows if row.value is None] == [
        "skipped: the model has no depth tokens", "skipped: the model has no segmentation head",
        "skipped: the model has no segmentation head"]


# ------------------------------------------------------------------------------------------ command
def test_diagnose_command_reports_every_number_finite_and_in_range(evaluate, checkpoint, shards, tmp_path):
    out = tmp_path / "diagnose.json"
    done = evaluate("diagnose", "--checkpoint", str(checkpoint), "--shards", str(shards), "--limit", "10",
                    "--batch-size", "4", "--json", "--out", str(out))
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)
    assert json.loads(out.read_text()) == results
    assert results["data"]["samples"] == 10 and results["data"]["batches"] == 3
    values = {row["quantity"]: row["value"] for row in results["readings"]}
    assert all(row["reading"] for row in results["readings"])
    assert all(value is not None and math.isfinite(value) for value in values.values()), values
    assert values["L_LLM, true images (nats/token)"] > 0 and values["L_LLM, images rolled"] > 0
    assert values["rolled - true"] == pytest.approx(values["L_LLM, images rolled"] - values["L_LLM, true images (nats/token)"])
    assert values["||std|| / ||mean||"] >= 0 and -1 <= values["mean pairwise cosine"] <= 1
    assert values["mean |logit change| / std"] >= 0 and values["logit std (own prompts)"] > 0
    for name in ("mask IoU, own prompts", "mask IoU, rolled prompts", "mask DICE, own prompts", "mask DICE, rolled prompts"):
        assert 0.0 <= values[name] <= 1.0
    # A random model does not read the picture: the first break is the first link.
    assert results["first_break"] == results["broken_links"][0]
    assert results["first_break"].startswith("image -> language model")

    table = evaluate("diagnose", "--checkpoint", str(checkpoint), "--shards", str(shards), "--limit", "4",
                     "--batch-size", "2")
    assert table.returncode == 0, table.stderr
    assert "where the chain breaks first" in table.stdout and "image reliance" in table.stdout


@pytest.mark.parametrize("arguments, message", [
    (["--batch-size", "1"], "--batch-size must be at least 2"),
    (["--limit", "1"], "--limit must be at least 2"),
    (["--split", "val"], "no shards of split(s) val"),
])
def test_bad_input_is_one_line_and_exit_code_2(evaluate, checkpoint, shards, arguments, message):
    done = evaluate("diagnose", "--checkpoint", str(checkpoint), "--shards", str(shards), *arguments)
    assert done.returncode == 2
    assert message in done.stderr and "Traceback" not in done.stderr
    assert len([line for line in done.stderr.splitlines() if line.startswith("error:")]) == 1


def test_missing_checkpoint_is_one_line(evaluate, shards, tmp_path):
    done = evaluate("diagnose", "--checkpoint", str(tmp_path / "nothing"), "--shards", str(shards))
    assert done.returncode == 2 and "checkpoint folder not found" in done.stderr
