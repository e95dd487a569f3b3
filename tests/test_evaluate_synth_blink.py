"""Synthetic HardBLINK questions: true depth decides, points on distinct objects, HardBLINK layout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from perceptio.evaluate.hardblink import load_hardblink
from perceptio.evaluate.synth_blink import SynthBlinkConfig, baselines, build_questions, lower_is_nearer, object_point


@pytest.fixture(scope="session")
def world(synth_world: Path) -> Path:
    return synth_world  # tests/conftest.py builds it once per session


def test_questions_are_decided_by_true_depth_on_distinct_objects(world, tmp_path):
    counts = build_questions(world, tmp_path, SynthBlinkConfig(seed=1))
    assert counts[3] >= 3, "the session's world should give several 3-point questions"
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
            ordered = sorted(true_depths)
            assert all(far / near >= 1.05 for near, far in zip(ordered, ordered[1:]))
            with Image.open(tmp_path / "images" / f"blink{variant}pointscenter" / question["image"]) as marked:
                assert marked.size == (record["camera"]["width"], record["camera"]["height"])
    assert len(load_hardblink(tmp_path)) == sum(counts.values())
    scores = baselines(tmp_path)
    assert scores["chance"][3] == pytest.approx(1 / 3)
    assert all(0.0 <= value <= 1.0 for value in scores["lower_is_nearer"].values())


def test_lower_is_nearer_picks_the_largest_y():
    assert lower_is_nearer([[5, 10], [50, 200], [90, 40]], ["A", "B", "C"]) == "B"


def test_object_point_stays_inside_the_eroded_object():
    mask = np.zeros((20, 30), dtype=bool)
    mask[2:12, 5:25] = True
    x, y = object_point(mask, erosion_px=3)
    assert 5 <= y <= 8 and 8 <= x <= 21
    thin = np.zeros((20, 30), dtype=bool)
    thin[5, :] = True
    assert object_point(thin, erosion_px=1) is None
