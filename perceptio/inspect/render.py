"""Pictures of shard samples with PIL and numpy alone: masks over the image, depth maps, contact sheets.

A picture is built from :class:`Block` s (an image plus the boxes of the named panels inside it), so
that the caller, the ``--json`` output and the tests know where each panel landed.
Depth follows the tokenizer's convention: normalised inverse depth, near = large = bright.
A sample drawn without its image (a text-only conversation) or without depth (curated with
``--depth-source none``) gets a grey ``no_image`` / ``no_depth`` panel that says so, in place of
the missing picture; conversations and grounded captions are written out under it.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from perceptio.shards import CONVERSATION_FIELD, GROUNDED_FIELD, QUESTION_FIELD, ShardSample, rle_to_mask

Box = tuple[int, int, int, int]  # left, top, right, bottom (right and bottom exclusive)

BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)
MUTED = (110, 110, 110)
GAP = 10
PANEL_HEIGHT = 320
PANEL_MAX_WIDTH = 480
MASK_ALPHA = 0.5
NORMALISED_RANGE = (-1.0, 1.0)  # the depth tokenizer's normalisation: far = -1, near = +1
# Distinct colours for refs (the ten of matplotlib's "tab10", written out: matplotlib is not a dependency).
REF_COLOURS = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
)  # fmt: skip
# An "inferno"-like ramp, dark to bright with luminance rising monotonically, so that near reads as bright.
RAMP_STOPS = np.array([0.0, 0.14, 0.29, 0.43, 0.57, 0.71, 0.86, 1.0])
RAMP_COLOURS = np.array(
    [
        (0, 0, 4), (40, 11, 84), (101, 21, 110), (159, 42, 99),
        (212, 72, 66), (245, 125, 21), (250, 193, 39), (252, 255, 164),
    ],
    dtype=np.float64,
)  # fmt: skip


@lru_cache(maxsize=None)
def font(size: int = 14) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's bundled scalable font: no system fonts needed."""
    return ImageFont.load_default(size=size)


def colormap(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map values to RGB uint8 on the ramp; ``low`` is the dark end, ``high`` the bright end."""
    span = high - low if high > low else 1.0
    unit = np.clip((np.asarray(values, dtype=np.float64) - low) / span, 0.0, 1.0)
    channels = [np.interp(unit, RAMP_STOPS, RAMP_COLOURS[:, channel]) for channel in range(3)]
    return np.stack(channels, axis=-1).round().astype(np.uint8)


@dataclass
class Block:
    """An image and the boxes of the named panels in it."""

    image: Image.Image
    panels: dict[str, Box] = field(default_factory=dict)

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size


def _shifted(panels: dict[str, Box], dx: int, dy: int) -> dict[str, Box]:
    return {name: (l + dx, t + dy, r + dx, b + dy) for name, (l, t, r, b) in panels.items()}


def stack(blocks: Sequence[Block], horizontal: bool, gap: int = GAP) -> Block:
    """Blocks side by side (top-aligned) or one under the other (left-aligned)."""
    if horizontal:
        size = (sum(b.size[0] for b in blocks) + gap * (len(blocks) - 1), max(b.size[1] for b in blocks))
    else:
        size = (max(b.size[0] for b in blocks), sum(b.size[1] for b in blocks) + gap * (len(blocks) - 1))
    canvas = Image.new("RGB", size, BACKGROUND)
    panels: dict[str, Box] = {}
    offset = 0
    for block in blocks:
        position = (offset, 0) if horizontal else (0, offset)
        canvas.paste(block.image, position)
        panels.update(_shifted(block.panels, *position))
        offset += (block.size[0] if horizontal else block.size[1]) + gap
    return Block(canvas, panels)


def padded(block: Block, margin: int) -> Block:
    canvas = Image.new("RGB", (block.size[0] + 2 * margin, block.size[1] + 2 * margin), BACKGROUND)
    canvas.paste(block.image, (margin, margin))
    return Block(canvas, _shifted(block.panels, margin, margin))


def wrap(text: str, width: int, text_font: Any) -> list[str]:
    """Greedy word wrap to ``width`` pixels."""
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split():
            candidate = f"{line} {word}".strip()
            if line and text_font.getlength(candidate) > width:
                lines.append(line)
                line = word
            else:
                line = candidate
        lines.append(line)
    return lines


def text_block(
    lines: Sequence[tuple[str, int, tuple[int, int, int]]], width: int, background: tuple[int, int, int] = BACKGROUND
) -> Block:
    """Wrapped text; each entry is (text, font size, colour)."""
    rendered: list[tuple[str, Any, tuple[int, int, int]]] = []
    for text, size, colour in lines:
        rendered.extend((line, font(size), colour) for line in wrap(text, width, font(size)))
    line_heights = [int(f.size * 1.3) for _, f, _ in rendered]
    canvas = Image.new("RGB", (width, max(1, sum(line_heights))), background)
    draw = ImageDraw.Draw(canvas)
    top = 0
    for (line, line_font, colour), height in zip(rendered, line_heights):
        draw.text((0, top), line, font=line_font, fill=colour)
        top += height
    return Block(canvas)


def captioned(block: Block, title: str, below: Sequence[tuple[str, int, tuple[int, int, int]]] = ()) -> Block:
    """A bold-ish title above a block and optional text under it, both as wide as the block."""
    parts = [text_block([(title, 15, INK)], block.size[0]), block]
    if below:
        parts.append(text_block(below, block.size[0]))
    return stack(parts, horizontal=False, gap=4)


def panel(name: str, image: Image.Image) -> Block:
    return Block(image, {name: (0, 0, *image.size)})


def fit_size(
    width: int, height: int, max_width: int = PANEL_MAX_WIDTH, max_height: int = PANEL_HEIGHT
) -> tuple[int, int]:
    scale = min(max_width / width, max_height / height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def decode_image(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB")


def overlay_masks(
    image: Image.Image, masks: Sequence[np.ndarray], colours: Sequence[tuple[int, int, int]]
) -> Image.Image:
    """Tint each mask's pixels with its colour and draw its outline; masks are at the image's size."""
    pixels = np.asarray(image, dtype=np.float64).copy()
    for mask, colour in zip(masks, colours):
        inside = mask.astype(bool)
        pixels[inside] = (1 - MASK_ALPHA) * pixels[inside] + MASK_ALPHA * np.asarray(colour, dtype=np.float64)
        pixels[_outline(inside)] = colour
    return Image.fromarray(pixels.round().astype(np.uint8))


def _number_masks(image: Image.Image, masks: Sequence[np.ndarray], colours: Sequence[tuple[int, int, int]]) -> None:
    """Write each mask's number (as on its ref card) in a tag at the mask's top-left corner."""
    draw = ImageDraw.Draw(image)
    label_font = font(13)
    for number, (mask, colour) in enumerate(zip(masks, colours), start=1):
        rows, cols = np.nonzero(mask)
        if rows.size == 0:
            continue
        left, top = int(cols.min()), int(rows.min())
        width = int(label_font.getlength(str(number))) + 8
        left, top = min(left, image.size[0] - width), min(top, image.size[1] - 18)
        draw.rectangle((left, top, left + width, top + 17), fill=colour)
        draw.text((left + 4, top + 1), str(number), font=label_font, fill=(255, 255, 255))


def _outline(mask: np.ndarray) -> np.ndarray:
    """Mask pixels with a 4-neighbour outside the mask (a one-pixel inner border)."""
    padded_mask = np.pad(mask, 1, constant_values=False)
    interior = (
        padded_mask[:-2, 1:-1] & padded_mask[2:, 1:-1] & padded_mask[1:-1, :-2] & padded_mask[1:-1, 2:]
    )
    return mask & ~interior


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.NEAREST)) > 127


def depth_image(depth: np.ndarray, size: tuple[int, int], low: float, high: float) -> Image.Image:
    """A depth map coloured on the ramp and stretched over the image's panel (it covers the whole image)."""
    resized = Image.fromarray(np.asarray(depth, dtype=np.float32)).resize(size, Image.BILINEAR)
    return Image.fromarray(colormap(np.asarray(resized), low, high))


def depth_range(maps: Sequence[np.ndarray]) -> tuple[float, float]:
    """The tokenizer's fixed range [-1, 1], so that colours mean the same in every picture; widened
    only for maps that leave it (which validate reports)."""
    low = min([NORMALISED_RANGE[0], *(float(np.nanmin(m)) for m in maps)])
    high = max([NORMALISED_RANGE[1], *(float(np.nanmax(m)) for m in maps)])
    return low, high


def colour_bar(height: int, low: float, high: float) -> Block:
    """A vertical ramp with its values, bright (near) at the top."""
    bar_width, label_width = 18, 70
    ramp = colormap(np.linspace(high, low, height)[:, None].repeat(bar_width, axis=1), low, high)
    canvas = Image.new("RGB", (bar_width + 6 + label_width, height), BACKGROUND)
    canvas.paste(Image.fromarray(ramp), (0, 0))
    draw = ImageDraw.Draw(canvas)
    small = font(12)
    for fraction, note in ((0.0, "near"), (0.5, ""), (1.0, "far")):
        value = high - fraction * (high - low)
        top = min(max(0, round(fraction * height) - 7), height - 30 if note else height - 14)
        draw.text((bar_width + 6, top), f"{value:+.2f}", font=small, fill=INK)
        if note:
            draw.text((bar_width + 6, top + 14 if fraction == 0 else top - 14), note, font=small, fill=MUTED)
    return panel("colour_bar", canvas)


def ref_masks(sample: ShardSample) -> list[np.ndarray]:
    return [rle_to_mask(ref["mask"]) for ref in sample.meta.get("refs") or []]


def phrase_masks(sample: ShardSample) -> list[np.ndarray]:
    """The masks of a grounded caption's phrases, in caption order."""
    return [rle_to_mask(phrase["mask"]) for phrase in (sample.meta.get(GROUNDED_FIELD) or {}).get("phrases") or []]


# Why a part of a sample is not drawn, as the picture and ``perceptio-inspect show`` say it.
NO_IMAGE = "no image: a text-only conversation"
NO_DEPTH = "no depth: curated without a depth teacher (--depth-source none)"


def missing_parts(sample: ShardSample) -> dict[str, str]:
    """The parts of a sample that are not there to draw ("image", "depth"), with the reason."""
    missing = {}
    if sample.jpg is None:
        missing["image"] = NO_IMAGE
    if sample.depth is None:
        missing["depth"] = NO_DEPTH
    return missing


def mask_colours(sample: ShardSample) -> list[tuple[int, int, int]]:
    """The colour of each mask of :func:`ref_masks` + :func:`phrase_masks`: refs and phrases are each numbered from 1."""
    counts = (len(sample.meta.get("refs") or []), len((sample.meta.get(GROUNDED_FIELD) or {}).get("phrases") or []))
    return [REF_COLOURS[i % len(REF_COLOURS)] for count in counts for i in range(count)]


def dialogue_lines(sample: ShardSample) -> list[tuple[str, int, tuple[int, int, int]]]:
    """A conversation's turns, or a grounded caption and its phrases (each in its mask's colour), as text lines."""
    meta = sample.meta
    lines: list[tuple[str, int, tuple[int, int, int]]] = []
    for turn in meta.get(CONVERSATION_FIELD) or []:
        role = str(turn.get("role"))
        lines.append((f"{role}: {turn.get('text')}", 13, INK if role == "user" else (31, 119, 180)))
    grounded = meta.get(GROUNDED_FIELD)
    if grounded:
        lines.append((f"caption: {grounded.get('caption')}", 13, INK))
        for number, phrase in enumerate(grounded.get("phrases") or []):
            lines.append((f"#{number + 1} {phrase.get('text')}", 13, REF_COLOURS[number % len(REF_COLOURS)]))
    return lines


def placeholder(size: tuple[int, int], message: str) -> Image.Image:
    """A grey panel with a message in it, in place of a picture that cannot be drawn."""
    grey = (235, 235, 235)
    canvas = Image.new("RGB", size, grey)
    text = text_block([(message, 14, MUTED)], size[0] - 20, background=grey)
    canvas.paste(text.image, (10, (size[1] - text.size[1]) // 2))
    return canvas


def _depth_row(
    image: Image.Image, sample: ShardSample, decoded: np.ndarray | None, decoded_note: str
) -> list[Block]:
    """Teacher depth, token-decoded depth (or why it is missing) and their shared colour bar."""
    maps = [sample.depth.astype(np.float32)] + ([decoded.astype(np.float32)] if decoded is not None else [])
    low, high = depth_range(maps)
    teacher = captioned(panel("teacher_depth", depth_image(maps[0], image.size, low, high)), "teacher depth")
    if decoded is not None:
        error = float(np.abs(maps[1] - maps[0]).mean())
        title = f"decoded from {sample.depth_tokens.size} tokens (MAE {error:.3f})"
        decoded_block = captioned(panel("decoded_depth", depth_image(decoded, image.size, low, high)), title)
    else:
        decoded_block = captioned(Block(placeholder(image.size, decoded_note)), "decoded depth")
    bar = stack([text_block([("", 15, INK)], 10), colour_bar(image.size[1], low, high)], horizontal=False, gap=4)
    return [teacher, decoded_block, bar]


def _ref_card(image: Image.Image, mask: np.ndarray, ref: dict[str, Any], number: int, width: int) -> Block:
    colour = REF_COLOURS[number % len(REF_COLOURS)]
    thumb_size = fit_size(*image.size, max_width=width, max_height=width)
    thumb = overlay_masks(image.resize(thumb_size, Image.BILINEAR), [resize_mask(mask, thumb_size)], [colour])
    depth = ref.get("depth") or {}
    lines: list[tuple[str, int, tuple[int, int, int]]] = [
        (f"#{number + 1} {ref.get('category', '?')}  (ref {ref.get('ref_id')}, depth rank {depth.get('rank', '?')})",
         13, colour),
    ]
    sentences = ref.get("sentences") or []
    lines += [(f"\u201c{sentence.get('sent') or sentence.get('raw')}\u201d", 13, INK) for sentence in sentences]
    if ref.get("description"):
        lines.append((f"description: {ref['description']}", 12, MUTED))
    return stack([panel(f"ref_{number}", thumb), text_block(lines, width)], horizontal=False, gap=4)


def _ade_row(image: Image.Image, sample: ShardSample) -> list[Block]:
    blocks: list[Block] = []
    question = sample.meta.get(QUESTION_FIELD) or {}
    if sample.marked_jpg is not None:
        marked = decode_image(sample.marked_jpg).resize(image.size, Image.BILINEAR)
        depths = ", ".join(
            f"{label} {value:+.2f}"
            for label, value in zip(question.get("labels", []), question.get("point_depths", []))
        )
        below = [
            (str(question.get("text", "")), 13, INK),
            (f"answer: {question.get('answer', '?')}", 15, (214, 39, 40)),
            (f"point depths (larger = nearer): {depths}", 12, MUTED),
        ]
        blocks.append(captioned(panel("marked", marked), "marked image", below))
    if sample.seg_png is not None:
        with Image.open(io.BytesIO(sample.seg_png)) as seg:
            classes = np.asarray(seg.convert("L").resize(image.size, Image.NEAREST))
        palette = np.random.default_rng(0).integers(40, 230, (256, 3)).astype(np.uint8)
        palette[0] = (0, 0, 0)  # class 0 is "other"
        blocks.append(captioned(panel("segmentation", Image.fromarray(palette[classes])), "class map (seg.png)"))
    return blocks


def _image_panel(sample: ShardSample, size_limit: tuple[int, int]) -> tuple[Image.Image | None, Image.Image]:
    """(the decoded image or None, the panel showing it fitted into ``size_limit``, or a placeholder)."""
    if sample.jpg is None:
        return None, placeholder(size_limit, NO_IMAGE)
    original = decode_image(sample.jpg)
    return original, original.resize(fit_size(*original.size, *size_limit), Image.BILINEAR)


def render_sample(sample: ShardSample, decoded: np.ndarray | None = None, decoded_note: str = "") -> Block:
    """The whole picture of one sample: header, image with masks, depths, refs or the ADE question, and
    a conversation's turns or a grounded caption's phrases; a part that is missing is a grey panel."""
    original, image = _image_panel(sample, (PANEL_MAX_WIDTH, PANEL_HEIGHT))
    refs, phrases = ref_masks(sample), phrase_masks(sample)
    masks, colours = refs + phrases, mask_colours(sample)
    meta = sample.meta
    if original is None:
        image_block = captioned(panel("no_image", image), "no image")
    else:
        panel_masks = [resize_mask(mask, image.size) for mask in masks]
        overlaid = overlay_masks(image, panel_masks, colours)
        _number_masks(overlaid, panel_masks[: len(refs)], colours[: len(refs)])
        _number_masks(overlaid, panel_masks[len(refs):], colours[len(refs):])
        counted = f", {len(phrases)} phrases" if phrases else "" if meta.get(CONVERSATION_FIELD) else f", {len(refs)} refs"
        image_block = captioned(panel("image", overlaid), f"image {original.size[0]}x{original.size[1]}{counted}")
    if sample.depth is not None:
        depth_blocks = _depth_row(image, sample, decoded, decoded_note)
    else:
        depth_blocks = [captioned(panel("no_depth", placeholder(image.size, NO_DEPTH)), "no depth")]
    top = stack([image_block, *depth_blocks], horizontal=True)
    missing = missing_parts(sample)
    header_lines = [
        (sample.key, 18, INK),
        (f"{meta.get('dataset')} / {meta.get('split')} \u00b7 file {meta.get('file_name')}", 13, MUTED),
        (f"teacher {meta.get('teacher')} \u00b7 tokenizer {meta.get('tokenizer')}", 13, MUTED),
    ]
    if missing:
        header_lines.append(("missing: " + "; ".join(missing.values()), 13, (214, 39, 40)))
    rows = [text_block(header_lines, top.size[0]), top]
    if refs and original is not None:
        card_width = 240
        per_row = max(1, (top.size[0] + GAP) // (card_width + GAP))
        cards = [_ref_card(image, mask, ref, i, card_width) for i, (mask, ref) in enumerate(zip(refs, meta["refs"]))]
        rows += [stack(cards[i : i + per_row], horizontal=True) for i in range(0, len(cards), per_row)]
    ade = _ade_row(image, sample) if original is not None else []
    if ade:
        rows.append(stack(ade, horizontal=True))
    dialogue = dialogue_lines(sample)
    if dialogue:
        rows.append(panel("dialogue", text_block(dialogue, top.size[0]).image))
    return padded(stack(rows, horizontal=False, gap=GAP + 4), 16)


def render_thumbnail(sample: ShardSample, width: int = 220) -> Block:
    """One cell of a contact sheet: the image with its masks (or the marked image) and its depth, a
    grey panel for either when the sample has none."""
    limit = (width, round(width * 0.75))
    if sample.marked_jpg is not None:
        image, masks = decode_image(sample.marked_jpg), []
        image = image.resize(fit_size(*image.size, *limit), Image.BILINEAR)
    else:
        original, image = _image_panel(sample, limit)
        masks = ref_masks(sample) + phrase_masks(sample) if original is not None else []
    size = image.size
    depth_size = (max(1, size[0] // 2), max(1, size[1] // 2))
    if sample.jpg is None:
        picture = panel("no_image", image)
    else:
        picture = panel("image", overlay_masks(image, [resize_mask(mask, size) for mask in masks], mask_colours(sample)))
    if sample.depth is not None:
        depth = sample.depth.astype(np.float32)
        depth_block = panel("depth", depth_image(depth, depth_size, *depth_range([depth])))
    else:
        depth_block = panel("no_depth", placeholder(depth_size, "no depth"))
    pictures = stack([picture, depth_block], horizontal=True, gap=4)
    refs = sample.meta.get("refs") or []
    question = sample.meta.get(QUESTION_FIELD) or {}
    turns = sample.meta.get(CONVERSATION_FIELD) or []
    grounded = sample.meta.get(GROUNDED_FIELD) or {}
    if refs and refs[0].get("sentences"):
        more = f" +{len(refs) - 1} refs" if len(refs) > 1 else ""
        note = f"\u201c{refs[0]['sentences'][0].get('sent')}\u201d{more}"
    elif question:
        note = f"answer: {question.get('answer')}"
    elif turns:
        note = f"{len(turns)} turns: \u201c{_shortened(str(turns[0].get('text')))}\u201d"
    elif grounded:
        note = f"\u201c{_shortened(str(grounded.get('caption')))}\u201d"
    else:
        note = ""
    caption = text_block([(sample.key, 11, INK), (note, 11, MUTED)], pictures.size[0])
    return stack([pictures, caption], horizontal=False, gap=3)


def _shortened(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "\u2026"


def render_grid(samples: Sequence[ShardSample], columns: int = 4) -> Block:
    """A contact sheet; cell i's panels are named ``{name}_{i}`` (``image_0``, ``depth_0``, ...)."""
    cells = []
    for index, sample in enumerate(samples):
        cell = render_thumbnail(sample)
        cells.append(Block(cell.image, {f"{name}_{index}": box for name, box in cell.panels.items()}))
    rows = [stack(cells[i : i + columns], horizontal=True, gap=GAP + 6) for i in range(0, len(cells), columns)]
    return padded(stack(rows, horizontal=False, gap=GAP + 6), 12)


def save_png(block: Block, path: str | os.PathLike[str]) -> None:
    """Write the picture to a temporary name and rename it, so a reader never sees half a PNG."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.tmp")
    block.image.save(temporary, format="PNG")
    os.replace(temporary, target)
