"""Does a fine-tuned model read its depth span on the easiest questions? The reading curriculum's own test.

``perceptio-train --reading-questions N`` teaches marked-point questions on any cells of a picture,
answered by the depth map (:func:`perceptio.curate.marked_points.reading_question`). This check
draws such questions afresh on the pictures of a shard folder (held-out ones, or training ones
for a memorisation check), gives the model the picture's true span as the start of its answer
(teacher forcing, as the decomposition's (d) does) and scores the letter it writes after it,
beside chance (the mean of 1 / points). A model that learnt the lookup from mark to span is far
above chance here, whatever it does on the hard split; ``--curated`` asks the pictures' curated
questions (on objects) the same way, ``--direct`` asks for the letter alone (a model trained
without depth tokens, the ablation's other arm). Scores come by point count and by placement:
questions whose points all lie near their cells' centres, and the others (``--spread`` says where
reading points fall; curated ones fall anywhere). ``--other-spans`` hands each question another
picture's span that names another answer: a model that reads its span follows the span, one that
answers from the picture does not. A model trained with ``--mark-readouts`` also writes each mark's
code after the span: scored against the given span's code at the mark (and, after another picture's
span, against the picture's own)::

    python benchmarks/reading_check.py --checkpoint RUN/model --shards HELDOUT/ade20k --pictures 40
"""

from __future__ import annotations

import argparse
import io
import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from perceptio.curate.marked_points import READING_ANSWER_GAP, codes_at_points
from perceptio.evaluate.hardblink import parse_choice
from perceptio.evaluate.predict import Predictor
from perceptio.shards import list_shards
from perceptio.tokens import depth_codes_in
from perceptio.train.bad_data import SkipCounter, read_shard
from perceptio.train.config import StreamConfig
from perceptio.train.data import Example, PromptTemplates, expand_sample, npy_load, token_grid_nearness
from perceptio.train.miniature import GRID, grid_cell  # the depth tokens' grid is the image tokens' 10 x 10

BATCH = 16
# A question is "centred" when each point lies within this many cells of its cell's centre (a disc
# mark then stays mostly inside its cell); curated points fall anywhere, most beyond it.
CENTRED = 0.3


def reading_examples(folder: Path, pictures: int, per_picture: int, seed: int, curated: bool = False,
                     direct: bool = False, spread: float = StreamConfig.reading_spread) -> list[Example]:
    """``per_picture`` reading questions (fewer where a draw has no clear answer) on the first
    ``pictures`` ADE-layout pictures of the folder, drawn as the trainer draws them with ``seed`` and
    ``spread`` (where in its cell each point falls);
    ``curated``: the pictures' curated questions instead (points on objects, answered by the true depth);
    ``direct``: asked for the letter alone (a model trained without depth tokens)."""
    templates, examples, seen = PromptTemplates.load(), [], 0
    kind = "/q" if curated else "/r"
    for shard in list_shards(folder):
        for _, raw in read_shard(str(shard.path), SkipCounter(quiet=True)):
            if seen == pictures:
                return examples
            drawn = [example for example in expand_sample(raw, templates, not direct, "depth", per_picture, (seed, 0), spread)
                     if kind in example.key]
            seen += bool(drawn)
            examples += drawn
    return examples


def true_span(example: Example) -> str:
    """The question's target up to its letter: "[D_START] .. [D_END]" ("" for a direct question)."""
    return example.target[: example.target.rindex("(")]


def written_letters(predictor: Predictor, examples: list[Example],
                    prefixes: list[str]) -> tuple[list[str | None], list[list[int]]]:
    """The letter written for each question after its prefix (a span; "": asked for the letter
    alone), and the readout codes written before it (none but for ``--mark-readouts`` models)."""
    letters, readouts = [], []
    for start in range(0, len(examples), BATCH):
        batch, given = examples[start:start + BATCH], prefixes[start:start + BATCH]
        replies = predictor.predict_batch([example.image() for example in batch], [example.prompt for example in batch],
                                          answer_prefixes=given if any(given) else None)
        letters += [parse_choice(reply.text, len(example.marks.labels)) for example, reply in zip(batch, replies)]
        readouts += [reply.readout_codes for reply in replies]
    return letters, readouts


def readouts_matching(examples: list[Example], readouts: list[list[int]], spans: list[str]) -> float | None:
    """The share of marks whose readout code is ``spans``' code at the mark's cell; None without readouts."""
    if not any(readouts):
        return None
    matched = []
    for example, written, span in zip(examples, readouts, spans):
        marked = codes_at_points(depth_codes_in(span), example.marks.points, image_size(example))
        matched += [index < len(written) and written[index] == code for index, code in enumerate(marked)]
    return sum(matched) / len(matched)


def letters_right(predictor: Predictor, examples: list[Example]) -> tuple[list[bool], float | None]:
    """Per question: is the letter written after the given true span (none for direct questions) the
    answer? And the share of readouts equal to that span's codes (:func:`readouts_matching`)."""
    spans = [true_span(example) for example in examples]
    letters, readouts = written_letters(predictor, examples, spans)
    return [letter == example.target[-2] for letter, example in zip(letters, examples)], readouts_matching(examples, readouts, spans)


def image_size(example: Example) -> tuple[int, int]:
    """(width, height) of the question's picture, from its header alone."""
    return Image.open(io.BytesIO(example.image_bytes)).size


def other_span_questions(examples: list[Example]) -> list[tuple[Example, str, str]]:
    """Each question with the true span of another of the examples' pictures whose depth map, pooled on
    the span's grid, clearly names another answer at the question's cells (nearest beats next by
    READING_ANSWER_GAP), and that answer; a question no other picture answers so is left out. A model
    that reads its span follows the span's answer; one that answers from the picture, its own."""
    spans: dict[str, str] = {}  # per picture: its true span and its depth map's cell means, computed once
    nearness: dict[str, np.ndarray] = {}
    for example in examples:
        picture = example.key.split("/")[0]
        if picture not in spans and example.depth_bytes is not None:
            spans[picture] = true_span(example)
            nearness[picture] = token_grid_nearness(npy_load(example.depth_bytes), GRID * GRID).reshape(-1)
    names = list(spans)
    paired = []
    for index, example in enumerate(examples):
        own = example.key.split("/")[0]
        cells = [grid_cell(point, image_size(example)) for point in example.marks.points]
        rotated = names[index % len(names):] + names[: index % len(names)]  # a different partner order per question
        for name in rotated:
            values = nearness[name][cells]
            ordered = np.sort(values)
            answer = example.marks.labels[int(np.argmax(values))]
            if name != own and ordered[-1] - ordered[-2] >= READING_ANSWER_GAP and answer != example.target[-2]:
                paired.append((example, spans[name], answer))
                break
    return paired


def farthest_from_centre(example: Example) -> float:
    """How far the question's point farthest from its grid cell's centre lies, in cells (0.5: on an edge)."""
    width, height = image_size(example)
    return max(max(abs(x * GRID / width % 1 - 0.5), abs(y * GRID / height % 1 - 0.5)) for x, y in example.marks.points)


def scores_by_placement(examples: list[Example], hits: list[bool]) -> dict[str, dict[str, float]]:
    """Questions, share right and chance for the centred questions (every point within
    :data:`CENTRED` of its cell's centre) and the others."""
    groups: dict[str, list[tuple[Example, bool]]] = {"centred": [], "off_centre": []}
    for example, hit in zip(examples, hits):
        groups["centred" if farthest_from_centre(example) <= CENTRED else "off_centre"].append((example, hit))
    return {name: {"questions": len(group), "right": sum(hit for _, hit in group) / len(group),
                   "chance": sum(1 / len(example.marks.labels) for example, _ in group) / len(group)}
            for name, group in groups.items() if group}


def lowest_point_answers(examples: list[Example]) -> float:
    """How often the lowest marked point in the picture is the answer: the picture's own cue, which a
    model can use instead of the span."""
    return sum(example.marks.labels[max(range(len(example.marks.points)), key=lambda i: example.marks.points[i][1])]
               == example.target[-2] for example in examples) / len(examples)


def true_span_scores(predictor: Predictor, examples: list[Example]) -> tuple[dict[str, Any], str]:
    """The letters after the true spans (or alone, for direct questions), scored; and a line to print."""
    hits, readouts = letters_right(predictor, examples)
    asked, right = Counter(), Counter()
    for example, hit in zip(examples, hits):
        asked[len(example.marks.labels)] += 1
        right[len(example.marks.labels)] += hit
    record = {
        "questions": len(examples),
        "letter_after_true_span": sum(hits) / len(hits),
        "chance": sum(1 / len(example.marks.labels) for example in examples) / len(examples),
        "lowest_point_is_the_answer": lowest_point_answers(examples),
        "by_points": {points: right[points] / asked[points] for points in sorted(asked)},
        "by_placement": scores_by_placement(examples, hits),
        "readouts_are_the_spans": readouts,
    }
    asked_for = "letter after the true span" if true_span(examples[0]) else "letter"
    line = (f"{record['questions']} QUESTIONS: {asked_for} {100 * record['letter_after_true_span']:.1f}% "
            f"(chance {100 * record['chance']:.1f}; the lowest point: {100 * record['lowest_point_is_the_answer']:.1f}); by points: "
            + ", ".join(f"{points}: {100 * share:.1f}" for points, share in record["by_points"].items()) + "; "
            + ", ".join(f"{name.replace('_', '-')} ({group['questions']}): {100 * group['right']:.1f} (chance {100 * group['chance']:.1f})"
                        for name, group in record["by_placement"].items()))
    if readouts is not None:
        line += f"; readouts equal to the span's codes: {100 * readouts:.1f}%"
    return record, line


def other_span_scores(predictor: Predictor, examples: list[Example]) -> tuple[dict[str, Any], str]:
    """The letters after another picture's span (:func:`other_span_questions`): how often each is the
    picture's answer and how often the span's; and a line to print."""
    paired = other_span_questions(examples)
    asked = [example for example, _, _ in paired]
    letters, readouts = written_letters(predictor, asked, [span for _, span, _ in paired])
    record = {
        "questions": len(paired),
        "letter_is_the_pictures_answer": sum(letter == example.target[-2] for letter, (example, _, _) in zip(letters, paired)) / len(paired),
        "letter_is_the_spans_answer": sum(letter == answer for letter, (_, _, answer) in zip(letters, paired)) / len(paired),
        "chance": sum(1 / len(example.marks.labels) for example, _, _ in paired) / len(paired),
        "readouts_are_the_spans": readouts_matching(asked, readouts, [span for _, span, _ in paired]),
        "readouts_are_the_pictures": readouts_matching(asked, readouts, [true_span(example) for example in asked]),
    }
    line = (f"{record['questions']} QUESTIONS after another picture's span: the letter is the picture's answer "
            f"{100 * record['letter_is_the_pictures_answer']:.1f}%, the span's {100 * record['letter_is_the_spans_answer']:.1f}% "
            f"(chance {100 * record['chance']:.1f})")
    if record["readouts_are_the_spans"] is not None:
        line += (f"; readouts equal to the given span's codes {100 * record['readouts_are_the_spans']:.1f}%, "
                 f"to the picture's {100 * record['readouts_are_the_pictures']:.1f}%")
    return record, line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="an exported model (perceptio-train's RUN/model)")
    parser.add_argument("--shards", type=Path, required=True, help="an ADE-layout shard folder with depth maps")
    parser.add_argument("--pictures", type=int, default=40)
    parser.add_argument("--per-picture", type=int, default=6, help="reading questions drawn per picture")
    parser.add_argument("--seed", type=int, default=1, help="the draws' seed (another than the training run's)")
    parser.add_argument("--spread", type=float, default=StreamConfig.reading_spread,
                        help="the central share of its cell a point falls in (perceptio-train --reading-spread)")
    parser.add_argument("--curated", action="store_true",
                        help="the pictures' curated questions (on objects) instead of reading questions")
    parser.add_argument("--direct", action="store_true", help="ask for the letter alone (a --no-depth-tokens model)")
    parser.add_argument("--other-spans", action="store_true",
                        help="give each question another picture's true span, one that names another answer: does the letter follow the span or the picture?")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, help="write the scores as JSON here")
    arguments = parser.parse_args()
    if arguments.other_spans and arguments.direct:
        parser.error("--other-spans needs questions answered after a span, not --direct ones")
    torch.set_num_threads(arguments.threads)
    examples = reading_examples(arguments.shards, arguments.pictures, arguments.per_picture, arguments.seed,
                                arguments.curated, arguments.direct, arguments.spread)
    predictor = Predictor.from_checkpoint(arguments.checkpoint)
    record, line = (other_span_scores if arguments.other_spans else true_span_scores)(predictor, examples)
    print(line.replace("QUESTIONS", "curated questions" if arguments.curated else "reading questions"))
    if arguments.out is not None:
        arguments.out.write_text(json.dumps({"arguments": {k: str(v) for k, v in vars(arguments).items()}, **record}, indent=2))


if __name__ == "__main__":
    main()
