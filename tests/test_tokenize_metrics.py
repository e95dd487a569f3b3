"""Depth reconstruction metrics and codebook statistics against values worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from perceptio.tokenize.metrics import align_scale_shift, codebook_usage, depth_metrics


def test_scale_and_shift_are_removed_before_scoring() -> None:
    target = np.array([[1.0, 2.0], [3.0, 4.0]])
    metrics = depth_metrics(0.5 * target + 7.0, target)  # any increasing affine copy aligns exactly
    assert metrics["abs_rel"] == pytest.approx(0, abs=1e-12)
    assert metrics["rmse"] == pytest.approx(0, abs=1e-12)
    assert metrics["delta1"] == 1.0
    assert align_scale_shift(2 * target + 1, target, np.ones_like(target, bool)) == pytest.approx((0.5, -0.5))


def test_near_and_far_swapped_does_not_align() -> None:
    """The scale is kept >= 0: a flipped map falls back to the constant mean (2.5) and scores badly."""
    target = np.array([[1.0, 2.0], [3.0, 4.0]])
    assert align_scale_shift(-target, target, np.ones_like(target, bool)) == pytest.approx((0.0, 2.5))
    metrics = depth_metrics(-0.5 * target + 7.0, target)
    assert metrics["abs_rel"] == pytest.approx((1.5 / 1 + 0.5 / 2 + 0.5 / 3 + 1.5 / 4) / 4)
    assert metrics["delta1"] == pytest.approx(0.25)  # ratios 2.5, 1.25, 1.2, 1.6: only 1.2 is < 1.25


def test_metrics_match_a_hand_computed_case() -> None:
    # pred = [0, 0, 1]; target = [1, 2, 4]. Least squares of s*p + t: t = mean of the first two
    # targets = 1.5 and s + t = 4, so aligned = [1.5, 1.5, 4].
    pred, target = np.array([[0.0, 0.0, 1.0]]), np.array([[1.0, 2.0, 4.0]])
    metrics = depth_metrics(pred, target)
    assert metrics["abs_rel"] == pytest.approx((0.5 / 1 + 0.5 / 2 + 0) / 3)
    assert metrics["rmse"] == pytest.approx(math.sqrt((0.25 + 0.25 + 0) / 3))
    # Ratios 1.5, 1.333.., 1: only the last is under 1.25.
    assert metrics["delta1"] == pytest.approx(1 / 3)
    assert metrics["images"] == 1


def test_invalid_pixels_and_masks_are_left_out_and_images_averaged() -> None:
    target = np.array([[[1.0, 2.0, 0.0, np.nan]], [[1.0, 2.0, 4.0, 8.0]]])
    pred = np.array([[[1.0, 2.0, 50.0, 3.0]], [[0.0, 0.0, 1.0, 1.0]]])
    mask = np.array([[[True, True, True, True]], [[True, True, True, False]]])
    metrics = depth_metrics(torch.tensor(pred), target, mask)
    # Image 1 scores perfectly on its two valid pixels; image 2 is the hand-computed case above.
    assert metrics["abs_rel"] == pytest.approx((0 + 0.25) / 2)
    assert metrics["delta1"] == pytest.approx((1 + 1 / 3) / 2)
    assert metrics["images"] == 2


def test_non_positive_aligned_values_fail_delta1() -> None:
    # Aligned exactly: [2, 1, 0.5]; flipping the sign of one prediction cannot be aligned away.
    target = np.array([[2.0, 1.0, 0.5, 4.0]])
    metrics = depth_metrics(np.array([[2.0, 1.0, 0.5, -4.0]]), target)
    assert metrics["delta1"] < 1.0


def test_images_without_valid_depth_are_skipped() -> None:
    metrics = depth_metrics(np.ones((1, 3, 3)), np.zeros((1, 3, 3)))
    assert metrics["images"] == 0 and math.isnan(metrics["abs_rel"])


def test_codebook_usage_and_perplexity() -> None:
    stats = codebook_usage(torch.tensor([[0, 1, 2, 3], [0, 1, 2, 3]]), num_codes=8)
    assert stats["usage"] == 0.5 and stats["codes_used"] == 4
    assert stats["perplexity"] == pytest.approx(4.0)  # uniform over 4 codes
    skewed = codebook_usage(np.array([0, 0, 0, 1]), num_codes=2)
    entropy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert skewed["perplexity"] == pytest.approx(math.exp(entropy))
    assert codebook_usage(torch.zeros(0, dtype=torch.long), 4)["usage"] == 0.0
