"""What the miniature's vision tower holds of depth, and what one of its size can learn (README
section 4, "The eye").

Two measurements on ADE-layout shards (each picture with its depth map and depth codes):

``--checkpoint M`` probes a trained model: the image tokens it feeds its language model (the
projector's output, cell vectors included) stay frozen, and readers from a token to its cell's
depth code are fitted on the ``--train`` pictures and scored on the ``--heldout`` ones: a linear
one (the token and its cell) and an MLP on the token's 3x3 neighbourhood. Tokens that hold their
cells' depth beat each cell's most frequent code, reported beside them.

``--fit`` trains an eye directly: the miniature's vision tower and projector (from ``--vlm``, or
random at ``--vision-width`` / ``--vision-layers``) with a linear head on each image token, on the
depth codes (cross-entropy) or, ``--target depth``, the mean depths of the 2x2 blocks under each
token (mean squared error: what the trainer's ``--eye-depth`` adds). What it reaches bounds what an
eye of that size and data gives the span.

With ``--blink DIR --world W --tokenizer T`` both answer a HardBLINK split from what the eye alone
reads of each question's unmarked source picture (codes decoded by the tokenizer, or the regressed
depth, read at the marked points as decomposition (b) reads a written span). InternVL models only
(the image tokens come from ``get_image_features``)::

    python benchmarks/eye_depth.py --checkpoint RUN/model --train S/ade20k --heldout H/ade20k
    python benchmarks/eye_depth.py --fit --train S/ade20k --heldout H/ade20k --target depth \\
        --blink heldout-blink --world HW --tokenizer tokenizer
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch import nn

from perceptio.errors import PerceptioError
from perceptio.evaluate.depth_answer import answer_from_depth
from perceptio.evaluate.hardblink import load_hardblink
from perceptio.shards import iter_shard, list_shards
from perceptio.train.eye_depth import SUB, token_depth_blocks
from perceptio.train.processor import tile_image_processor
from probes import write_record

TARGETS = ("codes", "depth")
CODES = 128  # the depth tokenizer's codebook (K)


@dataclass
class Pictures:
    """Pictures of a shard folder as the eye sees them, with what each image token should read."""

    pixels: torch.Tensor  # (N, 3, S, S): one whole-picture tile each
    codes: torch.Tensor  # (N, tokens) long: the depth code of each token's cell
    blocks: torch.Tensor  # (N, tokens, SUB * SUB): the mean depths under each token

    def target(self, kind: str) -> torch.Tensor:
        return self.codes if kind == "codes" else self.blocks


def load_pictures(folders: list[Path], tile: Callable[[Image.Image], torch.Tensor], limit: int = 0) -> Pictures:
    """Every picture with depth of the folders' shards (the first ``limit``; 0: all). The tokens must
    be the depth grid (a 280-pixel tile of the miniature: 10x10 of each)."""
    samples = (sample for folder in folders for shard in list_shards(folder) for sample in iter_shard(shard.path)
               if sample.jpg is not None and sample.depth_tokens is not None)
    pixels, codes, depths = [], [], []
    for sample in itertools.islice(samples, limit or None):
        pixels.append(tile(Image.open(io.BytesIO(sample.jpg))))
        codes.append(torch.as_tensor(sample.depth_tokens.astype(np.int64)).reshape(-1))
        depths.append(torch.from_numpy(sample.depth.astype(np.float32)))
    if not pixels:
        raise PerceptioError(f"no pictures with depth in {', '.join(map(str, folders))}")
    codes_tensor = torch.stack(codes)
    side = int(round(codes_tensor.shape[1] ** 0.5))
    return Pictures(torch.stack(pixels), codes_tensor, token_depth_blocks(torch.stack(depths), side))


def image_tokens(vlm: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """(N, tokens, D): what an InternVL feeds its language model for each tile (its projector's output;
    hooks on the projector, such as --cell-embeddings', included)."""
    inner = vlm.model
    return inner.get_image_features(pixel_values=pixels, vision_feature_layer=inner.config.vision_feature_layer,
                                    vision_feature_select_strategy=inner.config.vision_feature_select_strategy).pooler_output


def neighbourhoods(tokens: torch.Tensor) -> torch.Tensor:
    """(N, tokens, 9 D): each token of a square grid with its 8 neighbours (zeros past the edge)."""
    count, length, width = tokens.shape
    side = int(round(length ** 0.5))
    grid = nn.functional.pad(tokens.reshape(count, side, side, width).permute(0, 3, 1, 2), (1, 1, 1, 1))
    parts = [grid[:, :, row:row + side, column:column + side] for row in range(3) for column in range(3)]
    return torch.cat(parts, 1).permute(0, 2, 3, 1).reshape(count, length, 9 * width)


def depth_map(blocks: torch.Tensor) -> torch.Tensor:
    """(side * SUB, side * SUB): the map whose blocks ``blocks`` (side * side, SUB * SUB) are, the
    inverse of :func:`token_depth_blocks` for one picture."""
    side = int(round(blocks.shape[0] ** 0.5))
    return blocks.reshape(side, side, SUB, SUB).permute(0, 2, 1, 3).reshape(side * SUB, side * SUB)


def output_width(kind: str) -> int:
    return CODES if kind == "codes" else SUB * SUB


def reading_loss(kind: str, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if kind == "codes":
        return nn.functional.cross_entropy(output.reshape(-1, output.shape[-1]), target.reshape(-1))
    return nn.functional.mse_loss(output, target)


def scores(kind: str, output: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """Codes: accuracy and cross-entropy; depth: mean squared error."""
    if kind == "codes":
        return {"accuracy": float((output.argmax(-1) == target).float().mean()),
                "cross_entropy": float(reading_loss(kind, output, target))}
    return {"mse": float(reading_loss(kind, output, target))}


def prior_scores(kind: str, train: torch.Tensor, heldout: torch.Tensor) -> dict[str, float]:
    """The reader that ignores the picture: each token's most frequent training code, or its mean depth."""
    if kind == "codes":
        mode = torch.stack([torch.bincount(train[:, token], minlength=CODES).argmax() for token in range(train.shape[1])])
        return {"accuracy": float((heldout == mode).float().mean())}
    return {"mse": float(((heldout - train.mean(0)) ** 2).mean())}


class TokenReader(nn.Module):
    """Reads each image token (or its neighbourhood), with a learned vector for its place."""

    def __init__(self, width: int, tokens: int, out: int, hidden: int = 0):
        super().__init__()
        self.place = nn.Parameter(torch.zeros(tokens, width))
        self.head = nn.Linear(width, out) if not hidden else nn.Sequential(
            nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, out))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(tokens + self.place)


def train_reader(module: nn.Module, forward: Callable[[torch.Tensor], torch.Tensor], count: int, target: torch.Tensor,
                 kind: str, steps: int, batch: int, lr: float, log: Callable[[int, torch.Tensor], None]) -> None:
    """AdamW on random batches of ``batch`` pictures, one-cycle ``lr``, gradients clipped at 1."""
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.05)
    module.train()
    for step in range(1, steps + 1):
        chosen = torch.randint(0, count, (batch,))
        loss = reading_loss(kind, forward(chosen), target[chosen])
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        log(step, loss)
    module.eval()


def in_batches(forward: Callable[[torch.Tensor], torch.Tensor], count: int, size: int = 64) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([forward(torch.arange(start, min(start + size, count))) for start in range(0, count, size)])


def blink_accuracy(read: Callable[[torch.Tensor], torch.Tensor], kind: str, blink: Path, world: Path,
                   tokenizer: Path | None, tile: Callable[[Image.Image], torch.Tensor]) -> dict[str, float]:
    """The HardBLINK split answered from what ``read`` (pixels -> (1, tokens, out)) makes of each
    question's source picture: its depth map (the codes decoded by the tokenizer, or the regressed
    blocks laid back out), made once per picture, read at the marked points."""
    vqvae = None
    if kind == "codes":
        if tokenizer is None:
            raise PerceptioError("--blink with codes needs --tokenizer to decode them")
        from perceptio.tokenize import DepthVQVAE

        vqvae = DepthVQVAE.from_pretrained(tokenizer)

    def as_map(reading: torch.Tensor) -> np.ndarray:
        if vqvae is None:
            return depth_map(reading).numpy()
        return vqvae.decode(reading.argmax(-1))[0].cpu().numpy()

    maps: dict[str, np.ndarray] = {}
    hits = 0
    questions = load_hardblink(blink)
    for question in questions:
        row = question.row
        source = row["source_file"]
        if source not in maps:
            with torch.no_grad():
                maps[source] = as_map(read(tile(Image.open(world / source))[None])[0])
        hits += answer_from_depth(maps[source], row["points"], row["labels"],
                                  (row["image_width"], row["image_height"])) == question.answer
    return {"eye_alone_choice": hits / len(questions), "questions": len(questions)}


def probe(arguments: argparse.Namespace, log: Callable[[int, torch.Tensor], None]) -> dict:
    """Readers fitted on a trained model's frozen image tokens (module docstring)."""
    from perceptio.evaluate.predict import Predictor

    model = Predictor.from_checkpoint(arguments.checkpoint).model.eval()
    vlm = model.adapter.model
    tile = _tile(model.processor.settings.image_size)
    train, heldout = load_pictures(arguments.train, tile, arguments.pictures), load_pictures([arguments.heldout], tile)
    with torch.no_grad():
        features = {name: in_batches(lambda chosen: image_tokens(vlm, pictures.pixels[chosen]), len(pictures.pixels))
                    for name, pictures in (("train", train), ("heldout", heldout))}
    record: dict = {"prior": prior_scores("codes", train.codes, heldout.codes)}
    tokens = features["train"].shape[1]
    for name, shape, hidden in (("linear", lambda x: x, 0), ("mlp_3x3", neighbourhoods, 256)):
        torch.manual_seed(arguments.seed)
        inputs = {split: shape(values) for split, values in features.items()}
        mean, std = inputs["train"].mean((0, 1)), inputs["train"].std((0, 1)) + 1e-6
        inputs = {split: (values - mean) / std for split, values in inputs.items()}
        reader = TokenReader(inputs["train"].shape[-1], tokens, CODES, hidden)
        train_reader(reader, lambda chosen: reader(inputs["train"][chosen]), len(train.codes), train.codes, "codes",
                     arguments.steps, arguments.batch_size, arguments.lr, log)
        with torch.no_grad():
            record[name] = {"train": scores("codes", reader(inputs["train"]), train.codes),
                            "heldout": scores("codes", reader(inputs["heldout"]), heldout.codes)}
        if arguments.blink is not None:
            def read(pixels, reader=reader, shape=shape, mean=mean, std=std):
                return reader((shape(image_tokens(vlm, pixels)) - mean) / std)
            record[name].update(blink_accuracy(read, "codes", arguments.blink, arguments.world, arguments.tokenizer, tile))
    return record


def fit(arguments: argparse.Namespace, log: Callable[[int, torch.Tensor], None]) -> dict:
    """An eye and a linear head trained directly on the depth (module docstring)."""
    from transformers import InternVLForConditionalGeneration

    from miniature import MINIATURE

    from perceptio.train.tiny import tiny_internvl, tiny_text_tokenizer

    torch.manual_seed(arguments.seed)
    if arguments.vlm is not None:
        vlm = InternVLForConditionalGeneration.from_pretrained(arguments.vlm)
    else:
        size = replace(MINIATURE, vision_width=arguments.vision_width, vision_layers=arguments.vision_layers)
        vlm = tiny_internvl(tiny_text_tokenizer(), size=size, seed=arguments.seed)
    tile = _tile(vlm.config.vision_config.image_size[0])
    train, heldout = load_pictures(arguments.train, tile, arguments.pictures), load_pictures([arguments.heldout], tile)
    kind = arguments.target
    tokens = train.codes.shape[1]
    eye = nn.ModuleList([vlm.model.vision_tower, vlm.model.multi_modal_projector])
    reader = TokenReader(vlm.config.text_config.hidden_size, tokens, output_width(kind))
    module = nn.ModuleList([eye, reader])
    module.requires_grad_(True)

    def read(pixels: torch.Tensor) -> torch.Tensor:
        return reader(image_tokens(vlm, pixels))

    started = time.time()
    train_reader(module, lambda chosen: read(train.pixels[chosen]), len(train.codes), train.target(kind), kind,
                 arguments.steps, arguments.batch_size, arguments.lr, log)
    record = {"prior": prior_scores(kind, train.target(kind), heldout.target(kind)),
              "eye_parameters": sum(p.numel() for p in eye.parameters()), "seconds": round(time.time() - started, 1),
              "train": scores(kind, in_batches(lambda chosen: read(train.pixels[chosen]), len(train.codes)), train.target(kind)),
              "heldout": scores(kind, in_batches(lambda chosen: read(heldout.pixels[chosen]), len(heldout.codes)),
                                heldout.target(kind))}
    if arguments.blink is not None:
        record.update(blink_accuracy(read, kind, arguments.blink, arguments.world, arguments.tokenizer, tile))
    return record


def _tile(image_size: int) -> Callable[[Image.Image], torch.Tensor]:
    processor = tile_image_processor(image_size)
    return lambda picture: processor(picture.convert("RGB"), return_tensors="pt")["pixel_values"][0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--checkpoint", type=Path, help="probe this exported model's image tokens")
    mode.add_argument("--fit", action="store_true", help="train an eye and a linear head on the depth directly")
    parser.add_argument("--train", type=Path, action="append", required=True, help="ADE-layout shards to fit on (repeatable)")
    parser.add_argument("--heldout", type=Path, required=True, help="ADE-layout shards to score on")
    parser.add_argument("--pictures", type=int, default=0, help="fit on the first N training pictures (0: all)")
    parser.add_argument("--target", choices=TARGETS, default="codes", help="--fit: the codes, or the 2x2 depths under each token")
    parser.add_argument("--vlm", type=Path, help="--fit: a miniature VLM folder whose eye to start from (default: random)")
    parser.add_argument("--vision-width", type=int, default=32, help="--fit: a random eye of this width (the miniature's: 32)")
    parser.add_argument("--vision-layers", type=int, default=2, help="--fit: and this many layers (the miniature's: 2)")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=32, help="pictures per step")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--blink", type=Path, help="a synthetic HardBLINK split to answer from the eye alone")
    parser.add_argument("--world", type=Path, help="the world of --blink's source pictures")
    parser.add_argument("--tokenizer", type=Path, help="the depth tokenizer (decodes codes for --blink)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, help="also write the record as JSON here")
    arguments = parser.parse_args()
    if arguments.blink is not None and arguments.world is None:
        parser.error("--blink needs --world (its questions' source pictures)")
    torch.set_num_threads(arguments.threads)

    def log(step: int, loss: torch.Tensor) -> None:
        if step % 250 == 0:
            print(f"step {step}: loss {loss.item():.4f}", flush=True)

    try:
        record = probe(arguments, log) if arguments.checkpoint is not None else fit(arguments, log)
    except PerceptioError as error:  # bad input: one line, exit code 2
        parser.exit(2, f"error: {error}\n")
    print(json.dumps(record))
    write_record(arguments, **record)


if __name__ == "__main__":
    main()
