"""``perceptio-train --plan``: exact counts at the published shapes, and the memory estimate's logic."""

from __future__ import annotations

from dataclasses import replace

import pytest

from perceptio.errors import PerceptioError
from perceptio.train import memory_plan, shapes
from perceptio.train.memory_plan import PlanRequest


def _lora_by_hand(text: dict, rank: int) -> int:
    """r x (in + out) for q, k, v, o, gate, up, down of every layer, from the published numbers."""
    hidden, inner = text["hidden_size"], text["intermediate_size"]
    kv = text["num_key_value_heads"] * hidden // text["num_attention_heads"]
    per_layer = (hidden + hidden) + 2 * (hidden + kv) + (hidden + hidden) + 2 * (hidden + inner) + (inner + hidden)
    return rank * per_layer * text["num_hidden_layers"]


@pytest.mark.parametrize("name", ["internvl3-1b", "internvl3-8b"])
def test_counts_of_the_8b_and_1b_shapes(name):
    text = shapes.SHAPES[name].config["text_config"]
    counts = memory_plan.count_parameters(f"shape:{name}", "shape:sam2.1-hiera-large", 256)
    assert counts.lora == _lora_by_hand(text, 256)
    # 131 perception tokens, plus <video> which InternVL's conversion adds beyond the 151674 rows.
    assert counts.new_token_rows == 132 and counts.vocab_rows == 151674 + 132
    assert counts.token_row_parameters == 131 * text["hidden_size"] * 2  # untied: embedding and head
    assert not counts.tied
    assert counts.trainable == counts.lora + counts.token_row_parameters + counts.segmenter
    vlm = shapes.build(shapes.SHAPES[name], device="meta")
    assert abs(shapes.count_parameters(vlm) / shapes.SHAPES[name].published_parameters - 1) < 0.01


def test_the_8b_counts_are_what_the_readme_states():
    counts = memory_plan.count_parameters("shape:internvl3-8b", "shape:sam2.1-hiera-large", 256)
    assert counts.lora == 645_922_816
    assert 8.7e9 < counts.total < 8.9e9


def test_memory_estimate_moves_the_right_way():
    base = memory_plan.plan(PlanRequest(batch_size=4))
    checkpointed = memory_plan.plan(PlanRequest(batch_size=4, gradient_checkpointing=True))
    assert checkpointed.activations < base.activations / 4
    assert checkpointed.weights == base.weights
    assert memory_plan.plan(PlanRequest(batch_size=8)).activations == 2 * base.activations
    fp32 = memory_plan.plan(PlanRequest(batch_size=4, precision="fp32"))
    assert fp32.weights > base.weights and fp32.optimizer == base.optimizer
    eight = PlanRequest(model="shape:internvl3-8b", gpus=8)
    assert memory_plan.plan(replace(eight, strategy="fsdp")).weights < memory_plan.plan(eight).weights / 4
    assert memory_plan.plan(eight).gradients == 2 * memory_plan.plan(replace(eight, gpus=1)).gradients  # DDP buckets


def test_recommendations_for_the_three_targets():
    one_b = memory_plan.recommend(PlanRequest(), gpus=1, gib=24)
    assert one_b is not None and one_b[1] >= 1  # the 1B model trains on one 24 GB card
    assert memory_plan.recommend(PlanRequest(model="shape:internvl3-8b"), gpus=1, gib=24) is None
    assert memory_plan.recommend(PlanRequest(model="shape:internvl3-8b"), gpus=1, gib=80) is not None
    text = memory_plan.render(PlanRequest())
    for label in ("1x24GB", "1x80GB", "8x80GB", "trainable", "new token rows"):
        assert label in text


def test_bad_settings_are_one_line():
    with pytest.raises(PerceptioError, match="--precision"):
        memory_plan.plan(PlanRequest(precision="fp8"))
    with pytest.raises(PerceptioError, match="ddp or fsdp"):
        memory_plan.plan(PlanRequest(strategy="zero3"))
    with pytest.raises(PerceptioError, match="unknown internvl shape"):
        memory_plan.plan(PlanRequest(model="shape:internvl3-2b"))
