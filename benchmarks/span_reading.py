"""Can a language model of the miniature's size learn to read a depth span? A direct probe.

A marked-point question is answered through its depth span only if, after writing the 100 tokens,
the model looks up the tokens of the marked cells and names the nearest. This benchmark isolates
that lookup: a language model with the miniature's dimensions, from random weights, reads text
made of the marks' cells ("A 3 5", letter row column on the 10 x 10 token grid), the true span of
the picture and a query, and is trained on the answer letter alone. Training questions are drawn
afresh at every step (2-5 random cells of a training picture, the nearest by the span's decoded
depth, nearer than the next by ``--min-gap``), so the answer is always in the span. Scored on
held-out pictures, on such questions and on the curated questions (answers from the true depth),
beside (a), the answer the decoded span gives those questions, and on *swapped* questions: the
marked cells' codes shuffled among them (``perceptio-train --reading-swaps``), so that the marks'
rows and columns, or the codes around a mark, name the answer only by chance and only the lookup of
the exact cells answers (``--training-swaps`` trains on such questions). ``--curated-training`` trains on the
training pictures' curated questions instead, as the fine-tuning does (a fixed set): ``truth``
answered by the true depth, which the span agrees with only as often as (a); ``span`` by the span.
``--training-cells objects`` keeps fresh questions but draws their cells from those the curated
questions mark (on objects). ``--filler-tokens N`` puts N random tokens before each question, as
the fine-tuned model has its 100 image tokens and the prompt before the marks and the span;
``--bare-steps K`` trains the first K steps without them (a warm-up; scores always have them).
``--marks grid`` gives the marks as a picture's tokens would hold them, one token per cell in the
span's order (the letter or a blank), with the filler between them and the span where the prompt sits
(``--filler-jitter``: a prompt of varying length); with ``--cell-embeddings`` each of those 100
tokens carries its cell's vector, as ``perceptio-train --cell-embeddings`` gives every image token.
``--code-rows mean`` starts the codes' input rows as ``perceptio-train`` starts a fine-tuned model's
new tokens by default (transformers' mean resizing: all one vector), ``spread`` as its
``--new-token-init spread`` does; the probe's own default draws them at random like every other row.
``--cell-embeddings`` adds a learned vector per grid cell to each span code and to the marks on
that cell (``--short-spans``: a curriculum in which only some of the span's cells are visible,
fewer competing for each mark, as ``cell_lookup.py`` measures it); ``--readouts`` has the model
write, after the query, each mark's letter and the span's code at its cell before the letter
(trained on both; scored greedily), as ``perceptio-train --mark-readouts`` does::

    python benchmarks/span_reading.py --shards ablation-out/shards/ade20k \\
        --heldout-shards HELDOUT/ade20k --tokenizer ablation-out/tokenizer --steps 3000

The recipe that learns the lookup (scored on swapped questions; README "The lookup learnt")::

    python benchmarks/span_reading.py --shards ablation-out/shards/ade20k \\
        --heldout-shards HELDOUT/ade20k --tokenizer ablation-out/tokenizer --steps 3000 --text-layers 4 \\
        --readouts --cell-embeddings --training-swaps 1 --text-kv-heads 4 --short-spans 16:1000,36:1000 --lr 1e-3
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
from perceptio.train.model import init_new_token_rows
from probes import parse_schedule, probe_parser, span_length_at, write_record

LETTERS = "ABCDE"
# The probe's own vocabulary: the codes, then the span markers, letters, digits, query and padding.
D_START, D_END, QUERY, PAD = 0, 1, 2, 3
# A cell without a mark (``--marks grid``): the padding token's row, which padding itself never lends
# to attention (it is masked), so that every earlier probe keeps its vocabulary and its runs.
BLANK = PAD
LETTER_IDS = 4
DIGIT_IDS = LETTER_IDS + len(LETTERS)
CODE_IDS = DIGIT_IDS + 10
FILLERS = 64  # --filler-tokens draws from this many ids after the codes
# --short-spans: a span code hidden from attention; :func:`batch` turns it into masked padding, so no
# vocabulary row is added and every earlier probe keeps its runs.
HIDDEN = -1


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


def sequence(picture: Picture, cells: list[int], letters: list[str], codes: list[int | None] | None = None,
             grid: bool = False) -> list[int]:
    """The marks' cells, the span (``codes``, the picture's by default), the query: the letter is
    predicted at the last position. ``grid``: the marks as a picture's tokens would hold them, one
    token per cell in the span's order (the mark's letter, or BLANK), instead of named cells."""
    if grid:
        marks = [BLANK] * (GRID * GRID)
        for cell, letter in zip(cells, letters):
            marks[cell] = LETTER_IDS + LETTERS.index(letter)
    else:
        marks = [token for cell, letter in zip(cells, letters)
                 for token in (LETTER_IDS + LETTERS.index(letter), DIGIT_IDS + cell // GRID, DIGIT_IDS + cell % GRID)]
    span = (HIDDEN if code is None else CODE_IDS + code for code in codes or picture.codes)
    return [*marks, D_START, *span, D_END, QUERY]


def span_question(picture: Picture, rng: random.Random, min_gap: float, on_objects: bool = False,
                  swapped: bool = False, grid: bool = False,
                  visible: int | None = None) -> tuple[list[int], int, int] | None:
    """2-5 random cells (``on_objects``: of the picture's :attr:`Picture.object_cells`), the answer the
    span gives (None when its nearest is not clear). ``swapped``: the codes of the marked cells are
    shuffled among them, as ``perceptio-train --reading-swaps`` shuffles them, and the answer follows
    its code: the marks' rows and columns then name it only by chance, only the lookup does.
    ``visible`` (``--short-spans``): only that many random cells of the span keep their code, the
    others are hidden (:data:`HIDDEN`, masked from attention), and the marks sit on visible cells:
    fewer cells compete for each mark, each in its place."""
    pool = picture.object_cells if on_objects else range(GRID * GRID)
    # Drawn only when asked for: questions without a short span keep their draws.
    shown = set(rng.sample(range(GRID * GRID), visible)) if visible is not None and visible < GRID * GRID else None
    if shown is not None:
        pool = [cell for cell in pool if cell in shown]
    count = min(rng.randint(2, len(LETTERS)), len(pool))
    if count < 2:
        return None
    cells = rng.sample(pool, count)
    values = np.sort(picture.nearness[cells])
    if values[-1] - values[-2] < min_gap:
        return None
    sources = rng.sample(cells, count) if swapped else cells  # the cell whose code each marked cell holds
    codes = list(picture.codes)
    for cell, source in zip(cells, sources):
        codes[cell] = picture.codes[source]
    if shown is not None:
        codes = [code if cell in shown else None for cell, code in enumerate(codes)]
    return sequence(picture, cells, list(LETTERS[:count]), codes, grid), int(np.argmax(picture.nearness[sources])), count


def curated_questions(pictures: list[Picture], span_answers: bool = False,
                      grid: bool = False) -> tuple[list[tuple[list[int], int, int]], float]:
    """The curated questions as probe items, and how often the decoded span names their answer ((a));
    ``span_answers``: each item answered by the decoded span instead of the true depth."""
    items, span_right = [], []
    for picture in pictures:
        for cells, letters, answer in picture.questions:
            by_span = int(np.argmax(picture.nearness[cells]))
            items.append((sequence(picture, cells, letters, grid=grid), by_span if span_answers else letters.index(answer), len(letters)))
            span_right.append(letters[by_span] == answer)
    return items, float(np.mean(span_right))


def with_filler(items: list[tuple[list[int], int, int]], count: int, first_id: int,
                rng: random.Random, jitter: int = 0, grid: bool = False) -> list[tuple[list[int], int, int]]:
    """Each item with ``count`` (plus 0..``jitter``) random filler tokens (ids ``first_id`` ..
    ``first_id + FILLERS - 1``) before its span: in front of a question that names its marks' cells,
    between the marks and the span when they are a grid (where a picture's prompt sits)."""
    padded, at = [], GRID * GRID if grid else 0
    for ids, answer, points in items:
        filler = [first_id + rng.randrange(FILLERS) for _ in range(count + (rng.randint(0, jitter) if jitter else 0))]
        padded.append((ids[:at] + filler + ids[at:], answer, points))
    return padded


def is_grid(tokens: list[int]) -> bool:
    """Whether a question holds its marks as a grid (``--marks grid``): its first 100 tokens are all
    letters or blanks (a question naming cells has digits and the span among them)."""
    return len(tokens) > GRID * GRID and all(token == BLANK or LETTER_IDS <= token < DIGIT_IDS for token in tokens[:GRID * GRID])


def marks_of(tokens: list[int]) -> list[tuple[int, int]]:
    """Each mark's letter id and cell, in the order the question lists them (by letter on a grid)."""
    if is_grid(tokens):
        return sorted((token, cell) for cell, token in enumerate(tokens[:GRID * GRID]) if token != BLANK)
    start, marks = tokens.index(D_START), []
    for first in range(start - 3, -1, -3):
        if not LETTER_IDS <= tokens[first] < DIGIT_IDS:
            break
        marks.insert(0, (tokens[first], (tokens[first + 1] - DIGIT_IDS) * GRID + tokens[first + 2] - DIGIT_IDS))
    return marks


def token_cells(tokens: list[int]) -> list[int]:
    """The grid cell each token stands for: a span code its own, each of a mark's three tokens the
    mark's, on a grid each of the first 100 tokens its own (as every image token gets its cell's
    vector in the trainer); -1 for the rest (filler, span markers, query, readouts)."""
    cells = [-1] * len(tokens)
    start = tokens.index(D_START)
    cells[start + 1:start + 1 + GRID * GRID] = range(GRID * GRID)
    if is_grid(tokens):
        cells[:GRID * GRID] = range(GRID * GRID)
        return cells
    marks = marks_of(tokens)
    for index, (_, cell) in enumerate(marks):
        first = start - 3 * (len(marks) - index)
        cells[first:first + 3] = [cell] * 3
    return cells


def readouts(tokens: list[int]) -> list[int]:
    """``--readouts``: what the model writes after the query before its letter, each mark's letter and
    the span's code at its cell ("A <code> B <code> ...")."""
    start = tokens.index(D_START)
    return [token for letter, cell in marks_of(tokens) for token in (letter, tokens[start + 1 + cell])]


def batch(items: list[tuple[list[int], int, int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded ids, attention mask and cells (:func:`token_cells`), so that every sequence ends at
    the last position; hidden codes (:data:`HIDDEN`, ``--short-spans``) are masked padding."""
    length = max(len(ids) for ids, _, _ in items)
    ids = torch.full((len(items), length), PAD)
    mask = torch.zeros((len(items), length), dtype=torch.long)
    cells = torch.full((len(items), length), -1)
    for row, (tokens, _, _) in enumerate(items):
        ids[row, length - len(tokens):] = torch.tensor(tokens)
        mask[row, length - len(tokens):] = 1
        cells[row, length - len(tokens):] = torch.tensor(token_cells(tokens))
    hidden = ids == HIDDEN
    ids[hidden], mask[hidden] = PAD, 0
    return ids, mask, cells


class CellEmbeddings(torch.nn.Module):
    """``--cell-embeddings``: one learned vector per grid cell, added to the span code of that cell
    and to the tokens of a mark on it, so that "the same cell" is matched by content, not found by
    counting rotary positions."""

    def __init__(self, width: int, std: float, cells: int = GRID * GRID) -> None:
        super().__init__()
        self.table = torch.nn.Embedding(cells, width)
        # As small as the token rows they are added to (the model's initializer range): torch's default
        # N(0, 1) would be 50 times larger and drown which code a position holds.
        torch.nn.init.normal_(self.table.weight, std=std)

    def forward(self, embeddings: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
        return embeddings + self.table(cells.clamp(min=0)) * (cells >= 0).unsqueeze(-1)


def asked_letters(logits: torch.Tensor, items: list[tuple[list[int], int, int]]) -> torch.Tensor:
    """The letters' logits (B, 5), letters beyond each question's count ruled out."""
    counts = torch.tensor([count for _, _, count in items])
    return logits.masked_fill(torch.arange(len(LETTERS))[None] >= counts[:, None], float("-inf"))


def forward_logits(model: Qwen2ForCausalLM, sequences: list[list[int]],
                   cell_embeddings: CellEmbeddings | None) -> torch.Tensor:
    """Logits (B, T, V) of left-padded sequences."""
    ids, mask, cells = batch([(tokens, 0, 0) for tokens in sequences])
    embeddings = model.get_input_embeddings()(ids)
    if cell_embeddings is not None:
        embeddings = cell_embeddings(embeddings, cells)
    return model(inputs_embeds=embeddings, attention_mask=mask).logits


def letter_logits(model: Qwen2ForCausalLM, items: list[tuple[list[int], int, int]],
                  cell_embeddings: CellEmbeddings | None = None) -> torch.Tensor:
    """The letters' logits at the last position, letters beyond each question's count ruled out."""
    logits = forward_logits(model, [ids for ids, _, _ in items], cell_embeddings)
    return asked_letters(logits[:, -1, LETTER_IDS:DIGIT_IDS], items)


def readout_loss(model: Qwen2ForCausalLM, items: list[tuple[list[int], int, int]],
                 cell_embeddings: CellEmbeddings | None, num_codes: int, token_mean: bool = False) -> torch.Tensor:
    """Cross-entropy of the readout codes (teacher-forced) plus that of the letter after them;
    ``token_mean``: one mean over every code and letter, each token weighing the same (as L_LLM weighs
    a fine-tuned answer's tokens, where the letter is one among its readouts)."""
    sequences = [ids + readouts(ids) for ids, _, _ in items]
    logits = forward_logits(model, sequences, cell_embeddings)
    width = logits.shape[1]
    rows, positions, targets = [], [], []
    for row, (ids, _, _) in enumerate(items):
        count = (len(sequences[row]) - len(ids)) // 2  # marks read out (on a grid, two in one cell are one)
        for mark in range(count):
            # The code is predicted at its letter, which sits 2 * (count - mark) from the end.
            rows.append(row)
            positions.append(width - 2 * (count - mark))
            targets.append(sequences[row][len(ids) + 2 * mark + 1] - CODE_IDS)
    code_terms = F.cross_entropy(logits[rows, positions, CODE_IDS:CODE_IDS + num_codes], torch.tensor(targets), reduction="none")
    letters = asked_letters(logits[:, -1, LETTER_IDS:DIGIT_IDS], items)
    letter_terms = F.cross_entropy(letters, torch.tensor([answer for _, answer, _ in items]), reduction="none")
    return torch.cat([code_terms, letter_terms]).mean() if token_mean else code_terms.mean() + letter_terms.mean()


def answer_with_readouts(model: Qwen2ForCausalLM, items: list[tuple[list[int], int, int]],
                         cell_embeddings: CellEmbeddings | None, num_codes: int) -> tuple[torch.Tensor, float]:
    """Greedy: each mark's code written after its letter, then the letter; the letters chosen and the
    share of readout codes equal to the span's."""
    sequences = [list(ids) for ids, _, _ in items]
    expected = [readouts(ids) for ids, _, _ in items]  # on a grid, two marks in one cell are read once
    right = total = 0
    for mark in range(max(len(tokens) // 2 for tokens in expected)):
        active = [row for row, tokens in enumerate(expected) if len(tokens) > 2 * mark]
        for row in active:
            sequences[row].append(expected[row][2 * mark])
        logits = forward_logits(model, [sequences[row] for row in active], cell_embeddings)
        for row, code in zip(active, logits[:, -1, CODE_IDS:CODE_IDS + num_codes].argmax(1).tolist()):
            truth = expected[row][2 * mark + 1] - CODE_IDS
            right, total = right + (code == truth), total + 1
            sequences[row].append(CODE_IDS + code)
    letters = asked_letters(forward_logits(model, sequences, cell_embeddings)[:, -1, LETTER_IDS:DIGIT_IDS], items)
    return letters.argmax(1), right / total


def accuracy(model: Qwen2ForCausalLM, items: list[tuple[list[int], int, int]],
             cell_embeddings: CellEmbeddings | None = None, num_codes: int | None = None) -> tuple[float, float | None]:
    """The share of letters right, and (with ``num_codes``: the readouts) of readout codes right."""
    model.eval()
    right, codes_right = 0, []
    with torch.no_grad():
        for start in range(0, len(items), 256):
            chunk = items[start:start + 256]
            if num_codes is None:
                chosen = letter_logits(model, chunk, cell_embeddings).argmax(1)
            else:
                chosen, code_share = answer_with_readouts(model, chunk, cell_embeddings, num_codes)
                codes_right.append(code_share)
            right += (chosen == torch.tensor([answer for _, answer, _ in chunk])).sum().item()
    model.train()
    return right / len(items), (float(np.mean(codes_right)) if codes_right else None)


def main() -> None:
    parser = probe_parser(__doc__.split("\n\n")[0], steps=3000, batch_size=64, lr=3e-3)
    parser.add_argument("--tokenizer", type=Path, required=True, help="the depth tokenizer the shards were curated with")
    parser.add_argument("--min-gap", type=float, default=0.05, help="training questions: nearest minus next, decoded nearness")
    parser.add_argument("--text-layers", type=int, default=MINIATURE.text_layers)
    parser.add_argument("--text-kv-heads", type=int, default=MINIATURE.text_kv_heads,
                        help=f"key-value heads (the miniature shares {MINIATURE.text_kv_heads} among its {MINIATURE.text_heads} query heads)")
    parser.add_argument("--training-cells", choices=("any", "objects"), default="any",
                        help="fresh training questions on any cells, or only on cells the curated questions mark")
    parser.add_argument("--curated-training", choices=("truth", "span"),
                        help="train on the training pictures' curated questions, not fresh span questions, "
                             "answered by the true depth (as curated) or by the decoded span")
    parser.add_argument("--training-swaps", type=float, default=0.0,
                        help="the share of fresh training questions asked with the marked cells' codes shuffled")
    parser.add_argument("--marks", choices=("cells", "grid"), default="cells",
                        help="the marks named by their cells before the span (A 3 7), or as a picture's tokens hold "
                             "them: 100 tokens in the span's order, each a mark's letter or blank (then the filler "
                             "goes between them and the span, where a picture's prompt sits)")
    parser.add_argument("--filler-jitter", type=int, default=0,
                        help="0..N more filler tokens, drawn per question (a prompt of varying length)")
    parser.add_argument("--filler-tokens", type=int, default=0,
                        help="random tokens before each question (the fine-tuning's image tokens and prompt)")
    parser.add_argument("--bare-steps", type=int, default=0,
                        help="a warm-up: the first N steps train without the filler tokens (scores keep them)")
    parser.add_argument("--code-rows", choices=("random", "spread", "mean"), default="random",
                        help="how the codes' input rows start: at random as every row, or as perceptio-train "
                             "--new-token-init starts new tokens (around, or at, the mean of the rows before them)")
    parser.add_argument("--cell-embeddings", action="store_true",
                        help="add a learned vector per grid cell to its span code and to the marks on it")
    parser.add_argument("--readouts", action="store_true",
                        help="after the query, write each mark's letter and its cell's code, then the letter")
    parser.add_argument("--short-spans", type=parse_schedule, default=[],
                        help="a curriculum for fresh training questions: how many of the span's cells stay visible "
                             "(the rest masked, the marks on visible ones) and for how many steps, e.g. 16:1000,36:1000, "
                             "before the whole span (scores always read whole spans)")
    parser.add_argument("--token-mean", action="store_true",
                        help="--readouts: one mean over codes and letters (the letter weighs as one token, as in L_LLM)")
    arguments = parser.parse_args()
    torch.manual_seed(arguments.seed)
    rng = random.Random(arguments.seed)
    tokenizer = DepthVQVAE.from_pretrained(arguments.tokenizer)
    train, heldout = read_pictures(arguments.shards, tokenizer), read_pictures(arguments.heldout_shards, tokenizer)
    scored_rng = random.Random(arguments.seed + 1)
    grid = arguments.marks == "grid"
    if arguments.short_spans and (arguments.curated_training or arguments.training_cells == "objects"
                                  or min(length for length, _ in arguments.short_spans) < len(LETTERS)):
        parser.error(f"--short-spans takes fresh questions on any cells, at least {len(LETTERS)} cells visible")
    span_heldout = [item for item in (span_question(picture, scored_rng, arguments.min_gap, grid=grid) for picture in heldout
                                      for _ in range(8)) if item is not None][: arguments.heldout * 4]
    swapped_heldout = [item for item in (span_question(picture, scored_rng, arguments.min_gap, swapped=True, grid=grid)
                                         for picture in heldout for _ in range(8)) if item is not None][: arguments.heldout * 4]
    curated, span_answers = curated_questions(heldout, grid=grid)
    curated_training = curated_questions(train, arguments.curated_training == "span", grid)[0] if arguments.curated_training else []
    filler_id = CODE_IDS + tokenizer.config.num_codes
    span_heldout, swapped_heldout, curated = (with_filler(items, arguments.filler_tokens, filler_id, scored_rng,
                                                          arguments.filler_jitter, grid)
                                              for items in (span_heldout, swapped_heldout, curated))
    chance = float(np.mean([1 / count for _, _, count in curated]))
    config = Qwen2Config(vocab_size=filler_id + FILLERS, hidden_size=MINIATURE.text_width,
                         intermediate_size=2 * MINIATURE.text_width, num_hidden_layers=arguments.text_layers,
                         num_attention_heads=MINIATURE.text_heads, num_key_value_heads=arguments.text_kv_heads,
                         max_position_embeddings=256 + GRID * GRID * grid + arguments.filler_tokens + arguments.filler_jitter, tie_word_embeddings=False)
    model = Qwen2ForCausalLM(config)
    if arguments.code_rows != "random":
        init_new_token_rows(model, range(CODE_IDS, CODE_IDS + tokenizer.config.num_codes), arguments.code_rows)
    cell_embeddings = CellEmbeddings(config.hidden_size, config.initializer_range) if arguments.cell_embeddings else None
    parameters = [*model.parameters(), *(cell_embeddings.parameters() if cell_embeddings else ())]
    optimizer = torch.optim.AdamW(parameters, lr=arguments.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, arguments.lr, total_steps=arguments.steps, pct_start=0.05)
    print(f"{len(train)} training and {len(heldout)} held-out pictures; {len(curated)} curated held-out questions "
          f"(chance {chance:.3f}, decoded span (a) {span_answers:.3f})", flush=True)
    curve, started = [], time.perf_counter()
    for step in range(1, arguments.steps + 1):
        items = rng.sample(curated_training, arguments.batch_size) if curated_training else []
        while len(items) < arguments.batch_size:
            item = span_question(rng.choice(train), rng, arguments.min_gap, arguments.training_cells == "objects",
                                 # drawn only when asked for: runs without swaps keep their questions
                                 swapped=arguments.training_swaps > 0 and rng.random() < arguments.training_swaps,
                                 grid=grid, visible=span_length_at(step, arguments.short_spans))
            if item is not None:
                items.append(item)
        bare = step <= arguments.bare_steps
        items = with_filler(items, 0 if bare else arguments.filler_tokens, filler_id, rng, 0 if bare else arguments.filler_jitter, grid)
        if arguments.readouts:
            loss = readout_loss(model, items, cell_embeddings, tokenizer.config.num_codes, arguments.token_mean)
        else:
            loss = F.cross_entropy(letter_logits(model, items, cell_embeddings), torch.tensor([answer for _, answer, _ in items]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 250 == 0 or step == arguments.steps:
            readout_codes = tokenizer.config.num_codes if arguments.readouts else None
            (span_right, span_codes), (swapped_right, _), (curated_right, _) = (
                accuracy(model, questions, cell_embeddings, readout_codes) for questions in (span_heldout, swapped_heldout, curated))
            curve.append({"step": step, "span_questions": span_right, "swapped_questions": swapped_right,
                          "curated_questions": curated_right, "readout_codes": span_codes})
            readout_note = f", readout codes {span_codes:.3f}" if span_codes is not None else ""
            print(f"step {step}: held-out span questions {span_right:.3f}, swapped {swapped_right:.3f}, curated questions "
                  f"{curated_right:.3f}{readout_note} ({time.perf_counter() - started:.0f} s)", flush=True)
    write_record(arguments, chance=chance, decoded_span=span_answers, curve=curve)


if __name__ == "__main__":
    main()
