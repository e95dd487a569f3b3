"""Confidence intervals for benchmark accuracies: percentile bootstrap over questions (and seeds).

An ablation compares arms evaluated on the *same* questions, so the difference of two arms is
bootstrapped paired: each resample draws question indices once and scores both arms on them. With
several training seeds, every resample also draws the seeds (with replacement), so the interval
covers both the finite question set and the run-to-run spread of training.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class Interval:
    """A mean and its percentile-bootstrap confidence interval."""

    mean: float
    low: float
    high: float
    level: float

    def to_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "low": self.low, "high": self.high, "level": self.level}

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def _as_runs(hits: Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
    """(seeds, questions) float array; a single run may be passed as one flat sequence."""
    array = np.asarray(hits, dtype=np.float64)
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2 or array.shape[1] == 0:
        raise ValueError(f"expected (seeds, questions) scores, got shape {array.shape}")
    return array


def bootstrap_mean(hits: Sequence[Sequence[float]] | np.ndarray, resamples: int = 2000, level: float = 0.95,
                   seed: int = 0) -> Interval:
    """Mean of per-question scores (0/1 hits) over seeds and questions, with a bootstrap interval."""
    return bootstrap_difference(hits, None, resamples, level, seed)


def bootstrap_difference(first: Sequence[Sequence[float]] | np.ndarray, second: Sequence[Sequence[float]] | np.ndarray | None,
                         resamples: int = 2000, level: float = 0.95, seed: int = 0) -> Interval:
    """Mean of ``first - second`` (paired by seed and question), or of ``first`` alone, with its interval.

    Each resample draws seeds and questions with replacement (the same draws for both arms).
    """
    a = _as_runs(first)
    b = None if second is None else _as_runs(second)
    if b is not None and b.shape != a.shape:
        raise ValueError(f"paired scores must have the same shape: {a.shape} vs {b.shape}")
    values = a if b is None else a - b
    seeds, questions = values.shape
    rng = np.random.default_rng(seed)
    seed_draws = rng.integers(0, seeds, size=(resamples, seeds))
    question_draws = rng.integers(0, questions, size=(resamples, questions))
    # per seed mean over the drawn questions, then the mean over the drawn seeds
    per_seed = values[:, question_draws].mean(axis=2)  # (seeds, resamples)
    means = per_seed[seed_draws, np.arange(resamples)[:, None]].mean(axis=1)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return Interval(float(values.mean()), float(low), float(high), level)
