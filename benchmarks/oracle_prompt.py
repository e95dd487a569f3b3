"""The mask path's ceiling: SAM2 prompted by a perfect reading of the expression, no language model.

Perceptio's mask comes from image -> language model -> ``[SEG]`` state -> projector -> SAM2 decoder.
This benchmark cuts the chain before the projector: each referring expression's prompt is the
mean of learned word vectors of its words (what an ideal ``[SEG]`` state could carry about the text,
and nothing about the picture), fed to the same :class:`~perceptio.train.sam.SamSegmenter` and
trained with the same L_SegRecon, on the same shards. Its held-out cIoU says how far the mask path
can go at this size and budget; a Perceptio run far below it loses the expression on the way to
``[SEG]`` or in the decoder (``perceptio-evaluate diagnose`` says which). With ``--save``, the
trained SAM2 is written as a model folder: a miniature SAM2 pretrained to segment from one prompt
token that names the object, for ``perceptio-train --sam-model``. With ``--world W`` it trains on
every RefCOCO expression of a synthetic world instead of the shards (a pretraining world of its own,
as SAM2's pretraining pictures are not the fine-tuning ones)::

    python benchmarks/oracle_prompt.py --sam-model MINI/sam2 --shards ablation-out/shards/refcoco \\
        --heldout-shards ablation-out/heldout-shards/refcoco --steps 800
"""

from __future__ import annotations

import random
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from transformers import Sam2Model

from perceptio.evaluate.benchmarks import read_shard_items
from perceptio.shards import rle_to_mask
from perceptio.train.config import PerceptioConfig
from perceptio.train.losses import segmentation_losses
from perceptio.train.processor import PerceptioProcessor, ProcessorSettings
from perceptio.train.sam import SamSegmenter
from perceptio.train.tiny import tiny_text_tokenizer
from probes import probe_parser, words, write_record

WORD_WIDTH = 64  # the miniature language model's width


def expression(prompt: str) -> str:
    """The quoted expression of a grounding prompt (manifests/prompts.json quotes it)."""
    quoted = re.findall(r'"([^"]*)"', prompt)
    return quoted[0] if quoted else prompt


class Oracle(torch.nn.Module):
    """Mean of learned word vectors -> SamSegmenter (its projector, then SAM2's decoder)."""

    def __init__(self, vocabulary: list[str], sam: Sam2Model, train_encoder: bool):
        super().__init__()
        self.index = {word: position for position, word in enumerate(vocabulary)}
        self.vectors = torch.nn.EmbeddingBag(len(vocabulary) + 1, WORD_WIDTH, mode="mean")  # last row: unknown
        self.segmenter = SamSegmenter(sam, WORD_WIDTH, train_encoder=train_encoder)

    def forward(self, pixels: torch.Tensor, texts: list[str]) -> torch.Tensor:
        ids = [torch.tensor([self.index.get(word, len(self.index)) for word in words(text)] or [len(self.index)])
               for text in texts]
        offsets = torch.tensor([0] + [len(row) for row in ids[:-1]]).cumsum(0)
        return self.segmenter(pixels, self.vectors(torch.cat(ids), offsets))


@dataclass(frozen=True)
class Referent:
    """One referring expression with its picture and mask, both decoded when used."""

    text: str
    image: Callable[[], Image.Image]
    mask: Callable[[], np.ndarray]


def shard_referents(shards: Path, limit: int | None = None) -> list[Referent]:
    """The referring expressions of curated shards (split train)."""
    items = [item for item in read_shard_items([shards], "train") if item.mask_rle is not None][:limit]
    return [Referent(expression(item.prompt), item.image, lambda rle=item.mask_rle: rle_to_mask(rle)) for item in items]


def world_referents(world: Path) -> list[Referent]:
    """Every RefCOCO expression of a synthetic world, all splits: a pretraining corpus (another
    world than the fine-tuning and held-out ones, as SAM2's own pretraining data is other pictures)."""
    from perceptio.sources.refer import ReferDataset

    refer = ReferDataset(world, "refcoco", "unc")
    return [Referent(sentence.sent, lambda image_id=ref.image_id: refer.load_image(image_id),
                     lambda ann_id=ref.ann_id: refer.ann_mask(ann_id))
            for ref in refer.refs for sentence in ref.sentences]


def tensors(referents: list[Referent], processor: PerceptioProcessor) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    pixels = torch.stack([processor.sam_pixel_values(referent.image()) for referent in referents])
    masks = torch.stack([processor.mask_target(referent.mask()) for referent in referents])
    return pixels, masks, [referent.text for referent in referents]


def held_out_ciou(oracle: Oracle, items: list[Referent], processor: PerceptioProcessor) -> float:
    """Cumulative IoU at the decoder's resolution (intersections and unions summed over items)."""
    intersection = union = 0.0
    with torch.no_grad():
        for start in range(0, len(items), 25):
            pixels, masks, texts = tensors(items[start : start + 25], processor)
            predicted, truth = oracle(pixels, texts) > 0, masks > 0.5
            intersection += float((predicted & truth).sum())
            union += float((predicted | truth).sum())
    return intersection / max(union, 1.0)


def train_oracle(sam_model: Path, shards: Path, heldout_shards: Path, steps: int, batch_size: int = 16,
                 lr: float = 1e-3, heldout: int = 200, seed: int = 0, train_encoder: bool = True,
                 save: Path | None = None, world: Path | None = None) -> dict:
    """Train the oracle on ``shards`` (split train; or on every expression of the synthetic
    ``world``), score it on ``heldout_shards`` every 100 steps and at the end; with ``save``, write
    the trained SAM2 there (atomically). Returns the record."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    train = world_referents(world) if world is not None else shard_referents(shards)
    scored = shard_referents(heldout_shards, heldout)
    vocabulary = sorted({word for referent in train for word in words(referent.text)})
    oracle = Oracle(vocabulary, Sam2Model.from_pretrained(sam_model), train_encoder)
    processor = PerceptioProcessor(tiny_text_tokenizer(), ProcessorSettings(
        image_size=448, tokens_per_tile=256, crop_to_patches=False, depth_size=320,
        sam_image_size=oracle.segmenter.image_size, max_length=64, use_depth_tokens=False, use_segmentation=True))
    trained = [param for param in oracle.parameters() if param.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=lr)
    curve, started = [], time.perf_counter()
    for step in range(1, steps + 1):
        pixels, masks, texts = tensors(rng.sample(train, batch_size), processor)
        bce, dice = segmentation_losses(oracle(pixels, texts), masks)
        loss = PerceptioConfig.seg_bce * bce + PerceptioConfig.seg_dice * dice  # L_SegRecon, as the trainer weighs it
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        dice = dice.item()
        if step % 100 == 0 or step == steps:
            score = held_out_ciou(oracle, scored, processor)
            curve.append({"step": step, "dice": dice, "heldout_ciou": score, "seconds": time.perf_counter() - started})
            print(f"oracle step {step}: DICE {dice:.3f}, held-out cIoU {score:.3f} ({len(scored)} expressions, "
                  f"{time.perf_counter() - started:.0f} s)", flush=True)
    if save is not None:
        from perceptio.io import atomic_directory

        with atomic_directory(save) as staging:
            oracle.segmenter.sam.save_pretrained(staging)
    return {"train_expressions": len(train), "trained_on": str(world or shards), "curve": curve}


def main() -> None:
    parser = probe_parser(__doc__.split("\n\n")[0], steps=800, batch_size=16, lr=1e-3)
    parser.add_argument("--sam-model", type=Path, required=True, help="a SAM2 folder (benchmarks/miniature.py writes MINI/sam2)")
    parser.add_argument("--frozen-encoder", action="store_true", help="keep SAM2's image encoder frozen")
    parser.add_argument("--save", type=Path, help="save the trained SAM2 here (a save_pretrained folder, for --sam-model)")
    parser.add_argument("--world", type=Path, help="train on this synthetic world's RefCOCO expressions (all splits) instead of --shards")
    arguments = parser.parse_args()
    record = train_oracle(arguments.sam_model, arguments.shards, arguments.heldout_shards, arguments.steps,
                          arguments.batch_size, arguments.lr, arguments.heldout, arguments.seed,
                          not arguments.frozen_encoder, arguments.save, arguments.world)
    write_record(arguments, **record)


if __name__ == "__main__":
    main()
