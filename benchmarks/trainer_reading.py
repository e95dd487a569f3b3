"""The span lookup in the trainer's own form: its model, processor and reading questions, in a bare loop.

``benchmarks/span_reading.py`` asks the lookup (find each mark's cell in the depth span, name the
nearest) of a language model in the probe's own tokens. This asks it as ``perceptio-train
--reading-in-text 1`` writes it: the reading questions of :mod:`perceptio.train.data` on a shard
folder's ADE20k pictures, in text alone (the prompt the marks' cells, "A 3 7, B 1 8", the span given
as context, the letter the target), encoded by the model's own processor and chat template, through
:class:`perceptio.train.model.PerceptioModel` built from ``--model`` exactly as the trainer builds it.
Nothing else is in the batch (no curated questions, no pictures, no other loss), so a difference
from the fine-tuning is the loop's and the batch's, a difference from the probe the model's and the
format's. ``--loss llm`` trains the trainer's L_LLM (every answer token), ``letter`` the letter alone.

Scored every 100 steps on held-out pictures' questions whose marked cells' codes are shuffled among
them (``--reading-swaps``), which only the exact lookup answers (the letter right, teacher forced;
chance about 32%). Beside it, what the perfect lookup scores on those questions: each mark's code
read from the span and compared through a table from code to the mean nearness of the training
pictures' cells that hold it (the depth maps pooled to the span's grid, as reading questions are
answered)::

    python benchmarks/trainer_reading.py --model BASE/vlm --tokenizer TOKENIZER \\
        --shards S/ade20k --heldout-shards H/ade20k --steps 600
"""

from __future__ import annotations

import argparse
import re
import time
from itertools import islice
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from perceptio.shards import iter_shard, list_shards
from perceptio.tokens import depth_codes_in
from perceptio.train.config import NEW_TOKEN_INITS, PerceptioConfig, StreamConfig
from perceptio.train.data import Example, ExampleReader, ReaderSlot, plan_streams, token_grid_nearness
from perceptio.train.loop import lr_factor
from perceptio.train.model import PerceptioModel
from probes import write_record

LETTERS = "ABCDE"


def text_reading_questions(folder: Path, seed: int, swaps: float) -> Iterator[Example]:
    """The trainer's reading questions asked in text alone, on ``folder``'s pictures, endlessly."""
    config = StreamConfig([folder], seed=seed, reading_questions=120, reading_spread=1 / 3,
                          reading_swaps=swaps, reading_in_text=1.0)
    reader = ExampleReader(plan_streams(config), ReaderSlot(0, 1, 0, 1), config)
    # Text questions are keyed {sample}/t{i}; the curated questions on pictures are left out.
    return (example for example in reader if example.key.rsplit("/", 1)[-1].startswith("t"))


def code_nearness(folder: Path, num_codes: int) -> np.ndarray:
    """(K,) each code's mean nearness over the cells that hold it in ``folder``'s pictures."""
    codes, nearness = [], []
    for shard in list_shards(folder):
        for sample in iter_shard(shard.path):
            if sample.depth_tokens is not None and sample.depth is not None:
                codes.append(np.asarray(sample.depth_tokens))
                nearness.append(token_grid_nearness(sample.depth, len(sample.depth_tokens)).reshape(-1))
    codes, nearness = np.concatenate(codes), np.concatenate(nearness)
    held = np.bincount(codes, minlength=num_codes)
    sums = np.bincount(codes, weights=nearness, minlength=num_codes)
    # A code no training cell holds reads as the average cell.
    return np.where(held > 0, sums / np.maximum(held, 1), nearness.mean())


def table_answer(example: Example, table: np.ndarray) -> str:
    """The letter a perfect lookup names: the mark whose cell's code the table finds nearest."""
    codes = depth_codes_in(example.target)
    side = int(round(len(codes) ** 0.5))
    marks = re.findall(r"([A-E]) (\d+) (\d+)", example.prompt)  # "A 3 7, B 1 8"
    return max(marks, key=lambda mark: table[codes[int(mark[1]) * side + int(mark[2])]])[0]


def answer_letter(example: Example) -> str:
    """The letter a reading question's target ends with ("...[D_END](B)")."""
    return example.target.rsplit("(", 1)[1][0]


def letter_ids(model: PerceptioModel) -> list[int]:
    """The token of each letter as the answer "(B)" writes it."""
    ids = []
    for letter in LETTERS:
        tokens = model.processor.token_ids(f"({letter})")
        if len(tokens) != 3:
            raise SystemExit(f"the tokenizer writes ({letter}) as {len(tokens)} tokens, not 3")
        ids.append(tokens[1])
    return ids


def letter_logits(model: PerceptioModel, batch: dict[str, Any], letters: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The letters' logits (B, 5) where each answer's letter is predicted, and the letter (B,)."""
    labels = batch["labels"]
    is_letter = torch.isin(labels, torch.tensor(letters))
    # The last letter among an example's targets is its answer (readouts, if any, come before it).
    position = (is_letter * torch.arange(labels.shape[1])).argmax(1)
    rows = torch.arange(labels.shape[0])
    hidden = model.hidden_states(batch)[rows, position - 1]
    logits = model.adapter.output_head()(hidden)[:, letters]
    return logits, torch.tensor([letters.index(token) for token in labels[rows, position].tolist()])


def letter_accuracy(model: PerceptioModel, batches: list[dict[str, Any]], letters: list[int]) -> float:
    model.eval()
    right = total = 0
    with torch.no_grad():
        for batch in batches:
            logits, answers = letter_logits(model, batch, letters)
            right += (logits.argmax(1) == answers).sum().item()
            total += len(answers)
    model.train()
    return right / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="the VLM folder (or hub id, or tiny) to fine-tune")
    parser.add_argument("--tokenizer", type=Path, required=True, help="the depth tokenizer the shards were curated with")
    parser.add_argument("--shards", type=Path, required=True, help="ADE20k-layout shards to train on")
    parser.add_argument("--heldout-shards", type=Path, required=True, help="ADE20k-layout shards to score")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=float, default=0.05)
    parser.add_argument("--grad-clip", type=float, default=1.0)
    parser.add_argument("--loss", choices=("llm", "letter"), default="llm")
    parser.add_argument("--training-swaps", type=float, default=1.0,
                        help="the share of training questions asked after a span with the marked cells' codes shuffled")
    parser.add_argument("--new-token-init", choices=NEW_TOKEN_INITS, default=PerceptioConfig.new_token_init)
    parser.add_argument("--heldout", type=int, default=320, help="held-out questions scored")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the curve as JSON here")
    arguments = parser.parse_args()
    torch.manual_seed(arguments.seed)
    config = PerceptioConfig(model=arguments.model, tokenizer=str(arguments.tokenizer), train_language_model=True,
                             span_weight=0.0, use_segmentation=False, new_token_init=arguments.new_token_init)
    model = PerceptioModel.from_config(config).train()
    letters = letter_ids(model)

    def encode(examples: list[Example]) -> dict[str, Any]:
        return model.processor.collate([model.processor.encode_conversation(**example.decode()) for example in examples])

    heldout_questions = text_reading_questions(arguments.heldout_shards, arguments.seed + 7, swaps=1.0)
    heldout_examples = [list(islice(heldout_questions, 64)) for _ in range(max(1, arguments.heldout // 64))]
    heldout = [encode(examples) for examples in heldout_examples]
    table = code_nearness(arguments.shards, model.depth_token_ids.numel())
    by_table = float(np.mean([table_answer(example, table) == answer_letter(example)
                              for examples in heldout_examples for example in examples]))
    print(f"a perfect lookup (a table from code to nearness) answers {by_table:.3f} of the held-out questions", flush=True)
    training = text_reading_questions(arguments.shards, arguments.seed, arguments.training_swaps)
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=arguments.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, arguments.steps, arguments.warmup))
    curve, started = [], time.perf_counter()
    for step in range(1, arguments.steps + 1):
        batch = encode(list(islice(training, arguments.batch_size)))
        if arguments.loss == "llm":
            loss = model(batch).loss
        else:
            logits, answers = letter_logits(model, batch, letters)
            loss = F.cross_entropy(logits, answers)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, arguments.grad_clip)
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == arguments.steps:
            right = letter_accuracy(model, heldout, letters)
            curve.append({"step": step, "loss": loss.item(), "swapped_questions": right})
            print(f"step {step}: loss {loss.item():.3f}, held-out swapped questions {right:.3f} "
                  f"({time.perf_counter() - started:.0f} s)", flush=True)
    write_record(arguments, perfect_lookup=by_table, curve=curve)


if __name__ == "__main__":
    main()
