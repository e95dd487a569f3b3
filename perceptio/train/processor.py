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
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from perceptio.errors import PerceptioError
from perceptio.io import write_text_atomic
from perceptio.tokens import D_END, D_START, SEG
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


class PerceptioProcessor:
    """Tokenizer + image processors + prompt layout: ``encode_example`` and ``collate`` (module docstring)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, settings: ProcessorSettings):
        """``tokenizer``: the VLM's text tokenizer with the perception tokens added (its adapter checked
        the image markup tokens)."""
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

        self.tokenizer = tokenizer
        self.settings = settings
        self.image_processor = GotOcr2ImageProcessorPil(
            size={"height": settings.image_size, "width": settings.image_size},
            image_mean=list(IMAGENET_MEAN),
            image_std=list(IMAGENET_STD),
            crop_to_patches=settings.crop_to_patches,
            max_patches=MAX_TILES,
        )

    # ------------------------------------------------------------------ pieces
    def pixel_values(self, image: Image.Image) -> torch.Tensor:
        """The image as the vision tower's input: (tiles, 3, H, W) float."""
        return self.image_processor(image.convert("RGB"), return_tensors="pt")["pixel_values"]

    def prompt_text(self, prompt: str, num_tiles: int) -> str:
        """The full model input before the answer: chat markup, image placeholders, the user prompt."""
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        template = self.tokenizer.chat_template or INTERNVL_CHAT_TEMPLATE
        text = self.tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=True)
        context = self.tokenizer.context_image_token
        image = (self.tokenizer.start_image_token + context * (self.settings.tokens_per_tile * num_tiles)
                 + self.tokenizer.end_image_token)
        if text.count(context) != 1:
            raise PerceptioError(f"the chat template placed {text.count(context)} image placeholders, expected 1")
        return text.replace(context, image)

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
        """Tensors of one training example; prompt positions are masked out of ``labels``.

        The target is written with every perception token (``[SEG] [D_START] ... [D_END] text``);
        the ablations remove what they switch off (the depth span without depth tokens, ``[SEG]``
        without segmentation), so data code does not depend on them.
        """
        settings = self.settings
        target = self.ablated_target(target)
        pixel_values = self.pixel_values(image)
        prompt_ids = self.token_ids(self.prompt_text(prompt, num_tiles=pixel_values.shape[0]))
        target_ids = self.token_ids(target + self.end_of_turn())
        if len(prompt_ids) >= settings.max_length:
            raise PerceptioError(f"the prompt alone has {len(prompt_ids)} tokens, over max_length {settings.max_length}")
        # Only the target's tail can be cut (a depth span may lose its [D_END]: it then counts as invalid).
        input_ids = (prompt_ids + target_ids)[: settings.max_length]
        labels = ([IGNORE_INDEX] * len(prompt_ids) + target_ids)[: settings.max_length]
        example = {
            "input_ids": torch.tensor(input_ids),
            "labels": torch.tensor(labels),
            "pixel_values": pixel_values,
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
            example["sam_pixel_values"] = self.sam_pixel_values(image)
            size = settings.mask_size
            example["gt_mask"] = self.mask_target(mask) if mask is not None else torch.zeros(size, size)
            example["has_mask"] = torch.tensor(mask is not None)
        return example

    def collate(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        """Right-pad token sequences, concatenate image tiles, stack the rest; lists stay lists."""
        if not examples:
            raise ValueError("collate needs at least one example")
        length = max(len(example["input_ids"]) for example in examples)
        batch: dict[str, Any] = {}
        for key in examples[0]:
            values = [example[key] for example in examples]
            if key in ("input_ids", "labels"):
                fill = self.pad_token_id if key == "input_ids" else IGNORE_INDEX
                batch[key] = torch.stack([_right_pad(value, length, fill) for value in values])
            elif key == "pixel_values":
                batch[key] = torch.cat(values)  # InternVL takes every tile of the batch in one tensor
            elif isinstance(values[0], torch.Tensor):
                batch[key] = torch.stack(values)
            else:
                batch[key] = values
        lengths = torch.tensor([len(example["input_ids"]) for example in examples])
        batch["attention_mask"] = (torch.arange(length)[None, :] < lengths[:, None]).long()
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
