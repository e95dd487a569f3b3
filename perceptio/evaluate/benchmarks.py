"""The benchmarks: which samples each one reads, and the per-sample record it scores.

Every benchmark turns its data into an ordered list of items with unique ids, lets each process
evaluate its share (:mod:`perceptio.evaluate.distributed`), gathers one JSON-able record per item
and scores the records with :mod:`perceptio.evaluate.metrics` or :mod:`perceptio.evaluate.hardblink`.
Prompts are the trainer's (``manifests/prompts.json`` through :func:`perceptio.train.data.expand_sample`),
so the model is asked the way it was taught.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Protocol, Sequence, TypeVar

import numpy as np
from PIL import Image

from perceptio.errors import PerceptioError
from perceptio.evaluate.decomposition import TokenReader
from perceptio.evaluate.distributed import ProcessGroup, gather_records
from perceptio.evaluate.hardblink import HardBlinkQuestion, parse_choice
from perceptio.evaluate.metrics import decoded_depth_scores, mask_overlap, token_accuracy
from perceptio.shards import npy_load, rle_to_mask

if TYPE_CHECKING:
    from perceptio.train.data import Example

Item = TypeVar("Item")


class PredictionLike(Protocol):
    text: str
    mask: np.ndarray | None
    depth: np.ndarray | None
    depth_codes: list[int]
    well_formed: bool
    readout_codes: list[int]


class PredictorLike(Protocol):
    identity: str

    def predict_batch(self, images: Sequence[Image.Image | None], prompts: Sequence[Any],
                      answer_prefixes: Sequence[str] | None = None) -> list[PredictionLike]: ...


@dataclass(frozen=True)
class ShardItem:
    """One evaluation sample read from shards."""

    id: str
    dataset: str
    split: str
    prompt: str
    image_bytes: bytes
    mask_rle: dict[str, Any] | None
    depth_bytes: bytes
    teacher_codes: tuple[int, ...]

    def image(self) -> Image.Image:
        return Image.open(io.BytesIO(self.image_bytes)).convert("RGB")


def shard_samples(shard_dirs: Sequence[str | Path], split: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(split, raw webdataset sample) of every sample of the split's shards, in file order."""
    import webdataset as wds

    from perceptio.train.data import find_shards

    for shard in find_shards(list(shard_dirs), splits=(split,)):
        for raw in wds.tarfile_samples([{"url": str(shard.path)}]):
            yield shard.split, raw


def read_shard_examples(shard_dirs: Sequence[str | Path], split: str, use_depth_tokens: bool = True) -> list[Example]:
    """The trainer's examples (:func:`perceptio.train.data.expand_sample`, the prompt templates and
    targets it trains on) of every sample of the split's shards, in file order."""
    from perceptio.train.data import PromptTemplates, expand_sample

    templates = PromptTemplates.load()
    return [example for _, raw in shard_samples(shard_dirs, split)
            for example in expand_sample(raw, templates, use_depth_tokens=use_depth_tokens)]


def read_shard_items(shard_dirs: Sequence[str | Path], split: str, per_image: bool = False) -> list[ShardItem]:
    """Every (ref, sentence) of the split's shards in file order; ``per_image``: the first of each
    image sample only (depth is a property of the image, not of the sentence)."""
    from perceptio.train.data import PromptTemplates, expand_sample

    templates = PromptTemplates.load()
    items: list[ShardItem] = []
    for shard_split, raw in shard_samples(shard_dirs, split):
        codes = npy_load(raw["depth_tokens.npy"]).tolist() if "depth_tokens.npy" in raw else []
        teacher_codes = tuple(int(code) for code in codes)
        examples = expand_sample(raw, templates, use_depth_tokens=True)
        for example in examples[:1] if per_image else examples:
            items.append(
                ShardItem(example.key, example.source, shard_split, example.prompt, example.image_bytes,
                          example.mask_rle, example.depth_bytes, teacher_codes)
            )
    return items


@dataclass(frozen=True)
class ConversationTurnItem:
    """One answer of a held-out conversation: the gold turns before it, and the reference."""

    id: str  # "{sample key}/turn{k}"
    key: str  # the conversation's sample key
    dataset: str
    split: str
    turn: int  # position of the answer among the turns (1, 3, ...)
    history: tuple[Any, ...]  # the turns before the answer, ending with the user's question
    reference: str
    image_bytes: bytes | None

    def image(self) -> Image.Image | None:
        return Image.open(io.BytesIO(self.image_bytes)).convert("RGB") if self.image_bytes is not None else None


def read_conversation_items(shard_dirs: Sequence[str | Path], split: str) -> list[ConversationTurnItem]:
    """Every answer of every conversation sample of the split's shards, in file order."""
    from perceptio.train.data import PromptTemplates, expand_sample

    templates = PromptTemplates.load()
    items: list[ConversationTurnItem] = []
    for shard_split, raw in shard_samples(shard_dirs, split):
        for example in expand_sample(raw, templates):
            if example.mask_rles or len(example.turns) < 2:  # grounded captions are scored as masks, not text
                continue
            for turn in range(1, len(example.turns), 2):
                items.append(ConversationTurnItem(f"{example.key}/turn{turn}", example.key, example.source,
                                                  shard_split, turn, example.turns[:turn],
                                                  example.turns[turn].text, example.image_bytes))
    return items


def conversation_query(item: ConversationTurnItem) -> tuple[Image.Image | None, list[Any]]:
    """The image (None for a text-only conversation) and the turns before the answer, as they were written."""
    return item.image(), list(item.history)


def conversation_score(item: ConversationTurnItem, prediction: PredictionLike) -> dict[str, Any]:
    from perceptio.evaluate.metrics import exact_match

    return {"id": item.id, "key": item.key, "dataset": item.dataset, "split": item.split, "turn": item.turn,
            "prediction": prediction.text, "reference": item.reference,
            "exact_match": exact_match(prediction.text, item.reference)}


def evaluate_items(
    items: Sequence[Item],
    predictor: PredictorLike,
    query: Callable[[Item], tuple[Image.Image, str]],
    score: Callable[[Item, Any], dict[str, Any]],
    group: ProcessGroup,
    item_id: Callable[[Item], str],
    batch_size: int = 1,
    advance: Callable[[int], None] = lambda done: None,
    answer_prefix: Callable[[Item], str] | None = None,
) -> list[dict[str, Any]]:
    """This rank's share generated ``batch_size`` items at a time and scored, then every rank's
    records gathered once each in item order; ``answer_prefix``: the text each answer is made to
    begin with (``Predictor.predict_batch``)."""
    records = []
    share = group.take(items)
    for start in range(0, len(share), batch_size):
        chunk = share[start : start + batch_size]
        images, prompts = zip(*(query(item) for item in chunk))
        prefixes = [answer_prefix(item) for item in chunk] if answer_prefix is not None else None
        predictions = predictor.predict_batch(images, prompts, answer_prefixes=prefixes)
        records.extend(score(item, prediction) for item, prediction in zip(chunk, predictions))
        advance(len(chunk))
    return gather_records(records, group, order=[item_id(item) for item in items])


def shard_query(item: ShardItem) -> tuple[Image.Image, str]:
    return item.image(), item.prompt


def refseg_score(item: ShardItem, prediction: PredictionLike) -> dict[str, Any]:
    if item.mask_rle is None:
        raise PerceptioError(f"sample {item.id} has no mask to score")
    truth = rle_to_mask(item.mask_rle)
    missing = prediction.mask is None
    mask = np.zeros_like(truth) if missing else prediction.mask
    overlap = mask_overlap(mask, truth)
    return {"id": item.id, "dataset": item.dataset, "split": item.split, "prompt": item.prompt,
            "intersection": overlap.intersection, "union": overlap.union, "missing_seg": missing}


def depth_score(item: ShardItem, prediction: PredictionLike) -> dict[str, Any]:
    record: dict[str, Any] = {
        "id": item.id, "dataset": item.dataset, "split": item.split, "well_formed": prediction.well_formed,
        "token_accuracy": token_accuracy(prediction.depth_codes, item.teacher_codes),
    }
    if prediction.well_formed and prediction.depth is not None:
        record.update(decoded_depth_scores(prediction.depth, npy_load(item.depth_bytes).astype(np.float32)))
    return record


ANSWER_STYLES = ("depth", "direct")


@lru_cache(maxsize=None)
def hardblink_prompt(question_text: str, style: str = "depth") -> str:
    """The trainer's marked-point prompt around a HardBLINK question (the first template of the
    style): ``depth`` asks for the depth span before the letter, ``direct`` for the letter alone."""
    from perceptio.train.data import PromptTemplates

    templates = PromptTemplates.load()
    prompts = templates.question_prompts if style == "depth" else templates.direct_question_prompts
    return prompts[0].format(question=question_text)


def hardblink_query(question: HardBlinkQuestion, style: str = "depth") -> tuple[Image.Image, str]:
    with Image.open(question.image_path) as image:
        return image.convert("RGB"), hardblink_prompt(question.text, style)


def hardblink_score(question: HardBlinkQuestion, prediction: PredictionLike, reader: TokenReader | None = None,
                    style: str = "depth") -> dict[str, Any]:
    """The letter the model wrote; with a ``reader``, the decomposition columns too (decomposition.py)."""
    record = {"id": question.sample_id, "variant": question.variant, "answer": question.answer,
              "choice": parse_choice(prediction.text, question.variant), "reply": prediction.text}
    if reader is not None:
        record.update(reader.columns(question.row, prediction.depth_codes, prediction.well_formed, style == "depth",
                                     prediction.readout_codes))
    return record
