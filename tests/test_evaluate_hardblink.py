"""HardBLINK: the letter parser on free-form replies, the reader on the real samples, scoring."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from perceptio.errors import PerceptioError
from perceptio.evaluate.hardblink import load_hardblink, parse_choice, score_hardblink


@pytest.mark.parametrize(
    ("reply", "options", "letter"),
    [
        ("(B)", 3, "B"),
        ("B", 3, "B"),
        ("b", 3, "B"),
        ("B.", 4, "B"),
        ("C)", 4, "C"),
        ("Point B is closest", 3, "B"),
        ("the answer is b.", 3, "B"),
        ("Answer: c", 3, "C"),
        ("I think it's point C", 3, "C"),
        ("I think it's C", 3, "C"),
        ("The closest point is B.", 5, "B"),
        ("The closest one is point D, right by the camera.", 5, "D"),
        ("A", 3, "A"),
        ("A is closest to the camera.", 4, "A"),
        ("A point near the bottom edge, D, is the closest.", 5, "D"),
        ("(E)", 5, "E"),
    ],
)
def test_parse_choice_reads_free_form_replies(reply, options, letter):
    assert parse_choice(reply, options) == letter


@pytest.mark.parametrize(
    ("reply", "options"),
    [
        ("(D)", 3),  # not an option with three points
        ("E", 4),
        ("(A) or (B), hard to say", 3),
        ("A is closer than C", 3),
        ("I cannot tell.", 5),
        ("", 3),
    ],
)
def test_parse_choice_refuses_absent_or_ambiguous_letters(reply, options):
    assert parse_choice(reply, options) is None


def test_reader_on_the_real_samples(shared_data):
    questions = load_hardblink(shared_data / "hardblink")
    assert [sum(q.variant == v for q in questions) for v in (3, 4, 5)] == [8, 8, 8]
    # The answers published with the samples, read independently of the reader.
    for variant in (3, 4, 5):
        answers_file = shared_data / "hardblink" / "answers" / f"blink_{variant}pointscenter_answers.jsonl"
        expected = [json.loads(line)["text"].strip("()") for line in answers_file.read_text().splitlines()]
        assert [q.answer for q in questions if q.variant == variant] == expected
    first = questions[0]
    assert first.variant == 3 and first.question_id == 0 and "closest to the camera" in first.text
    with Image.open(first.image_path) as image:
        assert image.size == (336, 336)
    assert all(q.answer in q.options for q in questions)
    assert len({q.sample_id for q in questions}) == len(questions)


def test_reader_reports_a_missing_image(tmp_path):
    (tmp_path / "questions").mkdir()
    (tmp_path / "answers").mkdir()
    (tmp_path / "questions" / "blink_3pointscenter_questions.jsonl").write_text(
        json.dumps({"question_id": 0, "image": "0.png", "text": "Which point?"}) + "\n"
    )
    (tmp_path / "answers" / "blink_3pointscenter_answers.jsonl").write_text(
        json.dumps({"question_id": 0, "text": "(A)"}) + "\n"
    )
    with pytest.raises(PerceptioError, match="image missing"):
        load_hardblink(tmp_path, variants=(3,))
    with pytest.raises(PerceptioError, match="4pointscenter"):
        load_hardblink(tmp_path, variants=(4,))


def test_score_per_variant_and_mean_of_variants():
    records = (
        [{"variant": 3, "answer": "A", "choice": "A"}] * 3
        + [{"variant": 3, "answer": "A", "choice": "B"}]
        + [{"variant": 4, "answer": "C", "choice": "C"}]
        + [{"variant": 4, "answer": "C", "choice": None}]
    )
    scores = score_hardblink(records)
    assert scores.accuracy == {3: 0.75, 4: 0.5}
    assert scores.questions == {3: 4, 4: 2}
    assert scores.unparsed == {3: 0, 4: 1}
    # The mean of the variants, as the paper averages (not the pooled 4/6).
    assert scores.average == pytest.approx(0.625)
