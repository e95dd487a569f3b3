"""Model-family adapters: everything that differs between vision-language model families.

The trainer only needs a few things from a base model: the last hidden states of the language
model, the output head, which modules are the language model (LoRA), the vision tower (frozen) and
the blocks FSDP shards, and the numbers the processor (:mod:`perceptio.train.processor`) needs to lay
out its input (tile side, image tokens per tile). An adapter provides them; adding a family means
one subclass of :class:`VLMAdapter` in one file, registered in :data:`ADAPTERS` by the
``model_type`` of its transformers config.

InternVL (``InternVLForConditionalGeneration``) is the default and the paper's family.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from perceptio.errors import PerceptioError


class VLMAdapter(ABC):
    """The family-specific side of a base vision-language model (see the module docstring)."""

    model_types: ClassVar[tuple[str, ...]]
    image_size: int  # side of one (square) vision tile
    tokens_per_tile: int  # image placeholder tokens per tile

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase):
        self.model = model
        self.tokenizer = tokenizer

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
    def image_projector(self) -> nn.Module:
        """The module whose output is the image tokens' features, (tiles, tokens_per_tile, D), each
        tile's tokens in row-major order (``--cell-embeddings`` adds its vectors there)."""

    @abstractmethod
    def language_model(self) -> nn.Module:
        """The text decoder (fully fine-tuned with ``train_language_model``)."""

    @abstractmethod
    def fsdp_units(self) -> list[nn.Module]:
        """The blocks FSDP shards one by one (the transformer layers), before the whole model."""


class InternVLAdapter(VLMAdapter):
    """``InternVLForConditionalGeneration`` (InternVL 2.5/3/3.5 in transformers format)."""

    model_types = ("internvl",)

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase):
        super().__init__(model, tokenizer)
        config = model.config
        height, width = config.vision_config.image_size
        if height != width:
            raise PerceptioError(f"InternVL tiles must be square, not {height}x{width}")
        self.image_size = height
        patches_per_side = height // config.vision_config.patch_size[0]
        # Pixel shuffle folds (1/ratio)^2 patches into one token: 32x32 patches -> 256 tokens at 0.5.
        self.tokens_per_tile = int(patches_per_side * config.downsample_ratio) ** 2
        for attribute in ("start_image_token", "end_image_token", "context_image_token"):
            if not getattr(tokenizer, attribute, None):
                name = config.name_or_path or "the model"
                raise PerceptioError(f"the tokenizer of {name} has no {attribute} (not an InternVL tokenizer?)")
        if tokenizer.convert_tokens_to_ids(tokenizer.context_image_token) != config.image_token_id:
            raise PerceptioError("the tokenizer's <IMG_CONTEXT> id differs from the model's image_token_id")

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

    def image_projector(self) -> nn.Module:
        return self.model.model.multi_modal_projector

    def language_model(self) -> nn.Module:
        return self.model.model.language_model

    def fsdp_units(self) -> list[nn.Module]:
        return list(self.language_model().layers)


ADAPTERS: dict[str, type[VLMAdapter]] = {model_type: InternVLAdapter for model_type in InternVLAdapter.model_types}


def adapter_for(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> VLMAdapter:
    """The adapter of the model's family, by its config's ``model_type``."""
    model_type = model.config.model_type
    if model_type not in ADAPTERS:
        raise PerceptioError(f"model type {model_type!r} has no adapter; supported: {', '.join(sorted(ADAPTERS))}")
    return ADAPTERS[model_type](model, tokenizer)
