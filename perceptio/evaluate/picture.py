"""One picture of a prediction for a person to look at: the mask over the image, the depth, the answer.

Built from the picture blocks of :mod:`perceptio.inspect.render` (PIL and numpy only), so that a
prediction looks like the shard samples ``perceptio-inspect`` draws: same mask tint, same depth
ramp and range (the tokenizer's normalised inverse depth, near = bright).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from perceptio.inspect.render import (
    INK,
    MUTED,
    REF_COLOURS,
    Block,
    captioned,
    colour_bar,
    depth_image,
    depth_range,
    fit_size,
    overlay_masks,
    padded,
    panel,
    resize_mask,
    stack,
    text_block,
)


def _placeholder(size: tuple[int, int], message: str) -> Image.Image:
    canvas = Image.new("RGB", size, (235, 235, 235))
    note = text_block([(message, 14, MUTED)], size[0] - 20)
    canvas.paste(note.image, (10, (size[1] - note.size[1]) // 2))
    return canvas


def render_prediction(
    image: Image.Image, mask: np.ndarray | None, depth: np.ndarray | None, prompt: str, answer: str, notes: str = ""
) -> Block:
    """Image with the predicted mask | decoded depth with its colour bar; prompt and answer below."""
    size = fit_size(*image.size)
    shown = image.convert("RGB").resize(size, Image.BILINEAR)
    if mask is not None:
        masked = panel("mask", overlay_masks(shown, [resize_mask(mask, size)], [REF_COLOURS[3]]))
        mask_title = f"mask ({int(np.count_nonzero(mask))} px)"
    else:
        masked = panel("mask", shown)
        mask_title = "no mask ([SEG] not generated)"
    blocks = [captioned(masked, mask_title)]
    if depth is not None:
        low, high = depth_range([depth])
        blocks.append(captioned(panel("depth", depth_image(depth, size, low, high)), "depth from the depth tokens"))
        blocks.append(stack([text_block([("", 15, INK)], 10), colour_bar(size[1], low, high)], horizontal=False, gap=4))
    else:
        blocks.append(captioned(panel("depth", _placeholder(size, "no well-formed depth span")), "depth"))
    row = stack(blocks, horizontal=True)
    lines = [(f"prompt: {prompt}", 14, INK), (f"answer: {answer or '(empty)'}", 16, INK)]
    if notes:
        lines.append((notes, 12, MUTED))
    return padded(stack([row, text_block(lines, row.size[0])], horizontal=False), 12)
