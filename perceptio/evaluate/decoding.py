"""Constrained decoding that keeps the perception format valid, as a transformers ``LogitsProcessor``.

Once ``[D_START]`` is emitted, exactly n depth tokens follow and then ``[D_END]``; depth tokens and
``[D_END]`` appear nowhere else (``readouts``: depth tokens may also follow a closed span, the mark
readouts ``A[D_k] B[D_k]`` of a model trained with ``--mark-readouts``). By default a sequence holds
at most one span (the format is ``[SEG] [D_START] d_1..d_n [D_END] answer``). Only the generated
part counts: given the prompt's length, spans written in earlier turns of a conversation neither
block nor open a span. Use it with ``generate``::

    processor = PerceptionFormatProcessor(depth_token_ids, d_start_id, d_end_id, num_depth_tokens=100)
    model.generate(..., logits_processor=LogitsProcessorList([processor]))

The state of every row is recomputed from ``input_ids`` at each step (vectorised; a few integer ops
on the sequence), so the processor holds no per-call state and works with any batch size, greedy
search, sampling and beam search.
"""

from __future__ import annotations

from typing import Sequence

import torch
from transformers import LogitsProcessor


class PerceptionFormatProcessor(LogitsProcessor):
    """Mask logits so that every depth span is ``[D_START]`` + exactly n depth tokens + ``[D_END]``.

    Args:
        depth_token_ids: the ids of the K depth-code tokens.
        d_start_id, d_end_id: the ids of ``[D_START]`` and ``[D_END]``.
        num_depth_tokens: n, the span length.
        max_spans: how many spans a sequence may hold (None: unlimited).
        max_length: the total length generation stops at, when known: a span is not opened where it
            could not be closed before it.
        prompt_length: where the answer starts: the (padded) prompt width, or one position per row
            (an answer begun by the caller, e.g. with a given span, counts from its own start);
            tokens before it are history, not counted.
        readouts: depth tokens are allowed outside a span once the answer has closed one.
    """

    def __init__(
        self,
        depth_token_ids: Sequence[int],
        d_start_id: int,
        d_end_id: int,
        num_depth_tokens: int,
        max_spans: int | None = 1,
        max_length: int | None = None,
        prompt_length: int | Sequence[int] = 0,
        readouts: bool = False,
    ):
        if not depth_token_ids:
            raise ValueError("depth_token_ids is empty")
        if num_depth_tokens < 1:
            raise ValueError(f"num_depth_tokens must be positive, not {num_depth_tokens}")
        self.depth_token_ids = torch.tensor(sorted({int(token) for token in depth_token_ids}), dtype=torch.long)
        if int(d_start_id) in self.depth_token_ids.tolist() or int(d_end_id) in self.depth_token_ids.tolist():
            raise ValueError("the span markers must not be depth tokens")
        self.d_start_id = int(d_start_id)
        self.d_end_id = int(d_end_id)
        self.num_depth_tokens = int(num_depth_tokens)
        self.max_spans = max_spans
        self.max_length = max_length
        self.prompt_length = prompt_length if isinstance(prompt_length, int) else [int(start) for start in prompt_length]
        self.readouts = readouts

    def _depth_lookup(self, vocab_size: int, device: torch.device) -> torch.Tensor:
        # The vocabulary may be wider than the largest token id (padded embedding tables).
        size = max(vocab_size, int(self.depth_token_ids.max()) + 1, self.d_start_id + 1, self.d_end_id + 1)
        lookup = torch.zeros(size, dtype=torch.bool, device=device)
        lookup[self.depth_token_ids.to(device)] = True
        return lookup

    def span_state(self, input_ids: torch.Tensor, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per row: (inside an open span, depth tokens written in it, spans closed so far)."""
        lookup = self._depth_lookup(vocab_size, input_ids.device)
        is_depth = lookup[input_ids.clamp(min=0, max=lookup.numel() - 1)] & (input_ids >= 0)
        positions = torch.arange(1, input_ids.shape[1] + 1, device=input_ids.device).expand_as(input_ids)
        # amax over an empty generated part (the first step) would fail: a zero column keeps it defined.
        zero = torch.zeros(input_ids.shape[0], 1, dtype=torch.long, device=input_ids.device)
        last_start = torch.cat([zero, torch.where(input_ids == self.d_start_id, positions, 0)], dim=1).max(dim=1).values
        last_end = torch.cat([zero, torch.where(input_ids == self.d_end_id, positions, 0)], dim=1).max(dim=1).values
        inside = last_start > last_end
        # Depth tokens after the last [D_START]: positions are 1-based, so `positions > last_start`.
        written = (is_depth & (positions > last_start.unsqueeze(1))).sum(dim=1)
        closed = (input_ids == self.d_end_id).sum(dim=1)
        return inside, torch.where(inside, written, torch.zeros_like(written)), closed

    def _answers(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The answer part of every row: the ids from the row's answer start, history replaced by -1
        (which no span counts)."""
        if isinstance(self.prompt_length, int):
            if input_ids.shape[1] < self.prompt_length:
                raise ValueError(f"input_ids has {input_ids.shape[1]} positions, fewer than the prompt's {self.prompt_length}")
            return input_ids[:, self.prompt_length :]
        if len(self.prompt_length) != input_ids.shape[0]:
            raise ValueError(f"{len(self.prompt_length)} answer starts for {input_ids.shape[0]} rows")
        starts = torch.tensor(self.prompt_length, device=input_ids.device).unsqueeze(1)
        columns = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        return torch.where(columns >= starts, input_ids, torch.full_like(input_ids, -1))

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        vocab_size = scores.shape[-1]
        inside, written, closed = self.span_state(self._answers(input_ids), vocab_size)
        is_depth = self._depth_lookup(vocab_size, scores.device)[:vocab_size]
        token_ids = torch.arange(vocab_size, device=scores.device)
        only_depth = is_depth.unsqueeze(0)
        only_end = (token_ids == self.d_end_id).unsqueeze(0)

        # Outside a span: no depth token, no [D_END]; [D_START] only while spans are left and fit.
        outside_banned = (is_depth | (token_ids == self.d_end_id)).unsqueeze(0).expand(scores.shape[0], -1).clone()
        if self.readouts:  # the mark readouts after a span
            outside_banned[(closed > 0).unsqueeze(1) & is_depth.unsqueeze(0)] = False
        start_banned = torch.zeros_like(inside)
        if self.max_spans is not None:
            start_banned |= closed >= self.max_spans
        if self.max_length is not None and input_ids.shape[1] + self.num_depth_tokens + 2 > self.max_length:
            start_banned |= True
        outside_banned[:, self.d_start_id] |= start_banned

        needs_depth = (inside & (written < self.num_depth_tokens)).unsqueeze(1)
        needs_end = (inside & (written >= self.num_depth_tokens)).unsqueeze(1)
        allowed = torch.where(needs_depth, only_depth, torch.where(needs_end, only_end, ~outside_banned))
        return scores.masked_fill(~allowed, float("-inf"))
