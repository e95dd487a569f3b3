"""Benchmark metrics: referring segmentation (cIoU, gIoU, precision@0.5) and depth-token quality.

Referring segmentation follows LISA's ``validate`` and Sa2VA's ``RESDataset.evaluate``: every
sentence of every ref is one sample; per sample, intersection and union are the foreground pixel
counts of the binarised prediction and the ground-truth mask at the image's size;

- cIoU = sum of intersections / sum of unions over all samples of a (dataset, split),
- gIoU = mean over samples of I / U, where a sample whose union is empty (empty prediction on an
  empty ground truth) scores 1,
- precision@0.5 = share of samples whose IoU is at least 0.5 (the same per-sample IoU as gIoU).

The peers add epsilons (I / (U + 1e-5), sum I / (sum U + 1e-10)); we compute the exact ratios, which
differ from theirs by less than 1e-9 on real masks. Where a model produced no [SEG] token at all, the
sample is scored with an empty prediction (its ground-truth area enters the union): Sa2VA skips such
samples in the sums, which flatters cIoU, so we count them as ``missing_seg`` instead.

Depth tokens are scored per sample (well-formed span, token accuracy against the teacher's tokens)
and, for well-formed spans, through the frozen VQ-VAE decoder against the teacher's depth with
:func:`perceptio.tokenize.metrics.depth_metrics` (AbsRel, delta<1.25 after scale-and-shift).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Sequence

import numpy as np

from perceptio.errors import PerceptioError

IOU_THRESHOLD = 0.5


@dataclass(frozen=True)
class MaskOverlap:
    """Foreground pixel counts of one prediction against its ground truth."""

    intersection: int
    union: int

    @property
    def iou(self) -> float:
        # An empty union means both masks are empty: the model correctly found nothing.
        return 1.0 if self.union == 0 else self.intersection / self.union


def mask_overlap(prediction: np.ndarray, target: np.ndarray) -> MaskOverlap:
    """Intersection and union of two binary (H, W) masks (any nonzero value is foreground)."""
    prediction = np.asarray(prediction)
    target = np.asarray(target)
    if prediction.shape != target.shape:
        raise PerceptioError(f"prediction mask {prediction.shape} and ground truth {target.shape} differ in size")
    predicted = prediction.astype(bool)
    truth = target.astype(bool)
    return MaskOverlap(
        intersection=int(np.count_nonzero(predicted & truth)), union=int(np.count_nonzero(predicted | truth))
    )


@dataclass(frozen=True)
class RefSegScores:
    """The referring-segmentation scores of one group of samples (a dataset split)."""

    ciou: float
    giou: float
    precision_at_50: float
    expressions: int
    missing_seg: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def refseg_scores(overlaps: Sequence[MaskOverlap], missing_seg: int = 0) -> RefSegScores:
    """cIoU, gIoU and precision@0.5 over the samples of one group (see the module docstring)."""
    if not overlaps:
        raise PerceptioError("no referring-segmentation samples to score")
    total_intersection = sum(overlap.intersection for overlap in overlaps)
    total_union = sum(overlap.union for overlap in overlaps)
    ious = np.array([overlap.iou for overlap in overlaps], dtype=np.float64)
    return RefSegScores(
        # Every ground truth empty and every prediction empty: nothing to find, nothing wrongly found.
        ciou=1.0 if total_union == 0 else total_intersection / total_union,
        giou=float(ious.mean()),
        precision_at_50=float((ious >= IOU_THRESHOLD).mean()),
        expressions=len(overlaps),
        missing_seg=missing_seg,
    )


def group_name(dataset: str, split: str) -> str:
    return f"{dataset}/{split}"


def refseg_scores_by_group(records: Iterable[dict[str, Any]]) -> dict[str, RefSegScores]:
    """Scores per ``dataset/split`` from per-sample records.

    A record holds ``dataset``, ``split``, ``intersection``, ``union`` and optionally
    ``missing_seg`` (True when the model wrote no [SEG] token).
    """
    overlaps: dict[str, list[MaskOverlap]] = defaultdict(list)
    missing: dict[str, int] = defaultdict(int)
    for record in records:
        name = group_name(record["dataset"], record["split"])
        overlaps[name].append(MaskOverlap(int(record["intersection"]), int(record["union"])))
        missing[name] += int(bool(record.get("missing_seg", False)))
    return {name: refseg_scores(overlaps[name], missing[name]) for name in sorted(overlaps)}


# --- depth tokens -------------------------------------------------------------------------------


@dataclass(frozen=True)
class PerceptionVocabulary:
    """The ids of the perception tokens in one model's vocabulary."""

    depth_token_ids: tuple[int, ...]  # id of [D_k] at index k
    d_start_id: int
    d_end_id: int
    num_depth_tokens: int  # n, the span length (100)

    def code_of(self) -> dict[int, int]:
        return {token_id: code for code, token_id in enumerate(self.depth_token_ids)}


def readout_codes(token_ids: Sequence[int], vocabulary: PerceptionVocabulary) -> list[int]:
    """The depth codes written after the first span's [D_END]: the mark readouts of a model trained
    with ``--mark-readouts`` (``A[D_k] B[D_k]``), in the order written."""
    ids = [int(token) for token in token_ids]
    if vocabulary.d_end_id not in ids:
        return []
    code_of = vocabulary.code_of()
    return [code_of[token] for token in ids[ids.index(vocabulary.d_end_id) + 1:] if token in code_of]


def depth_span(token_ids: Sequence[int], vocabulary: PerceptionVocabulary,
               readouts: bool = False) -> tuple[bool, list[int]]:
    """(well_formed, codes) of a generated sequence.

    Well formed: exactly one [D_START], followed by exactly n depth tokens and one [D_END], and no
    depth token or [D_END] anywhere else (``readouts``: depth tokens may follow the [D_END], as mark
    readouts). ``codes`` are the depth codes after the first [D_START] up to the next non-depth token
    (possibly fewer or more than n when the span is malformed).
    """
    ids = [int(token) for token in token_ids]
    code_of = vocabulary.code_of()
    starts = [position for position, token in enumerate(ids) if token == vocabulary.d_start_id]
    if not starts:
        return False, []
    codes: list[int] = []
    for token in ids[starts[0] + 1 :]:
        if token not in code_of:
            break
        codes.append(code_of[token])
    end = starts[0] + 1 + len(codes)
    closed = end < len(ids) and ids[end] == vocabulary.d_end_id
    counted = ids[: end + 1] if readouts else ids
    depth_elsewhere = sum(token in code_of for token in counted) != len(codes)
    ends = sum(token == vocabulary.d_end_id for token in ids)
    well_formed = (
        len(starts) == 1 and closed and ends == 1 and not depth_elsewhere and len(codes) == vocabulary.num_depth_tokens
    )
    return well_formed, codes


def decoded_depth_scores(decoded: np.ndarray, teacher: np.ndarray) -> dict[str, float]:
    """AbsRel and delta1 of a token-decoded depth map against the teacher's, both in the tokenizer's
    normalised inverse depth ([-1, 1], near = +1, as shards store it).

    Shards keep only the normalised teacher map, whose far end is 0 after any shift to [0, 1], where
    a relative error is unbounded. Both maps are therefore shifted to [1, 2] (far = 1) before
    :func:`perceptio.tokenize.metrics.depth_metrics` aligns the prediction by scale and shift; the
    numbers rank models and checkpoints but are not comparable to metric-depth tables.
    """
    from perceptio.tokenize.metrics import depth_metrics

    scores = depth_metrics((np.asarray(decoded) + 3.0) / 2.0, (np.asarray(teacher, dtype=np.float64) + 3.0) / 2.0)
    return {"abs_rel": scores["abs_rel"], "delta1": scores["delta1"]}


def token_accuracy(codes: Sequence[int], teacher_codes: Sequence[int]) -> float:
    """Share of the teacher's n positions where the generated code matches; missing codes are wrong."""
    teacher = [int(code) for code in teacher_codes]
    if not teacher:
        raise PerceptioError("the teacher's depth tokens are empty")
    matches = sum(int(generated) == expected for generated, expected in zip(codes, teacher))
    return matches / len(teacher)


@dataclass(frozen=True)
class DepthTokenScores:
    """Depth-token quality over a set of samples."""

    samples: int
    well_formed: int
    well_formed_rate: float
    token_accuracy: float  # mean over every sample (a malformed span still earns its matching prefix)
    abs_rel: float | None  # mean over well-formed samples; None when there are none
    delta1: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def depth_token_scores(records: Iterable[dict[str, Any]]) -> DepthTokenScores:
    """Aggregate per-sample records holding ``well_formed``, ``token_accuracy`` and, for well-formed
    spans, ``abs_rel`` and ``delta1``."""
    records = list(records)
    if not records:
        raise PerceptioError("no depth samples to score")
    formed = [record for record in records if record["well_formed"]]
    return DepthTokenScores(
        samples=len(records),
        well_formed=len(formed),
        well_formed_rate=len(formed) / len(records),
        token_accuracy=float(np.mean([record["token_accuracy"] for record in records])),
        abs_rel=float(np.mean([record["abs_rel"] for record in formed])) if formed else None,
        delta1=float(np.mean([record["delta1"] for record in formed])) if formed else None,
    )


# ------------------------------------------------------------------------------- conversations
_ARTICLES = {"a", "an", "the"}


def normalise_answer(text: str) -> str:
    """Lower case, punctuation and articles dropped, whitespace collapsed (the VQA convention)."""
    kept = "".join(character if character.isalnum() or character.isspace() else " " for character in text.lower())
    return " ".join(word for word in kept.split() if word not in _ARTICLES)


def exact_match(prediction: str, reference: str) -> bool:
    """Whether the answers agree after :func:`normalise_answer` ("The blue cube." == "blue cube")."""
    return normalise_answer(prediction) == normalise_answer(reference)


@dataclass(frozen=True)
class ConversationScores:
    answers: int  # assistant turns scored
    exact_match: float  # share of answers that match their reference
    conversations: int
    all_turns_right: float  # share of conversations with every answer right

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def conversation_scores(records: Iterable[dict[str, Any]]) -> ConversationScores:
    """Scores of ``{"key", "turn", "prediction", "reference"}`` records (one per assistant turn)."""
    by_conversation: dict[str, list[bool]] = defaultdict(list)
    for record in records:
        by_conversation[record["key"]].append(exact_match(record["prediction"], record["reference"]))
    answers = [right for rights in by_conversation.values() for right in rights]
    if not answers:
        raise PerceptioError("no conversation turn to score")
    return ConversationScores(
        answers=len(answers),
        exact_match=sum(answers) / len(answers),
        conversations=len(by_conversation),
        all_turns_right=sum(all(rights) for rights in by_conversation.values()) / len(by_conversation),
    )
