"""Depth teacher (Depth Anything V2 or ground truth), depth cache, and the depth VQ-VAE tokenizer.

The public names below are the stage's interface (docs/architecture.md, "tokenize"). They are
imported on first use, so that ``import perceptio.tokenize.config`` (and this package) stays
torch-free.
"""

from __future__ import annotations

import importlib
from typing import Any

# Public name -> the module that defines it.
_EXPORTS = {
    "DEFAULT_DEPTH_MODEL": "perceptio.tokenize.config",
    "DepthVQVAEConfig": "perceptio.tokenize.config",
    "FitConfig": "perceptio.tokenize.config",
    "DepthCache": "perceptio.tokenize.cache",
    "default_cache_dir": "perceptio.tokenize.cache",
    "codebook_usage": "perceptio.tokenize.metrics",
    "depth_metrics": "perceptio.tokenize.metrics",
    "DepthTeacher": "perceptio.tokenize.teacher",
    "OracleTeacher": "perceptio.tokenize.teacher",
    "PipelineTeacher": "perceptio.tokenize.teacher",
    "DepthVQVAE": "perceptio.tokenize.vqvae",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
