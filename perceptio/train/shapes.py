"""The real architectures, built from their published configurations with random weights.

No weights can be downloaded in tests, CI or on the lent GPU machine, but the shapes that matter
(layer sizes, vocabulary rows, tied or untied heads, the image-token id, SAM2's 1024 input, Depth
Anything's 518 input) can be rebuilt exactly from the published ``config.json`` numbers. A model id
``shape:<name>`` (``--model shape:internvl3-1b``, ``--sam-model shape:sam2.1-hiera-large``) builds
one of them in place of a hub checkpoint; everything downstream (token adding, embedding resizing,
LoRA, the [SEG] head) then runs on the real shape.

Where each number comes from is written next to it. ``published_parameters`` is the size the
model's authors state (hub "Model size" of the safetensors, or the project README table); tests
check our build against it within 1 %.

The text tokenizer of an InternVL shape is not Qwen2.5's (151k merges cannot be downloaded here):
it is the TINY byte-level BPE, padded with unused entries to the published vocabulary so that the
special tokens sit at their published ids (``<|endoftext|>`` 151643, ``<|im_start|>`` 151644,
``<|im_end|>`` 151645, ``<img>`` 151665, ``</img>`` 151666, ``<IMG_CONTEXT>`` 151667) and
``len(tokenizer)`` equals the published embedding rows (151674): adding the perception tokens then
grows the embedding and the untied head exactly as with the real checkpoint. Text is split into
somewhat more tokens than by Qwen's BPE; the image tokens (256 per tile) dominate a prompt anyway.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from typing import Any

SHAPE_PREFIX = "shape:"

# OpenGVLab's InternViT-300M-448px-V2_5 in transformers' ``internvl_vision`` format: the
# ``vit_300m_config`` of OpenGVLab/InternVL internvl_chat/tools/internvl_custom2hf.py, which writes
# the vision_config of every InternVL*-hf checkpoint with a 300M tower (1B-78B except 38B/78B).
INTERNVIT_300M: dict[str, Any] = {
    "model_type": "internvl_vision",
    "attention_bias": True,
    "hidden_act": "gelu",
    "hidden_size": 1024,
    "image_size": [448, 448],
    "intermediate_size": 4096,
    "layer_norm_eps": 1e-6,
    "layer_scale_init_value": 0.1,
    "norm_type": "layer_norm",
    "num_attention_heads": 16,
    "num_channels": 3,
    "num_hidden_layers": 24,
    "patch_size": [14, 14],
    "use_absolute_position_embeddings": True,
    "use_mask_token": False,
    "use_mean_pooling": True,
    "use_qk_norm": False,
}

# The language models as InternVL3 ships them (llm_config of OpenGVLab/InternVL3-1B / -8B, copied
# into text_config by the -hf conversion): Qwen2.5 with the vocabulary cut to 151674 rows (151643
# BPE + 31 added tokens) and an untied output head (top-level tie_word_embeddings false; the
# InternVL3-1B module print shows a separate lm_head Linear(896, 151674)).
QWEN25_05B: dict[str, Any] = {
    "model_type": "qwen2",
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "vocab_size": 151674,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "pad_token_id": 151643,
}
# Qwen2.5-7B (Qwen/Qwen2.5-7B-Instruct config.json) with InternVL3-8B's 151674-row vocabulary.
QWEN25_7B: dict[str, Any] = {
    **QWEN25_05B,
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
}


def _internvl(text: dict[str, Any]) -> dict[str, Any]:
    # Top-level fields of InternVL3-*-hf config.json (written by internvl_custom2hf.py):
    # pixel-shuffle 0.5 -> 256 image tokens per 448 tile, <IMG_CONTEXT> = 151667, GELU projector.
    return {
        "model_type": "internvl",
        "downsample_ratio": 0.5,
        "image_seq_length": 256,
        "image_token_id": 151667,
        "projector_hidden_act": "gelu",
        "vision_feature_layer": -1,
        "vision_feature_select_strategy": "default",
        "tie_word_embeddings": False,
        "vision_config": INTERNVIT_300M,
        "text_config": text,
    }


def _sam2(hidden: int, heads: int, blocks: list[int], window: list[int], global_blocks: list[int]) -> dict[str, Any]:
    # facebookresearch/sam2 sam2/configs/sam2.1/sam2.1_hiera_{t,l}.yaml (trunk embed_dim, num_heads,
    # stages, window_spec, global_att_blocks; Hiera doubles width and heads per stage), with the
    # 256-wide FPN neck and the 1024 input of every SAM 2.1 model, in transformers' Sam2Config names.
    widths = [hidden * 2**stage for stage in range(4)]
    return {
        "vision_config": {
            "backbone_config": {
                "model_type": "sam2_hiera_det_model",
                "hidden_size": hidden,
                "num_attention_heads": heads,
                "image_size": [1024, 1024],
                "blocks_per_stage": blocks,
                "embed_dim_per_stage": widths,
                "num_attention_heads_per_stage": [heads * 2**stage for stage in range(4)],
                "window_size_per_stage": window,
                "global_attention_blocks": global_blocks,
                "window_positional_embedding_background_size": [7, 7],
            },
            "backbone_channel_list": widths[::-1],
            "fpn_hidden_size": 256,
        },
    }


def _depth_anything(hidden: int, layers: int, heads: int, out: list[int], neck: list[int], fusion: int) -> dict[str, Any]:
    # depth-anything/Depth-Anything-V2-{Small,Large}-hf config.json: a DINOv2 ViT-S/14 or ViT-L/14
    # backbone at 518, features from 4 layers (V2: layers 2,5,8,11 of ViT-S and 4,11,17,23 of
    # ViT-L, 0-based), the DPT neck and head widths of the Depth Anything V2 repository (dpt.py:
    # features 64/256, out_channels [48..384] / [256..1024]).
    return {
        "backbone_config": {
            "model_type": "dinov2",
            "image_size": 518,
            "patch_size": 14,
            "hidden_size": hidden,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "intermediate_size": 4 * hidden,
            "out_indices": out,
            "apply_layernorm": True,
            "reshape_hidden_states": False,
        },
        "reassemble_hidden_size": hidden,
        "patch_size": 14,
        "neck_hidden_sizes": neck,
        "fusion_hidden_size": fusion,
        "head_hidden_size": 32,
        "depth_estimation_type": "relative",
    }


@dataclass(frozen=True)
class PublishedShape:
    """One published architecture: its config, where it comes from, and its stated size."""

    name: str  # what follows ``shape:``
    hub_id: str  # the checkpoint it mirrors
    kind: str  # "internvl" | "sam2" | "depth_anything"
    config: dict[str, Any] = field(repr=False)
    published_parameters: int
    parameters_source: str


SHAPES: dict[str, PublishedShape] = {
    shape.name: shape
    for shape in (
        PublishedShape(
            "internvl3-1b", "OpenGVLab/InternVL3-1B-hf", "internvl", _internvl(QWEN25_05B),
            938_000_000, "hub 'Model size' of OpenGVLab/InternVL3-1B(-hf): 938M params",
        ),
        PublishedShape(
            "internvl3-8b", "OpenGVLab/InternVL3-8B-hf", "internvl", _internvl(QWEN25_7B),
            7_940_000_000, "hub 'Model size' of OpenGVLab/InternVL3-8B(-hf): 7.94B params",
        ),
        PublishedShape(
            "sam2.1-hiera-tiny", "facebook/sam2.1-hiera-tiny", "sam2", _sam2(96, 1, [1, 2, 7, 2], [8, 4, 14, 7], [5, 7, 9]),
            38_900_000, "facebookresearch/sam2 README model table: sam2.1_hiera_tiny 38.9M",
        ),
        PublishedShape(
            "sam2.1-hiera-large", "facebook/sam2.1-hiera-large", "sam2",
            _sam2(144, 2, [2, 6, 36, 4], [8, 4, 16, 8], [23, 33, 43]),
            224_400_000, "facebookresearch/sam2 README model table: sam2.1_hiera_large 224.4M",
        ),
        PublishedShape(
            "depth-anything-v2-small", "depth-anything/Depth-Anything-V2-Small-hf", "depth_anything",
            _depth_anything(384, 12, 6, [3, 6, 9, 12], [48, 96, 192, 384], 64),
            24_800_000, "DepthAnything/Depth-Anything-V2 README: Depth-Anything-V2-Small 24.8M",
        ),
        PublishedShape(
            "depth-anything-v2-large", "depth-anything/Depth-Anything-V2-Large-hf", "depth_anything",
            _depth_anything(1024, 24, 16, [5, 12, 18, 24], [256, 512, 1024, 1024], 256),
            335_300_000, "DepthAnything/Depth-Anything-V2 README: Depth-Anything-V2-Large 335.3M",
        ),
    )
}


def depth_anything_processor(input_size: int = 518) -> Any:
    """Depth Anything V2's published preprocessing: keep the aspect ratio, the shorter side to
    ``input_size`` (518 published; smaller for tests), sides a multiple of 14, ImageNet statistics."""
    from transformers.models.dpt.image_processing_pil_dpt import DPTImageProcessorPil

    return DPTImageProcessorPil(size={"height": input_size, "width": input_size}, keep_aspect_ratio=True,
                                ensure_multiple_of=14, resample=3, image_mean=[0.485, 0.456, 0.406],
                                image_std=[0.229, 0.224, 0.225])


def is_shape(model_id: str) -> bool:
    return model_id.startswith(SHAPE_PREFIX)


def shape_for(model_id: str, kind: str) -> PublishedShape:
    """The shape named by ``shape:<name>`` (or by the hub id it mirrors); a PerceptioError names the
    known ones otherwise."""
    from perceptio.errors import PerceptioError

    name = model_id[len(SHAPE_PREFIX):] if is_shape(model_id) else model_id
    by_hub_id = {value.hub_id: value for value in SHAPES.values()}
    shape = SHAPES.get(name) or by_hub_id.get(name)
    if shape is None or shape.kind != kind:
        known = ", ".join(SHAPE_PREFIX + key for key, value in SHAPES.items() if value.kind == kind)
        raise PerceptioError(f"unknown {kind} shape {model_id!r}; known: {known}")
    return shape


def hf_config(shape: PublishedShape) -> Any:
    """The transformers config object of a shape."""
    from transformers import DepthAnythingConfig, InternVLConfig, Sam2Config

    values = copy.deepcopy(shape.config)
    if shape.kind == "internvl":
        return InternVLConfig(**values)
    if shape.kind == "sam2":
        return Sam2Config(**values)
    return DepthAnythingConfig(**values)


def build(shape: PublishedShape, device: str = "cpu", seed: int = 0, whole_checkpoint: bool = False) -> Any:
    """The model with random weights (``device="meta"``: shapes only, no memory).

    SAM2 is built as ``Sam2Model`` (the image model our segmenter uses); ``whole_checkpoint``
    builds ``Sam2VideoModel`` instead, which adds the memory attention and memory encoder that the
    published checkpoints (and their stated sizes) also hold.
    """
    import torch
    from transformers import (
        DepthAnythingForDepthEstimation,
        InternVLForConditionalGeneration,
        Sam2Model,
        Sam2VideoConfig,
        Sam2VideoModel,
    )

    cls = {"internvl": InternVLForConditionalGeneration, "sam2": Sam2VideoModel if whole_checkpoint else Sam2Model,
           "depth_anything": DepthAnythingForDepthEstimation}[shape.kind]
    config = Sam2VideoConfig(**copy.deepcopy(shape.config)) if cls is Sam2VideoModel else hf_config(shape)
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        return cls(config)


def shaped_tokenizer(shape: PublishedShape) -> Any:
    """The TINY BPE laid out like InternVL3's tokenizer (module docstring): published ids and length."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from perceptio.train.processor import INTERNVL_CHAT_TEMPLATE
    from perceptio.train.tiny import IM_END, IM_START, IMAGE_MARKUP, PAD, tiny_text_tokenizer

    text = shape.config["text_config"]
    rows, image_id = text["vocab_size"], shape.config["image_token_id"]
    base = json.loads(tiny_text_tokenizer().backend_tokenizer.to_str())
    specials = {PAD: 151643, IM_START: 151644, IM_END: 151645, IMAGE_MARKUP["start_image_token"]: image_id - 2,
                IMAGE_MARKUP["end_image_token"]: image_id - 1, IMAGE_MARKUP["context_image_token"]: image_id}
    # Byte-level BPE entries keep their order and fill ids from 0; unused entries pad up to the
    # first special id, and again between and after the specials, up to the published rows.
    vocab = [token for token, _ in sorted(base["model"]["vocab"].items(), key=lambda item: item[1]) if token not in specials]
    by_id = {index: token for index, token in enumerate(vocab)}
    by_id.update({index: token for token, index in specials.items()})
    ordered = {by_id.get(index, f"<|unused_{index}|>"): index for index in range(rows)}
    # Added tokens keep their ids only when the model vocabulary holds them too (else appended).
    base["model"]["vocab"] = ordered
    base["added_tokens"] = [
        {"id": index, "content": token, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}
        for token, index in sorted(specials.items(), key=lambda item: item[1])
    ]
    backend = Tokenizer.from_str(json.dumps(base))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=IM_END, pad_token=PAD, extra_special_tokens=IMAGE_MARKUP,
        model_max_length=text["max_position_embeddings"],
    )
    tokenizer.chat_template = INTERNVL_CHAT_TEMPLATE
    return tokenizer


def count_parameters(model: Any) -> int:
    return sum(parameter.numel() for parameter in model.parameters())
