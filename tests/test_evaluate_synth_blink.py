"""Synthetic HardBLINK questions: true depth decides, points on distinct objects, HardBLINK layout,
a hard split where no single cue beats chance, and the answer read from depth maps and tokens."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from perceptio.curate.marked_points import COLOURED_MARKS, HARDBLINK_MARKS, LETTER_COLOURS
from perceptio.errors import PerceptioError
from perceptio.evaluate.hardblink import load_hardblink
from perceptio.evaluate.depth_answer import answer_from_codes, answer_from_depth, nearness_at
from perceptio.evaluate.synth_blink import (
    HEURISTICS,
    SynthBlinkConfig,
    baselines,
    build_questions,
    lower_is_nearer,
    read_questions,
    token_ceiling,
)


@pytest.fixture(scope="session")
def world(synth_world: Path) -> Path:
    return synth_world  # tests/conftest.py builds it once per session


def test_questions_are_decided_by_true_depth_on_distinct_objects(world, tmp_path):
    counts = build_questions(world, tmp_path, SynthBlinkConfig(seed=1))
    assert counts[3] >= 6, "the session's world should give several 3-point questions"
    records = {record["stem"]: record for record in json.loads((world / "world.json").read_text())["images"]}
    for variant in (3, 4, 5):
        questions = [json.loads(line) for line in (tmp_path / "questions" / f"blink_{variant}pointscenter_questions.jsonl").read_text().splitlines()]
        answers = [json.loads(line) for line in (tmp_path / "answers" / f"blink_{variant}pointscenter_answers.jsonl").read_text().splitlines()]
        assert len(questions) == len(answers) == counts[variant]
        for question, answer in zip(questions, answers):
            record = records[question["source"]]
            depth_mm = np.asarray(Image.open(world / record["depth_file"])).astype(float)
            instances = np.asarray(Image.open(world / record["instance_file"]))
            points = question["points"]
            assert len(points) == variant == len(question["labels"])
            true_depths = [depth_mm[y, x] for x, y in points]
            assert all(depth > 0 for depth in true_depths)
            assert answer["text"] == f"({question['labels'][int(np.argmin(true_depths))]})"
            hit = [int(instances[y, x]) for x, y in points]
            assert 0 not in hit and len(set(hit)) == variant, "each point on its own object"
            areas = {obj["instance"]: obj["area_px"] for obj in record["objects"]}
            assert question["object_areas"] == [areas[instance] for instance in hit]
            ordered = sorted(true_depths)
            assert all(far / near >= 1.05 for near, far in zip(ordered, ordered[1:]))
            assert ordered[1] / ordered[0] >= 1.25, "the answer is clear: the nearest is 25% nearer than the next"
            with Image.open(tmp_path / "images" / f"blink{variant}pointscenter" / question["image"]) as marked:
                assert marked.size == (record["camera"]["width"], record["camera"]["height"])
    assert len(load_hardblink(tmp_path)) == sum(counts.values())
    scores = baselines(tmp_path)
    assert scores["chance"][3] == pytest.approx(1 / 3)
    assert set(scores) == {"chance", *HEURISTICS}
    assert all(0.0 <= value <= 1.0 for by_variant in scores.values() for value in by_variant.values())


def test_hard_split_puts_every_balanced_cue_at_chance(world, tmp_path):
    counts = build_questions(world, tmp_path, SynthBlinkConfig(seed=2, hard=True, questions_per_image=4, variants=(3,)))
    assert counts[3] >= 9, "twenty images with four tries each should fill a few balanced blocks"
    scores = baselines(tmp_path)
    # Exact up to the rounding of each outcome's share of the kept questions.
    for cue in ("lowest_point", "largest_object", "lowest_object_base"):
        assert scores[cue][3] == pytest.approx(1 / 3, abs=1.5 / counts[3]), cue
    easy = tmp_path.parent / "easy"
    build_questions(world, easy, SynthBlinkConfig(seed=2, questions_per_image=4, variants=(3,)))
    assert baselines(easy)["lowest_object_base"][3] > 0.5, "without balancing the ground contact gives most answers away"
    limited = build_questions(world, tmp_path, SynthBlinkConfig(seed=2, hard=True, questions_per_image=4, variants=(3,)),
                              limit_per_variant=5)
    assert limited[3] == 5 and len(read_questions(tmp_path)[3]) == 5


def test_true_depth_read_at_the_points_answers_and_a_fitted_tokenizer_nearly_does(world, tmp_path):
    import torch

    from perceptio.tokenize.fit import FitConfig, train
    from perceptio.tokenize.teacher import OracleTeacher
    from perceptio.tokenize.vqvae import DepthVQVAE, DepthVQVAEConfig

    build_questions(world, tmp_path / "q", SynthBlinkConfig(seed=4, questions_per_image=2))
    questions = read_questions(tmp_path / "q")
    oracle = OracleTeacher(world / "depth")
    config = DepthVQVAEConfig(input_pool=8, hidden_channels=(8, 8), code_dim=8, num_res_blocks=1)
    tokenizer = DepthVQVAE(config)
    hits = []
    for rows in questions.values():
        for row, answer in rows:
            depth = tokenizer.normalize(oracle.predict_paths([world / row["source_file"]])[0])[0].numpy()
            hits.append(answer_from_depth(depth, row["points"], row["labels"], (row["image_width"], row["image_height"])) == answer)
    assert np.mean(hits) >= 0.95, "the normalised true depth read at the points gives the answer"

    images = sorted((world / "images" / "mscoco" / "images" / "train2014").glob("*.jpg"))
    maps = tokenizer.normalize([oracle.predict_paths([path])[0] for path in images])
    torch.manual_seed(0)
    fitted = train(maps, config, FitConfig(steps=120, batch_size=8, warmup_steps=10, checkpoint_every=1000), tmp_path / "fit")
    ceiling = token_ceiling(tmp_path / "q", world, fitted)
    assert set(ceiling) == set(questions)
    total = sum(len(rows) for rows in questions.values())
    mean = sum(ceiling[v] * len(rows) for v, rows in questions.items()) / total
    chance = sum(len(rows) / v for v, rows in questions.items()) / total
    assert mean > chance + 0.25, (mean, chance)
    row, _ = questions[3][0]
    assert answer_from_codes(fitted, [0] * 99, row["points"], row["labels"], (384, 288)) is None, "a short span answers nothing"


def test_lower_is_nearer_picks_the_largest_y():
    assert lower_is_nearer([[5, 10], [50, 200], [90, 40]], ["A", "B", "C"]) == "B"


def test_reading_a_map_at_image_points():
    depth = np.zeros((320, 320), np.float32)
    depth[160:, :160] = 1.0  # the lower-left quarter is near
    assert nearness_at(depth, (10, 200), (400, 300)) == pytest.approx(1.0)
    assert nearness_at(depth, (390, 10), (400, 300)) == pytest.approx(0.0)
    assert answer_from_depth(depth, [[390, 10], [10, 290], [200, 100]], ["A", "B", "C"], (400, 300)) == "B"


def test_coloured_marks_are_recorded_and_drawn_in_each_letters_colour(world, tmp_path):
    config = SynthBlinkConfig(seed=1, variants=(3,))
    build_questions(world, tmp_path / "red", config)
    build_questions(world, tmp_path / "coloured", replace(config, mark_style=COLOURED_MARKS))
    asked = {style: [json.loads(line) for line in (tmp_path / style / "questions" / "blink_3pointscenter_questions.jsonl")
                     .read_text().splitlines()] for style in ("red", "coloured")}
    assert [q["points"] for q in asked["red"]] == [q["points"] for q in asked["coloured"]], "the same questions"
    assert {q["mark_style"] for q in asked["red"]} == {HARDBLINK_MARKS}
    assert {q["mark_style"] for q in asked["coloured"]} == {COLOURED_MARKS}

    def near(style: str, question: dict, index: int) -> int:
        """Pixels within JPEG noise of the index-th letter's colour around its point."""
        x, y = question["points"][index]
        with Image.open(tmp_path / style / "images" / "blink3pointscenter" / question["image"]) as marked:
            window = np.asarray(marked.convert("RGB")).astype(int)[max(0, y - 20):y + 8, max(0, x - 30):x + 8]
        return int((np.abs(window - LETTER_COLOURS[index]).max(-1) < 40).sum())

    for question in asked["coloured"]:
        for index in range(3):
            assert near("coloured", question, index) > near("red", question, index) + 20
    with pytest.raises(PerceptioError, match="mark style"):
        SynthBlinkConfig(mark_style="neon")
