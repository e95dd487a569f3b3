"""The bare cell lookup (benchmarks/cell_lookup.py): each readout code is the span's code at its
mark's cell, every token carries the cell it stands for, and the logits read are where the code is
predicted."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
from cell_lookup import lookup_batch, main, parse_schedule, readout_logits, span_length_at, vocabulary  # noqa: E402
from span_reading import CellEmbeddings  # noqa: E402


def test_each_readout_is_the_code_at_its_marks_cell_and_tokens_carry_their_cells():
    cells, marks, codes = 16, 3, 32
    first_letter, d_start, query = vocabulary(codes)
    ids, token_cells, targets = lookup_batch(random.Random(0), 8, cells, marks, codes)
    assert ids.shape == token_cells.shape == (8, marks + 1 + cells + 1 + 2 * marks) and targets.shape == (8, marks)
    for row in range(8):
        sequence, where = ids[row].tolist(), token_cells[row].tolist()
        span = sequence[marks + 1:marks + 1 + cells]
        assert sequence[marks] == d_start and sequence[marks + 1 + cells] == query
        assert where[marks + 1:marks + 1 + cells] == list(range(cells)) and where[marks] == where[-1] == -1
        assert all(0 <= code < codes for code in span)
        readouts = sequence[-2 * marks:]
        for mark in range(marks):
            cell = where[mark]  # the mark's own token carries its cell
            assert sequence[mark] == readouts[2 * mark] == first_letter + mark
            assert readouts[2 * mark + 1] == span[cell] == targets[row, mark].item()
        assert len(set(where[:marks])) == marks  # marks on distinct cells


def test_a_short_span_holds_a_subset_of_the_cells_in_grid_order_and_its_readouts_still_match():
    cells, marks, codes, length = 100, 2, 32, 16
    ids, token_cells, targets = lookup_batch(random.Random(2), 32, cells, marks, codes, span_length=length)
    assert ids.shape[1] == marks + 1 + length + 1 + 2 * marks
    seen = set()
    for row in range(32):
        where, sequence = token_cells[row].tolist(), ids[row].tolist()
        span_cells, span = where[marks + 1:marks + 1 + length], sequence[marks + 1:marks + 1 + length]
        assert span_cells == sorted(span_cells) and len(set(span_cells)) == length
        for mark in range(marks):
            assert where[mark] in span_cells and targets[row, mark].item() == span[span_cells.index(where[mark])]
        seen.update(span_cells)
    assert len(seen) > 90  # the cells vary from sequence to sequence: every vector is used
    assert parse_schedule("16:500,36:250") == [(16, 500), (36, 250)]
    assert [span_length_at(step, [(16, 2), (36, 1)]) for step in (1, 2, 3, 4)] == [16, 16, 36, None]


def test_the_logits_read_are_those_that_predict_each_readout_code():
    cells, marks, codes = 9, 2, 16
    ids, token_cells, _ = lookup_batch(random.Random(1), 4, cells, marks, codes)
    config = Qwen2Config(vocab_size=codes + 7, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    torch.manual_seed(0)
    model, embeddings = Qwen2ForCausalLM(config).eval(), CellEmbeddings(16, 0.02, cells)
    with torch.no_grad():
        read = readout_logits(model, embeddings, ids, token_cells, marks, codes)
        full = model(inputs_embeds=embeddings(model.get_input_embeddings()(ids), token_cells)).logits
    for mark in range(marks):
        code_position = ids.shape[1] - 2 * (marks - mark) + 1  # the code follows its letter
        assert torch.equal(read[:, mark], full[:, code_position - 1, :codes])


def test_a_short_run_writes_its_curve_and_refuses_more_marks_than_letters(tmp_path, monkeypatch, capsys):
    out = tmp_path / "lookup.json"
    monkeypatch.setattr(sys, "argv", ["cell_lookup.py", "--cells", "9", "--steps", "40", "--every", "20",
                                      "--heldout", "32", "--out", str(out)])
    main()
    record = json.loads(out.read_text())
    assert [point["step"] for point in record["curve"]] == [20, 40] and record["chance"] == 1 / 128
    for bad, message in ((["--marks", "6"], "--marks must be 1..5"), (["--short-spans", "3:10", "--marks", "4"], "--marks must be 1..3"),
                         (["--short-spans", "16-500"], "expected LENGTH:STEPS")):
        monkeypatch.setattr(sys, "argv", ["cell_lookup.py", *bad])
        with pytest.raises(SystemExit) as refused:
            main()
        assert refused.value.code == 2 and message in capsys.readouterr().err
