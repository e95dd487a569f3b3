"""The paper's four losses (docs: ../shared/docs/paper-notes.md, "Losses"), on restricted logits.

Vocabularies are ~150k wide, so output logits are computed only at the positions that carry a loss:
:class:`SupervisedLogits` holds one row per supervised target token and an index from (sample,
target position) to that row. Notation as in the paper: ``z_{b,t-1}`` (the row for target position
``t``) predicts ``y_{b,t}``; ``s_b`` / ``e_b`` are the positions of the first ``[D_START]`` and the
first ``[D_END]`` after it among the sample's target tokens; the span is valid when both exist, and
``l_b = e_b - s_b - 1``. Every per-sample term is averaged over the whole batch (``1/B``), samples
without a valid span contributing zero.

Choices the paper leaves open, made here:

- L_LLM is the mean NLL over every supervised token of the batch (depth tokens included). Option
  (``PerceptioConfig.span_weight``, not in the paper): the span's tokens weigh less in it, so that
  the few answer tokens after a 100-token span are not drowned; L_depth still trains the span.
  Likewise ``PerceptioConfig.answer_weight``: the answer after a span (and its readouts) weighs more.
- L_count measures the span length the model would write, differentiably (see
  :func:`depth_count_loss`); a sample without a valid span contributes zero (the literal formula
  would add the constant ``log(1 + n)``, which carries no gradient).
- L_DepthRecon's ``||Y^ - Y||^2`` is a per-pixel mean (MSE); the sum over 320x320 pixels would be
  ~10^5 times larger than the other terms at the paper's weight 1.0. Spans shorter than ``n`` are
  padded with uniform code distributions (the codebook mean); longer ones are truncated.
- L_SegText (ours, off by default): see :func:`seg_text_loss`.
- L_SegRecon averages per-pixel sigmoid CE and a smoothed DICE (``1 - (2|P.G| + 1)/(|P| + |G| + 1)``)
  over the samples that have both a ground-truth mask and a ``[SEG]`` token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


@dataclass
class SupervisedLogits:
    """Output logits at supervised positions only.

    ``logits[index[b, t]]`` is ``z_{b,t-1}``, the prediction of target token ``labels[b, t]``;
    ``index`` is -1 where ``labels`` is ignored (and at ``t = 0``, which nothing predicts).
    """

    logits: torch.Tensor  # (N, V)
    index: torch.Tensor  # (B, T) long
    targets: torch.Tensor  # (N,) long: the label each row predicts

    @classmethod
    def from_hidden(
        cls, hidden: torch.Tensor, labels: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor]
    ) -> "SupervisedLogits":
        """Apply ``head`` only to the hidden states (B, T, D) that predict a supervised label."""
        supervised = labels != IGNORE_INDEX
        supervised[:, 0] = False  # nothing precedes the first position
        batch_index, target_position = supervised.nonzero(as_tuple=True)
        index = torch.full(labels.shape, -1, dtype=torch.long, device=labels.device)
        index[batch_index, target_position] = torch.arange(len(batch_index), device=labels.device)
        logits = head(hidden[batch_index, target_position - 1])
        return cls(logits=logits, index=index, targets=labels[batch_index, target_position])

    @classmethod
    def from_full_logits(cls, logits: torch.Tensor, labels: torch.Tensor) -> "SupervisedLogits":
        """The same rows taken from a full (B, T, V) logits tensor (the reference path, for tests)."""
        return cls.from_hidden(logits, labels, head=lambda rows: rows)

    def token_nll(self) -> torch.Tensor:
        """(N,) cross-entropy of each supervised token (float32 for stability under autocast)."""
        return F.cross_entropy(self.logits.float(), self.targets, reduction="none")


@dataclass
class DepthSpans:
    """Per-sample ``s_b``, ``e_b`` (target positions; -1 when absent) and validity."""

    start: torch.Tensor  # (B,) long
    end: torch.Tensor  # (B,) long
    valid: torch.Tensor  # (B,) bool

    @property
    def length(self) -> torch.Tensor:
        """``l_b = e_b - s_b - 1`` for valid spans, 0 otherwise."""
        return torch.where(self.valid, self.end - self.start - 1, torch.zeros_like(self.start))


def find_depth_spans(labels: torch.Tensor, d_start_id: int, d_end_id: int) -> DepthSpans:
    """The first ``[D_START]`` of each sample's targets and the first ``[D_END]`` after it."""
    batch, length = labels.shape
    positions = torch.arange(length, device=labels.device).expand(batch, length)
    never = torch.full_like(positions, length)
    is_start = labels == d_start_id
    start = torch.where(is_start, positions, never).min(dim=1).values
    is_end = (labels == d_end_id) & (positions > start[:, None])
    end = torch.where(is_end, positions, never).min(dim=1).values
    valid = (start < length) & (end < length)
    missing = torch.full_like(start, -1)
    return DepthSpans(
        start=torch.where(start < length, start, missing),
        end=torch.where(valid, end, missing),
        valid=valid,
    )


def llm_loss(supervised: SupervisedLogits, token_nll: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """L_LLM: mean teacher-forced NLL over all supervised tokens of the batch; with ``weights``
    ((N,), see :func:`span_token_weights`) the weighted mean ``sum(w * nll) / sum(w)``."""
    if token_nll.numel() == 0:
        return supervised.logits.sum() * 0.0
    if weights is None:
        return token_nll.mean()
    return (weights * token_nll).sum() / weights.sum().clamp_min(torch.finfo(token_nll.dtype).tiny)


def answer_starts(labels: torch.Tensor, spans: DepthSpans, depth_token_ids: torch.Tensor) -> torch.Tensor:
    """(B,) the first target position of each sample's answer after its span: past ``e_b`` and past
    the depth codes written after it (``--mark-readouts``' ``A[D_k] B[D_k]``); ``labels.shape[1]``
    (no answer) for samples without a valid span."""
    batch, length = labels.shape
    positions = torch.arange(length, device=labels.device).expand(batch, length)
    after_span = spans.valid[:, None] & (positions > spans.end[:, None])
    is_code = torch.isin(labels, depth_token_ids.to(labels.device)) & after_span
    last_code = torch.where(is_code, positions, torch.full_like(positions, -1)).max(dim=1).values
    start = torch.maximum(spans.end, last_code) + 1
    return torch.where(spans.valid, start, torch.full_like(start, length))


def llm_token_weights(supervised: SupervisedLogits, spans: DepthSpans, span_weight: float,
                      answer_start: torch.Tensor | None = None, answer_weight: float = 1.0) -> torch.Tensor:
    """(N,) weight of each supervised token in L_LLM: ``span_weight`` from ``s_b`` to ``e_b`` (the
    markers included) of a valid span, ``answer_weight`` from ``answer_start`` (see
    :func:`answer_starts`) on, 1 elsewhere."""
    batch_index, position = (supervised.index >= 0).nonzero(as_tuple=True)  # the rows' own order
    inside = spans.valid[batch_index] & (position >= spans.start[batch_index]) & (position <= spans.end[batch_index])
    weights = torch.where(inside, span_weight, 1.0).to(supervised.logits.device)
    if answer_start is not None:
        weights = torch.where(position >= answer_start[batch_index], answer_weight, weights)
    return weights


def depth_marker_loss(supervised: SupervisedLogits, token_nll: torch.Tensor, spans: DepthSpans) -> torch.Tensor:
    """L_marker = 1/B sum_b 1[valid] (CE(z_{s_b-1}, D_START) + CE(z_{e_b-1}, D_END))."""
    batch = spans.valid.shape[0]
    total = supervised.logits.sum() * 0.0
    for b in torch.nonzero(spans.valid).flatten().tolist():
        rows = supervised.index[b, [spans.start[b], spans.end[b]]]
        total = total + token_nll[checked_rows(rows)].sum()
    return total / batch


def depth_token_loss(supervised: SupervisedLogits, token_nll: torch.Tensor, spans: DepthSpans) -> torch.Tensor:
    """L_token = 1/B sum_b 1[l_b > 0] / l_b sum_{t=s_b+1}^{e_b-1} CE(z_{t-1}, y_t)."""
    batch = spans.valid.shape[0]
    total = supervised.logits.sum() * 0.0
    for b in torch.nonzero(spans.length > 0).flatten().tolist():
        rows = supervised.index[b, spans.start[b] + 1 : spans.end[b]]
        total = total + token_nll[checked_rows(rows)].mean()
    return total / batch


def depth_count_loss(
    supervised: SupervisedLogits, spans: DepthSpans, depth_ids: torch.Tensor, num_tokens: int
) -> torch.Tensor:
    """L_count = 1/B sum_b 1[valid] E[log(1 + |L_b - n|)], L_b the run length the model would write.

    The paper's ``log(1 + |l_b - n|)`` uses the ground-truth length, a constant. Here ``L_b`` is
    the number of consecutive depth-code tokens the model writes after ``[D_START]``, under
    teacher forcing along the ground-truth span: at the j-th step inside the span (target position
    ``t = s_b + 1 + j``, ``j = 0..l_b``) the model continues the run with probability
    ``c_j = sum_k p(D_k | z_{t-1})`` (its total mass on the K depth tokens) and stops with
    ``1 - c_j``. Then ``P(L_b = j) = (1 - c_j) prod_{i<j} c_i`` for ``j <= l_b``, and the remaining
    mass ``prod_{i<=l_b} c_i`` (still writing codes where ``[D_END]`` belongs) is counted at length
    ``l_b + 1``. The loss is the expectation of ``log(1 + |L_b - n|)`` under that distribution: zero
    when the model puts all its mass on codes for exactly ``n`` steps and then on a non-code token,
    differentiable in every ``c_j``. Computed in log space.
    """
    batch = spans.valid.shape[0]
    total = supervised.logits.sum() * 0.0
    is_depth = torch.zeros(supervised.logits.shape[-1], dtype=torch.bool, device=supervised.logits.device)
    is_depth[depth_ids] = True
    for b in torch.nonzero(spans.valid).flatten().tolist():
        start, end = int(spans.start[b]), int(spans.end[b])
        rows = checked_rows(supervised.index[b, start + 1 : end + 1])
        log_probs = torch.log_softmax(supervised.logits[rows].float(), dim=-1)
        log_continue = log_probs.masked_fill(~is_depth, -math.inf).logsumexp(-1)
        log_stop = log_probs.masked_fill(is_depth, -math.inf).logsumexp(-1)
        # log prod_{i<j} c_i for j = 0..l_b+1
        log_survive = torch.cat([log_continue.new_zeros(1), log_continue.cumsum(0)])
        log_length_probs = torch.cat([log_stop + log_survive[:-1], log_survive[-1:]])
        lengths = torch.arange(end - start + 1, device=log_probs.device, dtype=log_probs.dtype)
        penalty = torch.log1p((lengths - num_tokens).abs())
        total = total + (log_length_probs.exp() * penalty).sum()
    return total / batch


def depth_recon_loss(
    supervised: SupervisedLogits,
    spans: DepthSpans,
    depth_ids: torch.Tensor,
    num_tokens: int,
    decode_soft: Callable[[torch.Tensor], torch.Tensor],
    depth_target: torch.Tensor,
    has_depth: torch.Tensor,
) -> torch.Tensor:
    """L_DepthRecon = 1/B sum_b MSE(decode_soft(p_b), Y_b), soft codebook mixing (Algorithm 1).

    For each interior position the logits are restricted to the K depth-code ids and soft-maxed
    into ``p_t`` over codes (code k = ``depth_ids[k]``); the sequence is truncated or padded
    (uniform) to ``n``; the frozen VQ-VAE's ``decode_soft`` mixes its codebook by ``p`` and decodes.
    Samples without a valid non-empty span or without a depth target contribute zero.
    """
    batch = spans.valid.shape[0]
    chosen = torch.nonzero((spans.length > 0) & has_depth.bool()).flatten().tolist()
    if not chosen:
        return supervised.logits.sum() * 0.0
    num_codes = len(depth_ids)
    probabilities = []
    for b in chosen:
        rows = checked_rows(supervised.index[b, int(spans.start[b]) + 1 : int(spans.end[b])][:num_tokens])
        code_probs = torch.softmax(supervised.logits[rows][:, depth_ids].float(), dim=-1)
        padding = code_probs.new_full((num_tokens - len(rows), num_codes), 1.0 / num_codes)
        probabilities.append(torch.cat([code_probs, padding]))
    decoded = decode_soft(torch.stack(probabilities))
    target = depth_target[chosen].to(decoded.dtype)
    per_sample = ((decoded - target) ** 2).flatten(1).mean(dim=1)
    return per_sample.sum() / batch


def seg_pairs(labels: torch.Tensor, seg_token_id: int, mask_counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row, position, mask index) of every ``[SEG]`` in ``labels`` (B, T) that has a mask.

    The k-th ``[SEG]`` of a row is paired with the row's k-th mask (a grounded caption's phrases in
    order). A row's ``[SEG]`` beyond its ``mask_counts`` (curation rejects such samples) and masks
    whose ``[SEG]`` was cut off by ``max_length`` pair with nothing and are left out.
    """
    is_seg = labels == seg_token_id
    rank = is_seg.long().cumsum(dim=1) - 1
    paired = is_seg & (rank < mask_counts.to(labels.device).view(-1, 1))
    rows, positions = paired.nonzero(as_tuple=True)  # row-major: each row's [SEG]s in order
    return rows, positions, rank[rows, positions]


def segmentation_losses(mask_logits: torch.Tensor, gt_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigmoid CE, DICE) averaged over the given masks (M, H, W); zeros when M = 0."""
    if mask_logits.shape[0] == 0:
        zero = mask_logits.sum() * 0.0
        return zero, zero
    logits = mask_logits.float().flatten(1)
    target = gt_mask.float().flatten(1)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(dim=1)
    probs = logits.sigmoid()
    dice = 1.0 - (2.0 * (probs * target).sum(1) + 1.0) / (probs.sum(1) + target.sum(1) + 1.0)
    return bce.mean(), dice.mean()


SEG_TEXT_TEMPERATURE = 0.1  # of the cosine similarities in L_SegText


def request_counts(input_ids: torch.Tensor, plain: torch.Tensor, seg_token_id: int, rows: torch.Tensor,
                   positions: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(N, V) token counts of the request behind each ``[SEG]`` at (``rows``, ``positions``): the
    plain text tokens (``plain`` (B, T): not markup, image or perception tokens, not padding) after
    the row's previous ``[SEG]`` (or its start) and before this one. For a referring sample that is
    its prompt; for a grounded caption, the phrase the ``[SEG]`` follows (and what came before it)."""
    rank = (input_ids == seg_token_id).long().cumsum(dim=1)  # [SEG]s up to and including each position
    index = torch.arange(input_ids.shape[1], device=input_ids.device)
    own = (rank[rows] == (rank[rows, positions] - 1)[:, None]) & (index[None] < positions[:, None]) & plain[rows]
    counts = torch.zeros(len(rows), vocab_size, device=input_ids.device)
    return counts.scatter_add_(1, input_ids[rows], own.float())


def seg_text_loss(read: torch.Tensor, counts: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
    """L_SegText: a contrastive loss between each ``[SEG]`` state, read by a linear map (``read``
    (N, D)), and the mean input embedding of its request's tokens (``counts`` (N, V) from
    :func:`request_counts`, ``embedding`` (V, D), detached). Each state must pick its own request
    out of the batch's (identical requests all count as its own); words every request shares cancel
    in the softmax, so what is learned is what tells requests apart: the referent."""
    meaning = (counts / counts.sum(dim=1, keepdim=True).clamp(min=1.0)) @ embedding.detach().float()
    logits = F.normalize(read.float(), dim=-1) @ F.normalize(meaning, dim=-1).T / SEG_TEXT_TEMPERATURE
    # Identical count vectors: |a|^2 + |b|^2 - 2 a.b is exactly zero for small integer counts.
    gram = counts @ counts.T
    squares = gram.diagonal()
    same = ((squares[:, None] + squares[None, :] - 2.0 * gram) == 0).float()
    return -(same / same.sum(dim=1, keepdim=True) * logits.log_softmax(dim=1)).sum(dim=1).mean()


def checked_rows(rows: torch.Tensor) -> torch.Tensor:
    """Span rows of :class:`SupervisedLogits`; -1 (unsupervised) would silently index the last row."""
    if bool((rows < 0).any()):
        raise ValueError("a depth-span position has no supervised logits (labels masked inside the span?)")
    return rows
