"""Bootstrap intervals of the ablation and the (a)/(b)/(c) decomposition scores."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from perceptio.evaluate.decomposition import TokenReader, decomposition_scores
from perceptio.evaluate.stats import bootstrap_difference, bootstrap_mean


def test_interval_brackets_the_mean_and_narrows_with_more_questions():
    rng = np.random.default_rng(0)
    small = bootstrap_mean(rng.random(50) < 0.6)
    large = bootstrap_mean(rng.random(5000) < 0.6)
    for interval in (small, large):
        assert interval.low <= interval.mean <= interval.high
    assert (large.high - large.low) < (small.high - small.low) / 5
    assert abs(large.mean - 0.6) < 0.03


def test_binomial_interval_width_is_about_the_normal_one():
    hits = np.array([1.0] * 150 + [0.0] * 150)
    interval = bootstrap_mean(hits, resamples=4000)
    half_width = 1.96 * np.sqrt(0.25 / 300)
    assert interval.high - interval.low == pytest.approx(2 * half_width, rel=0.15)


def test_paired_difference_of_identical_arms_is_exactly_zero():
    hits = (np.random.default_rng(1).random((3, 200)) < 0.5).astype(float)
    difference = bootstrap_difference(hits, hits)
    assert (difference.mean, difference.low, difference.high) == (0.0, 0.0, 0.0)
    assert not difference.excludes_zero()


def test_a_clear_difference_excludes_zero_and_seeds_widen_the_interval():
    rng = np.random.default_rng(2)
    better = (rng.random((3, 300)) < 0.7).astype(float)
    worse = (rng.random((3, 300)) < 0.4).astype(float)
    difference = bootstrap_difference(better, worse)
    assert difference.excludes_zero() and 0.2 < difference.mean < 0.4
    # seeds that disagree a lot: the same questions, one seed far better than the others
    spread = better.copy()
    spread[0] = 1.0
    assert bootstrap_mean(spread).high - bootstrap_mean(spread).low > bootstrap_mean(better).high - bootstrap_mean(better).low


def test_shapes_must_match():
    with pytest.raises(ValueError):
        bootstrap_difference(np.ones((2, 10)), np.ones((2, 9)))


def test_decomposition_scores_per_variant_and_overall():
    records = [
        {"variant": 3, "answer": "A", "choice": "A", "token_choice": "A", "truth_choice": "A", "well_formed": True, "token_accuracy": 0.5},
        {"variant": 3, "answer": "B", "choice": "A", "token_choice": "B", "truth_choice": "B", "well_formed": True, "token_accuracy": 0.7},
        {"variant": 4, "answer": "C", "choice": None, "token_choice": None, "truth_choice": "C", "well_formed": False, "token_accuracy": None},
    ]
    scores = decomposition_scores(records)
    three = scores["by_variant"]["3"]
    assert (three["choice"], three["token_choice"], three["truth_choice"]) == (0.5, 1.0, 1.0)
    assert three["token_accuracy"] == pytest.approx(0.6)
    assert scores["choice"] == pytest.approx(1 / 3) and scores["token_choice"] == pytest.approx(2 / 3)
    assert scores["truth_choice"] == 1.0 and scores["well_formed"] == pytest.approx(2 / 3)


class CodeIsNearness:
    """A stand-in depth tokenizer: 100 codes, each cell's depth its code (larger = nearer)."""

    num_tokens = 100

    def decode(self, codes):
        return codes.reshape(1, 10, 10).float().repeat_interleave(32, 1).repeat_interleave(32, 2)


def test_readouts_are_checked_against_the_models_span_and_the_truth_at_each_mark():
    span, truth = list(range(100)), [99 - code for code in range(100)]
    reader = TokenReader(CodeIsNearness(), Path("world"), _truth={"pictures/0.png": truth})  # the truth known already
    row = {"points": [[10, 10], [300, 230]], "labels": ["A", "B"], "image_width": 320, "image_height": 240,
           "source_file": "pictures/0.png"}
    marked = [0, 99]  # the cells of the two points
    copied = reader.columns(row, span, True, readouts=[span[cell] for cell in marked])
    assert (copied["readout_copy"], copied["readout_truth"]) == (1.0, 0.0)
    assert (copied["token_choice"], copied["truth_choice"]) == ("B", "A")
    half = reader.columns(row, span, True, readouts=[truth[marked[0]]])  # only A's, and the true one
    assert (half["readout_copy"], half["readout_truth"]) == (0.0, 0.5)
    assert "readout_copy" not in reader.columns(row, span, True)  # a model without readouts
    scores = decomposition_scores([{**copied, "variant": 2, "answer": "A", "choice": "A"},
                                   {**half, "variant": 2, "answer": "A", "choice": "B"}])
    assert (scores["readout_copy"], scores["readout_truth"]) == (0.5, 0.25)
