"""Marked-point questions: points on objects, balanced cues, many questions per image, one example each."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from perceptio.curate.marked_points import (
    COLOURED_MARKS,
    DIRECT,
    HARDBLINK_MARKS,
    LETTER_COLOURS,
    READING_ANSWER_GAP,
    WITH_DEPTH,
    CueBalancer,
    MarkedPointsConfig,
    Target,
    choose_points,
    cue_combinations,
    cue_outcome,
    draw_marks,
    make_questions,
    object_regions,
    point_cell,
    reading_question,
    swapped_reading_question,
    window_nearness,
)
from perceptio.sources.masks import segment_masks
from perceptio.errors import PerceptioError
from perceptio.shards import ShardSample, sample_key
from perceptio.tokens import D_END, D_START, depth_span
from perceptio.train.config import writes_readouts
from perceptio.train.data import PromptTemplates, StreamConfig, expand_sample

STUFF = frozenset({1, 2})  # wall, floor


def _scene(height: int = 120, width: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """A class map (wall on top, floor below) with four boxes of two thing classes, and a nearness
    map: the floor gets nearer downwards, every box is flat at its own value."""
    classes = np.ones((height, width), np.uint8)
    classes[height // 2:] = 2
    nearness = np.linspace(-1, 1, height, dtype=np.float32)[:, None].repeat(width, 1)
    boxes = [(10, 20, 40, 30, 3, -0.5), (60, 70, 30, 30, 4, 0.9), (110, 15, 35, 40, 3, 0.2), (150, 60, 40, 45, 4, -0.1)]
    for x, y, w, h, cls, value in boxes:
        classes[y:y + h, x:x + w] = cls
        nearness[y:y + h, x:x + w] = value
    return classes, nearness


def test_segments_are_connected_thing_parts_and_points_stay_on_them():
    classes, nearness = _scene()
    masks = segment_masks(classes, STUFF)
    assert len(masks) == 4, "two boxes of each thing class, never the wall or the floor"
    config = MarkedPointsConfig(min_points=2, max_points=4, questions_per_image=12, min_distance_px=10)
    regions = object_regions(masks, config)
    questions = make_questions(regions, window_nearness(nearness, config), "img", seed=3, config=config)
    assert len(questions) == 12
    values = {0.9, -0.5, 0.2, -0.1}
    for question in questions:
        points = np.array(question["points"])
        assert 2 <= len(points) <= 4 and len(question["labels"]) == len(points)
        hit = [classes[y, x] for x, y in points]
        assert all(cls in (3, 4) for cls in hit), "every point on a thing, none on wall or floor"
        owners = [next(i for i, mask in enumerate(masks) if mask[y, x]) for x, y in points]
        assert len(set(owners)) == len(owners), "one point per object"
        assert set(round(v, 3) for v in question["point_depths"]) <= {round(v, 3) for v in values}
        assert question["answer"] == question["labels"][int(np.argmax(question["point_depths"]))]
        assert question["object_areas"] == [int(masks[o].sum()) for o in owners]
        assert question["target"] in (DIRECT, WITH_DEPTH)
    assert {q["target"] for q in questions} == {DIRECT, WITH_DEPTH}
    assert len({tuple(map(tuple, q["points"])) for q in questions}) > 6, "the questions differ"
    assert make_questions(regions, window_nearness(nearness, config), "img", 3, config) == questions
    assert {q["mark_style"] for q in questions} == {HARDBLINK_MARKS}
    coloured = replace(config, mark_style=COLOURED_MARKS)
    assert [q["mark_style"] for q in make_questions(regions, window_nearness(nearness, config), "img", 3, coloured)] \
        == [COLOURED_MARKS] * 12, "the style travels with each question"


def test_no_question_without_depth_contrast_or_objects():
    classes, _ = _scene()
    config = MarkedPointsConfig(questions_per_image=4, min_distance_px=10)
    flat = np.zeros(classes.shape, np.float32)
    regions = object_regions(segment_masks(classes, STUFF), config)
    assert make_questions(regions, window_nearness(flat, config), "img", 0, config) == []
    assert object_regions(segment_masks(np.ones_like(classes), STUFF), config) == []


def test_cues_and_wishes():
    classes, nearness = _scene()
    config = MarkedPointsConfig(min_distance_px=10)
    regions = object_regions(segment_masks(classes, STUFF), config)
    near = window_nearness(nearness, config)
    rng = np.random.default_rng(0)
    for wish in (Target(True, None, None), Target(False, None, None), Target(None, False, None)):
        points = choose_points(regions, near, 3, rng, config, wish)
        assert points is not None
        outcome = cue_outcome(points, regions)
        assert outcome is not None
        for wanted, got in zip(wish.__dict__.values(), outcome.__dict__.values()):
            assert wanted is None or wanted == got
        nearest = int(np.argmax([p.nearness for p in points]))
        assert outcome.lowest_is_nearest == (int(np.argmax([p.y for p in points])) == nearest)
    shares = dict(cue_combinations(4))
    assert sum(shares.values()) == pytest.approx(1.0)
    assert shares[Target(True, True, True)] == pytest.approx(1 / 64)
    assert shares[Target(False, False, False)] == pytest.approx(27 / 64)


def test_balancer_keeps_each_cue_at_chance():
    balancer = CueBalancer(3)
    rng = np.random.default_rng(1)
    combinations = [target for target, _ in cue_combinations(3)]
    targets = []
    # Outcomes offered at random, the easy one ("every cue right") far too often.
    for _ in range(600):
        offered = {combinations[0]} | {combinations[i] for i in rng.choice(8, size=2)}
        chosen = balancer.pick(offered)
        if chosen is not None:
            balancer.add(chosen)
            targets.append(chosen)
    kept = [targets[i] for i in balancer.keep(targets)]
    assert len(kept) >= 150
    for cue in ("lowest_is_nearest", "largest_is_nearest", "lowest_base_is_nearest"):
        rate = np.mean([getattr(target, cue) for target in kept])
        assert rate == pytest.approx(1 / 3, abs=0.02)
    assert balancer.keep(targets, size=27) and len(balancer.keep(targets, size=27)) == 27


def _ade_sample(questions: list[dict], depth: np.ndarray | None = None, size: tuple[int, int] = (64, 48)) -> dict:
    width, height = size
    image = np.full((height, width, 3), 90, np.uint8)
    import io

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG")
    meta = {"dataset": "ade20k", "split": "training", "image_id": 7, "file_name": "7.jpg", "width": width,
            "height": height, "teacher": "test", "tokenizer": "test@0", "refs": [], "questions": questions,
            "question": questions[0] if questions else None}
    depth = np.zeros((320, 320), np.float16) if depth is None else depth.astype(np.float16)
    sample = ShardSample(sample_key("ade20k", "training", 7), buffer.getvalue(), depth,
                         np.arange(100, dtype=np.int16) % 128, meta)
    return {"__key__": sample.key, **sample.to_members()}


def test_one_example_per_question_with_its_target_and_its_marks():
    questions = [
        {"text": "Which point is the closest to the camera?", "points": [[10, 10], [50, 30]], "labels": ["A", "B"],
         "answer": "B", "point_depths": [0.1, 0.5], "object_areas": [9, 16], "object_bases": [12, 33], "target": target}
        for target in (DIRECT, WITH_DEPTH, DIRECT)
    ]
    raw = _ade_sample(questions)
    templates = PromptTemplates.load()
    examples = expand_sample(raw, templates)
    assert [e.key.rsplit("/", 1)[1] for e in examples] == ["q0", "q1", "q2"]
    assert examples[0].target == "(B)" and examples[2].target == "(B)"
    assert examples[1].target.startswith(D_START) and examples[1].target.endswith("(B)")
    assert all(e.image_bytes == raw["jpg"] and e.mask_rle is None for e in examples)
    image = np.asarray(examples[0].decode()["image"]).astype(int)
    red = (image[..., 0] > 150) & (image[..., 1] < 100)
    assert red[5:16, 4:17].any() and red[25:36, 44:57].any(), "both points are drawn at load time"
    assert np.asarray(draw_marks(Image.new("RGB", (64, 48), (90, 90, 90)), [[10, 10]], ["A"]))[10, 6, 0] > 150

    both = expand_sample(raw, templates, question_targets="both")
    assert Counter(e.key.rsplit("/", 1)[1] for e in both) == {DIRECT: 3, WITH_DEPTH: 3}
    direct = expand_sample(raw, templates, question_targets="direct")
    assert all(e.target == "(B)" for e in direct)
    assert all(D_START in e.target for e in expand_sample(raw, templates, question_targets="depth"))
    assert all(e.target == "(B)" for e in expand_sample(raw, templates, use_depth_tokens=False, question_targets="depth"))
    with pytest.raises(PerceptioError, match="question targets"):
        expand_sample(raw, templates, question_targets="sometimes")
    with pytest.raises(PerceptioError, match="question targets"):
        StreamConfig([], question_targets="sometimes")
    assert expand_sample(_ade_sample([]), templates) == []
    json.dumps(questions)  # the fields are plain json


def test_coloured_marks_give_each_letter_its_colour_as_the_question_records():
    question = {"text": "Which point is the closest to the camera?", "points": [[10, 10], [50, 30]], "labels": ["A", "B"],
                "answer": "B", "point_depths": [0.1, 0.5], "object_areas": [9, 16], "object_bases": [12, 33],
                "target": DIRECT}
    templates = PromptTemplates.load()
    as_recorded = {}
    for style in (None, HARDBLINK_MARKS, COLOURED_MARKS):  # None: a question curated before styles existed
        recorded = question if style is None else {**question, "mark_style": style}
        (example,) = expand_sample(_ade_sample([recorded]), templates)
        as_recorded[style] = np.asarray(example.decode()["image"]).astype(int)

    def has(image: np.ndarray, colour: tuple[int, int, int], rows: slice, columns: slice) -> bool:
        return bool((image[rows, columns] == colour).all(-1).any())

    around_a, around_b = (slice(0, 16), slice(0, 17)), (slice(18, 36), slice(36, 57))
    coloured = as_recorded[COLOURED_MARKS]
    assert has(coloured, LETTER_COLOURS[0], *around_a) and not has(coloured, LETTER_COLOURS[1], *around_a)
    assert has(coloured, LETTER_COLOURS[1], *around_b) and not has(coloured, LETTER_COLOURS[0], *around_b)
    assert not has(coloured, (255, 255, 255), slice(None), slice(None)), "no white box: a disc in the letter's colour"
    assert np.array_equal(as_recorded[None], as_recorded[HARDBLINK_MARKS]), "older questions: HardBLINK's marks"
    for around in (around_a, around_b):
        assert has(as_recorded[HARDBLINK_MARKS], (255, 0, 0), *around) and has(as_recorded[HARDBLINK_MARKS], (255, 255, 255), *around)
    with pytest.raises(PerceptioError, match="mark style"):
        draw_marks(Image.new("RGB", (64, 48)), [[10, 10]], ["A"], style="neon")
    with pytest.raises(PerceptioError, match="mark style"):
        MarkedPointsConfig(mark_style="neon")


def test_reading_questions_mark_any_cells_and_name_the_nearest_by_the_depth_map_anew_each_epoch():
    # A depth map of 10 x 10 constant cells, each at its own random nearness.
    cells = np.random.default_rng(3).uniform(-1, 1, (10, 10))
    depth = np.kron(cells, np.ones((32, 32)))
    curated = {"text": "Which point is the closest to the camera?", "points": [[10, 10], [50, 30]], "labels": ["A", "B"],
               "answer": "B", "target": DIRECT, "mark_style": COLOURED_MARKS}
    raw = _ade_sample([curated], depth, size=(320, 240))
    templates = PromptTemplates.load()
    examples = expand_sample(raw, templates, reading_questions=30, reading_seed=(0, 0))
    reading = [e for e in examples if "/r" in e.key]
    assert examples[0].key.endswith("/q0") and 10 <= len(reading) <= 30  # draws without a clear answer are left out
    counts, answers = Counter(), Counter()
    for example in reading:
        points = example.marks.points
        marked = [min(9, y * 10 // 240) * 10 + min(9, x * 10 // 320) for x, y in points]
        values = cells.reshape(-1)[marked]
        assert len(set(marked)) == len(marked) and 2 <= len(marked) <= 5
        assert np.sort(values)[-1] - np.sort(values)[-2] >= READING_ANSWER_GAP
        answer = example.marks.labels[int(np.argmax(values))]
        assert example.target.startswith(D_START) and example.target.endswith(f"({answer})")  # recorded: span first
        assert example.marks.style == COLOURED_MARKS  # drawn as the picture's curated questions are
        counts[len(marked)] += 1
        answers[answer] += 1
    assert len(counts) == 4 and len(answers) >= 4, "every point count, answers spread over the letters"
    image = np.asarray(reading[0].decode()["image"]).astype(int)
    x, y = reading[0].marks.points[0]
    assert (np.abs(image[y - 4 : y + 5, x - 4 : x + 5] - LETTER_COLOURS[0]).sum(-1) < 60).any(), "A's disc on its point"

    again = expand_sample(raw, templates, reading_questions=30, reading_seed=(0, 0))
    assert [(e.key, e.marks, e.target) for e in again] == [(e.key, e.marks, e.target) for e in examples]
    next_epoch = [e.marks for e in expand_sample(raw, templates, reading_questions=30, reading_seed=(0, 1))]
    assert next_epoch != [e.marks for e in examples]
    direct = expand_sample(raw, templates, use_depth_tokens=False, reading_questions=30, reading_seed=(0, 0))
    assert all(e.target in {"(A)", "(B)", "(C)", "(D)", "(E)"} for e in direct)
    # A map without contrast gives no reading question; curated questions are kept as they are.
    flat = expand_sample(_ade_sample([curated]), templates, reading_questions=30, reading_seed=(0, 0))
    assert [e.key.rsplit("/", 1)[1] for e in flat] == ["q0"]
    assert reading_question(np.zeros((10, 10)), (320, 240), np.random.default_rng(0), spread=1.0) is None
    with pytest.raises(PerceptioError, match="reading-questions"):
        StreamConfig([], reading_questions=-1)


def test_swapped_reading_questions_are_answered_by_the_shuffled_span_and_the_picture_names_it_by_chance():
    nearness = np.random.default_rng(6).uniform(-1, 1, (10, 10))
    codes = list(range(100))  # code k at cell k: the span tells which cell's code each cell holds
    rng = np.random.default_rng(7)
    drawn = [q for q in (reading_question(nearness, (320, 240), rng, spread=1.0) for _ in range(600)) if q]
    picture_named, chance = [], []
    for question in drawn:
        swapped, shuffled = swapped_reading_question(question, codes, nearness, rng)
        cells = question["cells"]
        assert [c for c in range(100) if shuffled[c] != c] == [c for c in sorted(cells) if shuffled[c] != c]
        assert sorted(shuffled[c] for c in cells) == sorted(cells)  # the marked cells' codes, shuffled among them
        by_span = nearness.reshape(-1)[[shuffled[c] for c in cells]]  # what the span says at each marked cell
        assert swapped["answer"] == question["labels"][int(np.argmax(by_span))]
        assert {k: v for k, v in swapped.items() if k != "answer"} == {k: v for k, v in question.items() if k != "answer"}
        picture_named.append(swapped["answer"] == question["answer"])
        chance.append(1 / len(cells))
    assert len(drawn) > 300 and abs(np.mean(picture_named) - np.mean(chance)) < 0.06


def test_a_share_of_reading_questions_is_swapped_written_span_first_without_a_depth_target():
    cells = np.random.default_rng(3).uniform(-1, 1, (10, 10))
    raw = _ade_sample([{"text": "Which?", "points": [[10, 10], [50, 30]], "labels": ["A", "B"], "answer": "B",
                        "target": DIRECT, "mark_style": COLOURED_MARKS}], np.kron(cells, np.ones((32, 32))), size=(320, 240))
    templates = PromptTemplates.load()
    plain = expand_sample(raw, templates, reading_questions=30, reading_seed=(0, 0))
    assert [(e.key, e.target) for e in expand_sample(raw, templates, reading_questions=30, reading_seed=(0, 0),
                                                     reading_swaps=0.0)] == [(e.key, e.target) for e in plain]
    mixed = expand_sample(raw, templates, question_targets="both", reading_questions=30, reading_seed=(0, 0), reading_swaps=0.5)
    swapped = [e for e in mixed if e.span_is_context]
    kept = [e for e in mixed if "/r" in e.key and not e.span_is_context]
    assert swapped and kept
    own_span = depth_span(range(100))  # the sample's codes are 0..99 (see _ade_sample)
    for example in swapped:
        span, answer = example.target.split(D_END)
        codes = [int(token) for token in span.replace(D_START, "").replace("[D_", " ").replace("]", "").split()]
        marked = [min(9, y * 10 // 240) * 10 + min(9, x * 10 // 320) for x, y in example.marks.points]
        assert [c for c in range(100) if codes[c] != c] == [c for c in sorted(marked) if codes[c] != c]
        assert answer.strip() == f"({example.marks.labels[int(np.argmax(cells.reshape(-1)[[codes[c] for c in marked]]))]})"
        assert example.depth_bytes is None and example.decode()["span_is_context"]  # no depth target: the span is not the picture's
        assert example.key.rsplit("/", 1)[1].startswith("r") and f"{example.key}/direct" not in {e.key for e in mixed}  # span first only
    assert all(e.target.startswith(own_span) for e in kept if D_START in e.target)
    assert 0.3 < len(swapped) / (len(swapped) + len({e.key.rsplit("/", 1)[0] for e in kept})) < 0.7
    direct = expand_sample(raw, templates, use_depth_tokens=False, reading_questions=30, reading_seed=(0, 0), reading_swaps=1.0)
    assert not any(e.span_is_context for e in direct)  # without depth tokens no span can answer
    answered_directly = expand_sample(raw, templates, question_targets=DIRECT, reading_questions=30, reading_seed=(0, 0),
                                      reading_swaps=1.0)
    assert [(e.key, e.target) for e in answered_directly] == [
        (e.key, e.target) for e in expand_sample(raw, templates, question_targets=DIRECT, reading_questions=30, reading_seed=(0, 0))]
    for bad in (-0.1, 1.5):
        with pytest.raises(PerceptioError, match="reading-swaps"):
            StreamConfig([], reading_swaps=bad)


def test_mark_readouts_name_the_code_of_each_marks_cell_in_the_span_the_question_follows():
    cells = np.random.default_rng(8).uniform(-1, 1, (10, 10))
    raw = _ade_sample([{"text": "Which?", "points": [[10, 10], [50, 30], [300, 230]], "labels": ["A", "B", "C"],
                        "answer": "C", "target": DIRECT}], np.kron(cells, np.ones((32, 32))), size=(320, 240))
    templates = PromptTemplates.load()
    options = dict(question_targets="both", reading_questions=30, reading_seed=(0, 0), reading_swaps=0.5)
    plain, read = expand_sample(raw, templates, **options), expand_sample(raw, templates, mark_readouts=True, **options)
    assert [e.key for e in read] == [e.key for e in plain] and any(e.span_is_context for e in read)
    for before, after in zip(plain, read):
        if D_START not in before.target:  # answered directly: nothing to read out
            assert after.target == before.target
            continue
        span, letter = before.target.split(D_END)
        assert after.target.startswith(span + D_END) and after.target.endswith(letter)
        codes = [int(token) for token in span.replace(D_START, "").replace("[D_", " ").replace("]", "").split()]
        marked = [min(9, y * 10 // 240) * 10 + min(9, x * 10 // 320) for x, y in after.marks.points]
        expected = " ".join(f"{label}[D_{codes[cell]:03d}]" for label, cell in zip(after.marks.labels, marked))
        assert after.target[len(span + D_END):-len(letter)] == f" {expected} "
    assert [e.target for e in expand_sample(raw, templates, use_depth_tokens=False, mark_readouts=True, **options)] == [
        e.target for e in expand_sample(raw, templates, use_depth_tokens=False, **options)]
    # perceptio-train keeps the setting only where a question is written span first (and records that).
    assert writes_readouts(True, True, "recorded") and writes_readouts(True, True, "both")
    assert not writes_readouts(True, False, "recorded") and not writes_readouts(True, True, "direct")
    assert not writes_readouts(False, True, "depth")



def test_readout_cells_name_each_marks_cell_before_its_code():
    cells = np.random.default_rng(8).uniform(-1, 1, (10, 10))
    raw = _ade_sample([{"text": "Which?", "points": [[10, 10], [50, 30], [300, 230]], "labels": ["A", "B", "C"],
                        "answer": "C", "target": WITH_DEPTH}], np.kron(cells, np.ones((32, 32))), size=(320, 240))
    templates = PromptTemplates.load()
    options = dict(reading_questions=20, reading_seed=(0, 0), reading_swaps=0.5, mark_readouts=True)
    plain, named = expand_sample(raw, templates, **options), expand_sample(raw, templates, readout_cells=True, **options)
    assert [e.key for e in named] == [e.key for e in plain]
    for before, after in zip(plain, named):
        span = before.target.split(D_END)[0] + D_END
        codes = [int(token) for token in span.replace(D_START, "").replace(D_END, "").replace("[D_", " ").replace("]", "").split()]
        places = [(min(9, y * 10 // 240), min(9, x * 10 // 320)) for x, y in after.marks.points]
        expected = " ".join(f"{label} {row} {column}[D_{codes[row * 10 + column]:03d}]"
                            for label, (row, column) in zip(after.marks.labels, places))
        assert after.target == f"{span} {expected} ({after.target[-2]})" and after.target[-2] == before.target[-2]


def test_reading_questions_in_text_have_no_picture_their_cells_in_the_prompt_and_the_span_as_context():
    cells = np.random.default_rng(9).uniform(-1, 1, (10, 10))
    raw = _ade_sample([{"text": "Which?", "points": [[10, 10], [50, 30]], "labels": ["A", "B"], "answer": "B",
                        "target": WITH_DEPTH}], np.kron(cells, np.ones((32, 32))), size=(320, 240))
    templates = PromptTemplates.load()
    options = dict(reading_questions=60, reading_seed=(0, 0), reading_swaps=0.5)
    mixed = expand_sample(raw, templates, reading_in_text=0.5, mark_readouts=True, readout_cells=True, **options)
    in_text = [e for e in mixed if "/t" in e.key]
    pictured = [e for e in mixed if "/r" in e.key]
    assert 0.3 < len(in_text) / (len(in_text) + len(pictured)) < 0.7
    # Each reading draw is asked once, with its picture or in text: the same draws as without text.
    without = [e for e in expand_sample(raw, templates, mark_readouts=True, readout_cells=True, **options) if "/r" in e.key]
    assert sorted(int(e.key.rsplit("/", 1)[1][1:]) for e in in_text + pictured) == [int(e.key.rsplit("/", 1)[1][1:]) for e in without]
    by_index = {e.key.rsplit("/", 1)[1][1:]: e for e in without}
    own = depth_span(range(100))
    for example in in_text:
        twin = by_index[example.key.rsplit("/", 1)[1][1:]]  # the same draw, asked with its picture
        assert example.image_bytes is None and example.image() is None and example.marks is None
        assert example.depth_bytes is None and example.decode()["span_is_context"]
        places = [f"{label} {min(9, y * 10 // 240)} {min(9, x * 10 // 320)}" for (x, y), label in
                  zip(twin.marks.points, twin.marks.labels)]
        assert ", ".join(places) in example.prompt
        assert example.target == twin.target  # the span (own or swapped), the readouts with cells, the letter
    assert any(e.target.startswith(own) for e in in_text) and any(not e.target.startswith(own) for e in in_text)
    # Runs without text questions draw what they drew before; without a span to read, none is in text.
    assert [(e.key, e.target) for e in expand_sample(raw, templates, reading_in_text=0.0, **options)] == [
        (e.key, e.target) for e in expand_sample(raw, templates, **options)]
    for kwargs in (dict(use_depth_tokens=False), dict(question_targets=DIRECT)):
        assert not any("/t" in e.key for e in expand_sample(raw, templates, reading_in_text=1.0, **options, **kwargs))
    for bad in (-0.1, 1.5):
        with pytest.raises(PerceptioError, match="reading-in-text"):
            StreamConfig([], reading_in_text=bad)

def test_reading_points_fall_where_the_spread_says_and_always_in_their_cell():
    nearness = np.random.default_rng(4).uniform(-1, 1, (10, 10))

    def drawn(size, spread):
        rng = np.random.default_rng(5)
        return [q for q in (reading_question(nearness, size, rng, spread=spread) for _ in range(400)) if q]

    for size in [(320, 240), (333, 251), (97, 61)]:  # sides a multiple of the grid or not
        for spread in (1 / 3, 1.0):
            for question in drawn(size, spread):
                cells = [min(9, y * 10 // size[1]) * 10 + min(9, x * 10 // size[0]) for x, y in question["points"]]
                values = nearness.reshape(-1)[cells]
                assert len(set(cells)) == len(cells)  # each point in a cell of its own: the one drawn
                assert [point_cell(point, size, 10) for point in question["points"]] == cells == question["cells"]
                assert question["labels"][int(np.argmax(values))] == question["answer"]
                assert np.sort(values)[-1] - np.sort(values)[-2] >= READING_ANSWER_GAP

    def offsets(spread):  # how far each point is from its cell's centre, in cells
        return [max(abs(x / 32 % 1 - 0.5), abs(y / 24 % 1 - 0.5)) for q in drawn((320, 240), spread) for x, y in q["points"]]

    assert max(offsets(1 / 3)) <= 1 / 6 + 1 / 24  # the central third (up to a pixel)
    assert max(offsets(1.0)) > 0.45 and np.mean(offsets(1.0)) > 0.2  # anywhere in the cell
    for bad in (0, -0.5, 1.5):
        with pytest.raises(PerceptioError, match="reading-spread"):
            StreamConfig([], reading_spread=bad)


def test_short_spans_hide_all_but_the_marked_cells_and_random_others_and_keep_the_questions():
    cells = np.random.default_rng(5).uniform(-1, 1, (10, 10))
    raw = _ade_sample([{"text": "Which?", "points": [[10, 10], [50, 30]], "labels": ["A", "B"], "answer": "B",
                        "target": DIRECT, "mark_style": COLOURED_MARKS}], np.kron(cells, np.ones((32, 32))), size=(320, 240))
    templates = PromptTemplates.load()
    whole = expand_sample(raw, templates, question_targets="both", reading_questions=20, reading_seed=(0, 1), reading_swaps=0.5)
    short = expand_sample(raw, templates, question_targets="both", reading_questions=20, reading_seed=(0, 1), reading_swaps=0.5,
                          reading_visible=16)
    drawn = [e for e in short if "/r" in e.key]
    assert drawn and all(len(e.hidden_cells) == 84 for e in drawn)
    for example in drawn:
        marked = {min(9, y * 10 // 240) * 10 + min(9, x * 10 // 320) for x, y in example.marks.points}
        assert not marked & set(example.hidden_cells)
        assert example.span_is_context and example.depth_bytes is None and example.decode()["hidden_cells"] == example.hidden_cells
    assert len({e.hidden_cells for e in drawn}) == len(drawn)  # drawn per question
    # The same questions and answers as with whole spans (their direct variants left out: a short span is read only)
    by_key = {e.key: e for e in whole}
    for example in drawn:
        same = by_key.get(example.key) or by_key[f"{example.key}/depth"]
        assert (example.marks, example.target) == (same.marks, same.target)
    assert not any(e.hidden_cells for e in short if "/r" not in e.key)  # the curated questions keep whole spans
    assert [e.key for e in short if "/r" not in e.key] == [e.key for e in whole if "/r" not in e.key]


def test_the_curriculum_is_by_epoch_and_refuses_fewer_cells_than_marks():
    config = StreamConfig(["shards"], reading_short_spans=(16, 36))
    assert [config.visible_cells(epoch) for epoch in range(4)] == [16, 36, None, None]
    with pytest.raises(PerceptioError, match="at least 5"):
        StreamConfig(["shards"], reading_short_spans=(4,))
