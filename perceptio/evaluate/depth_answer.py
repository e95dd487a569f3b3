"""Answer a marked-point question by reading a depth map at the points.

This is how the depth tokens *could* answer "which point is closest": decode the 100 codes with the
tokenizer, look at the decoded inverse depth under each marked point, pick the largest (nearest).
Applied to the ground-truth tokens it gives the ceiling of what tokens can tell (issue 11's
decomposition (a)); applied to the tokens a model generated, what the model's own perception tells
(b), to be compared with the letter the model wrote (c).

Depth maps here are the tokenizer's square (S, S) maps of normalised inverse depth (near = +1),
stretched over the whole image, so image pixel (x, y) of a W x H image sits at
((x + 0.5) * S / W, (y + 0.5) * S / H).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def nearness_at(depth: np.ndarray, point: Sequence[int], image_size: tuple[int, int], window: int = 1) -> float:
    """Mean of the map over a (2w+1)^2 window around the image point ``(x, y)`` (``image_size`` = (W, H))."""
    rows, cols = depth.shape
    width, height = image_size
    col = min(cols - 1, int((point[0] + 0.5) * cols / width))
    row = min(rows - 1, int((point[1] + 0.5) * rows / height))
    patch = depth[max(0, row - window): row + window + 1, max(0, col - window): col + window + 1]
    return float(patch.mean())


def answer_from_depth(depth: np.ndarray, points: Sequence[Sequence[int]], labels: Sequence[str],
                      image_size: tuple[int, int]) -> str:
    """The label of the point where the map is nearest (largest normalised inverse depth)."""
    values = [nearness_at(depth, point, image_size) for point in points]
    return labels[int(np.argmax(values))]


def answer_from_codes(tokenizer: Any, codes: Sequence[int], points: Sequence[Sequence[int]], labels: Sequence[str],
                      image_size: tuple[int, int]) -> str | None:
    """Decode ``codes`` with ``tokenizer`` (a DepthVQVAE) and read it at the points; None when the
    codes are not a full grid (a malformed span answers nothing)."""
    import torch

    if len(codes) != tokenizer.num_tokens:
        return None
    with torch.no_grad():
        depth = tokenizer.decode(torch.as_tensor(list(codes), dtype=torch.long))[0].cpu().numpy()
    return answer_from_depth(depth, points, labels, image_size)
