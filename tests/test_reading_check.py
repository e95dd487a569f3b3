"""The reading check (benchmarks/reading_check.py): it asks the trainer's reading questions, hands the
model each picture's true span and scores the letter written after it."""

from __future__ import annotations

import dataclasses
import io
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from PIL import Image

from perceptio.curate.marked_points import READING_ANSWER_GAP
from perceptio.tokens import D_END, D_START
from perceptio.train.data import npy_load, token_grid_nearness
from perceptio.train.miniature import GRID, grid_cell
from tests.train_factory import write_shards

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from reading_check import (CENTRED, farthest_from_centre, image_size, letters_right, lowest_point_answers,  # noqa: E402
                           other_span_questions, other_span_scores, reading_examples, scores_by_placement)


class ScriptedPredictor:
    """Writes the letter ``answer(prefix)`` (and the readout codes ``readouts(prefix)``) after whatever
    prefix it is given, and keeps the prefixes."""

    def __init__(self, answer, readouts=lambda prefix: []):
        self.answer, self.readouts, self.prefixes = answer, readouts, []

    def predict_batch(self, images, prompts, answer_prefixes=None):
        prefixes = answer_prefixes or [None] * len(prompts)
        self.prefixes += prefixes
        return [SimpleNamespace(text=f"({self.answer(prefix)})", readout_codes=self.readouts(prefix)) for prefix in prefixes]


def span_codes_at_marks(span, example):
    """The codes a span holds at the cells of the question's marks."""
    codes = [int(piece[: piece.index("]")]) for piece in span.split("[D_")[1:] if piece[0].isdigit()]
    return [codes[grid_cell(point, image_size(example))] for point in example.marks.points]


def test_the_letter_after_the_true_span_is_scored_against_the_depth_maps_answer(tmp_path):
    write_shards(tmp_path, "ade20k", split="training", shards=2, images_per_shard=3, questions=True)
    examples = reading_examples(tmp_path, pictures=4, per_picture=5, seed=1)
    assert examples and len({example.key.split("/")[0] for example in examples}) == 4
    assert all(example.target.startswith(D_START) for example in examples)

    always_a = ScriptedPredictor(lambda prefix: "A")
    hits, readouts = letters_right(always_a, examples)
    assert hits == [example.target.endswith("(A)") for example in examples] and readouts is None
    assert always_a.prefixes == [example.target[: example.target.rindex("(")] for example in examples]
    assert all(prefix.endswith(D_END) for prefix in always_a.prefixes)
    # A model that writes each question's own answer after its span scores every question.
    queue = iter(example.target[-2] for example in examples)
    assert all(letters_right(ScriptedPredictor(lambda prefix: next(queue)), examples)[0])
    # A --mark-readouts model: its readouts copy the span at the marks, or are off by one mark.
    expected = iter(span_codes_at_marks(example.target, example) for example in examples)
    assert letters_right(ScriptedPredictor(lambda prefix: "A", lambda prefix: next(expected)), examples)[1] == 1.0
    shifted = iter(span_codes_at_marks(example.target, example)[1:] for example in examples)
    off = letters_right(ScriptedPredictor(lambda prefix: "A", lambda prefix: next(shifted)), examples)[1]
    assert off < 0.5


def test_direct_questions_are_asked_without_a_span_and_curated_ones_on_request(tmp_path):
    write_shards(tmp_path, "ade20k", split="training", shards=1, images_per_shard=3, questions=True)
    direct = reading_examples(tmp_path, pictures=3, per_picture=5, seed=1, direct=True)
    assert direct and all(D_START not in example.target for example in direct)
    scripted = ScriptedPredictor(lambda prefix: "B")
    assert letters_right(scripted, direct)[0] == [example.target == "(B)" for example in direct]
    assert scripted.prefixes == [None] * len(direct)
    curated = reading_examples(tmp_path, pictures=3, per_picture=0, seed=1, curated=True)
    assert [example.key.rsplit("/", 1)[1] for example in curated] == ["q0"] * 3


def test_questions_are_scored_apart_by_where_their_points_fall_in_their_cells(tmp_path):
    write_shards(tmp_path, "ade20k", split="training", shards=1, images_per_shard=3, questions=True)
    centred = reading_examples(tmp_path, pictures=3, per_picture=20, seed=1, spread=1 / 3)
    anywhere = reading_examples(tmp_path, pictures=3, per_picture=20, seed=1, spread=1.0)
    for example in centred:  # within a sixth of a cell of the centre, up to a pixel (these pictures are small)
        pixel = 10 / min(Image.open(io.BytesIO(example.image_bytes)).size)
        assert farthest_from_centre(example) <= 1 / 6 + pixel
    assert max(map(farthest_from_centre, anywhere)) > CENTRED
    examples = centred + anywhere
    hits = [farthest_from_centre(example) > CENTRED for example in examples]  # right exactly off centre
    scores = scores_by_placement(examples, hits)
    off = sum(hits)
    assert scores["off_centre"]["questions"] == off and scores["centred"]["questions"] == len(examples) - off
    assert scores["off_centre"]["right"] == 1.0 and scores["centred"]["right"] == 0.0
    assert 0.2 <= scores["centred"]["chance"] <= 0.5


def test_other_pictures_spans_tell_a_model_that_reads_its_span_from_one_that_reads_the_picture(tmp_path):
    write_shards(tmp_path, "ade20k", split="training", shards=2, images_per_shard=3, questions=True)
    examples = reading_examples(tmp_path, pictures=6, per_picture=8, seed=1)
    paired = other_span_questions(examples)
    assert len(paired) >= len(examples) // 3
    maps = {e.key.split("/")[0]: token_grid_nearness(npy_load(e.depth_bytes), GRID * GRID).reshape(-1) for e in examples}
    for example, span, answer in paired:
        assert span.startswith(D_START) and span.endswith(D_END)  # the factory's pictures may share a span
        assert answer != example.target[-2] and answer in example.marks.labels
        # The answer is what another picture's depth map clearly says at this question's cells.
        cells = [grid_cell(point, image_size(example)) for point in example.marks.points]
        assert any(example.marks.labels[int(np.argmax(near[cells]))] == answer
                   and np.sort(near[cells])[-1] - np.sort(near[cells])[-2] >= READING_ANSWER_GAP
                   for picture, near in maps.items() if picture != example.key.split("/")[0])

    def scripted(answers):
        queue = iter(answers)
        return ScriptedPredictor(lambda prefix: next(queue))

    follows_span, _ = other_span_scores(scripted([answer for _, _, answer in paired]), examples)
    assert follows_span["questions"] == len(paired)
    assert (follows_span["letter_is_the_spans_answer"], follows_span["letter_is_the_pictures_answer"]) == (1.0, 0.0)
    follows_picture, line = other_span_scores(scripted([example.target[-2] for example, _, _ in paired]), examples)
    assert (follows_picture["letter_is_the_spans_answer"], follows_picture["letter_is_the_pictures_answer"]) == (0.0, 1.0)
    assert "the picture's answer 100.0%, the span's 0.0%" in line and follows_picture["readouts_are_the_spans"] is None
    copies = iter(span_codes_at_marks(span, example) for example, span, _ in paired)
    reads_span, line = other_span_scores(ScriptedPredictor(lambda prefix: "A", lambda prefix: next(copies)), examples)
    assert reads_span["readouts_are_the_spans"] == 1.0 and reads_span["readouts_are_the_pictures"] < 1.0
    assert "readouts equal to the given span's codes 100.0%" in line


def test_the_lowest_point_heuristic_is_scored_on_the_same_questions(tmp_path):
    write_shards(tmp_path, "ade20k", split="training", shards=1, images_per_shard=3, questions=True)
    examples = reading_examples(tmp_path, pictures=3, per_picture=10, seed=1)
    lowest = [example.marks.labels[max(range(len(example.marks.points)), key=lambda i: example.marks.points[i][1])]
              for example in examples]

    def answered(letters):
        return [dataclasses.replace(e, turns=(e.turns[0], dataclasses.replace(e.turns[1], text=f"({a})")))
                for a, e in zip(letters, examples)]

    assert lowest_point_answers(answered(lowest)) == 1.0  # every answer the lowest point
    others = [next(label for label in e.marks.labels if label != a) for a, e in zip(lowest, examples)]
    assert lowest_point_answers(answered(others)) == 0.0  # never
    half = [a if i % 2 else o for i, (a, o) in enumerate(zip(lowest, others))]
    assert lowest_point_answers(answered(half)) == sum(i % 2 for i in range(len(examples))) / len(examples)
