"""Depth teacher (Depth Anything V2 or ground truth), depth cache, and the depth VQ-VAE tokenizer.

The public names below are the stage's interface (docs/architecture.md, "tokenize").
"""

from perceptio.tokenize.cache import DepthCache, default_cache_dir
from perceptio.tokenize.metrics import codebook_usage, depth_metrics
from perceptio.tokenize.teacher import DEFAULT_DEPTH_MODEL, DepthTeacher, OracleTeacher, PipelineTeacher
from perceptio.tokenize.vqvae import DepthVQVAE, DepthVQVAEConfig

__all__ = [
    "DEFAULT_DEPTH_MODEL",
    "DepthCache",
    "DepthTeacher",
    "DepthVQVAE",
    "DepthVQVAEConfig",
    "OracleTeacher",
    "PipelineTeacher",
    "codebook_usage",
    "default_cache_dir",
    "depth_metrics",
]
