"""Model-family adapters: everything that differs between vision-language model families.

The trainer only needs five things from a base model: its image tensors, its prompt layout (chat
template and image placeholder tokens), the last hidden states of the language model, the output
head, and which modules are the language model (LoRA) and the vision tower (frozen). An adapter
provides them; adding a family means one subclass of :class:`VLMAdapter` in one file, registered in
:data:`ADAPTERS` by the ``model_type`` of its transformers config.

InternVL (``InternVLForConditionalGeneration``) is the default and the paper's family. Its
``InternVLProcessor`` cannot be built without torchvision (its video processor), so the image side
uses transformers' PIL implementation of the same image processor (``GotOcr2ImageProcessorPil``:
bicubic resize to 448, ImageNet mean/std, InternVL's tiling with a thumbnail when tiles are on) and
the prompt is expanded here exactly as ``InternVLProcessor.replace_image_token`` does:
``<img>`` + ``<IMG_CONTEXT>`` x (256 x tiles) + ``</img>``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from PIL import Image
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from perceptio.errors import PerceptioError

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


class VLMAdapter(ABC):
    """The family-specific side of a base vision-language model (see the module docstring)."""

    model_types: ClassVar[tuple[str, ...]]

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, crop_to_patches: bool = False):
        self.model = model
        self.tokenizer = tokenizer
        self.crop_to_patches = crop_to_patches

    @abstractmethod
    def pixel_values(self, image: Image.Image) -> torch.Tensor:
        """The image as the vision tower's input: (tiles, 3, H, W) float."""

    @abstractmethod
    def prompt_text(self, prompt: str, num_tiles: int) -> str:
        """The full model input before the answer: chat markup, image placeholders, the user prompt."""

    @abstractmethod
    def end_of_turn(self) -> str:
        """The text that closes the assistant's answer (appended to every target)."""

    @abstractmethod
    def last_hidden_state(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor | None
    ) -> torch.Tensor:
        """The language model's last hidden states (B, T, D), without applying the output head."""

    @abstractmethod
    def output_head(self) -> nn.Module:
        """The module that maps hidden states to vocabulary logits."""

    @abstractmethod
    def lora_target_modules(self) -> str:
        """A regular expression (peft ``target_modules``) matching the language model's linear layers."""

    @abstractmethod
    def vision_modules(self) -> list[nn.Module]:
        """Modules frozen when ``freeze_vision`` is set (vision tower, and projector where separate)."""

    @abstractmethod
    def language_model(self) -> nn.Module:
        """The text decoder (gradient checkpointing is enabled on it)."""


class InternVLAdapter(VLMAdapter):
    """``InternVLForConditionalGeneration`` (InternVL 2.5/3/3.5 in transformers format)."""

    model_types = ("internvl",)
    max_tiles = 12  # InternVL's default ``max_patches`` when tiling

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, crop_to_patches: bool = False):
        super().__init__(model, tokenizer, crop_to_patches)
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

        config = model.config
        height, width = config.vision_config.image_size
        self.image_processor = GotOcr2ImageProcessorPil(
            size={"height": height, "width": width},
            image_mean=list(IMAGENET_MEAN),
            image_std=list(IMAGENET_STD),
            crop_to_patches=crop_to_patches,
            max_patches=self.max_tiles,
        )
        patches_per_side = height // config.vision_config.patch_size[0]
        # Pixel shuffle folds (1/ratio)^2 patches into one token: 32x32 patches -> 256 tokens at 0.5.
        self.tokens_per_tile = int(patches_per_side * config.downsample_ratio) ** 2
        for attribute in ("start_image_token", "end_image_token", "context_image_token"):
            if not getattr(tokenizer, attribute, None):
                name = config.name_or_path or "the model"
                raise PerceptioError(f"the tokenizer of {name} has no {attribute} (not an InternVL tokenizer?)")
        if tokenizer.convert_tokens_to_ids(tokenizer.context_image_token) != config.image_token_id:
            raise PerceptioError("the tokenizer's <IMG_CONTEXT> id differs from the model's image_token_id")

    def pixel_values(self, image: Image.Image) -> torch.Tensor:
        return self.image_processor(image.convert("RGB"), return_tensors="pt")["pixel_values"]

    def prompt_text(self, prompt: str, num_tiles: int) -> str:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        template = self.tokenizer.chat_template or INTERNVL_CHAT_TEMPLATE
        text = self.tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=True
        )
        context = self.tokenizer.context_image_token
        image = self.tokenizer.start_image_token + context * (self.tokens_per_tile * num_tiles) + self.tokenizer.end_image_token
        if text.count(context) != 1:
            raise PerceptioError(f"the chat template placed {text.count(context)} image placeholders, expected 1")
        return text.replace(context, image)

    def end_of_turn(self) -> str:
        return "<|im_end|>" if "<|im_end|>" in self.tokenizer.get_vocab() else self.tokenizer.eos_token

    def last_hidden_state(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor | None
    ) -> torch.Tensor:
        return self.model.model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values).last_hidden_state

    def output_head(self) -> nn.Module:
        return self.model.lm_head

    def lora_target_modules(self) -> str:
        return r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"

    def vision_modules(self) -> list[nn.Module]:
        return [self.model.model.vision_tower, self.model.model.multi_modal_projector]

    def language_model(self) -> nn.Module:
        return self.model.model.language_model


ADAPTERS: dict[str, type[VLMAdapter]] = {model_type: InternVLAdapter for model_type in InternVLAdapter.model_types}


def adapter_for(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, crop_to_patches: bool = False) -> VLMAdapter:
    """The adapter of the model's family, by its config's ``model_type``."""
    model_type = model.config.model_type
    if model_type not in ADAPTERS:
        raise PerceptioError(f"model type {model_type!r} has no adapter; supported: {', '.join(sorted(ADAPTERS))}")
    return ADAPTERS[model_type](model, tokenizer, crop_to_patches)
