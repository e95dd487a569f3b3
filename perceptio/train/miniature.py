"""Pretraining the miniature's parts on the synthetic world, as the real recipe starts from pretrained ones.

The paper fine-tunes a pretrained VLM and a pretrained SAM2 whose image encoder stays frozen. The
miniature (``benchmarks/miniature.py``) reproduces that regime in small: before any Perceptio
training, its tiny SAM2 is pretrained the way SAM is, on the training world's instance masks with
point and box prompts (no text, no depth: the world's ``instances/*.png`` only), and saved with
``save_pretrained`` so that ``perceptio-train --sam-model`` loads it like a real checkpoint.

One example, from disk to the loss: ``world.json`` lists image ``k`` with its ``file`` and
``instance_file``; the picture is resized to SAM2's square input (the processor's own
``sam_pixel_values``) and the uint16 instance map to the mask grid (nearest); a step draws, per
image of the batch, one visible instance, a prompt (one positive point inside the instance, or its
box) and supervises the decoder's single-mask output with the trainer's own BCE + DICE.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import InternVLForConditionalGeneration, PreTrainedTokenizerBase, Sam2Model

from perceptio.sources.synth.conversations import image_questions, unique_names
from perceptio.train.chat import ASSISTANT, USER, Turn
from perceptio.train.losses import segmentation_losses
from perceptio.train.processor import IMAGENET_MEAN, IMAGENET_STD, PerceptioProcessor, ProcessorSettings

MIN_INSTANCE_PIXELS = 12  # on the mask grid: smaller instances give no usable prompt


@dataclass(frozen=True)
class SamPretraining:
    steps: int = 1500
    batch_size: int = 16
    lr: float = 1e-3
    box_fraction: float = 0.5  # prompts that are the instance's box rather than one point inside it
    seed: int = 0
    log_every: int = 100


@dataclass
class InstanceImages:
    """Every picture of a world at SAM2's input size, with its instance map at the mask size."""

    pixels: torch.Tensor  # (N, 3, S, S) normalised like SamSegmenter's input
    instances: torch.Tensor  # (N, M, M) int64 instance ids, 0 = background

    @classmethod
    def load(cls, world: Path, image_size: int, mask_size: int) -> "InstanceImages":
        records = json.loads((world / "world.json").read_text())["images"]
        mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
        pixels, instances = [], []
        for record in records:
            picture = Image.open(world / record["file"]).convert("RGB").resize((image_size, image_size), Image.Resampling.BILINEAR)
            pixels.append((torch.from_numpy(np.asarray(picture, dtype=np.float32) / 255.0).permute(2, 0, 1) - mean) / std)
            ids = Image.fromarray(np.asarray(Image.open(world / record["instance_file"])).astype(np.int32))
            instances.append(torch.from_numpy(np.asarray(ids.resize((mask_size, mask_size), Image.Resampling.NEAREST)).astype(np.int64)))
        return cls(torch.stack(pixels), torch.stack(instances))


def _prompt(mask: torch.Tensor, use_box: bool, scale: float, generator: torch.Generator) -> tuple[list[list[float]], int]:
    """One prompt for a (M, M) mask in SAM2 input pixels: a box (label 2, 3 corners) or one point (label 1)."""
    ys, xs = torch.nonzero(mask, as_tuple=True)
    if use_box:
        return [[float(xs.min()) * scale, float(ys.min()) * scale], [float(xs.max() + 1) * scale, float(ys.max() + 1) * scale]], 1
    pick = int(torch.randint(len(xs), (1,), generator=generator))
    return [[(float(xs[pick]) + 0.5) * scale, (float(ys[pick]) + 0.5) * scale]], 0


def pretrain_sam(sam: Sam2Model, world: Path, settings: SamPretraining = SamPretraining(),
                 log=print) -> dict[str, float]:
    """Train every part of ``sam`` on the world's instance masks; returns the last logged numbers."""
    image_size = int(sam.config.prompt_encoder_config.image_size)
    mask_size = image_size // 4
    data = InstanceImages.load(world, image_size, mask_size)
    generator = torch.Generator().manual_seed(settings.seed)
    optimizer = torch.optim.AdamW(sam.parameters(), lr=settings.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, settings.lr, total_steps=settings.steps, pct_start=0.05)
    sam.train()
    scale = image_size / mask_size
    running: dict[str, float] = {}
    started = time.perf_counter()
    for step in range(1, settings.steps + 1):
        pictures = torch.randint(len(data.pixels), (settings.batch_size,), generator=generator)
        masks, points, boxes, kinds = [], [], [], []
        for index in pictures.tolist():
            ids = data.instances[index]
            present, counts = torch.unique(ids[ids > 0], return_counts=True)
            present = present[counts >= MIN_INSTANCE_PIXELS]
            if len(present) == 0:
                present = torch.unique(ids)  # background only: segment the background from a point on it
            instance = present[int(torch.randint(len(present), (1,), generator=generator))]
            mask = ids == instance
            use_box = bool(torch.rand((), generator=generator) < settings.box_fraction)
            prompt, kind = _prompt(mask, use_box, scale, generator)
            masks.append(mask.float())
            kinds.append(kind)
            (boxes if use_box else points).append(prompt)
        target = torch.stack(masks)
        logits = _decode(sam, data.pixels[pictures], points, boxes, kinds)
        bce, dice = segmentation_losses(logits, target)
        loss = bce + dice
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(sam.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            predicted = logits > 0
            iou = ((predicted & (target > 0)).sum((1, 2)) / ((predicted | (target > 0)).sum((1, 2)).clamp(min=1))).mean()
        for name, value in (("bce", bce), ("dice", dice), ("iou", iou)):
            value = float(value.detach())
            running[name] = 0.9 * running.get(name, value) + 0.1 * value
        if step % settings.log_every == 0 or step == settings.steps:
            log(f"sam pretraining step {step}/{settings.steps}: bce {running['bce']:.3f} dice {running['dice']:.3f} "
                f"iou {running['iou']:.3f} ({time.perf_counter() - started:.0f} s)")
    sam.eval()
    return dict(running)


def _decode(sam: Sam2Model, pixels: torch.Tensor, points: list, boxes: list, kinds: list[int]) -> torch.Tensor:
    """Single-mask logits (B, M, M) for a batch whose prompts are points (kind 0) or boxes (kind 1).

    The two kinds cannot share one prompt tensor, so each group runs through ``Sam2Model`` with its
    own pictures (every picture is still encoded once, with gradients)."""
    order = torch.tensor(kinds)
    pieces: dict[int, torch.Tensor] = {}
    for kind, prompts in ((0, points), (1, boxes)):
        chosen = torch.nonzero(order == kind, as_tuple=True)[0]
        if len(chosen) == 0:
            continue
        if kind == 0:
            inputs = {"input_points": torch.tensor(prompts).view(len(chosen), 1, 1, 2),
                      "input_labels": torch.ones(len(chosen), 1, 1, dtype=torch.long)}
        else:
            inputs = {"input_boxes": torch.tensor(prompts).view(len(chosen), 1, 4)}
        pieces[kind] = sam(pixel_values=pixels[chosen], multimask_output=False, **inputs).pred_masks[:, 0, 0]
    logits = torch.cat([pieces[kind] for kind in sorted(pieces)])
    # back to the batch's order
    positions = torch.cat([torch.nonzero(order == kind, as_tuple=True)[0] for kind in sorted(pieces)])
    return logits[torch.argsort(positions)]


# ------------------------------------------------------------------------------------ the VLM
GRID = 10  # the miniature's image is a 10x10 grid of tokens (280-px tile): places are named on it


@dataclass(frozen=True)
class VlmPretraining:
    steps: int = 1500
    batch_size: int = 16
    lr: float = 2e-3
    seed: int = 0
    log_every: int = 100


def _place(obj: dict, camera: dict) -> str:
    """The object's centre as "row column" on the image's GRID x GRID grid (its first token says the row)."""
    x, y = obj["image_centre"]
    row = min(GRID - 1, max(0, int(y / camera["height"] * GRID)))
    column = min(GRID - 1, max(0, int(x / camera["width"] * GRID)))
    return f"{row} {column}"


def place_questions(record: dict) -> list[tuple[str, str]]:
    """Where the uniquely named objects are, asked both ways: "Where is the red cube?" -> "3 7"
    (row and column of its centre) and "What is at row 3 column 7?" -> "the red cube"."""
    asked = []
    for instance, name in unique_names(record["objects"]).items():
        obj = next(obj for obj in record["objects"] if obj["instance"] == instance)
        place = _place(obj, record["camera"])
        asked.append((f"Where is {name}? Row and column.", place))
        row, column = place.split()
        asked.append((f"What is at row {row} column {column}?", name))
    return asked


def referring_questions(world: Path, records: list[dict]) -> dict[int, list[tuple[str, str]]]:
    """Picture index -> questions about the objects the world's training referring expressions
    pick out: their colour, shape and place, asked with the expression (as InternVL's pretraining
    grounds RefCOCO expressions in text). Masks and depth are never shown."""
    from perceptio.sources.refer import ReferDataset

    by_ann = {obj["ann_id"]: (index, obj) for index, record in enumerate(records) for obj in record["objects"] if "ann_id" in obj}
    asked: dict[int, list[tuple[str, str]]] = {}
    for dataset, split_by in (("refcoco", "unc"), ("refcoco+", "unc"), ("refcocog", "umd")):
        if not (world / dataset).is_dir():
            continue
        for ref in ReferDataset(world, dataset, split_by).refs_in_split("train"):
            if ref.ann_id not in by_ann:
                continue
            index, obj = by_ann[ref.ann_id]
            for sentence in ref.sentences:
                asked.setdefault(index, []).extend([
                    (f"What colour is {sentence.sent}?", obj["colour"]),
                    (f"What shape is {sentence.sent}?", obj["shape"]),
                    (f"Where is {sentence.sent}? Row and column.", _place(obj, records[index]["camera"])),
                ])
    return asked


def vlm_processor(vlm: InternVLForConditionalGeneration, tokenizer: PreTrainedTokenizerBase) -> PerceptioProcessor:
    """The trainer's prompt layout for a bare VLM: one tile, no perception tokens, no SAM2 input."""
    vision = vlm.config.vision_config
    return PerceptioProcessor(tokenizer, ProcessorSettings(
        image_size=int(vision.image_size[0]), tokens_per_tile=int(vlm.config.image_seq_length), crop_to_patches=False,
        depth_size=1, sam_image_size=None, max_length=1024, use_depth_tokens=False, use_segmentation=False))


def pretrain_vlm(vlm: InternVLForConditionalGeneration, tokenizer: PreTrainedTokenizerBase, world: Path,
                 settings: VlmPretraining = VlmPretraining(), log=print) -> dict[str, float]:
    """Train every part of ``vlm`` on one-turn questions about the world's pictures: colours,
    counts, left/right, sizes (the world's LLaVA questions), places on the image grid, and the
    colour, shape and place of what each training referring expression names. No question is about
    depth: what the depth tokens add is left for the ablation to measure."""
    records = json.loads((world / "world.json").read_text())["images"]
    pictures = [Image.open(world / record["file"]).convert("RGB") for record in records]
    processor = vlm_processor(vlm, tokenizer)
    about = [image_questions(record["objects"], record["camera"]["width"], np.random.default_rng(index))
             + place_questions(record) for index, record in enumerate(records)]
    for index, questions in referring_questions(world, records).items():
        about[index] += questions
    rng = np.random.default_rng(settings.seed)
    optimizer = torch.optim.AdamW(vlm.parameters(), lr=settings.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, settings.lr, total_steps=settings.steps, pct_start=0.05)
    vlm.train()
    running: dict[str, float] = {}
    started = time.perf_counter()
    for step in range(1, settings.steps + 1):
        examples = []
        for index in rng.integers(len(records), size=settings.batch_size).tolist():
            question, answer = about[index][int(rng.integers(len(about[index])))]
            examples.append(processor.encode_conversation(pictures[index], [Turn(USER, question), Turn(ASSISTANT, answer)]))
        batch = processor.collate(examples)
        output = vlm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     pixel_values=batch["pixel_values"], labels=batch["labels"])
        optimizer.zero_grad(set_to_none=True)
        output.loss.backward()
        torch.nn.utils.clip_grad_norm_(vlm.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        value = float(output.loss.detach())
        running["loss"] = 0.9 * running.get("loss", value) + 0.1 * value
        if step % settings.log_every == 0 or step == settings.steps:
            log(f"vlm pretraining step {step}/{settings.steps}: loss {running['loss']:.3f} "
                f"({time.perf_counter() - started:.0f} s)")
    vlm.eval()
    return dict(running)
