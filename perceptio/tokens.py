"""The perception-token vocabulary shared by curation, training and evaluation.

A target sequence is ``[SEG] [D_START] d_1 ... d_n [D_END] answer`` (paper-notes.md): one
segmentation token, n = 100 depth tokens between two markers, then text. Depth code k in [0, K) is
written as the special token ``[D_k]`` with k zero-padded to three digits.
"""

from __future__ import annotations

import re
from typing import Iterable, Sequence

SEG = "[SEG]"
D_START = "[D_START]"
D_END = "[D_END]"
DEFAULT_NUM_CODES = 128
DEFAULT_NUM_DEPTH_TOKENS = 100
MAX_MARKS = 5  # the most points a marked-point question marks, A to E (a readout names each)


def depth_token(code: int) -> str:
    return f"[D_{code:03d}]"


def depth_vocabulary(num_codes: int = DEFAULT_NUM_CODES) -> list[str]:
    """The K depth-code tokens, in code order."""
    return [depth_token(code) for code in range(num_codes)]


def special_tokens(num_codes: int = DEFAULT_NUM_CODES) -> list[str]:
    """Every token the model's vocabulary gains: [SEG], the two markers and the K codes."""
    return [SEG, D_START, D_END, *depth_vocabulary(num_codes)]


def depth_span(codes: Iterable[int]) -> str:
    """``[D_START][D_k1]...[D_kn][D_END]`` for a sequence of codebook indices."""
    return D_START + "".join(depth_token(int(code)) for code in codes) + D_END


def mark_readouts(labels: Sequence[str], codes: Sequence[int], cells: Sequence[str] | None = None) -> str:
    """`` A[D_k] B[D_k] ``: each marked point's letter and the depth code of its cell, the readouts a
    model trained with ``--mark-readouts`` writes between a question's span and its letter; with
    ``cells`` (each mark's cell as text, "3 7") `` A 3 7[D_k] ``, as ``--readout-cells`` writes them."""
    named = [f"{label} {cell}" for label, cell in zip(labels, cells)] if cells is not None else list(labels)
    return "".join(f" {name}{depth_token(int(code))}" for name, code in zip(named, codes)) + " "


def depth_codes_in(text: str) -> list[int]:
    """The codes of every ``[D_k]`` token in a text, in order (a span as written, readouts included)."""
    return [int(code) for code in re.findall(r"\[D_(\d+)\]", text)]


def parse_depth_token(token: str) -> int | None:
    """The code of a ``[D_k]`` token, or None for any other string."""
    if token.startswith("[D_") and token.endswith("]") and token[3:-1].isdigit():
        return int(token[3:-1])
    return None


def codes_from_tokens(tokens: Sequence[str]) -> list[int]:
    """The depth codes inside the first well-delimited span of a decoded token list."""
    if D_START not in tokens:
        return []
    start = tokens.index(D_START) + 1
    end = tokens.index(D_END, start) if D_END in tokens[start:] else len(tokens)
    return [code for code in map(parse_depth_token, tokens[start:end]) if code is not None]
