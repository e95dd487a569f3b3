"""How long does the miniature's language model take to learn to look up a span code by its cell?

The lookup a marked-point question needs through its depth span, at its barest: a span of
``--cells`` random codes, each carrying a learned vector of its cell (``span_reading.py
--cell-embeddings``), 1-5 marks before it carrying the vectors of their cells, and after the query
each mark's letter followed by the code at its cell, which the model is trained to write. The codes
are drawn uniformly and independently, so a cell next to the right one gives no credit (a depth
span's neighbouring codes are alike): the score is the share of exact codes written on a fixed
held-out set (chance 1 / ``--codes``). Run once per grid size to see how the steps the lookup needs
grow with the number of cells a mark can sit on (the depth span has 100), and whether a curriculum
of shorter spans (``--short-spans``: fewer cells compete for each mark, every cell's vector is
still used) gets the full span's lookup started::

    python benchmarks/cell_lookup.py --cells 16 --steps 1500
    python benchmarks/cell_lookup.py --cells 100 --steps 6000 --out lookup-100.json
    python benchmarks/cell_lookup.py --cells 100 --steps 3000 --text-kv-heads 4 --short-spans 16:1000,36:1000
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import Qwen2Config, Qwen2ForCausalLM

from miniature import MINIATURE
from probes import parse_schedule, span_length_at, write_record
from span_reading import CellEmbeddings

LETTERS = 5


def vocabulary(codes: int) -> tuple[int, int, int]:
    """The first letter's id, the span start's and the query's: codes come first (ids 0 .. codes - 1)."""
    return codes, codes + LETTERS, codes + LETTERS + 1


def lookup_batch(rng: random.Random, size: int, cells: int, marks: int, codes: int,
                 span_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``size`` sequences ``marks.. D_START span.. QUERY (letter code)..``, the cell of each token (-1
    where none: the span start, the query, the readouts) and each mark's code (size, marks).
    ``span_length`` (below ``cells``): a shorter span, of that many cells drawn afresh per sequence
    (in grid order), so that fewer cells compete for each mark while every cell's vector is used."""
    first_letter, d_start, query = vocabulary(codes)
    ids, token_cells, targets = [], [], []
    for _ in range(size):
        span_cells = sorted(rng.sample(range(cells), span_length)) if span_length and span_length < cells else range(cells)
        span = [rng.randrange(codes) for _ in span_cells]
        marked = rng.sample(range(len(span_cells)), marks)  # indices into the span
        readouts = [token for mark, index in enumerate(marked) for token in (first_letter + mark, span[index])]
        ids.append([first_letter + mark for mark in range(marks)] + [d_start, *span, query, *readouts])
        token_cells.append([*(span_cells[index] for index in marked), -1, *span_cells, -1] + [-1] * len(readouts))
        targets.append([span[index] for index in marked])
    return torch.tensor(ids), torch.tensor(token_cells), torch.tensor(targets)


def readout_logits(model: Qwen2ForCausalLM, cell_embeddings: CellEmbeddings, ids: torch.Tensor,
                   token_cells: torch.Tensor, marks: int, codes: int) -> torch.Tensor:
    """The codes' logits (B, marks, codes) where each readout code is predicted: at its letter."""
    embeddings = cell_embeddings(model.get_input_embeddings()(ids), token_cells)
    logits = model(inputs_embeds=embeddings).logits
    letters = [ids.shape[1] - 2 * (marks - mark) for mark in range(marks)]
    return logits[:, letters, :codes]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", type=int, default=100, help="cells a mark can sit on (the span's length)")
    parser.add_argument("--marks", type=int, default=1, help="marks per sequence, each read out")
    parser.add_argument("--codes", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--text-layers", type=int, default=4)
    parser.add_argument("--text-kv-heads", type=int, default=MINIATURE.text_kv_heads,
                        help=f"key-value heads (the miniature shares {MINIATURE.text_kv_heads} among its {MINIATURE.text_heads} query heads)")
    parser.add_argument("--text-width", type=int, default=MINIATURE.text_width)
    parser.add_argument("--heldout", type=int, default=512, help="held-out sequences scored")
    parser.add_argument("--every", type=int, default=250, help="score every N steps")
    parser.add_argument("--short-spans", type=parse_schedule, default=[],
                        help="a curriculum: span lengths and their steps before the full span, e.g. 16:500,36:500 "
                             "(each a random subset of the cells; scored on full spans throughout)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the curve as JSON here")
    arguments = parser.parse_args()
    shortest = min([arguments.cells] + [length for length, _ in arguments.short_spans])
    if not 1 <= arguments.marks <= min(LETTERS, shortest):
        parser.error(f"--marks must be 1..{min(LETTERS, shortest)}")
    torch.manual_seed(arguments.seed)
    rng = random.Random(arguments.seed)
    config = Qwen2Config(vocab_size=arguments.codes + LETTERS + 2, hidden_size=arguments.text_width,
                         intermediate_size=2 * arguments.text_width, num_hidden_layers=arguments.text_layers,
                         num_attention_heads=MINIATURE.text_heads, num_key_value_heads=arguments.text_kv_heads,
                         max_position_embeddings=arguments.cells + 3 * LETTERS + 2, tie_word_embeddings=False)
    model = Qwen2ForCausalLM(config)
    cell_embeddings = CellEmbeddings(config.hidden_size, config.initializer_range, arguments.cells)
    optimizer = torch.optim.AdamW([*model.parameters(), *cell_embeddings.parameters()], lr=arguments.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, arguments.lr, total_steps=arguments.steps, pct_start=0.05)
    shape = (arguments.cells, arguments.marks, arguments.codes)
    heldout = lookup_batch(random.Random(arguments.seed + 1), arguments.heldout, *shape)
    curve, learnt_at, started = [], None, time.perf_counter()
    for step in range(1, arguments.steps + 1):
        ids, token_cells, targets = lookup_batch(rng, arguments.batch_size, *shape, span_length_at(step, arguments.short_spans))
        logits = readout_logits(model, cell_embeddings, ids, token_cells, arguments.marks, arguments.codes)
        loss = F.cross_entropy(logits.reshape(-1, arguments.codes), targets.reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % arguments.every == 0 or step == arguments.steps:
            model.eval()
            with torch.no_grad():
                ids, token_cells, targets = heldout
                chosen = readout_logits(model, cell_embeddings, ids, token_cells, arguments.marks, arguments.codes).argmax(-1)
            model.train()
            right = (chosen == targets).float().mean().item()
            learnt_at = learnt_at or (step if right >= 0.5 else None)
            curve.append({"step": step, "training_loss": loss.item(), "heldout_codes_right": right})
            print(f"step {step}: loss {loss.item():.3f}, held-out codes right {right:.3f} "
                  f"({time.perf_counter() - started:.0f} s)", flush=True)
    print(f"{arguments.cells} cells: " + (f"half the held-out codes right by step {learnt_at}" if learnt_at
                                          else f"not half the held-out codes right in {arguments.steps} steps"))
    write_record(arguments, chance=1 / arguments.codes, learnt_at=learnt_at, curve=curve)


if __name__ == "__main__":
    main()
