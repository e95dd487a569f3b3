"""Read LLaVA-1.5 instruction data (``llava_v1_5_mix665k.json``) exactly as it is distributed.

The file is one JSON list; each record is::

    {"id": "000000033471", "image": "coco/train2017/000000033471.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat are the colors of the bus?"},
                       {"from": "gpt", "value": "The bus is white and red."}, ...]}

``image`` is relative to the images root (``coco/``, ``gqa/``, ``ocr_vqa/``, ``textvqa/``, ``vg/``
in the LLaVA-1.5 release) and is absent for the text-only (ShareGPT) records; ``<image>`` marks
where the picture goes, once, in a human turn. Turns alternate human, gpt, human, gpt, ...
(the layout of haotian-liu/LLaVA ``docs/Finetune_Custom_Data.md`` at commit
9ad726577ceabb54fc641d75e139aa5a266147d1, and of the released mix665k file; read our own way).

What the reader does with bad input (each case a :class:`Problem`, the record left out):

- not an object, or no ``conversations`` list: ``bad_record``;
- no turns, or a turn with empty text: ``empty_conversation``;
- roles other than human/gpt, not alternating from human, or not ending with gpt:
  ``bad_turns`` (an assistant turn is what the model learns; a dangling question teaches nothing);
- ``<image>`` count not equal to the number of images (1 with ``image``, 0 without), or the
  placeholder in a gpt turn: ``placeholder_mismatch``.

Images are checked lazily, as the other readers do: :meth:`LlavaDataset.load_image` raises
:class:`BadImage` (``missing_image`` / ``corrupt_image``) and curation records the record as rejected.
A missing or unreadable JSON file or images root is a :class:`PerceptioError`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from perceptio.sources.problems import Problem, decode_image
from perceptio.errors import PerceptioError
from perceptio.sources.jsonfile import load_json_list

IMAGE_PLACEHOLDER = "<image>"
ROLES = {"human": "user", "gpt": "assistant"}  # LLaVA's speaker names -> chat-template roles


@dataclass(frozen=True)
class Turn:
    role: str  # "user" or "assistant"
    text: str  # without the <image> placeholder


@dataclass(frozen=True)
class Conversation:
    """One record: its position in the file (a unique integer id), the record's own id, its turns."""

    index: int
    id: str
    image: str | None  # relative to the images root; None for a text-only conversation
    turns: tuple[Turn, ...]


def strip_placeholder(text: str) -> str:
    """The turn's text without ``<image>`` and the line break that LLaVA puts beside it."""
    return text.replace(IMAGE_PLACEHOLDER, "").strip()


def parse_record(index: int, record: Any) -> Conversation | Problem:
    """A checked :class:`Conversation`, or the :class:`Problem` that keeps the record out."""
    if not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
        return Problem("bad_record", index, "not an object with a 'conversations' list")
    record_id = str(record.get("id", f"#{index}"))
    image = record.get("image")
    if image is not None and (not isinstance(image, str) or not image.strip()):
        return Problem("bad_record", record_id, f"'image' is {image!r}, expected a relative path")
    raw_turns = record["conversations"]
    if not raw_turns:
        return Problem("empty_conversation", record_id, "no turns")
    turns, placeholders = [], 0
    for position, turn in enumerate(raw_turns):
        speaker = turn.get("from") if isinstance(turn, dict) else None
        value = turn.get("value") if isinstance(turn, dict) else None
        if speaker not in ROLES or not isinstance(value, str):
            return Problem("bad_turns", record_id, f"turn {position} is not {{'from': human|gpt, 'value': str}}")
        expected = "human" if position % 2 == 0 else "gpt"
        if speaker != expected:
            return Problem("bad_turns", record_id, f"turn {position} is from {speaker}, expected {expected} (turns alternate)")
        count = value.count(IMAGE_PLACEHOLDER)
        if count and speaker == "gpt":
            return Problem("placeholder_mismatch", record_id, f"turn {position} (gpt) holds {IMAGE_PLACEHOLDER}")
        placeholders += count
        text = strip_placeholder(value)
        if not text:
            return Problem("empty_conversation", record_id, f"turn {position} has no text")
        turns.append(Turn(ROLES[speaker], text))
    if turns[-1].role != "assistant":
        return Problem("bad_turns", record_id, "the last turn is a question without an answer")
    images = 0 if image is None else 1
    if placeholders != images:
        return Problem(
            "placeholder_mismatch", record_id, f"{placeholders} {IMAGE_PLACEHOLDER} placeholder(s) for {images} image(s)"
        )
    return Conversation(index, record_id, image, tuple(turns))


class LlavaDataset:
    """The checked records of one LLaVA conversation file.

    >>> data = LlavaDataset("llava_v1_5_mix665k.json", "playground/data")   # doctest: +SKIP
    >>> data.conversations[0].turns[0].role                                  # doctest: +SKIP
    'user'
    """

    def __init__(self, json_path: str | os.PathLike[str], images_root: str | os.PathLike[str]):
        self.json_path = Path(json_path)
        self.images_root = Path(images_root)
        if not self.images_root.is_dir():
            raise PerceptioError(f"images root {self.images_root} not found")
        self.problems: list[Problem] = []
        self.conversations: list[Conversation] = []
        for index, record in enumerate(load_json_list(self.json_path, "LLaVA conversation file")):
            parsed = parse_record(index, record)
            if isinstance(parsed, Problem):
                self.problems.append(parsed)
            else:
                self.conversations.append(parsed)

    def image_path(self, conversation: Conversation) -> Path | None:
        return None if conversation.image is None else self.images_root / conversation.image

    def load_image(self, conversation: Conversation) -> Image.Image | None:
        """The decoded image, None for a text-only record; raises :class:`BadImage` when unusable."""
        path = self.image_path(conversation)
        return None if path is None else decode_image(path, conversation.id)
