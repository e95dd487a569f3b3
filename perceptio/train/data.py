"""Training data: shards streamed with webdataset into mixed, shuffled, encoded batches.

The path of one example, from disk to the model:

1. :func:`find_shards` lists ``{dataset}-{split}-{index:06d}.tar`` files of the chosen splits and
   :func:`plan_mix` groups them into weighted streams (``--mix refcoco=1,refcocog=1,ade20k=0.5``).
2. Every reader (one DataLoader worker of one rank) takes its own shards of every stream: each
   epoch the stream's shard list is shuffled with a seed shared by all ranks, then split by node and
   by worker (the slicing of ``webdataset.split_by_node`` then ``webdataset.split_by_worker``, done
   with explicit ids because a resumed run renumbers its workers, see :class:`ShardStream`).
3. :func:`perceptio.train.bad_data.read_shards` reads the tars, skipping and counting what does not
   read or decode (see bad_data.py); :func:`expand_sample` turns one sample into examples (one per
   (ref, sentence), one per marked-point question for ADE20k and per reading question drawn for
   this epoch, its span short in the curriculum's first epochs, one conversation for LLaVA, one
   grounded caption for GranD-f) with the templates of ``manifests/prompts.json``; a seeded buffer
   mixes them (webdataset's ``shuffle``, on a buffer the reader can save and rebuild).
4. A seeded draw picks the stream of each example in proportion to its weight, so a stream's share
   does not depend on its size. Streams repeat endlessly (epoch after epoch, reshuffled), so every
   rank makes exactly as many steps as asked and no rank waits for another at an epoch's end.
5. Only then are images decoded and the processor's ``encode_conversation`` run (it lays the
   turns out with the chat template and labels the answers only); DataLoader workers get the processor
   (:class:`perceptio.train.processor.PerceptioProcessor`), never the model.

Exact resume: a reader's position is (draws made, and per stream the epoch, the examples taken in
it, the last sample read and the examples waiting in the shuffle buffer). Everything before
encoding is a pure function of the seed, so a reader rebuilt from its position seeks: it skips the
shards before the last one read without opening them, passes over the samples before the position
in that shard without decoding them, reads back the buffered examples' samples, and goes on with
the very next example (see :class:`_StreamReader`).
"""

from __future__ import annotations

import io
import json
import os
import random
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence

import numpy as np
import torch

from perceptio import fs
from perceptio.curate.marked_points import (
    HARDBLINK_MARKS,
    cell_names,
    codes_at_points,
    draw_marks,
    grid_side,
    point_cell,
    reading_question,
    swapped_reading_question,
)
from perceptio.errors import PerceptioError
from perceptio.recipes import load_recipe
from perceptio.shards import (
    CONVERSATION_FIELD,
    GROUNDED_FIELD,
    QUESTION_FIELD,
    QUESTIONS_FIELD,
    ShardFile,
    dataset_folders,
    list_shards,
    npy_load,
    rle_to_mask,
)
from perceptio.tokens import SEG, depth_span, mark_readouts
from perceptio.train.bad_data import SkipCounter, guarded, read_shard, read_shards
from perceptio.train.chat import ASSISTANT, USER, Turn, as_turns
from perceptio.train.config import QUESTION_TARGETS, TRAINING_SPLITS, StreamConfig
from perceptio.train.preemption import ignore_stop_signals


# ---------------------------------------------------------------------------------------- shards
def find_shards(dirs: Sequence[str | os.PathLike[str]], splits: Sequence[str] = TRAINING_SPLITS) -> list[ShardFile]:
    """Every shard of ``splits`` in ``dirs``, each a dataset's folder or their parent, sorted by path."""
    found: list[ShardFile] = []
    for directory in dirs:
        if not fs.is_dir(directory):
            raise PerceptioError(f"shard folder {directory} does not exist")
        for folder in dataset_folders(directory):
            found += list_shards(folder, splits)
    if not found:
        raise PerceptioError(
            f"no shards of split(s) {', '.join(splits)} in {', '.join(map(str, dirs))} "
            "(expected {dataset}-{split}-{index:06d}.tar files from perceptio-curate; on an object store, "
            "each with its __meta__/NAME_stats.json marker)"
        )
    return sorted(found, key=lambda shard: str(shard.path))


def parse_mix(text: str) -> dict[str, float]:
    """``"refcoco=1,refcocog=1,ade20k=0.5"`` -> ``{"refcoco": 1.0, ...}``."""
    weights: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, equals, value = item.partition("=")
        try:
            weight = float(value)
        except ValueError:
            weight = -1.0
        if not equals or not name.strip() or weight < 0 or not np.isfinite(weight):
            raise PerceptioError(f"--mix item {item!r} is not NAME=WEIGHT with a weight >= 0")
        weights[name.strip()] = weight
    if not weights or not any(weights.values()):
        raise PerceptioError(f"--mix {text!r} gives no dataset a positive weight")
    return weights


def mix_key_for(dataset: str, keys: Sequence[str]) -> str | None:
    """The mix key that claims a dataset name, or None.

    A key matches the full name (``refcoco-unc``) or its family, the part before the first dash
    (``refcoco`` for ``refcoco-unc`` and ``refcoco-google``, but not ``refcoco+-unc`` or
    ``refcocog-umd``). The full name wins over the family, so ``refcoco=1,refcoco-google=0``
    keeps only the UNC partition.
    """
    if dataset in keys:
        return dataset
    family = dataset.split("-", 1)[0]
    return family if family in keys else None


@dataclass(frozen=True)
class Stream:
    """One weighted stream of the mix: the shards its key claims."""

    name: str
    weight: float
    shards: tuple[Path | str, ...]  # local paths or object-store URLs
    datasets: tuple[str, ...]


def plan_mix(shards: Sequence[ShardFile], mix: dict[str, float] | None) -> list[Stream]:
    """Group shards into weighted streams; without a mix every dataset is a stream of weight 1.

    Datasets no key claims, and keys of weight 0, are left out; a key that claims nothing is an
    error (most likely a typo).
    """
    weights = mix if mix is not None else {name: 1.0 for name in sorted({shard.dataset for shard in shards})}
    claimed: dict[str, list[ShardFile]] = {name: [] for name in weights}
    for shard in shards:
        key = mix_key_for(shard.dataset, list(weights))
        if key is not None:
            claimed[key].append(shard)
    available = sorted({shard.dataset for shard in shards})
    for name, members in claimed.items():
        if not members:
            raise PerceptioError(f"--mix names {name!r} but no shard matches it; datasets found: {', '.join(available)}")
    return [
        Stream(name, weights[name], tuple(s.path for s in members), tuple(sorted({s.dataset for s in members})))
        for name, members in sorted(claimed.items())
        if weights[name] > 0
    ]


# -------------------------------------------------------------------------------------- examples
@dataclass(frozen=True)
class PromptTemplates:
    """The templates of ``manifests/prompts.json``."""

    grounding_prompts: tuple[str, ...]
    grounding_target: str
    question_prompts: tuple[str, ...]
    question_target: str
    direct_question_prompts: tuple[str, ...]
    direct_question_target: str
    caption_prompts: tuple[str, ...]
    text_reading_prompts: tuple[str, ...]

    @classmethod
    def load(cls, name: str = "prompts.json") -> "PromptTemplates":
        recipe = load_recipe(name)
        return cls(
            tuple(recipe["grounding"]["prompts"]),
            recipe["grounding"]["target"],
            tuple(recipe["depth_question"]["prompts"]),
            recipe["depth_question"]["target"],
            tuple(recipe["direct_question"]["prompts"]),
            recipe["direct_question"]["target"],
            tuple(recipe["grounded_caption"]["prompts"]),
            tuple(recipe["text_reading"]["prompts"]),
        )


@dataclass(frozen=True)
class Marks:
    """The points a marked-point question marks on its image, their letters and how they are drawn
    (:data:`perceptio.curate.marked_points.MARK_STYLES`)."""

    points: tuple[tuple[int, int], ...]
    labels: tuple[str, ...]
    style: str


@dataclass
class Example:
    """One training example, still undecoded (cheap to skip when a resumed run fast-forwards)."""

    # "{sample key}/ref{ref_id}/sent{sent_id}", "{sample key}/q{i}[/{variant}]" (a curated question),
    # "{sample key}/r{i}" (a reading question), "{sample key}/t{i}" (one asked in text alone),
    # "{sample key}/question" or the sample key
    key: str
    source: str  # the sample's json "dataset", e.g. "refcoco-unc"
    turns: tuple[Turn, ...]  # user, assistant, ...: a single question and answer for perception data
    image_bytes: bytes | None  # None: a text-only conversation
    mask_rles: tuple[dict[str, Any], ...]  # the targets of the answers' [SEG]s, in order
    depth_bytes: bytes | None  # depth.npy, float16 (320, 320); None for samples without depth
    # Points and letters drawn on the image when it is decoded (marked-point questions).
    marks: Marks | None = None
    # The answer's depth span is context, not a target (a swapped reading question's): unlabelled.
    span_is_context: bool = False
    # Cells of the answer's span hidden from attention (a short span, StreamConfig.reading_short_spans).
    hidden_cells: tuple[int, ...] = ()

    @property
    def prompt(self) -> str:
        """The last question (the only one of a perception example)."""
        return self.turns[-2].text

    @property
    def target(self) -> str:
        """The last answer."""
        return self.turns[-1].text

    @property
    def mask_rle(self) -> dict[str, Any] | None:
        """The first [SEG]'s mask (the only one of a referring example)."""
        return self.mask_rles[0] if self.mask_rles else None

    def image(self) -> Any:
        """The decoded RGB image, with the question's marks drawn when it has some; None without one."""
        from PIL import Image

        if self.image_bytes is None:
            return None
        image = Image.open(io.BytesIO(self.image_bytes)).convert("RGB")
        if self.marks is not None:
            image = draw_marks(image, self.marks.points, self.marks.labels, self.marks.style)
        return image

    def decode(self) -> dict[str, Any]:
        """Keyword arguments of the processor's ``encode_conversation``."""
        depth = npy_load(self.depth_bytes).astype(np.float32) if self.depth_bytes is not None else None
        return {"image": self.image(), "turns": list(self.turns), "masks": [rle_to_mask(rle) for rle in self.mask_rles],
                "depth": depth, "span_is_context": self.span_is_context, "hidden_cells": self.hidden_cells}


def _single(key: str, source: str, prompt: str, target: str, image: bytes, mask: dict[str, Any] | None,
            depth: bytes | None, marks: Marks | None = None) -> Example:
    return Example(key, source, (Turn(USER, prompt), Turn(ASSISTANT, target)), image, (mask,) if mask else (), depth,
                   marks)


def grounded_target(caption: str, phrases: Sequence[dict[str, Any]]) -> str:
    """The caption with a ``[SEG]`` right after each phrase, in order (GLaMM's interleaved masks)."""
    parts, position = [], 0
    for phrase in phrases:
        parts += [caption[position:phrase["end"]], f" {SEG}"]
        position = phrase["end"]
    return "".join(parts) + caption[position:]


def _pick(options: Sequence[str], key: str) -> str:
    # A stable hash of the key (not Python's salted hash) keeps the choice identical across runs.
    return options[zlib.crc32(key.encode("utf-8")) % len(options)]


def _question_variants(question: dict[str, Any], question_targets: str, use_depth_tokens: bool) -> list[str]:
    if not use_depth_tokens:
        return ["direct"]
    if question_targets == "both":
        return ["direct", "depth"]
    if question_targets == "recorded":
        return [question.get("target", "depth")]  # one-question shards and reading questions have none: depth first
    return [question_targets]


def _question_example(key: str, source: str, question: dict[str, Any], variant: str, depth: str,
                      templates: PromptTemplates, image_bytes: bytes, depth_bytes: bytes | None,
                      marks: Marks | None) -> Example:
    if variant == "direct":
        prompts, target = templates.direct_question_prompts, templates.direct_question_target
    else:
        prompts, target = templates.question_prompts, templates.question_target
    prompt = _pick(prompts, key).format(question=question["text"])
    return _single(key, source, prompt, target.format(depth=depth, answer=question["answer"]), image_bytes, None,
                   depth_bytes, marks)


def token_grid_nearness(depth: np.ndarray, tokens: int) -> np.ndarray:
    """A normalised depth map pooled to its depth tokens' grid: (G, G) cell means, G = sqrt(tokens)."""
    side = int(round(tokens ** 0.5))
    cell = depth.shape[0] // side
    return depth[: cell * side, : cell * side].astype(np.float32).reshape(side, cell, side, cell).mean((1, 3))


def readouts(question: dict[str, Any], codes: Sequence[int], size: tuple[int, int], with_cells: bool = False) -> str:
    """A question's mark readouts: each letter (``with_cells``: and its cell, "A 3 7") with the code,
    in ``codes`` (the span it is asked after), of the cell its point falls in on the span's grid."""
    cells = cell_names(question["points"], size, grid_side(codes)) if with_cells else None
    return mark_readouts(question["labels"], codes_at_points(codes, question["points"], size), cells)


def _text_question_example(key: str, source: str, question: dict[str, Any], depth: str, templates: PromptTemplates,
                           size: tuple[int, int], grid: int) -> Example:
    """A reading question asked in text alone (``--reading-in-text``): no picture, each mark named by
    its cell ("A 3 7, B 1 8"), the span (``depth``) given as context before the letter."""
    points = ", ".join(f"{label} {cell}" for label, cell in zip(question["labels"], cell_names(question["points"], size, grid)))
    prompt = _pick(templates.text_reading_prompts, key).format(points=points, grid=grid)
    target = templates.question_target.format(depth=depth, answer=question["answer"])
    example = Example(key, source, (Turn(USER, prompt), Turn(ASSISTANT, target)), None, (), None)
    example.span_is_context = True
    return example


@dataclass(frozen=True)
class ReadingDraw:
    """One reading question as drawn: the span it is asked after when that is not the picture's
    own (swapped), whether it is asked in text alone, and the span's cells hidden (a short span)."""

    question: dict[str, Any]
    span: list[int] | None = None
    in_text: bool = False
    hidden_cells: tuple[int, ...] = ()


def hidden_cells(question: dict[str, Any], size: tuple[int, int], grid: int, visible: int,
                 rng: np.random.Generator) -> tuple[int, ...]:
    """A short span's hidden cells: all but the marked cells and random others, ``visible`` in all."""
    marked = {point_cell(point, size, grid) for point in question["points"]}
    others = [cell for cell in range(grid * grid) if cell not in marked]
    shown = marked | set(rng.permutation(others)[: max(0, visible - len(marked))].tolist())
    return tuple(cell for cell in range(grid * grid) if cell not in shown)


def _reading_questions(raw: dict[str, Any], meta: dict[str, Any], codes: Sequence[int], count: int,
                       seed: Sequence[int], spread: float, swaps: float,
                       in_text: float = 0.0, visible: int | None = None) -> list[ReadingDraw]:
    """``count`` draws of :func:`reading_question` (points in the central ``spread`` of their cells)
    on the sample's depth map pooled to its depth tokens' grid (the draws without a clear answer are
    left out), marked as its curated questions are; each with the span it is asked after when that
    is not the picture's own: a share ``swaps`` of them is swapped (:func:`swapped_reading_question`);
    whether it is asked in text alone: a share ``in_text`` of them; and, with ``visible`` below the
    grid's cells, the cells its span hides (:func:`hidden_cells`)."""
    nearness = token_grid_nearness(npy_load(raw["depth.npy"]), len(codes))
    key_hash = zlib.crc32(raw["__key__"].encode("utf-8"))
    rng = np.random.default_rng([*seed, key_hash])
    curated = meta.get(QUESTIONS_FIELD) or [{}]
    style = curated[0].get("mark_style", HARDBLINK_MARKS)
    drawn = (reading_question(nearness, (meta["width"], meta["height"]), rng, spread, style) for _ in range(count))
    questions = [question for question in drawn if question is not None]
    if swaps or in_text:  # no draws without either: the questions of such runs stay as they were
        # Which are asked in text has draws of its own: the questions and their spans are those of a run without.
        text_rng = np.random.default_rng([*seed, key_hash, 1])
        draws = []
        for question in questions:
            question, span = swapped_reading_question(question, codes, nearness, rng) if rng.random() < swaps else (question, None)
            draws.append(ReadingDraw(question, span, bool(text_rng.random() < in_text)))
    else:
        draws = [ReadingDraw(question) for question in questions]
    if visible is None or visible >= len(codes):
        return draws
    # Short spans have draws of their own too: the questions are those of a run with whole spans.
    short_rng = np.random.default_rng([*seed, key_hash, 2])
    size, grid = (meta["width"], meta["height"]), grid_side(codes)
    return [replace(draw, hidden_cells=hidden_cells(draw.question, size, grid, visible, short_rng)) for draw in draws]


def expand_sample(raw: dict[str, Any], templates: PromptTemplates, use_depth_tokens: bool = True,
                  question_targets: str = "recorded", reading_questions: int = 0,
                  reading_seed: Sequence[int] = (), reading_spread: float = StreamConfig.reading_spread,
                  reading_swaps: float = StreamConfig.reading_swaps,
                  mark_readouts: bool = StreamConfig.mark_readouts,
                  reading_in_text: float = StreamConfig.reading_in_text,
                  readout_cells: bool = StreamConfig.readout_cells,
                  reading_visible: int | None = None) -> list[Example]:
    """The training examples of one shard sample (a webdataset dict of member bytes).

    Grounding samples give one example per (ref, sentence). ADE20k samples give one example per
    marked-point question of ``questions`` (the image with that question's points drawn at load
    time), written as ``question_targets`` says (see :data:`QUESTION_TARGETS`); samples of the
    older one-question format give one example on their ``marked.jpg``. An ADE20k sample with a
    depth map gives ``reading_questions`` more, drawn on any cells by a generator seeded with
    ``reading_seed`` (the run's seed and epoch: new ones each epoch) and the sample's key, each point
    in the central ``reading_spread`` of its cell, keyed ``{key}/r{i}`` and written as the curated
    ones (``recorded``: span first); a share ``reading_swaps`` of them is asked after a span shuffled
    at the marked cells, written span first only, the span as context (no depth target). With
    ``mark_readouts`` every question written span first names, after the span, each mark's letter
    and the span's code at its cell (:func:`perceptio.tokens.mark_readouts`) before the letter,
    ``readout_cells``: each mark's cell too ("A 3 7[D_055]"). A share ``reading_in_text`` of the reading
    questions is asked in text alone, keyed ``{key}/t{i}``: no picture, the marks named by their cells
    in the prompt, the span (the picture's or the swapped one) as context. ``reading_visible``: the
    reading questions' spans show only that many cells, the marked ones among them (the rest hidden
    from attention; the span then context). Without depth tokens the
    span is left out and every question is answered directly; then, and with ``question_targets``
    "direct", none is swapped or asked in text. A LLaVA conversation is one example of all its
    turns; a GranD-f grounded caption one example whose answer holds a [SEG] per phrase.
    """
    if question_targets not in QUESTION_TARGETS:
        raise PerceptioError(f"question targets must be one of {', '.join(QUESTION_TARGETS)}, not {question_targets!r}")
    key = raw["__key__"]
    meta = json.loads(raw["json"])
    source = meta["dataset"]
    codes = npy_load(raw["depth_tokens.npy"]).tolist() if "depth_tokens.npy" in raw else None
    depth = depth_span(codes) if use_depth_tokens and codes is not None else ""
    examples = []
    for ref in meta.get("refs", []):
        for sentence in ref["sentences"]:
            example_key = f"{key}/ref{ref['ref_id']}/sent{sentence['sent_id']}"
            prompt = _pick(templates.grounding_prompts, example_key).format(expression=sentence["sent"])
            target = templates.grounding_target.format(seg=SEG, depth=depth, description=ref.get("description", ""))
            examples.append(_single(example_key, source, prompt, target.strip(), raw["jpg"], ref["mask"], raw.get("depth.npy")))
    questions = meta.get(QUESTIONS_FIELD)
    if questions is not None:
        drawn = []
        if reading_questions and "depth.npy" in raw and codes is not None:
            span_first = use_depth_tokens and question_targets != "direct"  # swaps and text need a span to read
            swaps, in_text = (reading_swaps, reading_in_text) if span_first else (0.0, 0.0)
            drawn = [(f"{'t' if draw.in_text else 'r'}{index}", draw) for index, draw in
                     enumerate(_reading_questions(raw, meta, codes, reading_questions, reading_seed, reading_spread,
                                                  swaps, in_text, reading_visible if span_first else None))]
        size = (meta["width"], meta["height"])
        for name, draw in [(f"q{index}", ReadingDraw(question)) for index, question in enumerate(questions)] + drawn:
            question, span, text = draw.question, draw.span, draw.in_text
            # A swapped question's span is not the picture's, a short one not all of it: no depth target for either.
            context = span is not None or bool(draw.hidden_cells)
            span_text = depth if span is None else depth_span(span)
            depth_bytes = None if context else raw.get("depth.npy")
            if mark_readouts and span_text:
                span_text += readouts(question, span or codes, size, readout_cells)
            if text:  # drawn span first only; the span is context, as nothing shows the picture
                example = _text_question_example(f"{key}/{name}", source, question, span_text, templates, size, grid_side(codes))
                examples.append(replace(example, hidden_cells=draw.hidden_cells))
                continue
            variants = _question_variants(question, question_targets, use_depth_tokens)
            if context:  # answered by the shuffled or short span: only after it
                variants = [variant for variant in variants if variant == "depth"]
            # Questions curated before mark styles existed were drawn as HardBLINK draws them.
            marks = Marks(tuple((int(x), int(y)) for x, y in question["points"]), tuple(question["labels"]),
                          question.get("mark_style", HARDBLINK_MARKS))
            for variant in variants:
                example_key = f"{key}/{name}" + (f"/{variant}" if len(variants) > 1 else "")
                example = _question_example(example_key, source, question, variant, span_text, templates, raw["jpg"],
                                            depth_bytes, marks)
                example.span_is_context, example.hidden_cells = context, draw.hidden_cells
                examples.append(example)
        return examples
    question = meta.get(QUESTION_FIELD)
    if question is not None:
        if "marked.jpg" not in raw:
            raise PerceptioError(f"sample {key} has a question but no marked.jpg ({raw.get('__url__')})")
        for variant in _question_variants(question, question_targets, use_depth_tokens):
            suffix = f"/{variant}" if question_targets == "both" and use_depth_tokens else ""
            examples.append(_question_example(f"{key}/question{suffix}", source, question, variant, depth,
                                              templates, raw["marked.jpg"], raw.get("depth.npy"), None))
    conversation = meta.get(CONVERSATION_FIELD)
    if conversation is not None:
        examples.append(Example(key, source, tuple(as_turns(conversation)), raw.get("jpg"), (), raw.get("depth.npy")))
    grounded = meta.get(GROUNDED_FIELD)
    if grounded is not None:
        prompt = _pick(templates.caption_prompts, key)
        target = grounded_target(grounded["caption"], grounded["phrases"])
        masks = tuple(phrase["mask"] for phrase in grounded["phrases"])
        examples.append(Example(key, source, (Turn(USER, prompt), Turn(ASSISTANT, target)), raw["jpg"], masks,
                                raw.get("depth.npy")))
    return examples


# ---------------------------------------------------------------------------------------- readers
@dataclass(frozen=True)
class ReaderSlot:
    """Which reader this is: one DataLoader worker of one rank."""

    rank: int = 0
    world_size: int = 1
    worker: int = 0
    num_workers: int = 1


def _rng(seed: int, *parts: object) -> random.Random:
    # String seeds are hashed with SHA-512 by `random`, identical in every process and run.
    return random.Random("/".join(map(str, (seed, *parts))))


Token = tuple[int, int, int]  # (shard in the reader's order of the epoch, sample in the tar, example of the sample)


def _shuffled(source: Iterator[Any], buffer: list[Any], size: int, initial: int, rng: random.Random) -> Iterator[Any]:
    """webdataset's ``shuffle`` (the same pulls and the same draws, so the same order), on a buffer the
    caller holds: a reader saves the buffer and the generator's state and can rebuild both."""
    initial = min(initial, size)
    for item in source:
        buffer.append(item)
        if len(buffer) < size:
            try:
                buffer.append(next(source))
            except StopIteration:
                pass
        if len(buffer) >= initial:
            yield _take_random(buffer, rng)
    while buffer:
        yield _take_random(buffer, rng)


def _take_random(buffer: list[Any], rng: random.Random) -> Any:
    index = rng.randint(0, len(buffer) - 1)
    item = buffer[index]
    buffer[index] = buffer[-1]
    buffer.pop()
    return item


class _StreamReader:
    """The endless, reshuffled example sequence of one stream for one reader.

    Its position (:meth:`state`) is the epoch and the examples taken in it, and, to seek: the last
    sample read (``cursor``: shard, sample, examples of it taken into the buffer), which examples
    sit in the shuffle buffer (as tokens) and the buffer's generator state. A reader rebuilt from
    it opens only the shard of the cursor (passing over the samples before it without decoding
    them) and the samples of buffered examples; every earlier shard is skipped unopened. Without a
    seek position (a stream shared sample by sample, whose readers count samples across all its
    shards; or a checkpoint from before), it replays the epoch up to ``taken`` instead.
    """

    def __init__(self, stream: Stream, slot: ReaderSlot, config: StreamConfig, templates: PromptTemplates,
                 epoch: int = 0, taken: int = 0, read: int | None = None, skipped: int | None = None,
                 seek: dict[str, Any] | None = None):
        self.stream, self.slot, self.config, self.templates = stream, slot, config, templates
        self.epoch, self.taken = epoch, 0
        self.bad = SkipCounter(quiet=True)  # a replay meets the bad samples the original run reported
        readers = slot.world_size * slot.num_workers
        self._shared = splits_samples(stream, readers)
        self._share = (readers, slot.rank * slot.num_workers + slot.worker)
        if seek is not None and not self._shared:
            self._begin_epoch(seek)
            self.taken = taken
        else:
            self._begin_epoch()
            for _ in range(taken):  # replay: images are only checked (bad_data.py), not decoded for the model
                next(self)
        # The counts before the position are not replayed: take them from the checkpoint.
        self.bad.quiet = False
        self.bad.read = read if read is not None else self.bad.read
        self.bad.skipped = skipped if skipped is not None else self.bad.skipped

    def _epoch_shards(self) -> list[str]:
        order = list(self.stream.shards)
        _rng(self.config.seed, "shards", self.stream.name, self.epoch).shuffle(order)
        if self._shared:
            # Too few shards to give each reader its own: every reader reads them all and keeps
            # every readers-th sample, so the readers still see disjoint samples.
            return [str(path) for path in order]
        return [str(path) for path in order[self.slot.rank :: self.slot.world_size][self.slot.worker :: self.slot.num_workers]]

    def _begin_epoch(self, seek: dict[str, Any] | None = None) -> None:
        self._shards = self._epoch_shards()
        self._rng = _rng(self.config.seed, "buffer", self.stream.name, self.epoch, self.slot.rank, self.slot.worker)
        self._cursor: Token | None = None
        self._buffer: list[tuple[Token | None, Example]] = []
        pending: list[tuple[Token, Example]] = []
        if seek is not None:
            version, internal, gauss = seek["rng"]
            self._rng.setstate((version, tuple(internal), gauss))
            self._cursor = tuple(seek["cursor"]) if seek["cursor"] else None
            tokens = [tuple(token) for token in seek["buffer"]]
            wanted = {(shard, sample) for shard, sample, _ in tokens} | ({self._cursor[:2]} if self._cursor else set())
            examples = self._read_back(wanted)
            self._buffer.extend((token, examples[token[:2]][token[2]]) for token in tokens)
            if self._cursor is not None:  # the examples of the last sample read that were not taken yet
                shard, sample, taken = self._cursor
                pending = [((shard, sample, n), example) for n, example in enumerate(examples[shard, sample]) if n >= taken]
        self._examples = _shuffled(self._source(pending), self._buffer, self.config.shuffle_buffer,
                                   self.config.shuffle_initial, self._rng)

    def _source(self, pending: list[tuple[Token, Example]]) -> Iterator[tuple[Token | None, Example]]:
        """The examples of the epoch in shard order, each with its token, from the cursor on."""
        if self._shared:
            for raw in read_shards(self._shards, self.bad, share=self._share):
                for example in self._checked_expand(raw, self.bad):
                    yield None, example
            return
        for token, example in pending:
            self._cursor = token[0], token[1], token[2] + 1
            yield token, example
        first_shard, first_sample = (self._cursor[0], self._cursor[1] + 1) if self._cursor else (0, 0)
        for shard in range(first_shard, len(self._shards)):
            start = first_sample if shard == first_shard else 0
            for sample, raw in read_shard(self._shards[shard], self.bad, start):
                for index, example in enumerate(self._checked_expand(raw, self.bad)):
                    self._cursor = shard, sample, index + 1
                    yield (shard, sample, index), example

    def _read_back(self, wanted: set[tuple[int, int]]) -> dict[tuple[int, int], list[Example]]:
        """The examples of samples read before the position, by (shard, sample): only their shards are
        opened, and within them nothing before the first wanted sample is decoded. Quietly: the
        original run counted and reported them."""
        found: dict[tuple[int, int], list[Example]] = {}
        quiet = SkipCounter(quiet=True)
        for shard in sorted({shard for shard, _ in wanted}):
            samples = {sample for wanted_shard, sample in wanted if wanted_shard == shard}
            for index, raw in read_shard(self._shards[shard], quiet, start=min(samples)):
                if index in samples:
                    found[shard, index] = self._checked_expand(raw, quiet)
                if index >= max(samples):
                    break
        missing = sorted(wanted - found.keys())
        if missing:
            raise PerceptioError(f"{self._shards[missing[0][0]]}: sample {missing[0][1]} of the checkpoint's position is "
                                 "gone (the shard changed since it was written); resume cannot seek to it")
        return found

    def _checked_expand(self, raw: dict[str, Any], counter: SkipCounter) -> list[Example]:
        examples = guarded(lambda sample: expand_sample(sample, self.templates, self.config.use_depth_tokens,
                                                        self.config.question_targets, self.config.reading_questions,
                                                        (self.config.seed, self.epoch), self.config.reading_spread,
                                                        self.config.reading_swaps, self.config.mark_readouts,
                                                        self.config.reading_in_text, self.config.readout_cells,
                                                        self.config.visible_cells(self.epoch)),
                           raw, counter)
        for example in examples:
            if mix_key_for(example.source, [self.stream.name]) is None:
                raise PerceptioError(
                    f"{raw.get('__url__')}: sample {raw['__key__']} says dataset {example.source!r}, "
                    f"which does not belong to the stream {self.stream.name!r} its file name put it in"
                )
        return examples

    def __next__(self) -> Example:
        for _attempt in range(2):
            try:
                _, example = next(self._examples)
                self.taken += 1
                return example
            except StopIteration:
                self.epoch, self.taken = self.epoch + 1, 0
                self._begin_epoch()
        raise PerceptioError(
            f"stream {self.stream.name!r} gave reader {self.slot} no example in a whole epoch "
            "(its shards hold no refs or questions)"
        )

    def state(self) -> dict[str, Any]:
        position = {"epoch": self.epoch, "taken": self.taken, "read": self.bad.read, "skipped": self.bad.skipped}
        if not self._shared:
            position["seek"] = {"cursor": list(self._cursor) if self._cursor else None,
                                "buffer": [list(token) for token, _ in self._buffer],
                                "rng": self._rng.getstate()}
        return position


class ExampleReader:
    """The mixed example sequence of one reader, with a position that rebuilds it exactly."""

    def __init__(self, streams: Sequence[Stream], slot: ReaderSlot, config: StreamConfig,
                 state: dict[str, Any] | None = None):
        templates = PromptTemplates.load(config.prompts)
        positions = (state or {}).get("streams", {})
        self._readers = [
            _StreamReader(stream, slot, config, templates, **positions.get(stream.name, {})) for stream in streams
        ]
        self._weights = [stream.weight for stream in streams]
        self._mix_rng = _rng(config.seed, "mix", slot.rank, slot.worker)
        self.draws = 0
        for _ in range((state or {}).get("draws", 0)):
            self._draw()

    def _draw(self) -> _StreamReader:
        self.draws += 1
        return self._mix_rng.choices(self._readers, weights=self._weights)[0]

    def __iter__(self) -> Iterator[Example]:
        return self

    def __next__(self) -> Example:
        return next(self._draw())

    def state(self) -> dict[str, Any]:
        return {
            "draws": self.draws,
            "streams": {r.stream.name: r.state() for r in self._readers},
        }


def splits_samples(stream: Stream, readers: int) -> bool:
    """Whether ``stream`` is split among readers sample by sample (fewer shards than readers)."""
    return len(stream.shards) < readers


def sample_split_notes(streams: Sequence[Stream], world_size: int, num_workers: int) -> list[str]:
    """One line per stream with fewer shards than readers: how it is shared instead."""
    readers = world_size * max(num_workers, 1)
    return [
        f"stream {stream.name!r}: {len(stream.shards)} shard(s) for {world_size} rank(s) x {max(num_workers, 1)} "
        f"loader worker(s) = {readers} readers: each reader reads them all and keeps one sample in {readers} "
        "(more shards, via perceptio-curate --samples-per-shard, avoid the repeated reading)"
        for stream in streams
        if splits_samples(stream, readers)
    ]


def plan_streams(config: StreamConfig, world_size: int = 1, num_workers: int = 0) -> list[Stream]:
    """The weighted streams of ``config`` (cheap: reads no tar)."""
    return plan_mix(find_shards(config.shards, config.splits), config.mix)


# ---------------------------------------------------------------------------------------- batches
@dataclass
class Batch:
    """One micro-batch: the model's collated inputs plus where they came from."""

    inputs: dict[str, Any]
    keys: list[str]
    sources: list[str]
    worker: int  # logical worker id within this rank
    reader: int  # the (virtual) reader that made it, see :class:`ReaderLayout`
    reader_state: dict[str, Any] = field(default_factory=dict)  # the reader's position after this batch


class EncodeCollate(Protocol):
    """What the readers need to turn examples into a batch (``PerceptioProcessor`` provides it).

    It travels to every DataLoader worker, so it must pickle small: no model weights.
    """

    def encode_conversation(self, image: Any, turns: Sequence[Turn], masks: Sequence[Any], depth: Any,
                            span_is_context: bool = False, hidden_cells: Sequence[int] = ()) -> dict[str, torch.Tensor]: ...
    def collate(self, examples: list[dict[str, torch.Tensor]]) -> dict[str, Any]: ...


@dataclass(frozen=True)
class ReaderLayout:
    """The readers of a run, fixed by its first start: ``world_size`` x ``num_workers`` of that start.

    Reader ``v`` reads what worker ``v // world_size`` of rank ``v % world_size`` read in the first
    start (its shards, its shuffle, its mix draws). A resumed run with another number of ranks or
    workers (elastic) plays the same readers, each from its own position: physical reader ``p``
    (rank + world_size x worker, of ``P``) plays the readers ``v`` with ``v % P == p``, taking a
    batch from the one that has made the fewest. So no example is repeated or skipped, and with an
    unchanged layout every reader plays itself (exact resume). A run may grow up to as many ranks x
    workers as it has readers.
    """

    world_size: int
    num_workers: int

    @property
    def size(self) -> int:
        return self.world_size * self.num_workers

    def slot(self, reader: int) -> ReaderSlot:
        return ReaderSlot(reader % self.world_size, self.world_size, reader // self.world_size, self.num_workers)

    def played_by(self, rank: int, world_size: int, worker: int, num_workers: int) -> list[int]:
        physical, count = rank + world_size * worker, world_size * num_workers
        return [reader for reader in range(self.size) if reader % count == physical]


class ShardStream(torch.utils.data.IterableDataset):
    """An endless stream of encoded batches for one rank.

    The DataLoader takes batches from its workers in turn (0, 1, ..., 0, 1, ...). A resumed run
    must go on with the worker that was next, so worker ids are rotated by ``first_worker``: the
    physical worker 0 then plays the reader that was due.
    """

    def __init__(self, streams: Sequence[Stream], config: StreamConfig, processor: EncodeCollate,
                 batch_size: int, rank: int, world_size: int, num_workers: int, layout: ReaderLayout,
                 reader_states: dict[int, dict[str, Any]] | None = None, first_worker: int = 0):
        super().__init__()
        self.streams, self.config, self.processor = list(streams), config, processor
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.num_workers = max(num_workers, 1)
        self.layout = layout
        self.reader_states = reader_states or {}
        self.first_worker = first_worker

    def __iter__(self) -> Iterator[Batch]:
        info = torch.utils.data.get_worker_info()
        worker = ((info.id if info is not None else 0) + self.first_worker) % self.num_workers
        played = self.layout.played_by(self.rank, self.world_size, worker, self.num_workers)
        readers = {v: ExampleReader(self.streams, self.layout.slot(v), self.config, self.reader_states.get(v))
                   for v in played}
        made = {v: self.reader_states.get(v, {}).get("batches", 0) for v in played}
        while True:
            v = min(played, key=lambda reader: (made[reader], reader))
            examples = [next(readers[v]) for _ in range(self.batch_size)]
            made[v] += 1
            inputs = self.processor.collate([self.processor.encode_conversation(**example.decode()) for example in examples])
            yield Batch(inputs, [e.key for e in examples], [e.source for e in examples], worker, v,
                        {**readers[v].state(), "batches": made[v]})


class ResumableLoader:
    """The DataLoader of one rank, and the position a checkpoint stores (``state_dict``)."""

    def __init__(self, config: StreamConfig, processor: EncodeCollate, batch_size: int = 1,
                 num_workers: int = 0, rank: int = 0, world_size: int = 1,
                 states: Sequence[dict[str, Any]] | None = None):
        """``states``: every rank's ``state_dict()`` from a checkpoint (in rank order), to go on from."""
        self.num_readers = max(num_workers, 1)
        self.rank, self.world_size = rank, world_size
        first = states[0] if states else {"world_size": world_size, "num_readers": self.num_readers}
        self.layout = ReaderLayout(*first.get("layout", (first["world_size"], first["num_readers"])))
        if world_size * self.num_readers > self.layout.size:
            raise PerceptioError(
                f"the checkpoint's run has {self.layout.size} loader readers ({self.layout.world_size} rank(s) x "
                f"{self.layout.num_workers} worker(s) when it started); resume with at most that many ranks x "
                f"--workers (got {world_size} x {self.num_readers})")
        self.streams = plan_streams(config, self.layout.world_size, self.layout.num_workers)
        # The newest position of each reader this rank plays, whichever rank played it last.
        mine = {reader for worker in range(self.num_readers)
                for reader in self.layout.played_by(rank, world_size, worker, self.num_readers)}
        self.reader_states: dict[int, dict[str, Any]] = {
            int(reader): position for state in states or [] for reader, position in state["readers"].items()
            if int(reader) in mine}
        same_layout = states and (first["world_size"], first["num_readers"]) == (world_size, self.num_readers)
        self.next_worker: int = states[rank]["next_worker"] if same_layout else 0
        if num_workers > 0:
            # Workers are forked after the tokenizer may have run; its thread pool must not be inherited.
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.dataset = ShardStream(self.streams, config, processor, batch_size, rank, world_size, num_workers,
                                   self.layout, self.reader_states, self.next_worker)
        # Its own generator: starting to iterate draws a seed, which must not move the global RNG
        # (a resumed run starts iterating at another point of the RNG stream than the original).
        self._loader = torch.utils.data.DataLoader(self.dataset, batch_size=None, num_workers=num_workers,
                                                   prefetch_factor=2 if num_workers else None,
                                                   worker_init_fn=ignore_stop_signals if num_workers else None,
                                                   generator=torch.Generator().manual_seed(config.seed))
        self._iterator: Iterator[Batch] | None = None

    def __iter__(self) -> "ResumableLoader":
        return self

    def __next__(self) -> Batch:
        if self._iterator is None:
            self._iterator = iter(self._loader)
        batch = next(self._iterator)
        self.reader_states[batch.reader] = batch.reader_state
        self.next_worker = (batch.worker + 1) % self.num_readers
        return batch

    def bad_samples(self) -> tuple[int, int]:
        """(skipped, read) samples of this rank's readers, up to the last batch taken."""
        positions = [position for state in self.reader_states.values() for position in state["streams"].values()]
        return (sum(position.get("skipped", 0) for position in positions),
                sum(position.get("read", 0) for position in positions))

    def state_dict(self) -> dict[str, Any]:
        return {
            "layout": [self.layout.world_size, self.layout.num_workers],
            "world_size": self.world_size,
            "num_readers": self.num_readers,
            "next_worker": self.next_worker,
            "readers": {str(k): v for k, v in sorted(self.reader_states.items())},
        }
