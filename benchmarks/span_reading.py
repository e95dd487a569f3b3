"""Can a language model of the miniature's size learn to read a depth span? A direct probe.

A marked-point question is answered through its depth span only if, after writing the 100 tokens,
the model looks up the tokens of the marked cells and names the nearest. This benchmark isolates
that lookup: a language model with the miniature's dimensions, from random weights, reads text
made of the marks' cells ("A 3 5", letter row column on the 10 x 10 token grid), the true span of
the picture and a query, and is trained on the answer letter alone. Training questions are drawn
afresh at every step (2-5 random cells of a training picture, the nearest by the span's decoded
depth, nearer than the next by ``--min-gap``), so the answer is always in the span. Scored on
held-out pictures, on such questions and on the curated questions (answers from the true depth),
beside (a), the answer the decoded span gives those questions. ``--curated-training`` trains on the
training pictures' curated questions instead, as the fine-tuning does (a fixed set): ``truth``
answered by the true depth, which the span agrees with only as often as (a); ``span`` by the span.
``--training-cells objects`` keeps fresh questions but draws their cells from those the curated
questions mark (on objects). ``--filler-tokens N`` puts N random tokens before each question, as
the fine-tuned model has its 100 image tokens and the prompt before the marks and the span::

    python benchmarks/span_reading.py --shards ablation-out/shards/ade20k \\
        --heldout-shards HELDOUT/ade20k --tokenizer ablation-out/tokenizer --steps 3000
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import Qwen2Config, Qwen2ForCausalLM

from miniature import MINIATURE
from perceptio.shards import iter_shard, list_shards
from perceptio.tokenize.vqvae import DepthVQVAE
from perceptio.train.data import token_grid_nearness
from perceptio.train.miniature import GRID, grid_cell  # the depth tokens' grid is the image tokens' 10 x 10
from probes import probe_parser, write_record

LETTERS = "ABCDE"
# The probe's own vocabulary: the codes, then the span markers, letters, digits, query and padding.
D_START, D_END, QUERY, PAD = 0, 1, 2, 3
LETTER_IDS = 4
DIGIT_IDS = LETTER_IDS + len(LETTERS)
CODE_IDS = DIGIT_IDS + 10
FILLERS = 64  # --filler-tokens draws from this many ids after the codes


@dataclass(frozen=True)
class Picture:
    codes: list[int]  # the picture's 100 ground-truth depth tokens
    nearness: np.ndarray  # (100,) the decoded span's mean normalised inverse depth per cell (near = +1)
    questions: list[tuple[list[int], list[str], str]]  # curated questions: cells, letters, answer

    @property
    def object_cells(self) -> list[int]:
        """The cells the curated questions mark (every one on an object)."""
        return sorted({cell for cells, _, _ in self.questions for cell in cells})


def read_pictures(folder: Path, tokenizer: DepthVQVAE) -> list[Picture]:
    """The ADE-layout samples of a shard folder with their spans decoded once."""
    samples = [sample for shard in list_shards(folder) for sample in iter_shard(shard.path)
               if sample.depth_tokens is not None and sample.meta.get("questions")]
    with torch.no_grad():
        decoded = tokenizer.decode(torch.as_tensor(np.stack([s.depth_tokens for s in samples]), dtype=torch.long)).numpy()
    pictures = []
    for sample, depth in zip(samples, decoded):
        nearness = token_grid_nearness(depth, GRID * GRID).reshape(-1)
        width, height = sample.meta["width"], sample.meta["height"]
        questions = [([grid_cell(point, (width, height)) for point in q["points"]], q["labels"], q["answer"])
                     for q in sample.meta["questions"]]
        pictures.append(Picture([int(code) for code in sample.depth_tokens], nearness, questions))
    return pictures


def sequence(picture: Picture, cells: list[int], letters: list[str]) -> list[int]:
    """The marks' cells, the span, the query: the letter is predicted at the last position."""
    marks = [token for cell, letter in zip(cells, letters)
             for token in (LETTER_IDS + LETTERS.index(letter), DIGIT_IDS + cell // GRID, DIGIT_IDS + cell % GRID)]
    return [*marks, D_START, *(CODE_IDS + code for code in picture.codes), D_END, QUERY]


def span_question(picture: Picture, rng: random.Random, min_gap: float,
                  on_objects: bool = False) -> tuple[list[int], int, int] | None:
    """2-5 random cells (``on_objects``: of the picture's :attr:`Picture.object_cells`), the answer the
    span gives (None when its nearest is not clear)."""
    pool = picture.object_cells if on_objects else range(GRID * GRID)
    count = min(rng.randint(2, len(LETTERS)), len(pool))
    if count < 2:
        return None
    cells = rng.sample(pool, count)
    values = np.sort(picture.nearness[cells])
    if values[-1] - values[-2] < min_gap:
        return None
    return sequence(picture, cells, list(LETTERS[:count])), int(np.argmax(picture.nearness[cells])), count


def curated_questions(pictures: list[Picture], span_answers: bool = False) -> tuple[list[tuple[list[int], int, int]], float]:
    """The curated questions as probe items, and how often the decoded span names their answer ((a));
    ``span_answers``: each item answered by the decoded span instead of the true depth."""
    items, span_right = [], []
    for picture in pictures:
        for cells, letters, answer in picture.questions:
            by_span = int(np.argmax(picture.nearness[cells]))
            items.append((sequence(picture, cells, letters), by_span if span_answers else letters.index(answer), len(letters)))
            span_right.append(letters[by_span] == answer)
    return items, float(np.mean(span_right))


def with_filler(items: list[tuple[list[int], int, int]], count: int, first_id: int,
                rng: random.Random) -> list[tuple[list[int], int, int]]:
    """Each item after ``count`` random filler tokens (ids ``first_id`` .. ``first_id + FILLERS - 1``)."""
    return [([first_id + rng.randrange(FILLERS) for _ in range(count)] + ids, answer, points) for ids, answer, points in items]


def batch(items: list[tuple[list[int], int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and attention mask, so that every sequence ends at the last position."""
    length = max(len(ids) for ids, _, _ in items)
    ids = torch.full((len(items), length), PAD)
    mask = torch.zeros((len(items), length), dtype=torch.long)
    for row, (tokens, _, _) in enumerate(items):
        ids[row, length - len(tokens):] = torch.tensor(tokens)
        mask[row, length - len(tokens):] = 1
    return ids, mask


def letter_logits(model: Qwen2ForCausalLM, items: list[tuple[list[int], int, int]]) -> torch.Tensor:
    """The letters' logits at the last position, letters beyond each question's count ruled out."""
    ids, mask = batch(items)
    logits = model(input_ids=ids, attention_mask=mask).logits[:, -1, LETTER_IDS:DIGIT_IDS]
    counts = torch.tensor([count for _, _, count in items])
    return logits.masked_fill(torch.arange(len(LETTERS))[None] >= counts[:, None], float("-inf"))


def accuracy(model: Qwen2ForCausalLM, items: list[tuple[list[int], int, int]]) -> float:
    model.eval()
    with torch.no_grad():
        right = sum((letter_logits(model, items[start:start + 256]).argmax(1)
                     == torch.tensor([answer for _, answer, _ in items[start:start + 256]])).sum().item()
                    for start in range(0, len(items), 256))
    model.train()
    return right / len(items)


def main() -> None:
    parser = probe_parser(__doc__.split("\n\n")[0], steps=3000, batch_size=64, lr=3e-3)
    parser.add_argument("--tokenizer", type=Path, required=True, help="the depth tokenizer the shards were curated with")
    parser.add_argument("--min-gap", type=float, default=0.05, help="training questions: nearest minus next, decoded nearness")
    parser.add_argument("--text-layers", type=int, default=MINIATURE.text_layers)
    parser.add_argument("--training-cells", choices=("any", "objects"), default="any",
                        help="fresh training questions on any cells, or only on cells the curated questions mark")
    parser.add_argument("--curated-training", choices=("truth", "span"),
                        help="train on the training pictures' curated questions, not fresh span questions, "
                             "answered by the true depth (as curated) or by the decoded span")
    parser.add_argument("--filler-tokens", type=int, default=0,
                        help="random tokens before each question (the fine-tuning's image tokens and prompt)")
    arguments = parser.parse_args()
    torch.manual_seed(arguments.seed)
    rng = random.Random(arguments.seed)
    tokenizer = DepthVQVAE.from_pretrained(arguments.tokenizer)
    train, heldout = read_pictures(arguments.shards, tokenizer), read_pictures(arguments.heldout_shards, tokenizer)
    scored_rng = random.Random(arguments.seed + 1)
    span_heldout = [item for item in (span_question(picture, scored_rng, arguments.min_gap) for picture in heldout
                                      for _ in range(8)) if item is not None][: arguments.heldout * 4]
    curated, span_answers = curated_questions(heldout)
    curated_training = curated_questions(train, arguments.curated_training == "span")[0] if arguments.curated_training else []
    filler_id = CODE_IDS + tokenizer.config.num_codes
    span_heldout, curated = (with_filler(items, arguments.filler_tokens, filler_id, scored_rng) for items in (span_heldout, curated))
    chance = float(np.mean([1 / count for _, _, count in curated]))
    config = Qwen2Config(vocab_size=filler_id + FILLERS, hidden_size=MINIATURE.text_width,
                         intermediate_size=2 * MINIATURE.text_width, num_hidden_layers=arguments.text_layers,
                         num_attention_heads=MINIATURE.text_heads, num_key_value_heads=MINIATURE.text_kv_heads,
                         max_position_embeddings=256 + arguments.filler_tokens, tie_word_embeddings=False)
    model = Qwen2ForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=arguments.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, arguments.lr, total_steps=arguments.steps, pct_start=0.05)
    print(f"{len(train)} training and {len(heldout)} held-out pictures; {len(curated)} curated held-out questions "
          f"(chance {chance:.3f}, decoded span (a) {span_answers:.3f})", flush=True)
    curve, started = [], time.perf_counter()
    for step in range(1, arguments.steps + 1):
        items = rng.sample(curated_training, arguments.batch_size) if curated_training else []
        while len(items) < arguments.batch_size:
            item = span_question(rng.choice(train), rng, arguments.min_gap, arguments.training_cells == "objects")
            if item is not None:
                items.append(item)
        items = with_filler(items, arguments.filler_tokens, filler_id, rng)
        loss = F.cross_entropy(letter_logits(model, items), torch.tensor([answer for _, answer, _ in items]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 250 == 0 or step == arguments.steps:
            curve.append({"step": step, "span_questions": accuracy(model, span_heldout),
                          "curated_questions": accuracy(model, curated)})
            print(f"step {step}: held-out span questions {curve[-1]['span_questions']:.3f}, curated questions "
                  f"{curve[-1]['curated_questions']:.3f} ({time.perf_counter() - started:.0f} s)", flush=True)
    write_record(arguments, chance=chance, decoded_span=span_answers, curve=curve)


if __name__ == "__main__":
    main()
