"""The whole path can learn: the tiny model overfits one example's mask, depth span and answer letter.

These are the sanity checks a training recipe must pass before anything is scaled (issue 11): with
the trainer's own optimiser set-up (AdamW groups of :func:`perceptio.train.loop.parameter_groups`,
the tiny model's default learning rates, gradient clipping at 1.0), a few hundred steps on one or
two examples must be enough for greedy inference through :class:`perceptio.evaluate.predict.Predictor`
to give back what was taught: the mask through image -> VLM -> [SEG] -> projection -> SAM2 decoder,
the 100 depth codes, and the letter.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from perceptio.evaluate.metrics import mask_overlap, token_accuracy
from perceptio.evaluate.predict import Predictor
from perceptio.tokenize.vqvae import DepthVQVAE, DepthVQVAEConfig
from perceptio.tokens import SEG, depth_span
from perceptio.train.config import PerceptioConfig, TrainConfig
from perceptio.train.loop import parameter_groups
from perceptio.train.model import PerceptioModel

QUESTION = "Which point is closest to the camera? Write the depth of the scene first, then answer with the letter."


@pytest.fixture(scope="module")
def vqvae_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("vqvae")
    DepthVQVAE(DepthVQVAEConfig(input_pool=8, hidden_channels=(4, 4), code_dim=8, num_res_blocks=1)).save_pretrained(folder)
    return folder


def disc_image(seed: int, width: int = 160, height: int = 120) -> tuple[Image.Image, np.ndarray]:
    """A coloured disc on a noisy background and its mask."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 80, (height, width, 3), dtype=np.uint8)
    yy, xx = np.mgrid[:height, :width]
    cx, cy, radius = rng.integers(40, width - 40), rng.integers(35, height - 35), rng.integers(18, 30)
    mask = ((xx - cx) ** 2 + (yy - cy) ** 2 <= radius**2).astype(np.uint8)
    pixels[mask > 0] = (230, 40, 40)
    return Image.fromarray(pixels), mask


def fit(model: PerceptioModel, examples: list[dict], steps: int) -> None:
    """The trainer's optimiser on a fixed batch (no schedule: these are overfitting checks)."""
    config = TrainConfig.for_model(True, steps=steps)  # the tiny model's lr, head lr and clipping
    optimizer = torch.optim.AdamW(parameter_groups(model, config), lr=config.lr)
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    batch = model.processor.collate(examples)
    model.train()
    for _ in range(steps):
        loss = model(batch).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, config.grad_clip)
        optimizer.step()


def tiny(vqvae_dir: Path, **changes) -> PerceptioModel:
    torch.manual_seed(0)
    config = PerceptioConfig(model="tiny", tokenizer=str(vqvae_dir), train_language_model=True, **changes)
    return PerceptioModel.from_config(config)


def test_one_mask_is_learned_through_the_whole_path(vqvae_dir):
    torch.set_num_threads(1)
    model = tiny(vqvae_dir, use_depth_tokens=False, use_depth_recon=False, use_depth_loss=False)
    image, mask = disc_image(0)
    prompt = 'Please segment the object described as "the red disc".'
    fit(model, [model.processor.encode_example(image, prompt, f"{SEG} a red disc", mask, None)], steps=150)

    prediction = Predictor(model, "overfit", max_new_tokens=8).predict(image, prompt)
    assert prediction.text == "a red disc"
    assert prediction.mask is not None, "no [SEG] generated"
    assert mask_overlap(prediction.mask, mask).iou >= 0.9


def test_depth_spans_and_letters_are_learned(vqvae_dir):
    torch.set_num_threads(1)
    model = tiny(vqvae_dir)
    rng = np.random.default_rng(1)
    cases = []
    for seed, letter in ((1, "A"), (2, "C")):
        image, _ = disc_image(seed)
        codes = rng.integers(0, 128, 100).tolist()
        depth = rng.uniform(-1, 1, (320, 320)).astype(np.float32)
        cases.append((image, codes, letter, model.processor.encode_example(image, QUESTION, f"{depth_span(codes)}({letter})", None, depth)))
    fit(model, [case[-1] for case in cases], steps=250)

    predictor = Predictor(model, "overfit", max_new_tokens=110)
    for image, codes, letter, _ in cases:
        prediction = predictor.predict(image, QUESTION)
        assert prediction.well_formed
        assert token_accuracy(prediction.depth_codes, codes) >= 0.9
        assert prediction.text == f"({letter})"
