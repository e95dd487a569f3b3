"""--eye-depth: the depth block each image token regresses, the term against a hand-written loop
over a batch mixing pictures with and without depth and a text-only example, its gradient reaching
the vision tower and not the language model, evaluation keeping nothing, and a second stage adding
or dropping the training-only head."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from perceptio.errors import PerceptioError
from perceptio.train.chat import ASSISTANT, USER, Turn
from perceptio.train.config import PerceptioConfig
from perceptio.train.eye_depth import EyeDepthHead, token_depth_blocks
from tests.test_train_model import build, example_parts, picture, weighted_total


def loop_blocks(depth: np.ndarray, side: int, sub: int) -> np.ndarray:
    """The reference for a map whose side is a multiple of side * sub: average m x m squares, then
    give token (r, c) the sub x sub values at rows r*sub.. and columns c*sub.., row by row."""
    size = side * sub
    m = depth.shape[0] // size
    pooled = np.array([[depth[i * m:(i + 1) * m, j * m:(j + 1) * m].mean() for j in range(size)] for i in range(size)])
    return np.array([[pooled[r * sub + a, c * sub + b] for a in range(sub) for b in range(sub)]
                     for r in range(side) for c in range(side)])


def test_each_image_token_regresses_the_block_under_it():
    depth = np.random.default_rng(0).uniform(-1, 1, (2, 60, 60)).astype(np.float32)
    blocks = token_depth_blocks(torch.from_numpy(depth), side=5, sub=3)
    assert blocks.shape == (2, 25, 9)
    for index in range(2):
        np.testing.assert_allclose(blocks[index].numpy(), loop_blocks(depth[index], 5, 3), atol=1e-5)


@pytest.fixture(scope="module")
def model(vqvae_dir):
    return build(vqvae_dir, eye_depth=0.5, freeze_vision=False)


def three_examples(model) -> tuple[dict, int]:
    """A text-only example, a question about a picture without depth, a grounding example with depth:
    the batch and the row of the one example the term covers (its picture is the batch's second tile)."""
    text = model.processor.encode_conversation(None, [Turn(USER, "Say hello."), Turn(ASSISTANT, "hello")])
    question = model.processor.encode_example(picture(seed=1), "Which point is closest to the camera?", "(B)")
    grounding = model.processor.encode_example(**example_parts())
    return model.processor.collate([text, question, grounding]), 2


def projector_output(model, batch) -> torch.Tensor:
    seen = []
    hook = model.adapter.image_projector().register_forward_hook(lambda module, inputs, output: seen.append(output))
    try:
        output = model(batch)
    finally:
        hook.remove()
    return seen[0], output


def test_the_term_is_the_squared_error_over_the_examples_with_a_picture_and_depth(model):
    batch, row = three_examples(model)
    assert batch["pixel_values"].shape[0] == 2 and batch["has_depth"].tolist() == [False, False, True]
    model.train()
    features, output = projector_output(model, batch)
    side = model.eye_depth.side
    predicted = model.eye_depth.head(features[1]).detach().numpy()
    assert 320 % (side * 2) == 0  # the tiny tile's 16x16 tokens: 10x10-pixel squares of the depth target
    target = loop_blocks(batch["depth_target"][row].numpy(), side, 2)
    expected = ((predicted - target) ** 2).mean()
    assert output.terms["eye_depth"].item() == pytest.approx(float(expected), rel=1e-4)
    assert output.loss.item() == pytest.approx(weighted_total(model.config, output.terms).item(), rel=1e-5)


def test_the_term_trains_the_eye_and_not_the_language_model(model):
    batch, _ = three_examples(model)
    model.train()
    model.zero_grad()
    model.hidden_states(batch)
    model.eye_depth.loss(batch["input_ids"], batch["depth_target"], batch["has_depth"]).backward()
    vision = [p.grad for module in model.adapter.vision_modules() for p in module.parameters()]
    assert all(grad is not None for grad in vision) and sum(grad.abs().sum() for grad in vision) > 0
    language = [p.grad for p in model.adapter.language_model().parameters() if p.requires_grad]
    assert all(grad is None or grad.abs().sum() == 0 for grad in language)
    model.zero_grad()


def test_evaluation_keeps_no_features_and_adds_nothing(model):
    batch, _ = three_examples(model)
    model.eval()
    with torch.no_grad():
        assert model(batch).terms["eye_depth"].item() == 0.0
    assert model.eye_depth._features is None


def test_a_batch_without_depth_keeps_the_head_in_the_graph(model):
    batch, _ = three_examples(model)
    batch["has_depth"] = torch.zeros_like(batch["has_depth"])
    model.train()
    model.zero_grad()
    model(batch).loss.backward()
    assert model.eye_depth.head.weight.grad is not None  # zero, but there for DDP on every rank
    model.zero_grad()


def test_a_second_stage_may_add_or_drop_the_head_and_nothing_else(vqvae_dir, tmp_path):
    plain = build(vqvae_dir, freeze_vision=False)
    with_head = build(vqvae_dir, eye_depth=1.0, freeze_vision=False)
    with torch.no_grad():
        for parameter in plain.parameters():
            parameter.add_(0.01)
    with_head.load_trained_weights(plain.save_pretrained(tmp_path / "plain"))
    shared = plain.trainable_state_dict()
    for name, tensor in with_head.trainable_state_dict().items():
        if not name.startswith("eye_depth."):
            assert torch.equal(tensor, shared[name]), name
    plain.load_trained_weights(with_head.save_pretrained(tmp_path / "with_head"))
    with pytest.raises(PerceptioError, match="do not match"):
        build(vqvae_dir, freeze_vision=True).load_trained_weights(tmp_path / "with_head")


def test_eye_depth_needs_whole_tiles_and_a_weight_of_at_least_zero():
    with pytest.raises(PerceptioError, match="crop-to-patches"):
        PerceptioConfig(model="tiny", eye_depth=1.0, crop_to_patches=True)
    with pytest.raises(PerceptioError, match="at least 0"):
        PerceptioConfig(model="tiny", eye_depth=-1.0)
    with pytest.raises(PerceptioError, match="square grid of image tokens"):
        EyeDepthHead(width=8, tokens_per_tile=50, image_token_id=0)
