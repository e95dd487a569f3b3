"""The depth VQ-VAE: 320x320 inverse-depth maps <-> a 10x10 grid of codes from K = 128.

The tokenizer owns its input normalisation (``DepthVQVAEConfig.normalization``, in config.py): callers hand it raw
relative inverse depth (the teacher's output, any size, any scale) and :meth:`DepthVQVAE.normalize`
turns each map into the quantity the codes describe. Tokens are meaningless under another
normalisation, so it travels in ``config.json`` with the weights.

Normalisation ``robust-minmax-inverse-depth``: resize to 320x320 (bilinear, antialiased), take the
``low_percentile`` / ``high_percentile`` of the valid pixels on every 4th row and column (valid:
finite and > 0; inverse depth 0 means "no depth", e.g. the oracle's invalid pixels), map them to
-1 / +1, clip to [-1, 1]. Invalid pixels become -1 (as far as the image goes). Near is +1. The map
is invariant to a constant scale of the input, so metric and relative inverse depth give the same
tokens.

Quantiser: nearest-neighbour codes, EMA codebook updates (decay 0.99), commitment loss (0.25),
straight-through gradients, and restarts of dead codes (EMA usage below ``dead_code_threshold``
assignments per step) from the current batch's encoder outputs, so that the whole codebook is used.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from contextlib import contextmanager
from typing import Iterator, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from perceptio.errors import PerceptioError
from perceptio.io import atomic_path, write_text_atomic
from perceptio.tokenize.config import CONFIG_NAME, WEIGHTS_NAME, DepthVQVAEConfig

PERCENTILE_STRIDE = 4

DepthInput = np.ndarray | torch.Tensor | Sequence[np.ndarray | torch.Tensor]


class QuantizerOutput(NamedTuple):
    quantized: torch.Tensor  # (B, D, g, g), straight-through: gradients reach the encoder
    indices: torch.Tensor  # (B, g*g) row-major codes
    commitment_loss: torch.Tensor


class VQOutput(NamedTuple):
    reconstruction: torch.Tensor  # (B, S, S), unclipped decoder output
    indices: torch.Tensor  # (B, g*g)
    loss: torch.Tensor  # reconstruction MSE + commitment * commitment loss
    reconstruction_loss: torch.Tensor
    commitment_loss: torch.Tensor


class EMAQuantizer(nn.Module):
    """Nearest-neighbour codebook kept as an exponential moving average of its assigned vectors."""

    def __init__(self, num_codes: int, code_dim: int, decay: float, dead_code_threshold: float) -> None:
        super().__init__()
        self.decay = decay
        self.dead_code_threshold = dead_code_threshold
        self.register_buffer("codebook", torch.randn(num_codes, code_dim) * 0.1)
        self.register_buffer("cluster_size", torch.zeros(num_codes))
        self.register_buffer("code_sum", torch.zeros(num_codes, code_dim))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    def nearest(self, vectors: torch.Tensor) -> torch.Tensor:
        """Index of the closest code for each row of ``vectors`` (N, D)."""
        codebook = self.codebook.to(vectors.dtype)
        distances = (
            vectors.pow(2).sum(1, keepdim=True) - 2 * vectors @ codebook.t() + codebook.pow(2).sum(1)[None, :]
        )
        return distances.argmin(dim=1)

    def forward(self, latents: torch.Tensor) -> QuantizerOutput:
        batch, dim, height, width = latents.shape
        vectors = latents.permute(0, 2, 3, 1).reshape(-1, dim).float()
        if self.training:
            self._update(vectors)
        indices = self.nearest(vectors)
        quantized = self.codebook[indices].view(batch, height, width, dim).permute(0, 3, 1, 2)
        commitment_loss = F.mse_loss(latents.float(), quantized.detach())
        quantized = latents + (quantized - latents).detach()
        return QuantizerOutput(quantized, indices.view(batch, height * width), commitment_loss)

    @torch.no_grad()
    def _update(self, vectors: torch.Tensor) -> None:
        num_codes = self.codebook.shape[0]
        if not bool(self.initialized):
            # Data-dependent start: codes drawn from real encoder outputs, each counted as if it had
            # its fair share of this batch, so that none looks dead on the first steps.
            self.codebook.copy_(_sample_rows(vectors, num_codes))
            self.cluster_size.fill_(vectors.shape[0] / num_codes)
            self.code_sum.copy_(self.codebook * self.cluster_size[:, None])
            self.initialized.fill_(True)
        indices = self.nearest(vectors)
        counts = torch.bincount(indices, minlength=num_codes).float()
        sums = torch.zeros_like(self.code_sum).index_add_(0, indices, vectors)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.code_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        total = self.cluster_size.sum()
        # Laplace smoothing keeps a code with a tiny count from dividing by ~0.
        smoothed = (self.cluster_size + 1e-5) / (total + num_codes * 1e-5) * total
        self.codebook.copy_(self.code_sum / smoothed[:, None])
        dead = self.cluster_size < self.dead_code_threshold
        if dead.any():
            fresh = _sample_rows(vectors, int(dead.sum()))
            self.codebook[dead] = fresh
            self.cluster_size[dead] = self.dead_code_threshold
            self.code_sum[dead] = fresh * self.dead_code_threshold


def _sample_rows(vectors: torch.Tensor, count: int) -> torch.Tensor:
    """``count`` distinct rows of ``vectors`` at random, repeating only when too few are distinct.

    Flat image regions give many identical encoder outputs; two identical codes would tie in
    every nearest-code search, so duplicates are dropped first.
    """
    distinct = torch.unique(vectors, dim=0)
    if distinct.shape[0] >= count:
        return distinct[torch.randperm(distinct.shape[0], device=vectors.device)[:count]].clone()
    return distinct[torch.randint(distinct.shape[0], (count,), device=vectors.device)].clone()


class ResidualBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1)
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features + self.body(features)


class Encoder(nn.Module):
    def __init__(self, config: DepthVQVAEConfig) -> None:
        super().__init__()
        widths = config.hidden_channels
        layers: list[nn.Module] = [nn.Conv2d(1, widths[0], 3, padding=1)]
        previous = widths[0]
        for width in widths:
            layers += [nn.SiLU(), nn.Conv2d(previous, width, 4, stride=2, padding=1)]
            previous = width
        layers += [ResidualBlock(previous) for _ in range(config.num_res_blocks)]
        layers += [nn.SiLU(), nn.Conv2d(previous, config.code_dim, 1)]
        self.layers = nn.Sequential(*layers)

    def forward(self, coarse: torch.Tensor) -> torch.Tensor:
        """(B, 1, S/p, S/p) pooled maps -> (B, code_dim, g, g) latents."""
        return self.layers(coarse)


class Decoder(nn.Module):
    def __init__(self, config: DepthVQVAEConfig) -> None:
        super().__init__()
        widths = list(reversed(config.hidden_channels))
        layers: list[nn.Module] = [nn.Conv2d(config.code_dim, widths[0], 3, padding=1)]
        layers += [ResidualBlock(widths[0]) for _ in range(config.num_res_blocks)]
        for width, following in zip(widths, [*widths[1:], widths[-1]]):
            layers += [nn.SiLU(), nn.ConvTranspose2d(width, following, 4, stride=2, padding=1)]
        layers += [nn.SiLU(), nn.Conv2d(widths[-1], 1, 3, padding=1)]
        self.layers = nn.Sequential(*layers)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, code_dim, g, g) code vectors -> (B, 1, S/p, S/p) maps at the pooled resolution."""
        return self.layers(codes)


class DepthVQVAE(nn.Module):
    """Depth tokenizer: ``encode`` raw inverse depth -> (B, 100) codes, ``decode`` codes -> maps."""

    def __init__(self, config: DepthVQVAEConfig | None = None) -> None:
        super().__init__()
        self.config = config or DepthVQVAEConfig()
        self.encoder = Encoder(self.config)
        self.quantizer = EMAQuantizer(
            self.config.num_codes, self.config.code_dim, self.config.ema_decay, self.config.dead_code_threshold
        )
        self.decoder = Decoder(self.config)

    # ------------------------------------------------------------------ properties
    @property
    def num_tokens(self) -> int:
        return self.config.grid_size**2

    @property
    def device(self) -> torch.device:
        return self.quantizer.codebook.device

    @property
    def codebook(self) -> torch.Tensor:
        """(K, code_dim) code vectors."""
        return self.quantizer.codebook

    @property
    def identity(self) -> str:
        """``<name>@<sha256[:12]>`` of the config and weights: tokens from two tokenizers match iff this does."""
        digest = hashlib.sha256(json.dumps(self.config.to_dict(), sort_keys=True).encode())
        for key, tensor in sorted(self.state_dict().items()):
            digest.update(key.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return f"{self.config.name}@{digest.hexdigest()[:12]}"

    # ------------------------------------------------------------------ normalisation
    def normalize(self, depth: DepthInput) -> torch.Tensor:
        """Raw inverse depth (H, W), (B, H, W) or a list of maps of any sizes -> (B, S, S) in [-1, 1]."""
        with _one_cpu_thread():
            return self._normalize(_as_maps(depth))

    def _normalize(self, maps: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        size = self.config.image_size
        # Float64 until the end: rounding then cannot tell a map from a scaled copy of it, so the
        # codes of inverse depth in any unit agree.
        if isinstance(maps, torch.Tensor):
            resized = _resize(_finite(maps.to(self.device, torch.float64)), size)
        else:
            resized = torch.cat([_resize(_finite(one.to(self.device, torch.float64))[None], size) for one in maps])
        valid = torch.isfinite(resized) & (resized > 0)
        fractions = (self.config.low_percentile / 100, self.config.high_percentile / 100)
        # The percentiles are taken over every PERCENTILE_STRIDE-th row and column (6,400 of the
        # 102,400 pixels): as good an estimate for a depth map, at a fraction of the cost.
        grid = (slice(None), slice(None, None, PERCENTILE_STRIDE), slice(None, None, PERCENTILE_STRIDE))
        bounds = torch.stack([_percentiles(one[mask], fractions) for one, mask in zip(resized[grid], valid[grid])])
        low, high = bounds[:, 0, None, None], bounds[:, 1, None, None]
        # A map without a valid pixel or a constant one has no range: it becomes all -1.
        span = torch.where(high > low, high - low, torch.ones_like(high))
        normalized = ((resized - low) / span * 2 - 1).clamp(-1, 1)
        return torch.where(valid, normalized, torch.full_like(normalized, -1.0)).float()

    def pool(self, normalized: torch.Tensor) -> torch.Tensor:
        """(B, S, S) normalised maps -> (B, S/p, S/p): the average of each p x p block.

        The encoder sees depth at this resolution and the decoder draws it there (then upsamples
        bilinearly): a 10x10 code grid cannot carry finer detail, and training on pooled maps is
        16x cheaper than on full ones.
        """
        return F.avg_pool2d(normalized[:, None], self.config.input_pool)[:, 0]

    # ------------------------------------------------------------------ training forward
    def forward(self, coarse: torch.Tensor) -> VQOutput:
        """Training pass on pooled normalised maps (B, S/p, S/p); updates the codebook in train mode."""
        latents = self.encoder(coarse[:, None])
        quantized, indices, commitment_loss = self.quantizer(latents)
        reconstruction = self.decoder(quantized)[:, 0]
        reconstruction_loss = F.mse_loss(reconstruction.float(), coarse.float())
        loss = reconstruction_loss + self.config.commitment * commitment_loss
        return VQOutput(reconstruction, indices, loss, reconstruction_loss, commitment_loss)

    # ------------------------------------------------------------------ the public codec
    @torch.no_grad()
    def encode_normalized(self, normalized: torch.Tensor) -> torch.Tensor:
        """Codes (B, g*g) of maps that are already normalised (B, S, S); never touches the codebook."""
        return self.encode_pooled(self.pool(normalized.to(self.device)))

    @torch.no_grad()
    def encode_pooled(self, coarse: torch.Tensor) -> torch.Tensor:
        """Codes (B, g*g) of pooled normalised maps (B, S/p, S/p), as :meth:`forward` trains on."""
        # One map at a time: batched convolutions may pick other kernels and round differently, and
        # a map's codes must not depend on which maps share its batch (curation batches, a CLI call
        # encodes one). The encoder is small, so this costs little.
        codes = []
        with _one_cpu_thread():
            for one in coarse.to(self.device):
                latents = self.encoder(one[None, None])
                vectors = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1]).float()
                codes.append(self.quantizer.nearest(vectors))
        return torch.stack(codes) if codes else torch.zeros(0, self.num_tokens, dtype=torch.long, device=self.device)

    def encode(self, depth: DepthInput) -> torch.Tensor:
        """Raw inverse depth (normalised here) -> LongTensor (B, 100) of row-major codes."""
        return self.encode_normalized(self.normalize(depth))

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor | Sequence[int] | np.ndarray) -> torch.Tensor:
        """Codes (B, 100) or (100,) -> normalised maps (B, S, S) in [-1, 1]."""
        tokens = torch.as_tensor(np.asarray(tokens) if not isinstance(tokens, torch.Tensor) else tokens)
        tokens = tokens.to(self.device, torch.long).reshape(-1, self.num_tokens)
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= self.config.num_codes):
            raise PerceptioError(f"depth codes must lie in [0, {self.config.num_codes}), got {tokens.min()}..{tokens.max()}")
        with _one_cpu_thread():
            return self._decode_vectors(self.codebook[tokens])

    def decode_soft(self, probs: torch.Tensor) -> torch.Tensor:
        """Probabilities over the K codes per position (B, 100, K) -> maps (B, S, S); differentiable.

        Each position's vector is the probability-weighted mix of the code vectors (the paper's soft
        codebook mixing), so one-hot probabilities give exactly :meth:`decode`.
        """
        if probs.shape[-2:] != (self.num_tokens, self.config.num_codes):
            raise PerceptioError(
                f"decode_soft wants (B, {self.num_tokens}, {self.config.num_codes}) probabilities, got {tuple(probs.shape)}"
            )
        return self._decode_vectors(probs.to(self.codebook.dtype) @ self.codebook)

    def _decode_vectors(self, vectors: torch.Tensor) -> torch.Tensor:
        grid, size = self.config.grid_size, self.config.image_size
        codes = vectors.reshape(-1, grid, grid, self.config.code_dim).permute(0, 3, 1, 2)
        coarse = self.decoder(codes)
        return F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)[:, 0].clamp(-1, 1)

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, directory: str | os.PathLike[str]) -> None:
        """Write ``config.json`` and ``model.safetensors`` (each atomically) into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {key: tensor.detach().cpu().contiguous() for key, tensor in self.state_dict().items()}
        with atomic_path(directory / WEIGHTS_NAME) as temporary:
            save_file(state, str(temporary), metadata={"format": "pt"})
        write_text_atomic(directory / CONFIG_NAME, json.dumps(self.config.to_dict(), indent=2) + "\n")

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike[str], device: str | torch.device | None = None
    ) -> "DepthVQVAE":
        """Load a tokenizer saved by :meth:`save_pretrained`, in eval mode."""
        directory = Path(directory)
        config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        if not config_path.is_file() or not weights_path.is_file():
            raise PerceptioError(f"{directory}: not a depth tokenizer (need {CONFIG_NAME} and {WEIGHTS_NAME})")
        try:
            config = DepthVQVAEConfig.from_dict(json.loads(config_path.read_text(encoding="utf-8")))
        except (json.JSONDecodeError, TypeError) as error:
            raise PerceptioError(f"{config_path}: unreadable tokenizer config ({error})") from error
        model = cls(config)
        model.load_state_dict(load_file(str(weights_path)))
        return model.to(device or "cpu").eval()


def _as_maps(depth: DepthInput) -> torch.Tensor | list[torch.Tensor]:
    """A (B, H, W) tensor, or a list of (H, W) tensors when the maps differ in size."""
    if isinstance(depth, (np.ndarray, torch.Tensor)):
        tensor = torch.as_tensor(depth)
        if tensor.ndim == 2:
            tensor = tensor[None]
        if tensor.ndim != 3:
            raise PerceptioError(f"depth must be (H, W) or (B, H, W), got shape {tuple(tensor.shape)}")
        return tensor
    maps = [torch.as_tensor(one) for one in depth]
    if not maps or any(one.ndim != 2 for one in maps):
        raise PerceptioError("depth must be a non-empty list of (H, W) maps")
    return maps


@contextmanager
def _one_cpu_thread() -> Iterator[None]:
    """Run torch on one CPU thread inside the block, then restore the previous count.

    The tokenizer's ops are small (a 0.26M-parameter network on 80x80 maps): threads gain nothing
    on them, and on a machine busy with other work every thread barrier stalls. Measured on this
    project's 2-core machine under load: encoding 4 maps took 0.04 s on one thread, 1.5 s on two.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _percentiles(values: torch.Tensor, fractions: tuple[float, float]) -> torch.Tensor:
    """``torch.quantile(values, fractions)`` (linear interpolation) by k-th value selection rather
    than a full sort. (0, 0) when ``values`` is empty."""
    if values.numel() == 0:
        return torch.zeros(2, dtype=values.dtype, device=values.device)
    results = []
    for fraction in fractions:
        position = fraction * (values.numel() - 1)
        below, above = math.floor(position), math.ceil(position)
        low = torch.kthvalue(values, below + 1).values
        high = low if above == below else torch.kthvalue(values, above + 1).values
        results.append(low + (high - low) * (position - below))
    return torch.stack(results)


def _finite(depth: torch.Tensor) -> torch.Tensor:
    """Non-finite values become 0 ("no depth") before resizing can smear them over their neighbours."""
    return torch.nan_to_num(depth, nan=0.0, posinf=0.0, neginf=0.0)


def _resize(maps: torch.Tensor, size: int) -> torch.Tensor:
    """(B, H, W) -> (B, size, size); antialiased when shrinking so that no detail aliases into codes."""
    if maps.shape[-2:] == (size, size):
        return maps
    return F.interpolate(maps[:, None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)[:, 0]
