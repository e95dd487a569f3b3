"""Metric definitions of perceptio.evaluate.metrics against values computed by hand."""

from __future__ import annotations

import numpy as np
import pytest

from perceptio.errors import PerceptioError
from perceptio.evaluate.metrics import (
    MaskOverlap,
    PerceptionVocabulary,
    decoded_depth_scores,
    depth_span,
    depth_token_scores,
    mask_overlap,
    refseg_scores,
    refseg_scores_by_group,
    token_accuracy,
)


def box(shape: tuple[int, int], top: int, left: int, bottom: int, right: int) -> np.ndarray:
    mask = np.zeros(shape, dtype=np.uint8)
    mask[top:bottom, left:right] = 1
    return mask


def test_mask_overlap_counts_foreground_pixels():
    # 4x4 box vs a 4x4 box shifted by 2 columns: overlap 4x2 = 8, union 16 + 16 - 8 = 24.
    prediction = box((10, 10), 0, 0, 4, 4)
    target = box((10, 10), 0, 2, 4, 6)
    overlap = mask_overlap(prediction, target)
    assert (overlap.intersection, overlap.union) == (8, 24)
    assert overlap.iou == pytest.approx(8 / 24)


def test_empty_prediction_on_empty_target_scores_one_and_nonempty_scores_zero():
    empty = np.zeros((5, 5), dtype=np.uint8)
    assert mask_overlap(empty, empty).iou == 1.0
    assert mask_overlap(empty, box((5, 5), 0, 0, 1, 1)).iou == 0.0


def test_mask_size_mismatch_is_a_user_error():
    with pytest.raises(PerceptioError, match="differ in size"):
        mask_overlap(np.zeros((4, 4)), np.zeros((4, 5)))


def test_ciou_giou_precision_by_hand():
    # Three expressions: I/U = 8/24, 9/10, 0/0 (both empty).
    overlaps = [MaskOverlap(8, 24), MaskOverlap(9, 10), MaskOverlap(0, 0)]
    scores = refseg_scores(overlaps)
    assert scores.ciou == pytest.approx((8 + 9 + 0) / (24 + 10 + 0))  # 0.5
    assert scores.giou == pytest.approx((1 / 3 + 0.9 + 1.0) / 3)
    assert scores.precision_at_50 == pytest.approx(2 / 3)  # 0.9 and the empty pair
    assert scores.expressions == 3


def test_ciou_weights_large_objects_giou_does_not():
    # A large object segmented well and a small one missed: cIoU stays high, gIoU halves.
    big_hit = MaskOverlap(intersection=990, union=1000)
    small_miss = MaskOverlap(intersection=0, union=10)
    scores = refseg_scores([big_hit, small_miss])
    assert scores.ciou == pytest.approx(990 / 1010)
    assert scores.giou == pytest.approx(0.99 / 2)
    assert scores.precision_at_50 == 0.5


def test_precision_threshold_is_inclusive():
    assert refseg_scores([MaskOverlap(5, 10)]).precision_at_50 == 1.0
    assert refseg_scores([MaskOverlap(49, 100)]).precision_at_50 == 0.0


def test_scores_grouped_per_dataset_and_split():
    records = [
        {"dataset": "refcoco-unc", "split": "val", "intersection": 1, "union": 2},
        {"dataset": "refcoco-unc", "split": "val", "intersection": 3, "union": 4, "missing_seg": True},
        {"dataset": "refcoco-unc", "split": "testA", "intersection": 0, "union": 5},
        {"dataset": "refcocog-umd", "split": "val", "intersection": 5, "union": 5},
    ]
    groups = refseg_scores_by_group(records)
    assert sorted(groups) == ["refcoco-unc/testA", "refcoco-unc/val", "refcocog-umd/val"]
    assert groups["refcoco-unc/val"].ciou == pytest.approx(4 / 6)
    assert groups["refcoco-unc/val"].giou == pytest.approx((0.5 + 0.75) / 2)
    assert groups["refcoco-unc/val"].missing_seg == 1
    assert groups["refcoco-unc/testA"].ciou == 0.0
    assert groups["refcocog-umd/val"].expressions == 1


def test_no_samples_is_a_user_error():
    with pytest.raises(PerceptioError):
        refseg_scores([])


# --- depth tokens ---------------------------------------------------------------------------------
# Vocabulary of the examples: depth codes 0..3 are ids 10..13, [D_START] = 5, [D_END] = 6, n = 3.
VOCAB = PerceptionVocabulary(depth_token_ids=(10, 11, 12, 13), d_start_id=5, d_end_id=6, num_depth_tokens=3)


@pytest.mark.parametrize(
    ("sequence", "well_formed", "codes"),
    [
        ([1, 5, 10, 13, 12, 6, 2], True, [0, 3, 2]),
        ([1, 5, 10, 13, 6, 2], False, [0, 3]),  # too short
        ([1, 5, 10, 13, 12, 11, 6], False, [0, 3, 2, 1]),  # too long
        ([1, 5, 10, 13, 12, 2], False, [0, 3, 2]),  # never closed
        ([1, 2, 3], False, []),  # no span
        ([11, 5, 10, 13, 12, 6], False, [0, 3, 2]),  # depth token outside the span
        ([5, 10, 13, 12, 6, 5, 10, 10, 10, 6], False, [0, 3, 2]),  # two spans
        ([6, 5, 10, 13, 12, 6], False, [0, 3, 2]),  # stray [D_END]
    ],
)
def test_depth_span_well_formedness(sequence, well_formed, codes):
    assert depth_span(sequence, VOCAB) == (well_formed, codes)


def test_mark_readouts_after_the_span_keep_it_well_formed_and_nowhere_else():
    readouts = [1, 5, 10, 13, 12, 6, 3, 13, 4, 10, 2]  # the span, then "A[D_3] B[D_0]"
    assert depth_span(readouts, VOCAB) == (False, [0, 3, 2])  # a model without readouts: codes outside the span
    assert depth_span(readouts, VOCAB, readouts=True) == (True, [0, 3, 2])
    assert depth_span([11, 5, 10, 13, 12, 6, 3, 13], VOCAB, readouts=True) == (False, [0, 3, 2])  # a code before the span


def test_token_accuracy_counts_missing_codes_as_wrong():
    assert token_accuracy([0, 3, 2], [0, 3, 1]) == pytest.approx(2 / 3)
    assert token_accuracy([0], [0, 3, 1]) == pytest.approx(1 / 3)
    assert token_accuracy([0, 3, 1, 2, 2], [0, 3, 1]) == 1.0


def test_depth_token_scores_average_depth_over_well_formed_only():
    records = [
        {"well_formed": True, "token_accuracy": 1.0, "abs_rel": 0.1, "delta1": 0.9},
        {"well_formed": True, "token_accuracy": 0.5, "abs_rel": 0.3, "delta1": 0.7},
        {"well_formed": False, "token_accuracy": 0.0},
    ]
    scores = depth_token_scores(records)
    assert scores.well_formed_rate == pytest.approx(2 / 3)
    assert scores.token_accuracy == pytest.approx(0.5)
    assert scores.abs_rel == pytest.approx(0.2)
    assert scores.delta1 == pytest.approx(0.8)
    none_formed = depth_token_scores([{"well_formed": False, "token_accuracy": 0.2}])
    assert none_formed.abs_rel is None and none_formed.well_formed == 0


def test_decoded_depth_scores_ignore_scale_and_shift_but_not_structure():
    rng = np.random.default_rng(0)
    teacher = np.clip(rng.normal(0, 0.5, (32, 32)), -1, 1)
    same = decoded_depth_scores(teacher, teacher)
    assert same["abs_rel"] == pytest.approx(0, abs=1e-9) and same["delta1"] == 1.0
    affine = decoded_depth_scores(0.5 * teacher - 0.2, teacher)  # aligned away by least squares
    assert affine["abs_rel"] == pytest.approx(0, abs=1e-9)
    unrelated = decoded_depth_scores(np.clip(rng.normal(0, 0.5, (32, 32)), -1, 1), teacher)
    assert unrelated["abs_rel"] > 0.1 and unrelated["delta1"] < 1.0


def test_exact_match_ignores_case_punctuation_and_articles():
    from perceptio.evaluate.metrics import conversation_scores, exact_match

    assert exact_match("The blue cube.", "blue cube") and exact_match(" 3 ", "3")
    assert not exact_match("blue cube", "red cube") and not exact_match("left", "left of it")
    scores = conversation_scores([
        {"key": "a", "turn": 1, "prediction": "red", "reference": "Red"},
        {"key": "a", "turn": 3, "prediction": "2", "reference": "3"},
        {"key": "b", "turn": 1, "prediction": "left", "reference": "left"},
    ])
    assert (scores.answers, scores.conversations) == (3, 2)
    assert scores.exact_match == pytest.approx(2 / 3) and scores.all_turns_right == 0.5
