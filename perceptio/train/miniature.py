"""Pretraining the miniature's VLM on the synthetic world, as the real recipe starts from a pretrained one.

The paper fine-tunes a pretrained InternVL, which already grounds referring expressions in text
(RefCOCO boxes are part of its pretraining) and answers simple questions about pictures. The
miniature (``benchmarks/miniature.py``) reproduces that regime in small: before any Perceptio
training, its tiny InternVL is trained on one-turn questions about the *training* world's pictures
(colours, counts, left/right, sizes, places on the image grid, and the colour, shape and place of
what each training referring expression names; optionally where the letters of marked points
are, :func:`mark_map_question`), then saved with ``save_pretrained`` so that
``perceptio-train --model`` loads it like a real checkpoint. No question is about depth and no mask
is shown: what the depth tokens and the ``[SEG]`` head add is left to the fine-tuning to learn.

One example, from disk to the loss: ``world.json`` lists image ``k`` with its objects; the question
"Where is the pink sphere? Row and column." is answered "6 3" (the row and column of the object's
centre on a 10x10 grid, the miniature's image-token grid); the trainer's own processor lays it out
in InternVL's chat format with the picture as one 280-pixel tile, and the answer tokens are
supervised with InternVL's next-token loss.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from transformers import InternVLForConditionalGeneration, PreTrainedTokenizerBase

from perceptio.curate.marked_points import HARDBLINK_MARKS, check_mark_style, draw_marks, point_cell
from perceptio.sources.synth.conversations import image_questions, unique_names
from perceptio.sources.synth.scene import COLOURS
from perceptio.train.chat import ASSISTANT, USER, Turn
from perceptio.train.processor import PerceptioProcessor, ProcessorSettings

GRID = 10  # the miniature's image is a 10x10 grid of tokens (280-px tile): places are named on it


MIN_PRETRAINING_STEPS = 40  # the one-cycle schedule's 5% warm-up needs two steps


@dataclass(frozen=True)
class VlmPretraining:
    steps: int = 1500
    batch_size: int = 16
    lr: float = 2e-3
    map_share: float = 0.3  # examples that are the picture's colour map (colour_map_question)
    mark_share: float = 0.0  # examples that are a marked copy's mark map (mark_map_question)
    mark_style: str = HARDBLINK_MARKS  # how those marks are drawn: as the fine-tuning questions will be
    seed: int = 0
    log_every: int = 100

    def __post_init__(self) -> None:
        if self.steps < MIN_PRETRAINING_STEPS or self.batch_size < 1:
            raise ValueError(f"VLM pretraining needs at least {MIN_PRETRAINING_STEPS} steps and one example "
                             f"(steps {self.steps}, batch {self.batch_size})")
        if min(self.map_share, self.mark_share) < 0 or self.map_share + self.mark_share > 1:
            raise ValueError(f"the map shares must be at least 0 and sum to at most 1 "
                             f"(colour {self.map_share}, marks {self.mark_share})")
        check_mark_style(self.mark_style)


def _place(obj: dict, camera: dict) -> str:
    """The object's centre as "row column" on the image's GRID x GRID grid (its first token says the row)."""
    x, y = obj["image_centre"]
    row = min(GRID - 1, max(0, int(y / camera["height"] * GRID)))
    column = min(GRID - 1, max(0, int(x / camera["width"] * GRID)))
    return f"{row} {column}"


def place_questions(record: dict) -> list[tuple[str, str]]:
    """Where the uniquely named objects are, asked both ways: "Where is the red cube?" -> "3 7"
    (row and column of its centre) and "What is at row 3 column 7?" -> "the red cube"."""
    names = unique_names(record["objects"])
    asked = []
    for obj in (obj for obj in record["objects"] if obj["instance"] in names):
        name, place = names[obj["instance"]], _place(obj, record["camera"])
        asked.append((f"Where is {name}? Row and column.", place))
        row, column = place.split()
        asked.append((f"What is at row {row} column {column}?", name))
    return asked


MAP_QUESTION = "The colour of each cell, row by row."
# One digit per colour of the world's palette, the same for every world (training and held out).
MAP_COLOURS = tuple(sorted(COLOURS))
MAP_BACKGROUND = "."


def colour_map_question(record: dict, instances: np.ndarray, colours: Sequence[str] = MAP_COLOURS) -> tuple[str, str]:
    """The picture as GRID x GRID characters, row-major, one per image token: the index in
    ``colours`` (the world's palette) of the object at the cell's centre, or "." for the floor and the wall. One character
    is one token of the tiny tokenizer, so the k-th answer token is about the k-th image token, the
    layout of the 100 depth tokens: the same reading of the picture, cell by cell."""
    height, width = instances.shape
    colour_of = {obj["instance"]: str(colours.index(obj["colour"])) for obj in record["objects"]}
    rows = ((np.arange(GRID) + 0.5) * height / GRID).astype(int)
    columns = ((np.arange(GRID) + 0.5) * width / GRID).astype(int)
    cells = instances[rows[:, None], columns[None, :]]
    return MAP_QUESTION, "".join(colour_of.get(int(cell), MAP_BACKGROUND) for cell in cells.flat)


MARK_QUESTION = "The marked points, cell by cell."
MARK_LABELS = "ABCDE"  # HardBLINK's letters; 2-5 points, as the marked-point questions


def grid_cell(point: tuple[int, int], size: tuple[int, int]) -> int:
    """The GRID x GRID cell (row-major index) of image point (x, y) of a (width, height) image."""
    return point_cell(point, size, GRID)


def mark_map_question(picture: Image.Image, record: dict, instances: np.ndarray, rng: np.random.Generator,
                      style: str = HARDBLINK_MARKS) -> tuple[Image.Image, str, str]:
    """A copy of the picture with 2-5 points marked as the marked-point questions mark them
    (:func:`perceptio.curate.marked_points.draw_marks` in ``style``), each on another object, and
    its map: GRID x GRID characters, row-major, the letter on the cell of each point, "." elsewhere.
    Like the colour map, answer token k is about image token k: where each letter is, which is what
    a question about the marked points needs before any depth can be compared."""
    objects = [obj["instance"] for obj in record["objects"] if (instances == obj["instance"]).any()]
    count = min(len(objects), int(rng.integers(2, len(MARK_LABELS) + 1)))
    points, cells = [], [MAP_BACKGROUND] * (GRID * GRID)
    for instance in rng.permutation(objects)[:count].tolist():
        ys, xs = np.nonzero(instances == instance)
        pick = int(rng.integers(len(xs)))
        point = (int(xs[pick]), int(ys[pick]))
        if cells[grid_cell(point, picture.size)] != MAP_BACKGROUND:
            continue  # two points in one cell: the map could name only one of them
        cells[grid_cell(point, picture.size)] = MARK_LABELS[len(points)]
        points.append(point)
    labels = list(MARK_LABELS[: len(points)])
    return draw_marks(picture, points, labels, style), MARK_QUESTION, "".join(cells)


def object_map(instances: np.ndarray, instance: int) -> str:
    """GRID x GRID characters, row-major: "1" where the instance covers at least a quarter of the
    cell, "." elsewhere; the cell of its largest share is always marked, so small objects show."""
    height, width = instances.shape
    rows = np.minimum((np.arange(height) * GRID) // height, GRID - 1)
    columns = np.minimum((np.arange(width) * GRID) // width, GRID - 1)
    cells = rows[:, None] * GRID + columns[None, :]
    share = np.bincount(cells[instances == instance], minlength=GRID * GRID) / np.bincount(cells.ravel(), minlength=GRID * GRID)
    marked = share >= 0.25
    marked[int(np.argmax(share))] = True
    return "".join("1" if cell else MAP_BACKGROUND for cell in marked)


def referring_questions(world: Path, records: list[dict]) -> dict[int, list[tuple[str, str]]]:
    """Picture index -> questions about the objects the world's training referring expressions
    pick out: their colour, shape and place, asked with the expression, and the cells they cover
    (:func:`object_map`), as InternVL's pretraining grounds RefCOCO expressions in text. No mask
    finer than the 10x10 grid and no depth is shown."""
    from perceptio.sources.refer import ReferDataset

    by_ann = {obj["ann_id"]: (index, obj) for index, record in enumerate(records) for obj in record["objects"] if "ann_id" in obj}
    instances: dict[int, np.ndarray] = {}
    asked: dict[int, list[tuple[str, str]]] = {}
    for dataset, split_by in (("refcoco", "unc"), ("refcoco+", "unc"), ("refcocog", "umd")):
        if not (world / dataset).is_dir():
            continue
        for ref in ReferDataset(world, dataset, split_by).refs_in_split("train"):
            if ref.ann_id not in by_ann:
                continue
            index, obj = by_ann[ref.ann_id]
            if index not in instances:
                instances[index] = np.asarray(Image.open(world / records[index]["instance_file"]))
            cells = object_map(instances[index], obj["instance"])
            for sentence in ref.sentences:
                asked.setdefault(index, []).extend([
                    (f"What colour is {sentence.sent}?", obj["colour"]),
                    (f"What shape is {sentence.sent}?", obj["shape"]),
                    (f"Where is {sentence.sent}? Row and column.", _place(obj, records[index]["camera"])),
                    (f"Mark {sentence.sent}, cell by cell.", cells),
                ])
    return asked


def vlm_processor(vlm: InternVLForConditionalGeneration, tokenizer: PreTrainedTokenizerBase) -> PerceptioProcessor:
    """The trainer's prompt layout for a bare VLM: one tile, no perception tokens, no SAM2 input."""
    vision = vlm.config.vision_config
    return PerceptioProcessor(tokenizer, ProcessorSettings(
        image_size=int(vision.image_size[0]), tokens_per_tile=int(vlm.config.image_seq_length), crop_to_patches=False,
        depth_size=1, sam_image_size=None, max_length=1024, use_depth_tokens=False, use_segmentation=False))


def pretrain_vlm(vlm: InternVLForConditionalGeneration, tokenizer: PreTrainedTokenizerBase, world: Path,
                 settings: VlmPretraining = VlmPretraining(), log=print) -> dict[str, float]:
    """Train every part of ``vlm`` on one-turn questions about the world's pictures: colours,
    counts, left/right, sizes (the world's LLaVA questions), places on the image grid, and the
    colour, shape and place of what each training referring expression names. No question is about
    depth: what the depth tokens add is left for the ablation to measure."""
    records = json.loads((world / "world.json").read_text())["images"]
    pictures = [Image.open(world / record["file"]).convert("RGB") for record in records]
    processor = vlm_processor(vlm, tokenizer)
    about = [image_questions(record["objects"], record["camera"]["width"], np.random.default_rng(index))
             + place_questions(record) for index, record in enumerate(records)]
    for index, questions in referring_questions(world, records).items():
        about[index] += questions
    instances = [np.asarray(Image.open(world / record["instance_file"])) for record in records]
    maps = [colour_map_question(record, cells) for record, cells in zip(records, instances)]
    rng = np.random.default_rng(settings.seed)
    optimizer = torch.optim.AdamW(vlm.parameters(), lr=settings.lr, weight_decay=0.01)
    # One cycle: 5% warm-up from lr/25, then cosine annealing (and Adam's beta1 cycled 0.95 <-> 0.85).
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, settings.lr, total_steps=settings.steps, pct_start=0.05)
    vlm.train()
    running: dict[str, float] = {}
    started = time.perf_counter()
    for step in range(1, settings.steps + 1):
        examples = []
        for index in rng.integers(len(records), size=settings.batch_size).tolist():
            pick, picture = rng.random(), pictures[index]
            if pick < settings.map_share:
                question, answer = maps[index]
            elif pick < settings.map_share + settings.mark_share:
                picture, question, answer = mark_map_question(picture, records[index], instances[index], rng,
                                                              settings.mark_style)
            else:
                question, answer = about[index][int(rng.integers(len(about[index])))]
            examples.append(processor.encode_conversation(picture, [Turn(USER, question), Turn(ASSISTANT, answer)]))
        batch = processor.collate(examples)
        output = vlm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     pixel_values=batch["pixel_values"], labels=batch["labels"])
        optimizer.zero_grad(set_to_none=True)
        output.loss.backward()
        torch.nn.utils.clip_grad_norm_(vlm.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        value = float(output.loss.detach())
        running["loss"] = 0.9 * running.get("loss", value) + 0.1 * value
        if step % settings.log_every == 0 or step == settings.steps:
            log(f"vlm pretraining step {step}/{settings.steps}: loss {running['loss']:.3f} "
                f"({time.perf_counter() - started:.0f} s)")
    vlm.eval()
    return dict(running)


def held_out_report(vlm: InternVLForConditionalGeneration, tokenizer: PreTrainedTokenizerBase, world: Path,
                    images: int = 40, mark_style: str = HARDBLINK_MARKS) -> dict[str, float]:
    """What a pretrained miniature VLM reads from pictures it never saw (greedy answers on another
    world): the share of marked points whose letter the mark map writes on the right cell (and on
    whose cell it writes some letter: the mark found, its letter maybe not read), the
    colour map's cell accuracy (all cells, and the cells on an object, against the all-background
    answer), the referring map's cell IoU with the truth, and the exact-match rate of the "row
    column" place answers."""
    records = json.loads((world / "world.json").read_text())["images"][:images]
    processor = vlm_processor(vlm, tokenizer)
    referring = referring_questions(world, records)
    vlm.eval()

    def answer(picture: Image.Image, question: str, length: int) -> str:
        text = processor.conversation_prompt([Turn(USER, question)], 1)
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            out = vlm.generate(**ids, pixel_values=processor.pixel_values(picture), max_new_tokens=length + 1, do_sample=False)
        return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()

    cells, object_cells, background, ious, places, marks_read, marks_found = [], [], [], [], [], [], []
    for index, record in enumerate(records):
        picture = Image.open(world / record["file"]).convert("RGB")
        instances = np.asarray(Image.open(world / record["instance_file"]))
        marked, question, truth = mark_map_question(picture, record, instances, np.random.default_rng(index), mark_style)
        written = answer(marked, question, GRID * GRID)[: GRID * GRID].ljust(GRID * GRID, "?")
        marked = [k for k, cell in enumerate(truth) if cell != MAP_BACKGROUND]
        marks_read += [written[k] == truth[k] for k in marked]
        marks_found += [written[k] in MARK_LABELS for k in marked]
        question, truth = colour_map_question(record, instances)
        written = answer(picture, question, GRID * GRID)[: GRID * GRID].ljust(GRID * GRID, "?")
        hits = np.array([a == b for a, b in zip(written, truth)])
        on_object = np.array([cell != MAP_BACKGROUND for cell in truth])
        cells.append(hits.mean())
        background.append(1 - on_object.mean())
        if on_object.any():
            object_cells.append(hits[on_object].mean())
        asked = referring.get(index, [])
        marks = [pair for pair in asked if pair[0].startswith("Mark ")][:1]
        wheres = [pair for pair in asked if pair[0].startswith("Where ")][:1]
        for question, truth in marks:
            written = answer(picture, question, GRID * GRID)[: GRID * GRID]
            true_cells = {k for k, cell in enumerate(truth) if cell == "1"}
            said = {k for k, cell in enumerate(written) if cell == "1"}
            ious.append(len(true_cells & said) / len(true_cells | said))
        for question, truth in wheres:
            places.append(float(answer(picture, question, 4) == truth))
    return {"mark_map_letters": float(np.mean(marks_read)), "mark_map_cells_found": float(np.mean(marks_found)),
            "colour_map_cells": float(np.mean(cells)), "colour_map_all_background": float(np.mean(background)),
            "colour_map_object_cells": float(np.mean(object_cells)), "referring_map_iou": float(np.mean(ious)),
            "place_exact": float(np.mean(places)), "images": len(records), "referring_maps": len(ious), "places": len(places)}
