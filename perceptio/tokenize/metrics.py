"""Depth reconstruction and codebook metrics (the tokenizer's fit report; evaluation reuses them).

``depth_metrics`` follows the monocular-depth protocol for predictions known only up to scale and
shift: per image, the prediction is aligned to the target by least squares (``s * pred + t``) over
the valid pixels (scale >= 0), then AbsRel = mean |a - g| / g, RMSE = sqrt(mean (a - g)^2) and
delta1 = share of pixels with max(a / g, g / a) < 1.25 are computed, and averaged over images. The
metrics are taken in the units of ``target`` (this project passes inverse depth, the quantity the
teacher and the tokenizer work in). An aligned value <= 0 fails delta1 (its ratio is unbounded).

``object_pair_order`` judges a depth map by what a downstream question needs: of the object pairs
of an image whose true depths clearly differ, the share whose near/far order the map keeps.
"""

from __future__ import annotations

import numpy as np
import torch

DELTA1_THRESHOLD = 1.25


def _as_batch(values: np.ndarray | torch.Tensor) -> np.ndarray:
    array = values.detach().cpu().double().numpy() if isinstance(values, torch.Tensor) else np.asarray(values, dtype=np.float64)
    return array[None] if array.ndim == 2 else array


def align_scale_shift(pred: np.ndarray, target: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """Least-squares (scale, shift) with ``scale * pred + shift ~ target`` over ``mask``, scale >= 0.

    The scale is kept non-negative: a free sign would let a map with near and far swapped align
    perfectly. When the unconstrained fit wants a negative scale, the best admissible fit is the
    constant ``mean(target)`` (scale 0).
    """
    x, y = pred[mask], target[mask]
    design = np.stack([x, np.ones_like(x)], axis=1)
    (scale, shift), *_ = np.linalg.lstsq(design, y, rcond=None)
    if scale < 0:
        return 0.0, float(y.mean())
    return float(scale), float(shift)


def depth_metrics(
    pred: np.ndarray | torch.Tensor,
    target: np.ndarray | torch.Tensor,
    mask: np.ndarray | torch.Tensor | None = None,
) -> dict[str, float]:
    """AbsRel, RMSE and delta1 of (H, W) or (B, H, W) maps after per-image scale-and-shift alignment.

    ``mask`` defaults to the finite, positive target pixels; images with fewer than two valid
    pixels are skipped (an alignment needs two). Returns the means over the scored images and
    their count as ``images``.
    """
    preds, targets = _as_batch(pred), _as_batch(target)
    if preds.shape != targets.shape:
        raise ValueError(f"pred {preds.shape} and target {targets.shape} differ in shape")
    valid = np.isfinite(targets) & (targets > 0) & np.isfinite(preds)
    if mask is not None:
        valid &= _as_batch(mask).astype(bool)
    per_image = []
    for one_pred, one_target, one_valid in zip(preds, targets, valid):
        if one_valid.sum() < 2:
            continue
        scale, shift = align_scale_shift(one_pred, one_target, one_valid)
        aligned, truth = scale * one_pred[one_valid] + shift, one_target[one_valid]
        with np.errstate(divide="ignore"):
            ratio = np.where(aligned > 0, np.maximum(aligned / truth, truth / aligned), np.inf)
        per_image.append(
            (
                np.mean(np.abs(aligned - truth) / truth),
                np.sqrt(np.mean((aligned - truth) ** 2)),
                np.mean(ratio < DELTA1_THRESHOLD),
            )
        )
    if not per_image:
        return {"abs_rel": float("nan"), "rmse": float("nan"), "delta1": float("nan"), "images": 0}
    abs_rel, rmse, delta1 = np.mean(per_image, axis=0)
    return {"abs_rel": float(abs_rel), "rmse": float(rmse), "delta1": float(delta1), "images": len(per_image)}


def codebook_usage(indices: np.ndarray | torch.Tensor, num_codes: int) -> dict[str, float]:
    """Share of the K codes used at least once, and the perplexity exp(H) of the code frequencies."""
    flat = torch.as_tensor(indices).reshape(-1).long().cpu()
    counts = torch.bincount(flat, minlength=num_codes).double()
    if counts.sum() == 0:
        return {"usage": 0.0, "perplexity": 0.0, "codes_used": 0}
    probabilities = counts / counts.sum()
    nonzero = probabilities[probabilities > 0]
    entropy = -(nonzero * nonzero.log()).sum()
    return {
        "usage": float((counts > 0).double().mean()),
        "perplexity": float(entropy.exp()),
        "codes_used": int((counts > 0).sum()),
    }


# Two objects count as a pair when their true depths differ by more than this share.
PAIR_MIN_RELATIVE_GAP = 0.05
LOWER_IS_NEARER = "lower is nearer"


def _median_in(depth_map: np.ndarray, rows: np.ndarray, cols: np.ndarray, image_shape: tuple[int, int]) -> float:
    """Median of a map (any size, stretched over the image) at the image pixels (rows, cols)."""
    height, width = image_shape
    map_rows, map_cols = depth_map.shape
    return float(np.median(depth_map[rows * map_rows // height, cols * map_cols // width]))


def object_pair_order(masks: list[np.ndarray], inverse_depth: np.ndarray, maps: dict[str, np.ndarray],
                      min_relative_gap: float = PAIR_MIN_RELATIVE_GAP) -> tuple[int, dict[str, int]]:
    """(pairs, {name: pairs whose near/far order it keeps}) over the object pairs of one image.

    ``inverse_depth`` is the image's reference (the teacher's raw inverse depth at image size,
    0 = invalid); an object's depth is its median inside its mask (valid pixels only). Pairs are
    the objects whose depths differ by more than ``min_relative_gap``. Each map of ``maps`` (larger
    = nearer, any size, stretched over the image, e.g. the tokenizer's normalised input or its
    reconstruction) keeps a pair when the median inside the masks orders the two the same way; the
    ``LOWER_IS_NEARER`` entry is the heuristic that the object whose mask reaches lowest in the
    image is the nearer. Ties keep nothing.
    """
    shape = inverse_depth.shape
    objects = []
    for mask in masks:
        rows, cols = np.nonzero(mask & (inverse_depth > 0))
        if len(rows):
            objects.append((rows, cols, float(np.median(inverse_depth[rows, cols])), int(np.nonzero(mask)[0].max())))
    values = {name: [_median_in(depth_map, rows, cols, shape) for rows, cols, _, _ in objects]
              for name, depth_map in maps.items()}
    values[LOWER_IS_NEARER] = [float(base) for *_, base in objects]
    pairs, kept = 0, {name: 0 for name in values}
    for i in range(len(objects)):
        for j in range(i + 1, len(objects)):
            near, far = sorted((objects[i][2], objects[j][2]), reverse=True)
            if near / far - 1 <= min_relative_gap:
                continue
            pairs += 1
            truth = np.sign(objects[i][2] - objects[j][2])
            for name, by_object in values.items():
                kept[name] += int(np.sign(by_object[i] - by_object[j]) == truth)
    return pairs, kept
