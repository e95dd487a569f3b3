"""The depth VQ-VAE: shapes, ranges, the normalisation contract, soft decoding, persistence, training."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from perceptio.errors import PerceptioError
from perceptio.tokenize.vqvae import DepthVQVAE, DepthVQVAEConfig, EMAQuantizer


def random_inverse_depth(seed: int, shape: tuple[int, ...] = (2, 120, 160)) -> np.ndarray:
    """Smooth positive maps (a ramp plus blobs), like inverse depth of a scene."""
    rng = np.random.default_rng(seed)
    *batch, height, width = shape
    rows = np.linspace(0, 1, height)[:, None]
    cols = np.linspace(0, 1, width)[None, :]
    maps = []
    for _ in range(int(np.prod(batch)) if batch else 1):
        blob = np.exp(-((rows - rng.uniform()) ** 2 + (cols - rng.uniform()) ** 2) / 0.02)
        maps.append(0.1 + rows * rng.uniform(0.5, 2) + blob * rng.uniform(0.5, 3) + rng.uniform(0, 0.05, (height, width)))
    return np.stack(maps).reshape(shape).astype(np.float32)


@pytest.fixture(scope="module")
def model() -> DepthVQVAE:
    torch.manual_seed(0)
    tokenizer = DepthVQVAE(DepthVQVAEConfig())
    # One training step initialises the codebook from data (codes drawn from encoder outputs).
    tokenizer.train()
    tokenizer(tokenizer.pool(tokenizer.normalize(random_inverse_depth(1, (4, 96, 128)))))
    return tokenizer.eval()


def test_normalize_range_size_and_percentiles(model: DepthVQVAE) -> None:
    depth = random_inverse_depth(2, (3, 90, 200))
    normalized = model.normalize(depth)
    assert normalized.shape == (3, 320, 320)
    assert normalized.min() >= -1 and normalized.max() <= 1
    # Robust min-max: about 2% of the pixels sit at each clipped end, not a single pixel.
    assert 0.01 < (normalized == -1).float().mean() < 0.04
    assert 0.01 < (normalized == 1).float().mean() < 0.04


def test_normalize_treats_invalid_pixels_as_far(model: DepthVQVAE) -> None:
    depth = random_inverse_depth(3, (320, 320))
    depth[:100] = 0.0
    depth[100:110] = np.nan
    normalized = model.normalize(depth)[0]
    assert torch.all(normalized[:110] == -1)
    assert normalized[120:].max() == 1  # the valid part still spans the whole range
    assert torch.all(model.normalize(np.zeros((8, 8), np.float32)) == -1)


def test_encode_decode_shapes_ranges_and_determinism(model: DepthVQVAE) -> None:
    depth = random_inverse_depth(4, (3, 100, 150))
    tokens = model.encode(depth)
    assert tokens.shape == (3, model.num_tokens) and tokens.dtype == torch.long
    assert model.num_tokens == 100
    assert tokens.min() >= 0 and tokens.max() < model.config.num_codes
    assert torch.equal(tokens, model.encode(depth))
    decoded = model.decode(tokens)
    assert decoded.shape == (3, 320, 320)
    assert decoded.min() >= -1 and decoded.max() <= 1
    assert torch.equal(decoded, model.decode(tokens))
    assert model.decode(tokens[0]).shape == (1, 320, 320)


def test_encode_accepts_maps_of_different_sizes(model: DepthVQVAE) -> None:
    small, large = random_inverse_depth(5, (60, 80)), random_inverse_depth(6, (300, 200))
    together = model.encode([small, large])
    assert torch.equal(together, torch.cat([model.encode(small), model.encode(large)]))


@pytest.mark.parametrize("factor", [4.0, 0.25])
def test_tokens_do_not_change_when_depth_is_scaled(model: DepthVQVAE, factor: float) -> None:
    depth = random_inverse_depth(7, (4, 120, 160))
    assert torch.equal(model.normalize(depth), model.normalize(depth * factor))
    assert torch.equal(model.encode(depth), model.encode(depth * factor))


@pytest.mark.parametrize("factor", [1000.0, 0.37])
def test_any_scale_changes_the_normalised_map_only_by_rounding(model: DepthVQVAE, factor: float) -> None:
    # depth * 1000 in float32 is rounded (relative 6e-8) before the tokenizer sees it, so the
    # normalised maps agree to rounding and a code can flip only at a near-tie between two codes.
    depth = random_inverse_depth(7, (4, 120, 160))
    assert torch.allclose(model.normalize(depth), model.normalize(depth * np.float32(factor)), atol=1e-6)
    agreement = (model.encode(depth) == model.encode(depth * np.float32(factor))).float().mean()
    assert agreement >= 0.98


def test_decode_soft_equals_decode_for_one_hot_and_passes_gradients(model: DepthVQVAE) -> None:
    tokens = model.encode(random_inverse_depth(8, (2, 64, 64)))
    one_hot = torch.nn.functional.one_hot(tokens, model.config.num_codes).float()
    assert torch.allclose(model.decode_soft(one_hot), model.decode(tokens), atol=1e-6)

    logits = torch.randn(2, model.num_tokens, model.config.num_codes, requires_grad=True)
    model.decode_soft(logits.softmax(-1)).square().mean().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_decode_rejects_out_of_range_codes(model: DepthVQVAE) -> None:
    with pytest.raises(PerceptioError):
        model.decode(torch.full((1, 100), model.config.num_codes))
    with pytest.raises(PerceptioError):
        model.decode_soft(torch.ones(1, 99, model.config.num_codes))


def test_save_load_round_trip(model: DepthVQVAE, tmp_path) -> None:
    model.save_pretrained(tmp_path / "tok")
    assert sorted(path.name for path in (tmp_path / "tok").iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((tmp_path / "tok" / "config.json").read_text())["normalization"] == "robust-minmax-inverse-depth"
    loaded = DepthVQVAE.from_pretrained(tmp_path / "tok")
    depth = random_inverse_depth(9)
    assert torch.equal(loaded.encode(depth), model.encode(depth))
    assert torch.equal(loaded.decode(model.encode(depth)), model.decode(model.encode(depth)))
    assert loaded.identity == model.identity
    assert loaded.identity.startswith("depth-vqvae@") and len(loaded.identity.split("@")[1]) == 12


def test_identity_changes_with_weights(model: DepthVQVAE) -> None:
    other = DepthVQVAE(model.config)
    other.load_state_dict(model.state_dict())
    assert other.identity == model.identity
    with torch.no_grad():
        other.decoder.layers[0].bias.add_(1e-3)
    assert other.identity != model.identity


def test_from_pretrained_rejects_a_folder_without_a_tokenizer(tmp_path) -> None:
    with pytest.raises(PerceptioError):
        DepthVQVAE.from_pretrained(tmp_path)


def test_config_checks_the_stride() -> None:
    with pytest.raises(PerceptioError):
        DepthVQVAEConfig(image_size=320, grid_size=8)
    assert DepthVQVAEConfig(image_size=160, grid_size=10, input_pool=2).stride == 16


def test_ema_codebook_follows_assignments_and_restarts_dead_codes() -> None:
    torch.manual_seed(0)
    quantizer = EMAQuantizer(num_codes=4, code_dim=2, decay=0.5, dead_code_threshold=1.0)
    quantizer.train()
    # Two tight clusters at (5, 5) and (-5, -5): after enough EMA steps every code sits on a
    # cluster, none is left far away (a dead code would be restarted onto the data).
    for _ in range(20):
        points = torch.cat([torch.randn(50, 2) * 0.01 + 5, torch.randn(50, 2) * 0.01 - 5])
        output = quantizer(points[:, :, None, None])
    distances = torch.cdist(quantizer.codebook, torch.tensor([[5.0, 5.0], [-5.0, -5.0]])).min(dim=1).values
    assert torch.all(distances < 0.1)
    assert output.quantized.shape == (100, 2, 1, 1)
    # Straight-through: the quantised output carries the encoder's gradient.
    latents = torch.randn(3, 2, 1, 1, requires_grad=True)
    quantizer(latents).quantized.sum().backward()
    assert torch.allclose(latents.grad, torch.ones_like(latents))
