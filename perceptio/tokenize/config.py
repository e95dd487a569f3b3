"""The tokenizer stage's configs and defaults, torch-free (the transformers split of config and model).

:class:`DepthVQVAEConfig` is saved beside the weights as ``config.json``; :class:`FitConfig` says how
the tokenizer trains; :class:`DepthDataConfig` where the depth maps come from. ``perceptio-tokenize``
and ``perceptio-curate`` read their option defaults from these classes, so each default is written
once, here. Importing this module imports neither torch nor transformers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from perceptio.errors import PerceptioError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
NORMALIZATIONS = ("robust-minmax-inverse-depth",)
DEFAULT_DEPTH_MODEL = "depth-anything/Depth-Anything-V2-Small-hf"
DEPTH_SOURCES = ("model", "gt")  # Depth Anything through the depth cache, or DATA_ROOT/depth ground truth


@dataclass
class DepthVQVAEConfig:
    """Shape, quantiser and normalisation of a depth tokenizer (saved as ``config.json``)."""

    image_size: int = 320
    grid_size: int = 10
    num_codes: int = 128
    code_dim: int = 32
    # The encoder first averages input_pool x input_pool pixels (depth is smooth at the scale a
    # 10x10 code grid can describe), then halves the resolution once per entry of hidden_channels.
    input_pool: int = 4
    # Small on purpose: it fits in minutes on two CPU cores and meets the reconstruction targets on
    # the synthetic world; (32, 64, 128) with 64-dim codes costs ~3x per training step.
    hidden_channels: tuple[int, ...] = (16, 32, 64)
    num_res_blocks: int = 1
    ema_decay: float = 0.99
    commitment: float = 0.25
    dead_code_threshold: float = 1.0
    normalization: str = "robust-minmax-inverse-depth"
    low_percentile: float = 2.0
    high_percentile: float = 98.0
    name: str = "depth-vqvae"

    def __post_init__(self) -> None:
        self.hidden_channels = tuple(int(width) for width in self.hidden_channels)
        stride = self.input_pool * 2 ** len(self.hidden_channels)
        if self.image_size != self.grid_size * stride:
            raise PerceptioError(
                f"tokenizer config: image_size {self.image_size} != grid_size {self.grid_size} x stride {stride}"
                " (input_pool x 2^len(hidden_channels))"
            )
        if self.normalization not in NORMALIZATIONS:
            raise PerceptioError(f"tokenizer config: unknown normalization {self.normalization!r}; known: {NORMALIZATIONS}")
        if not 0 <= self.low_percentile < self.high_percentile <= 100:
            raise PerceptioError("tokenizer config: need 0 <= low_percentile < high_percentile <= 100")

    @property
    def stride(self) -> int:
        return self.image_size // self.grid_size

    def to_dict(self) -> dict:
        values = dataclasses.asdict(self)
        values["hidden_channels"] = list(self.hidden_channels)
        return values

    @classmethod
    def from_dict(cls, values: dict) -> "DepthVQVAEConfig":
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise PerceptioError(f"tokenizer config: unknown fields {unknown}")
        return cls(**values)


@dataclass
class FitConfig:
    """How long and how fast the tokenizer trains."""

    steps: int = 800
    batch_size: int = 16
    learning_rate: float = 2e-3
    min_learning_rate_ratio: float = 0.05
    warmup_steps: int = 50
    checkpoint_every: int = 100
    seed: int = 0


@dataclass
class DepthDataConfig:
    """Where the teacher depth of a fit (or an evaluation) comes from."""

    depth_source: str = "model"  # one of DEPTH_SOURCES
    depth_model: str = DEFAULT_DEPTH_MODEL  # hub id or local folder (depth_source "model")
    teacher_batch_size: int = 8  # images per teacher forward pass
    held_out_fraction: float = 0.1  # share of images held out for evaluation (by stem hash)
