"""Held-out referring segmentation by kind of expression, on the synthetic world.

``perceptio-evaluate refseg --out R.json`` lists every expression with its intersection and union;
this script groups them by what the expression asks for (the world's expressions name a colour, a
shape, or a relation: left/right, near/far, size; ``perceptio/sources/synth/expressions.py``) and
prints cIoU, gIoU and precision@0.5 per kind, scored by ``perceptio.evaluate.metrics.refseg_scores``
as the command scores. It tells a mask path that finds "the red one" but not "the smaller cube"
from one that finds nothing::

    perceptio-evaluate refseg --checkpoint RUN/model --shards ablation-out/heldout-shards/refcoco \\
        --split train --limit 200 --out R.json
    python benchmarks/refseg_kinds.py R.json [R2.json ...]
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from perceptio.evaluate.metrics import MaskOverlap, RefSegScores, refseg_scores
from perceptio.sources.synth.scene import COLOURS, SHAPES
from probes import words
from oracle_prompt import expression

# The first relation word an expression uses decides its kind (synth/expressions.py's wordings).
RELATION_WORDS = {
    "left": ("left", "leftmost"), "right": ("right", "rightmost"),
    "near": ("closer", "nearer", "closest", "nearest"), "far": ("farther", "further", "farthest"),
    "size": ("bigger", "larger", "biggest", "largest", "smaller", "smallest", "tiniest"),
}
KIND_OF_WORD = {word: kind for kind, names in RELATION_WORDS.items() for word in names}
KINDS = (*RELATION_WORDS, "colour", "shape", "other", "all")


def kind(text: str) -> str:
    """"left", "near", ... for a relation; else "colour" when a colour is named, else "shape"."""
    said = words(expression(text))
    relation = next((KIND_OF_WORD[word] for word in said if word in KIND_OF_WORD), None)
    if relation is not None:
        return relation
    return "colour" if set(said) & set(COLOURS) else "shape" if set(said) & set(SHAPES) else "other"


def by_kind(records: list[dict]) -> dict[str, RefSegScores]:
    """cIoU, gIoU and precision@0.5 per kind and overall, scored as ``perceptio-evaluate refseg`` scores."""
    overlaps: dict[str, list[MaskOverlap]] = defaultdict(list)
    missing: dict[str, int] = defaultdict(int)
    for record in records:
        for name in (kind(record["prompt"]), "all"):
            overlaps[name].append(MaskOverlap(int(record["intersection"]), int(record["union"])))
            missing[name] += int(record["missing_seg"])
    return {name: refseg_scores(overlaps[name], missing[name]) for name in overlaps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, nargs="+", help="perceptio-evaluate refseg --out files")
    arguments = parser.parse_args()
    tables = {path.name: by_kind(json.loads(path.read_text())["per_expression"]) for path in arguments.results}
    print("| kind | " + " | ".join(f"{name}: n, cIoU, gIoU, P@0.5" for name in tables) + " |")
    print("| --- |" + " --- |" * len(tables))
    for name in KINDS:
        cells = [f"{t[name].expressions}, {100 * t[name].ciou:.1f}, {100 * t[name].giou:.1f}, {100 * t[name].precision_at_50:.1f}"
                 if name in t else "-" for t in tables.values()]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
