"""``PerceptioProcessor``: everything between a decoded example and the model's input tensors.

Split from the model as transformers splits processors from models: it holds the text tokenizer
(with the perception tokens), the VLM's image processor, the prompt layout (chat template and image
placeholders), SAM2's image and mask preprocessing and the ablations' target rewriting, and nothing
with weights. DataLoader workers receive it (a small picklable object) rather than a bound method
of the model, which under a spawn or forkserver start method would pickle the whole model into
every worker.

The prompt layout is InternVL's (``InternVLProcessor.replace_image_token``): the chat template puts
one ``<IMG_CONTEXT>`` where the image goes, expanded to ``<img>`` + ``<IMG_CONTEXT>`` x (tokens per
tile x tiles) + ``</img>``. The image processor is transformers' PIL implementation of InternVL's
(``GotOcr2ImageProcessorPil``), because ``InternVLProcessor`` cannot be built without torchvision.

:meth:`save_pretrained` writes the tokenizer and ``processor.json`` (the settings, which also
define the image processors) into a folder; :meth:`from_pretrained` reads them back into an
equivalent processor.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from perceptio.errors import PerceptioError
from perceptio.io import write_text_atomic
from perceptio.tokens import D_END, D_START, SEG
from perceptio.train.chat import ASSISTANT, USER, Turn, as_turns, lay_out, messages_for
from perceptio.train.losses import IGNORE_INDEX

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The layout of InternVL3-hf's chat template (no default system turn, an image as "<IMG_CONTEXT>\n"),
# used when a tokenizer carries no template of its own (the tiny one is saved with it).
INTERNVL_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
DEPTH_SPAN = re.compile(re.escape(D_START) + r".*?(" + re.escape(D_END) + r"|$)", re.DOTALL)
PROCESSOR_NAME = "processor.json"
MAX_TILES = 12  # InternVL's default ``max_patches`` when tiling


def unlabelled_spans(labels: Sequence[int], start_id: int, end_id: int) -> list[int]:
    """``labels`` with every depth span, ``[D_START]`` to ``[D_END]``, set to IGNORE_INDEX."""
    out, inside = [], False
    for label in labels:
        inside = inside or label == start_id
        out.append(IGNORE_INDEX if inside else label)
        inside = inside and label != end_id
    return out


@dataclass(frozen=True)
class ProcessorSettings:
    """What a processor needs besides its tokenizer; saved as ``processor.json``."""

    image_size: int  # side of one VLM tile (448 for InternVL)
    tokens_per_tile: int  # image placeholders per tile (256 for InternVL at pixel-shuffle 0.5)
    crop_to_patches: bool  # InternVL's dynamic tiling, or one tile
    depth_size: int  # side of the depth target
    sam_image_size: int | None  # SAM2's square input; None without the segmentation head
    max_length: int  # longest token sequence; longer examples lose their target's tail
    use_depth_tokens: bool  # False: the depth span is removed from every target
    use_segmentation: bool  # False: [SEG] is removed from every target

    @property
    def mask_size(self) -> int:
        """Side of the predicted (and target) mask: SAM2's decoder output is a quarter of its input."""
        return (self.sam_image_size or 0) // 4


def tile_image_processor(image_size: int, crop_to_patches: bool = False) -> Any:
    """InternVL's image processing (PIL implementation): ``image_size`` tiles, ImageNet normalisation;
    the whole picture as one tile unless ``crop_to_patches``."""
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    return GotOcr2ImageProcessorPil(size={"height": image_size, "width": image_size}, image_mean=list(IMAGENET_MEAN),
                                    image_std=list(IMAGENET_STD), crop_to_patches=crop_to_patches, max_patches=MAX_TILES)


class PerceptioProcessor:
    """Tokenizer + image processors + prompt layout: ``encode_example`` and ``collate`` (module docstring)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, settings: ProcessorSettings):
        """``tokenizer``: the VLM's text tokenizer with the perception tokens added (its adapter checked
        the image markup tokens)."""
        self.tokenizer = tokenizer
        self.settings = settings
        self.image_processor = tile_image_processor(settings.image_size, settings.crop_to_patches)

    # ------------------------------------------------------------------ pieces
    def pixel_values(self, image: Image.Image) -> torch.Tensor:
        """The image as the vision tower's input: (tiles, 3, H, W) float."""
        return self.image_processor(image.convert("RGB"), return_tensors="pt")["pixel_values"]

    def _render(self, messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
        template = self.tokenizer.chat_template or INTERNVL_CHAT_TEMPLATE
        return self.tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def _image_expander(self, num_tiles: int) -> Callable[[str], str]:
        """Replaces the template's one image placeholder by the image markup of ``num_tiles`` tiles."""
        context = self.tokenizer.context_image_token
        image = (self.tokenizer.start_image_token + context * (self.settings.tokens_per_tile * num_tiles)
                 + self.tokenizer.end_image_token)

        def expand(text: str) -> str:
            if text.count(context) != 1:
                raise PerceptioError(f"the chat template placed {text.count(context)} image placeholders, expected 1")
            return text.replace(context, image)

        return expand

    def conversation_prompt(self, turns: Sequence[Any], num_tiles: int | None) -> str:
        """The model input before the next answer: the turns so far (ending with the user's), laid out
        by the chat template, the image (``num_tiles`` tiles; None: no image) in the first user turn."""
        history = as_turns(turns)
        text = self._render(messages_for(history, num_tiles is not None), True)
        return self._image_expander(num_tiles)(text) if num_tiles is not None else text

    def prompt_text(self, prompt: str, num_tiles: int) -> str:
        """The full model input before the answer to a single question about an image."""
        return self.conversation_prompt([Turn(USER, prompt)], num_tiles)

    def end_of_turn(self) -> str:
        """The text that closes the assistant's answer (appended to every target)."""
        return "<|im_end|>" if "<|im_end|>" in self.tokenizer.get_vocab() else self.tokenizer.eos_token

    def sam_pixel_values(self, image: Image.Image) -> torch.Tensor:
        """(3, S, S) float: SAM2's input (RGB, square resize without keeping the aspect, ImageNet mean/std)."""
        size = self.settings.sam_image_size
        if size is None:
            raise PerceptioError("this processor has no segmentation head to prepare images for")
        resized = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
        pixels = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (pixels - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def mask_target(self, mask: np.ndarray) -> torch.Tensor:
        """A binary (H, W) mask resized (nearest) to the predicted mask's (M, M), as float 0/1."""
        size = self.settings.mask_size
        picture = Image.fromarray((np.asarray(mask) > 0).astype(np.uint8) * 255)
        resized = picture.resize((size, size), Image.Resampling.NEAREST)
        return torch.from_numpy(np.asarray(resized) > 127).float()

    def ablated_target(self, target: str) -> str:
        """The target text with the perception tokens that the ablation switches off removed."""
        ablated = target
        if not self.settings.use_depth_tokens:
            ablated = DEPTH_SPAN.sub(" ", ablated)
        if not self.settings.use_segmentation:
            ablated = ablated.replace(SEG, " ")
        return target if ablated == target else " ".join(ablated.split())

    def token_ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    @property
    def pad_token_id(self) -> int:
        tokenizer = self.tokenizer
        return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    # ------------------------------------------------------------------ examples and batches
    def encode_example(
        self,
        image: Image.Image,
        prompt: str,
        target: str,
        mask: np.ndarray | None = None,
        depth: np.ndarray | None = None,
    ) -> dict[str, torch.Tensor]:
        """One question and its answer about an image (see :meth:`encode_conversation`)."""
        masks = [mask] if mask is not None else []
        return self.encode_conversation(image, [Turn(USER, prompt), Turn(ASSISTANT, target)], masks, depth)

    def encode_conversation(
        self,
        image: Image.Image | None,
        turns: Sequence[Any],
        masks: Sequence[np.ndarray] = (),
        depth: np.ndarray | None = None,
        span_is_context: bool = False,
        hidden_cells: Sequence[int] = (),
    ) -> dict[str, torch.Tensor]:
        """Tensors of one training example of any number of turns, with or without an image.

        The chat template lays the turns out (:mod:`perceptio.train.chat`); ``labels`` hold every
        answer and its end-of-turn marker and nothing else. Answers are written with every perception
        token (``[SEG] [D_START] ... [D_END] text``); the ablations remove what they switch off, so
        data code does not depend on them. ``masks`` are the targets of the ``[SEG]`` tokens of the
        answers, in order (a grounded caption has one per phrase). With ``span_is_context`` the answers'
        depth spans, markers included, are read but not labelled (a swapped reading question's span).
        ``hidden_cells``: codes of the last answer's span hidden from attention and unlabelled, as
        padding is (a short span of ``--reading-short-spans``; the span must be context). Each keeps
        its position, so the codes left visible stay at their cells.
        """
        settings = self.settings
        turns = [Turn(turn.role, self.ablated_target(turn.text)) if turn.role == ASSISTANT else turn
                 for turn in as_turns(turns)]
        pixel_values = self.pixel_values(image) if image is not None else None
        expand = self._image_expander(pixel_values.shape[0]) if pixel_values is not None else None
        input_ids, labels = lay_out(turns, self._render, self.token_ids, self.end_of_turn(), expand)
        if span_is_context:
            labels = unlabelled_spans(labels, *self.tokenizer.convert_tokens_to_ids([D_START, D_END]))
        attention = [1] * len(input_ids)
        if hidden_cells:
            if not span_is_context:
                raise ValueError("cells of a span can be hidden only where the span is context")
            start = len(input_ids) - 1 - input_ids[::-1].index(self.tokenizer.convert_tokens_to_ids(D_START))
            for cell in hidden_cells:
                attention[start + 1 + cell] = 0
        first_answer = next(position for position, label in enumerate(labels) if label != IGNORE_INDEX)
        if first_answer >= settings.max_length:
            raise PerceptioError(f"the prompt alone has {first_answer} tokens, over max_length {settings.max_length}")
        # Only answers' tails can be cut (a depth span may lose its [D_END]: it then counts as invalid).
        example = {
            "input_ids": torch.tensor(input_ids[: settings.max_length]),
            "labels": torch.tensor(labels[: settings.max_length]),
            "attention_mask": torch.tensor(attention[: settings.max_length]),
            # No tile for a text-only example: the batch's tiles are concatenated (see collate).
            "pixel_values": pixel_values if pixel_values is not None else torch.zeros(0, 3, settings.image_size, settings.image_size),
            "depth_target": torch.zeros(settings.depth_size, settings.depth_size),
            "has_depth": torch.tensor(depth is not None),
        }
        if depth is not None:
            depth = np.asarray(depth, dtype=np.float32)
            if depth.shape != (settings.depth_size, settings.depth_size):
                raise PerceptioError(
                    f"depth target has shape {depth.shape}, expected ({settings.depth_size}, {settings.depth_size})")
            example["depth_target"] = torch.from_numpy(depth)
        if settings.sam_image_size is not None:
            size, side = settings.mask_size, settings.sam_image_size
            if masks and image is None:
                raise PerceptioError("masks were given for an example without an image")
            example["sam_pixel_values"] = self.sam_pixel_values(image) if image is not None else torch.zeros(3, side, side)
            example["gt_masks"] = (torch.stack([self.mask_target(mask) for mask in masks]) if len(masks)
                                   else torch.zeros(0, size, size))
            example["num_masks"] = torch.tensor(len(masks))
        return example

    def collate(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        """Right-pad token sequences and mask stacks, concatenate image tiles, stack the rest; lists stay lists."""
        if not examples:
            raise ValueError("collate needs at least one example")
        length = max(len(example["input_ids"]) for example in examples)
        batch: dict[str, Any] = {}
        for key in examples[0]:
            values = [example[key] for example in examples]
            if key in ("input_ids", "labels", "attention_mask"):
                fill = {"input_ids": self.pad_token_id, "labels": IGNORE_INDEX, "attention_mask": 0}[key]
                batch[key] = torch.stack([_right_pad(value, length, fill) for value in values])
            elif key == "pixel_values":
                batch[key] = torch.cat(values)  # InternVL takes every tile of the batch in one tensor
            elif key == "gt_masks":  # (masks, M, M) per example: padded to the batch's most masks
                most = max(value.shape[0] for value in values)
                batch[key] = torch.stack([torch.cat([value, value.new_zeros(most - value.shape[0], *value.shape[1:])])
                                          for value in values])
            elif isinstance(values[0], torch.Tensor):
                batch[key] = torch.stack(values)
            else:
                batch[key] = values
        return batch

    # ------------------------------------------------------------------ files
    def save_pretrained(self, directory: str | os.PathLike[str]) -> Path:
        """Write the tokenizer and ``processor.json`` into ``directory`` (part of a model export)."""
        folder = Path(directory)
        self.tokenizer.save_pretrained(folder)
        write_text_atomic(folder / PROCESSOR_NAME, json.dumps(asdict(self.settings), indent=2, sort_keys=True) + "\n")
        return folder

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike[str]) -> "PerceptioProcessor":
        folder = Path(directory)
        if not (folder / PROCESSOR_NAME).is_file():
            raise PerceptioError(f"{folder} holds no {PROCESSOR_NAME} (not a perceptio export?)")
        settings = ProcessorSettings(**json.loads((folder / PROCESSOR_NAME).read_text()))
        return cls(AutoTokenizer.from_pretrained(folder), settings)


def _right_pad(values: torch.Tensor, length: int, fill: int) -> torch.Tensor:
    return torch.cat([values, values.new_full((length - len(values),), fill)])
