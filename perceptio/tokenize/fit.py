"""Training and evaluation of the depth VQ-VAE on inverse-depth maps, with resumable checkpoints.

Training samples batches of normalised maps (random horizontal flips: a mirrored scene is still a
scene) and minimises reconstruction MSE + commitment loss with AdamW and a cosine learning rate.
Every random draw of step ``s`` is seeded from (seed, s), so a run resumed from its checkpoint
takes the same steps as one that never stopped.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F

from perceptio.errors import PerceptioError
from perceptio.io import atomic_path
from perceptio.tokenize.config import DepthVQVAEConfig, FitConfig
from perceptio.tokenize.metrics import LOWER_IS_NEARER, codebook_usage, depth_metrics, object_pair_order
from perceptio.tokenize.vqvae import DepthVQVAE

CHECKPOINT_NAME = "checkpoint.pt"


def learning_rate(step: int, config: FitConfig) -> float:
    """Linear warm-up, then cosine decay to ``min_learning_rate_ratio`` of the peak."""
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    floor = config.min_learning_rate_ratio
    return config.learning_rate * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _save_checkpoint(path: Path, model: DepthVQVAE, optimizer: torch.optim.Optimizer, step: int, fit: FitConfig) -> None:
    with atomic_path(path) as temporary:
        torch.save(
            {
                "step": step,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "tokenizer_config": model.config.to_dict(),
                "fit_config": dataclasses.asdict(fit),
            },
            temporary,
        )


def load_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated or foreign file: say which and why, not a traceback
        raise PerceptioError(f"{path}: unreadable checkpoint ({error})") from error


def train(
    maps: torch.Tensor,
    tokenizer_config: DepthVQVAEConfig,
    fit: FitConfig,
    checkpoint_dir: Path,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    device: str | None = None,
) -> DepthVQVAE:
    """Fit a tokenizer to pooled normalised maps (N, S/p, S/p) (see ``DepthVQVAE.pool``); resumes from ``checkpoint_dir`` when it holds one.

    A checkpoint from another tokenizer configuration is refused (its weights would not fit).
    """
    if maps.shape[0] == 0:
        raise PerceptioError("no training depth maps")
    checkpoint_path = checkpoint_dir / CHECKPOINT_NAME
    torch.manual_seed(fit.seed)  # the initial weights, too, are a function of the seed
    model = DepthVQVAE(tokenizer_config).to(device or "cpu")
    optimizer = torch.optim.AdamW(model.parameters(), lr=fit.learning_rate, weight_decay=1e-4)
    start = 0
    if checkpoint_path.is_file():
        state = load_checkpoint(checkpoint_path)
        if state["tokenizer_config"] != tokenizer_config.to_dict():
            raise PerceptioError(f"{checkpoint_path}: checkpoint of another tokenizer config; use a new --out")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start = int(state["step"])
    model.train()
    for step in range(start, fit.steps):
        torch.manual_seed(fit.seed * 1_000_003 + step)
        picks = torch.randint(maps.shape[0], (fit.batch_size,))
        batch = maps[picks].float().to(model.device)
        flips = (torch.rand(fit.batch_size) < 0.5).to(model.device)
        batch[flips] = batch[flips].flip(-1)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, fit)
        output = model(batch)
        optimizer.zero_grad(set_to_none=True)
        output.loss.backward()
        optimizer.step()
        done = step + 1
        if done % fit.checkpoint_every == 0 or done == fit.steps:
            _save_checkpoint(checkpoint_path, model, optimizer, done, fit)
        if on_step is not None:
            on_step(done, {"mse": output.reconstruction_loss.item(), "commit": output.commitment_loss.item()})
    return model.eval()


@torch.no_grad()
def evaluate(model: DepthVQVAE, depths: Iterable[np.ndarray], batch_size: int = 16) -> dict[str, float]:
    """Round-trip raw inverse-depth maps through the tokenizer and score them at their own size.

    Each decoded map is resized back to its source map's size and compared with the source (not
    with the normalised, clipped input), so the clipping of the normalisation counts as error too.
    """
    per_image: list[dict[str, float]] = []
    codes: list[torch.Tensor] = []
    batch: list[np.ndarray] = []

    def flush() -> None:
        tokens = model.encode(batch)
        codes.append(tokens.cpu())
        for depth, decoded in zip(batch, model.decode(tokens)):
            resized = F.interpolate(decoded[None, None], size=depth.shape, mode="bilinear", align_corners=False)[0, 0]
            scores = depth_metrics(resized.cpu().numpy(), depth)
            if scores["images"]:
                per_image.append(scores)
        batch.clear()

    for depth in depths:
        batch.append(depth)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    if not per_image:
        raise PerceptioError("no evaluation map has valid depth")
    summary = {key: float(np.mean([scores[key] for scores in per_image])) for key in ("abs_rel", "rmse", "delta1")}
    summary["images"] = len(per_image)
    summary.update(codebook_usage(torch.cat(codes), model.config.num_codes))
    return summary


@torch.no_grad()
def evaluate_pairs(model: DepthVQVAE, depths: Iterable[np.ndarray], masks: Iterable[list[np.ndarray]]) -> dict[str, Any]:
    """Object-pair order (see :func:`perceptio.tokenize.metrics.object_pair_order`) over images.

    For each image (its raw inverse depth and its object masks) the pairs are scored on the
    tokenizer's reconstruction (``decoded``), on its normalised input (``normalised input``, the
    most any tokenizer with this normalisation can keep) and by the "lower is nearer" heuristic.
    Returns the pair count and the share each keeps (None without pairs).
    """
    pairs, images = 0, 0
    kept = {"decoded": 0, "normalised input": 0, LOWER_IS_NEARER: 0}
    for depth, image_masks in zip(depths, masks):
        normalized = model.normalize(depth)
        decoded = model.decode(model.encode_normalized(normalized))
        found, kept_here = object_pair_order(
            image_masks, depth, {"decoded": decoded[0].cpu().numpy(), "normalised input": normalized[0].cpu().numpy()}
        )
        images += 1
        pairs += found
        for name, count in kept_here.items():
            kept[name] += count
    return {"images": images, "pairs": pairs, **{name: (count / pairs if pairs else None) for name, count in kept.items()}}
