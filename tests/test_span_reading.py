"""The span-reading probe (benchmarks/span_reading.py): its questions are answered by the span, its
sequences put the marks, the span and the query where the model reads them, and it scores (a)."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import Qwen2Config, Qwen2ForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from span_reading import (  # noqa: E402
    BLANK,
    CODE_IDS,
    D_END,
    D_START,
    DIGIT_IDS,
    FILLERS,
    LETTER_IDS,
    PAD,
    QUERY,
    HIDDEN,
    CellEmbeddings,
    Picture,
    answer_with_readouts,
    batch,
    curated_questions,
    letter_logits,
    marks_of,
    readout_loss,
    readouts,
    span_question,
    token_cells,
    with_filler,
)


def picture(seed: int) -> Picture:
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 128, 100).tolist()
    # A cell's nearness follows its code, so that every answer can be checked from the codes alone.
    return Picture(codes, np.array(codes, dtype=np.float32) / 127, [([12, 57, 90], ["A", "B", "C"], "B")])


def test_a_span_question_is_answered_by_the_span_at_its_cells():
    rng, seen = random.Random(0), 0
    for seed in range(40):
        drawn = picture(seed)
        item = span_question(drawn, rng, min_gap=0.05)
        if item is None:
            continue
        seen += 1
        ids, answer, count = item
        assert len(ids) == 3 * count + 103 and 2 <= count <= 5
        marks, span = ids[: 3 * count], ids[3 * count:]
        assert span[0] == D_START and span[101] == D_END and span[102] == QUERY
        assert [code - CODE_IDS for code in span[1:101]] == drawn.codes
        letters = [marks[3 * k] - LETTER_IDS for k in range(count)]
        cells = [(marks[3 * k + 1] - DIGIT_IDS) * 10 + marks[3 * k + 2] - DIGIT_IDS for k in range(count)]
        assert letters == list(range(count)) and len(set(cells)) == count
        values = [drawn.nearness[cell] for cell in cells]
        assert answer == int(np.argmax(values)) and sorted(values)[-1] - sorted(values)[-2] >= 0.05
    assert seen > 20


def test_a_swapped_question_is_answered_by_the_codes_its_marked_cells_now_hold():
    rng, seen = random.Random(3), 0
    for seed in range(40):
        drawn = picture(seed)
        item = span_question(drawn, rng, min_gap=0.05, swapped=True)
        if item is None:
            continue
        seen += 1
        ids, answer, count = item
        marks, codes = ids[: 3 * count], [code - CODE_IDS for code in ids[3 * count + 1: 3 * count + 101]]
        cells = [(marks[3 * k + 1] - DIGIT_IDS) * 10 + marks[3 * k + 2] - DIGIT_IDS for k in range(count)]
        # The marked cells' codes are shuffled among them; every other cell keeps its own.
        assert sorted(codes[cell] for cell in cells) == sorted(drawn.codes[cell] for cell in cells)
        assert all(codes[cell] == drawn.codes[cell] for cell in range(100) if cell not in cells)
        # In this test picture a code's nearness is code / 127: the answer is the largest code held.
        assert answer == int(np.argmax([codes[cell] for cell in cells]))
    assert seen > 20


def test_a_short_span_shows_only_some_cells_puts_the_marks_on_them_and_masks_the_rest():
    rng, seen = random.Random(4), 0
    for seed in range(40):
        drawn = picture(seed)
        item = span_question(drawn, rng, min_gap=0.05, swapped=True, visible=16)
        if item is None:
            continue
        seen += 1
        ids, answer, count = item
        marks, span = ids[: 3 * count], ids[3 * count + 1: 3 * count + 101]
        cells = [(marks[3 * k + 1] - DIGIT_IDS) * 10 + marks[3 * k + 2] - DIGIT_IDS for k in range(count)]
        shown = [cell for cell, token in enumerate(span) if token != HIDDEN]
        assert len(shown) == 16 and set(cells) <= set(shown)
        assert all(span[cell] - CODE_IDS == drawn.codes[cell] for cell in shown if cell not in cells)
        assert answer == int(np.argmax([span[cell] - CODE_IDS for cell in cells]))
        ids_tensor, mask, _ = batch([item])
        assert mask[0].sum().item() == len(ids) - 84  # the 84 hidden codes are masked like padding
        assert (ids_tensor[mask == 0] == PAD).all() and (ids_tensor >= 0).all()
    assert seen > 20


def test_grid_marks_hold_each_letter_in_its_cell_and_the_filler_sits_before_the_span():
    rng = random.Random(5)
    items = [item for item in (span_question(picture(seed), rng, 0.05, grid=True) for seed in range(10)) if item]
    for ids, answer, count in items:
        grid, span = ids[:100], ids[100:]
        marked = [cell for cell, token in enumerate(grid) if token != BLANK]
        assert len(marked) == count and sorted(grid[cell] - LETTER_IDS for cell in marked) == list(range(count))
        assert span[0] == D_START and len(span) == 103
        by_letter = sorted(marked, key=lambda cell: grid[cell])
        assert answer == int(np.argmax([span[1 + cell] for cell in by_letter]))
    first = CODE_IDS + 128
    for (ids, _, _), (longer, _, _) in zip(items, with_filler(items, 7, first, random.Random(6), jitter=3, grid=True)):
        assert longer[:100] == ids[:100] and longer[-103:] == ids[100:] and 7 <= len(longer) - len(ids) <= 10
        assert all(first <= token < first + FILLERS for token in longer[100:-103])
    # Readouts and cells: by letter, each mark's cell and its code; every grid token and span code its own cell.
    for ids, _, _ in with_filler(items, 7, first, random.Random(6), jitter=3, grid=True):
        by_letter = sorted((token, cell) for cell, token in enumerate(ids[:100]) if token != BLANK)
        start = ids.index(D_START)
        assert marks_of(ids) == by_letter
        assert readouts(ids) == [token for letter, cell in by_letter for token in (letter, ids[start + 1 + cell])]
        cells = token_cells(ids)
        assert cells[:100] == list(range(100)) and cells[start + 1:start + 101] == list(range(100))
        assert set(cells[100:start] + cells[start + 101:] + [cells[start]]) == {-1}


def test_curated_questions_and_the_decoded_span_answer():
    pictures = [picture(seed) for seed in range(6)]
    items, span_answers = curated_questions(pictures)
    assert [answer for _, answer, _ in items] == [1] * 6 and {count for _, _, count in items} == {3}
    by_span = [int(np.argmax(p.nearness[[12, 57, 90]])) for p in pictures]
    assert span_answers == np.mean([answer == 1 for answer in by_span])
    relabelled, same_rate = curated_questions(pictures, span_answers=True)
    assert len(set(by_span)) > 1, "some pictures' spans disagree with the curated answer"
    assert [answer for _, answer, _ in relabelled] == by_span and same_rate == span_answers
    assert [ids for ids, _, _ in relabelled] == [ids for ids, _, _ in items]


def test_letters_beyond_a_question_are_never_chosen():
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=CODE_IDS + 128, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                         max_position_embeddings=256))
    rng = random.Random(1)
    items = [item for item in (span_question(picture(seed), rng, 0.0) for seed in range(8)) if item is not None]
    logits = letter_logits(model, items)
    for row, (_, _, count) in zip(logits, items):
        assert torch.isfinite(row[:count]).all() and torch.isinf(row[count:]).all()


def test_fresh_questions_on_objects_take_only_the_curated_cells():
    rng, drawn = random.Random(2), picture(3)
    assert drawn.object_cells == [12, 57, 90]
    for _ in range(30):
        item = span_question(drawn, rng, 0.0, on_objects=True)
        assert item is not None
        ids, _, count = item
        cells = {(ids[3 * k + 1] - DIGIT_IDS) * 10 + ids[3 * k + 2] - DIGIT_IDS for k in range(count)}
        assert cells <= {12, 57, 90} and 2 <= count <= 3


def test_filler_tokens_come_before_the_question_and_leave_it_as_it_was():
    rng = random.Random(1)
    items = [item for item in (span_question(picture(seed), rng, min_gap=0.05) for seed in range(10)) if item]
    first = CODE_IDS + 128
    padded = with_filler(items, 140, first, random.Random(2))
    for (ids, answer, count), (longer, same_answer, same_count) in zip(items, padded):
        assert longer[140:] == ids and (same_answer, same_count) == (answer, count)
        assert all(first <= token < first + FILLERS for token in longer[:140])
    assert len({tuple(ids[:140]) for ids, _, _ in padded}) == len(padded)  # drawn afresh for each question
    assert with_filler(items, 0, first, random.Random(2)) == items


def tiny_probe_model(extra: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=CODE_IDS + 128 + extra, hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                        max_position_embeddings=512))


def test_cells_and_readouts_name_each_marks_cell_and_the_spans_code_there():
    rng = random.Random(3)
    items = [item for item in (span_question(picture(seed), rng, 0.0) for seed in range(6)) if item]
    for ids, _, count in with_filler(items, 7, CODE_IDS + 128, random.Random(4)):
        cells, start = token_cells(ids), ids.index(D_START)
        assert cells[start + 1:start + 101] == list(range(100)) and cells[:7] == [-1] * 7 and cells[start:start + 1] == [-1]
        marks = [((ids[7 + 3 * k + 1] - DIGIT_IDS) * 10 + ids[7 + 3 * k + 2] - DIGIT_IDS) for k in range(count)]
        assert cells[7:start] == [cell for cell in marks for _ in range(3)]
        assert readouts(ids) == [token for k, cell in enumerate(marks) for token in (LETTER_IDS + k, ids[start + 1 + cell])]


def test_the_readout_loss_is_the_mean_code_cross_entropy_plus_the_letters_as_a_loop_computes_them():
    model, rng = tiny_probe_model(), random.Random(5)
    items = [item for item in (span_question(picture(seed), rng, 0.0) for seed in range(8)) if item]
    loss = readout_loss(model, items, None, 128)
    code_terms, letter_terms = [], []
    for ids, answer, count in items:  # one unpadded sequence at a time
        full = ids + readouts(ids)
        logits = model(input_ids=torch.tensor([full])).logits[0]
        for mark in range(count):
            position = len(ids) + 2 * mark  # the mark's letter; its code comes next
            code_terms.append(F.cross_entropy(logits[position, CODE_IDS:CODE_IDS + 128][None],
                                              torch.tensor([full[position + 1] - CODE_IDS])))
        letters = logits[-1, LETTER_IDS:LETTER_IDS + count]
        letter_terms.append(F.cross_entropy(letters[None], torch.tensor([answer])))
    assert loss.item() == pytest.approx((torch.stack(code_terms).mean() + torch.stack(letter_terms).mean()).item(), rel=1e-4)
    every_token = torch.stack(code_terms + letter_terms).mean()  # --token-mean: the letter is one token among the codes
    assert readout_loss(model, items, None, 128, token_mean=True).item() == pytest.approx(every_token.item(), rel=1e-4)


def test_greedy_readouts_are_scored_against_the_span_and_cell_embeddings_start_neutral_where_no_cell():
    model, rng = tiny_probe_model(), random.Random(6)
    items = [item for item in (span_question(picture(seed), rng, 0.0) for seed in range(8)) if item]
    with torch.no_grad():
        letters, code_share = answer_with_readouts(model, items, None, 128)
    assert letters.shape == (len(items),) and 0.0 <= code_share <= 1.0
    assert all(letter < count for letter, (_, _, count) in zip(letters.tolist(), items))
    embeddings = CellEmbeddings(16, std=0.02)
    # As small as the token rows: torch's N(0, 1) default would drown which code a position holds.
    assert 0.015 < embeddings.table.weight.std().item() < 0.025
    plain = torch.randn(1, 3, 16)
    added = embeddings(plain, torch.tensor([[-1, 0, 99]]))
    assert torch.equal(added[0, 0], plain[0, 0]) and torch.allclose(added[0, 2], plain[0, 2] + embeddings.table.weight[99])
