"""Cell embeddings (``--cell-embeddings``; not in the paper): one learned vector per cell of the depth grid.

A marked-point question is answered through its depth span only if the model finds, for each mark,
the span code of the mark's cell. Nothing in the base model says that image token 37 and the 38th
code of the span stand for the same place: the two are 100+ positions apart and the rotary
positions differ. Text probes of the miniature's size learnt that lookup only when both carried a
shared vector per cell, matched by content (README, "The lookup learnt"). This module adds that
vector, ``table[cell]``, to

- each image token's features, by the cell of the depth grid its patch centre falls in (a forward
  hook on the projector whose output holds a tile's tokens in row-major order), and
- each token of a depth span, the k-th after ``[D_START]`` getting cell k (a forward hook on the
  language model's input embeddings, which see the token ids), whether the span is a target, context
  or being generated. Readout codes after ``[D_END]`` get none: they are answers, not places.

During generation with a key-value cache the embeddings see one new token per call; inside
:meth:`CellEmbeddings.decoding` such a call continues the previous one's spans, outside it every call
is a whole sequence (teacher forcing). The table starts at the language model's initializer range,
as small as the rows it is added to (a larger start drowns which code a position holds).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn


NEVER = -(2 ** 40)  # "no such marker yet": before every position, a carried span's start included


def image_token_cells(tokens_per_tile: int, grid: int) -> torch.Tensor:
    """(tokens_per_tile,) the row-major cell of a ``grid`` x ``grid`` map that holds each image token's
    centre, the tile's tokens being a row-major square (InternVL's pixel shuffle keeps that order)."""
    side = int(round(tokens_per_tile ** 0.5))
    if side * side != tokens_per_tile:
        raise ValueError(f"{tokens_per_tile} image tokens per tile are not a square grid")
    centre_cells = ((torch.arange(side) * 2 + 1) * grid) // (2 * side)  # the cell row (or column) of each token row
    return (centre_cells[:, None] * grid + centre_cells[None, :]).reshape(-1)


def span_cells(input_ids: torch.Tensor, d_start_id: int, d_end_id: int, cells: int,
               carried: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The cell of each token of ``input_ids`` (B, T) that sits in a depth span (the k-th token after
    ``[D_START]`` is cell k), -1 elsewhere (markers, text, readouts, tokens past the grid); and the
    tokens of a span still open at the end of each row (B,), -1 when none is (what the next call
    continues from). ``carried``: that count from the call before (generation); None: a fresh sequence."""
    rows, length = input_ids.shape
    positions = torch.arange(length, device=input_ids.device).expand(rows, length)
    never = torch.full_like(positions, NEVER)
    last_start = torch.where(input_ids == d_start_id, positions, never).cummax(1).values
    last_end = torch.where(input_ids == d_end_id, positions, never).cummax(1).values
    if carried is not None:
        # A span open before this call started ``carried`` tokens before its first position.
        open_before = (carried >= 0)[:, None]
        last_start = torch.where((last_start == never) & open_before, (-carried - 1)[:, None].expand(rows, length), last_start)
    inside = (last_start > last_end) & (positions > last_start)
    cell = positions - last_start - 1
    cell = torch.where(inside & (cell < cells), cell, torch.full_like(cell, -1))
    still_open = inside[:, -1] | (input_ids[:, -1] == d_start_id)
    carry = torch.where(still_open, positions[:, -1] - last_start[:, -1], torch.full_like(last_start[:, -1], -1))
    return cell, carry


class CellEmbeddings(nn.Module):
    """The table and the two hooks that add it (see the module docstring)."""

    def __init__(self, width: int, std: float, cells: int, tokens_per_tile: int, d_start_id: int, d_end_id: int):
        super().__init__()
        grid = int(round(cells ** 0.5))
        if grid * grid != cells:
            raise ValueError(f"cell embeddings need a square depth grid, not {cells} tokens")
        self.table = nn.Embedding(cells, width)
        nn.init.normal_(self.table.weight, std=std)
        self.register_buffer("image_cells", image_token_cells(tokens_per_tile, grid), persistent=False)
        self.d_start_id, self.d_end_id = d_start_id, d_end_id
        self._carried: torch.Tensor | None = None  # inside decoding(): the open spans' lengths so far
        self._decoding = False

    @property
    def cells(self) -> int:
        return self.table.num_embeddings

    def attach(self, token_embeddings: nn.Module, image_projector: nn.Module) -> None:
        """Hook onto the language model's input embeddings and the image features' projector."""
        token_embeddings.register_forward_hook(self._add_to_tokens)
        image_projector.register_forward_hook(self._add_to_image)

    def _add_to_image(self, module: nn.Module, inputs: tuple, features: torch.Tensor) -> torch.Tensor:
        # (tiles, tokens per tile, D): every tile is one whole picture (no crops, PerceptioConfig checks).
        return features + self.table(self.image_cells).to(features.dtype)

    def _add_to_tokens(self, module: nn.Module, inputs: tuple, embeddings: torch.Tensor) -> torch.Tensor:
        input_ids = inputs[0]
        # One new token continues the call before it; more (a prompt, or a step without a cache) start afresh.
        continues = self._decoding and input_ids.shape[1] == 1
        cell, carry = span_cells(input_ids, self.d_start_id, self.d_end_id, self.cells,
                                 self._carried if continues else None)
        if self._decoding:
            self._carried = carry
        added = self.table(cell.clamp(min=0)) * (cell >= 0).unsqueeze(-1)
        return embeddings + added.to(embeddings.dtype)

    @contextmanager
    def decoding(self) -> Iterator[None]:
        """Generation: a forward of one token continues the spans of the forward before it (a
        key-value cache's steps); one of several tokens is a whole sequence (the prompt, or a step
        without a cache)."""
        self._decoding, self._carried = True, None
        try:
            yield
        finally:
            self._decoding, self._carried = False, None
