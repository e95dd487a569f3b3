"""HardBLINK relative depth: the benchmark's layout, a letter parser for free-form answers, scoring.

Layout (as released with AURORA, ``Data/evals/hardblink/``)::

    DIR/images/blink{3,4,5}pointscenter/{i}.png
    DIR/questions/blink_{N}pointscenter_questions.jsonl   {"question_id", "image", "text", ...}
    DIR/answers/blink_{N}pointscenter_answers.jsonl       {"question_id", "text": "(A)", ...}

Each question shows N points drawn as red circles labelled A, B, ... and asks which one is closest
to the camera. Accuracy is reported per variant (3, 4, 5 points) and as the mean of the three, as in
the paper's table (71.0 = mean of 75.8, 71.0, 66.1).
"""

from __future__ import annotations

import json
import re
import string
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from perceptio.errors import PerceptioError

VARIANTS = (3, 4, 5)


@dataclass(frozen=True)
class HardBlinkQuestion:
    variant: int  # number of marked points
    question_id: int
    image_path: Path
    text: str
    answer: str  # the correct letter, e.g. "B"
    # The whole question line: the synthetic split also records the points, letters and image size.
    row: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def sample_id(self) -> str:
        return f"blink{self.variant}_{self.question_id}"

    @property
    def options(self) -> str:
        return string.ascii_uppercase[: self.variant]


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise PerceptioError(f"HardBLINK file missing: {path}")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise PerceptioError(f"{path}:{number}: not JSON ({error.msg})") from None
    return rows


def load_hardblink(root: str | Path, variants: Sequence[int] = VARIANTS) -> list[HardBlinkQuestion]:
    """Every question of the chosen variants, in file order; checks that images and answers exist."""
    root = Path(root)
    if not root.is_dir():
        raise PerceptioError(f"HardBLINK folder not found: {root}")
    questions: list[HardBlinkQuestion] = []
    for variant in variants:
        if variant not in VARIANTS:
            raise PerceptioError(f"HardBLINK has 3, 4 and 5 point variants, not {variant}")
        stem = f"blink_{variant}pointscenter"
        answers_path = root / "answers" / f"{stem}_answers.jsonl"
        answers = {row["question_id"]: row["text"] for row in _read_jsonl(answers_path)}
        for row in _read_jsonl(root / "questions" / f"{stem}_questions.jsonl"):
            question_id = row["question_id"]
            image_path = root / "images" / f"blink{variant}pointscenter" / row["image"]
            if not image_path.is_file():
                raise PerceptioError(f"HardBLINK image missing: {image_path}")
            if question_id not in answers:
                raise PerceptioError(f"{answers_path}: no answer for question {question_id}")
            answer = parse_choice(answers[question_id], variant)
            if answer is None:
                raise PerceptioError(f"{answers_path}: unreadable answer {answers[question_id]!r} for question {question_id}")
            questions.append(HardBlinkQuestion(variant, int(question_id), image_path, row["text"], answer, row))
    return questions


# A letter the answer names explicitly: "(B)", "point B", "answer is B", "answer: B", "option B".
_NAMED = re.compile(
    r"\(\s*([A-Z])\s*\)"
    r"|\b(?:point|answer\s+is|answer\s*[:=]|option|choice|label(?:led)?|circle)\s*\(?\s*([A-Z])\b",
    re.IGNORECASE,
)
# The whole reply is one letter, possibly with punctuation: "B", "b.", "C)".
_ALONE = re.compile(r"^\W*([A-Z])\W*$", re.IGNORECASE)
# A capital letter standing alone as a word; "A" and "I" are also English words and need care.
_CAPITAL = re.compile(r"\b([A-Z])\b")
# "A" used as a letter rather than the article: not followed by a lowercase word, or by a verb.
_A_AS_LETTER = re.compile(r"\bA\b(?!\s+(?!(?:is|was|appears|seems|looks)\b)[a-z])")


def parse_choice(reply: str, num_options: int) -> str | None:
    """The option letter a free-form reply chooses, or None when it names none or several.

    Tries, in order: the whole reply is one letter; a letter the reply names explicitly ("(B)",
    "Point B is closest", "the answer is b."); the only capital letter standing alone ("I think
    it's C"), where "A" before a lowercase word is read as the article when another letter is
    present. Only the first ``num_options`` letters count (so the pronoun "I" never does).
    """
    options = string.ascii_uppercase[:num_options]
    alone = _ALONE.match(reply.strip())
    if alone:
        letter = alone.group(1).upper()
        return letter if letter in options else None
    named = {(first or second).upper() for first, second in _NAMED.findall(reply)} & set(options)
    if len(named) == 1:
        return named.pop()
    if len(named) > 1:
        return None
    candidates = {match.group(1) for match in _CAPITAL.finditer(reply)} & set(options)
    if len(candidates) > 1 and "A" in candidates and not _A_AS_LETTER.search(reply):
        candidates.discard("A")  # "A point near the edge, C, ...": "A" was the article
    return candidates.pop() if len(candidates) == 1 else None


@dataclass(frozen=True)
class HardBlinkScores:
    accuracy: dict[int, float]  # per variant
    questions: dict[int, int]
    unparsed: dict[int, int]  # replies naming no single letter (scored wrong)
    average: float  # mean of the per-variant accuracies

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def score_hardblink(records: Iterable[dict[str, Any]]) -> HardBlinkScores:
    """Per-variant accuracy and their mean from records holding ``variant``, ``answer``, ``choice``."""
    correct: dict[int, int] = {}
    total: dict[int, int] = {}
    unparsed: dict[int, int] = {}
    for record in records:
        variant = int(record["variant"])
        total[variant] = total.get(variant, 0) + 1
        correct[variant] = correct.get(variant, 0) + int(record["choice"] == record["answer"])
        unparsed[variant] = unparsed.get(variant, 0) + int(record["choice"] is None)
    if not total:
        raise PerceptioError("no HardBLINK answers to score")
    accuracy = {variant: correct[variant] / total[variant] for variant in sorted(total)}
    return HardBlinkScores(
        accuracy=accuracy,
        questions={variant: total[variant] for variant in sorted(total)},
        unparsed={variant: unparsed[variant] for variant in sorted(total)},
        average=sum(accuracy.values()) / len(accuracy),
    )
