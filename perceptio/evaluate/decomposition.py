"""Where a relative-depth answer comes from: (a) true tokens, (b) the model's tokens, (c) its letter.

For a marked-point question whose points are known (the synthetic HardBLINK split records them):

- (a) ``truth_choice``: the answer read from the ground-truth depth tokens of the image (the
  world's true depth encoded by the depth tokenizer, decoded, read at the points): the ceiling of
  what any tokens can give;
- (b) ``token_choice``: the same reading of the tokens the model generated (None when it wrote
  no well-formed span);
- (c) ``choice``: the letter the model wrote;
- (d) ``truth_fed_choice``: the letter the model writes when its answer is begun with the
  ground-truth span (the span teacher-forced, as in training): can it read a perfect span?

Where (c) falls short of (b) the model does not use its own perception; where (b) falls short of
(a) it writes wrong tokens; where (d) falls short of (a) it cannot read even the true span.
``token_accuracy`` is the share of the generated codes equal to the true ones (position by position).
A model trained with ``--mark-readouts`` writes each mark's code after its span: ``readout_copy`` is
the share of those equal to its own span's code at the mark's cell (does it copy its span?),
``readout_truth`` the share equal to the true code there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from perceptio.curate.marked_points import codes_at_points
from perceptio.evaluate.metrics import token_accuracy

COLUMNS = ("truth_choice", "token_choice", "choice", "truth_fed_choice")
READOUT_COLUMNS = ("readout_copy", "readout_truth")


@dataclass
class TokenReader:
    """Reads depth codes at a question's points; knows the true codes of the world's images."""

    tokenizer: Any  # perceptio.tokenize.DepthVQVAE
    world: Path | None = None  # the synthetic world the questions were drawn from (for (a))
    _truth: dict[str, list[int]] = field(default_factory=dict)

    def truth_codes(self, row: dict[str, Any]) -> list[int] | None:
        """The ground-truth tokens of the question's source image (cached per image)."""
        source = row.get("source_file")
        if self.world is None or source is None:
            return None
        if source not in self._truth:
            from perceptio.tokenize.teacher import OracleTeacher

            depth = OracleTeacher(self.world / "depth").predict_paths([self.world / source])[0]
            self._truth[source] = [int(code) for code in self.tokenizer.encode(depth)[0].reshape(-1).tolist()]
        return self._truth[source]

    def truth_span(self, row: dict[str, Any]) -> str:
        """The ground-truth span as the model writes it (``[D_START]`` codes ``[D_END]``); empty when unknown."""
        from perceptio.tokens import depth_span

        truth = self.truth_codes(row)
        return depth_span(truth) if truth is not None else ""

    def columns(self, row: dict[str, Any], codes: Sequence[int], well_formed: bool, asked_for_tokens: bool = True,
                readouts: Sequence[int] = ()) -> dict[str, Any]:
        """(a), and (b) with the token accuracy when the model was asked to write its span, of one
        question, and how its ``readouts`` (if any) match its span and the truth at the marks; empty
        when the question does not record its points."""
        from perceptio.evaluate.depth_answer import answer_from_codes

        if "points" not in row or "labels" not in row:
            return {}
        size = (int(row["image_width"]), int(row["image_height"]))
        points, labels = row["points"], row["labels"]
        record: dict[str, Any] = {}
        if asked_for_tokens:
            record.update(well_formed=bool(well_formed), token_choice=None, token_accuracy=None)
        if asked_for_tokens and well_formed:
            record["token_choice"] = answer_from_codes(self.tokenizer, list(codes), points, labels, size)
        truth = self.truth_codes(row)
        if truth is not None:
            record["truth_choice"] = answer_from_codes(self.tokenizer, truth, points, labels, size)
            if asked_for_tokens and well_formed:
                record["token_accuracy"] = token_accuracy(list(codes), truth)
        if readouts:
            def matching(span: Sequence[int]) -> float:  # readout i against the span's code at point i
                marked = codes_at_points(span, points, size)
                return float(np.mean([i < len(readouts) and readouts[i] == code for i, code in enumerate(marked)]))

            if well_formed:
                record["readout_copy"] = matching(codes)
            if truth is not None:
                record["readout_truth"] = matching(truth)
        return record


def decomposition_scores(records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy of (a), (b), (c) per point count and over all questions, with span statistics."""
    by_variant: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        by_variant.setdefault(str(record["variant"]), []).append(record)
    everything = [record for group in by_variant.values() for record in group]
    scores: dict[str, Any] = {}
    for name, group in [*sorted(by_variant.items()), ("all", everything)]:
        entry: dict[str, Any] = {"questions": len(group)}
        for column in COLUMNS:
            present = [record for record in group if column in record]
            entry[column] = (float(np.mean([record[column] == record["answer"] for record in present]))
                             if present and len(present) == len(group) else None)
        formed = [record for record in group if record.get("well_formed")]
        entry["well_formed"] = len(formed) / len(group) if group and "well_formed" in group[0] else None  # None: asked directly
        accuracies = [record["token_accuracy"] for record in formed if record.get("token_accuracy") is not None]
        entry["token_accuracy"] = float(np.mean(accuracies)) if accuracies else None
        for column in READOUT_COLUMNS:
            shares = [record[column] for record in group if column in record]
            entry[column] = float(np.mean(shares)) if shares else None
        scores[name] = entry
    overall = scores["all"]
    return {"by_variant": scores, "token_accuracy": overall["token_accuracy"], "truth_choice": overall["truth_choice"],
            "token_choice": overall["token_choice"], "choice": overall["choice"],
            "truth_fed_choice": overall["truth_fed_choice"], "well_formed": overall["well_formed"],
            **{column: overall[column] for column in READOUT_COLUMNS}}
