"""Can the language model learn to carry the expression to the ``[SEG]`` state? A direct probe.

A ``[SEG]`` state can prompt SAM2 well only if it says what the expression names. This benchmark
asks the language model for exactly that, with the strongest signal there is: a linear head on the
``[SEG]`` state (teacher-forced, the trainer's own grounding examples and processor) is trained with
the language model to name the colour word of the expression, and scored on held-out expressions.
A model that cannot learn this in a few hundred steps cannot learn it from the mask loss, whose
signal reaches ``[SEG]`` only through SAM2's decoder::

    python benchmarks/seg_route.py --model MINI --shards ablation-out/shards/refcoco \\
        --heldout-shards ablation-out/heldout-shards/refcoco --steps 300
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from perceptio.evaluate.benchmarks import read_shard_examples
from perceptio.sources.synth.scene import COLOURS
from perceptio.train import losses
from perceptio.train.config import PerceptioConfig
from perceptio.train.model import PerceptioModel
from probes import probe_parser, words, write_record

COLOUR_NAMES = sorted(COLOURS)


def coloured_requests(shards: Path) -> list[tuple[dict, int]]:
    """(decoded example, colour index) of every grounding example whose expression names a colour."""
    found = []
    for example in read_shard_examples([shards], "train", use_depth_tokens=False):
        decoded = example.decode()
        said = [word for word in words(decoded["turns"][0].text) if word in COLOURS]
        if said and example.image_bytes is not None:
            found.append((decoded, COLOUR_NAMES.index(said[0])))
    return found


def seg_states(model: PerceptioModel, items: list[tuple[dict, int]]) -> torch.Tensor:
    """The last hidden state at each example's [SEG] (the one the trainer pairs with its mask)."""
    processor = model.processor
    batch = processor.collate([processor.encode_conversation(**decoded) for decoded, _ in items])
    rows, positions, _ = losses.seg_pairs(batch["labels"], model.seg_token_id, batch["num_masks"])
    return model.hidden_states(batch)[rows, positions]


def accuracy(model: PerceptioModel, head: torch.nn.Linear, items: list[tuple[dict, int]]) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(items), 20):
            chunk = items[start : start + 20]
            guesses = head(seg_states(model, chunk)).argmax(dim=1)
            correct += int((guesses == torch.tensor([colour for _, colour in chunk])).sum())
    model.train()
    return correct / len(items)


def main() -> None:
    parser = probe_parser(__doc__.split("\n\n")[0], steps=300, batch_size=8, lr=3e-3)
    parser.add_argument("--model", type=Path, required=True, help="a folder with vlm/ and sam2/ (benchmarks/miniature.py)")
    arguments = parser.parse_args()
    torch.manual_seed(arguments.seed)
    rng = random.Random(arguments.seed)
    config = PerceptioConfig(model=str(arguments.model / "vlm"), sam_model=str(arguments.model / "sam2"), tokenizer="",
                             train_language_model=True, use_depth_tokens=False, use_depth_recon=False)
    model = PerceptioModel.from_config(config)
    train, heldout = coloured_requests(arguments.shards), coloured_requests(arguments.heldout_shards)[: arguments.heldout]
    head = torch.nn.Linear(model.adapter.model.config.get_text_config().hidden_size, len(COLOUR_NAMES))
    trained = [param for param in model.adapter.model.parameters() if param.requires_grad] + list(head.parameters())
    optimizer = torch.optim.AdamW(trained, lr=arguments.lr)
    majority = max(sum(colour == index for _, colour in heldout) for index in range(len(COLOUR_NAMES))) / len(heldout)
    curve, started = [{"step": 0, "heldout_accuracy": accuracy(model, head, heldout)}], time.perf_counter()
    print(f"{len(train)} training and {len(heldout)} held-out expressions with a colour; majority colour {majority:.3f}")
    for step in range(1, arguments.steps + 1):
        items = rng.sample(train, arguments.batch_size)
        loss = F.cross_entropy(head(seg_states(model, items)), torch.tensor([colour for _, colour in items]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == arguments.steps:
            curve.append({"step": step, "heldout_accuracy": accuracy(model, head, heldout)})
            print(f"step {step}: held-out colour accuracy {curve[-1]['heldout_accuracy']:.3f} "
                  f"({time.perf_counter() - started:.0f} s)", flush=True)
    write_record(arguments, majority=majority, curve=curve)


if __name__ == "__main__":
    main()
