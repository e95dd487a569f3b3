"""``PerceptioModel``: a vision-language model that writes ``[SEG] [D_START] d_1..d_n [D_END] answer``.

Pieces (paper-notes.md): a transformers vision-language model (InternVL by default, reached through
:mod:`perceptio.train.adapter`) with the perception tokens of :mod:`perceptio.tokens` added, LoRA on
its language model and trainable rows for the new tokens (or, with ``train_language_model``, every
weight of the language model: the default for the random TINY model); a SAM2 mask decoder prompted by the
``[SEG]`` hidden state (:mod:`perceptio.train.sam`); the frozen depth VQ-VAE whose ``decode_soft``
gives L_DepthRecon; with ``cell_embeddings`` a learned vector per depth-grid cell on the image tokens
and span codes of that cell (:mod:`perceptio.train.cells`); with ``eye_depth`` a training-only head
that regresses each image token's depth (:mod:`perceptio.train.eye_depth`).
:mod:`perceptio.train.losses` defines the four losses. Its inputs come from ``model.processor``
(:class:`~perceptio.train.processor.PerceptioProcessor`), the weight-free half.

Export (:meth:`PerceptioModel.save_pretrained`) writes a folder that
:meth:`PerceptioModel.from_pretrained` loads: ``adapter`` format (trainable weights only, base
models by id) or ``merged`` format (a plain transformers VLM folder with LoRA and the new token rows
merged in, loadable by ``AutoModelForImageTextToText``, plus the SAM2 folder and the projector);
either way with the processor's files at its top, so ``PerceptioProcessor.from_pretrained`` loads
them alone.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Sam2Model

from perceptio.errors import PerceptioError
from perceptio.hub import looks_like_repo_id, resolved_commit
from perceptio.io import atomic_directory, write_text_atomic
from perceptio.shards import DEPTH_SIZE
from perceptio.tokens import D_END, D_START, DEFAULT_NUM_CODES, SEG, depth_token, special_tokens
from perceptio.train import losses, shapes
from perceptio.train.adapter import VLMAdapter, adapter_for
from perceptio.train.cells import CellEmbeddings
from perceptio.train.checkpoint import absolute_location
from perceptio.train.config import CONFIG_NAME, TINY, PerceptioConfig
from perceptio.train.eye_depth import EyeDepthHead
from perceptio.train.processor import PerceptioProcessor, ProcessorSettings
from perceptio.train.sam import SamSegmenter

TRAINABLE_NAME = "trainable.safetensors"
PROJECTOR_NAME = "seg_projector.safetensors"
CELLS_NAME = "cell_embeddings.safetensors"  # a merged export's --cell-embeddings table (not mergeable: it is per place)
# The adapter export in the ecosystem's formats, beside trainable.safetensors: PEFT's own files
# (PeftModel.from_pretrained(base, folder) loads them) and the segmentation head on its own.
HEADS_NAME, HEADS_CONFIG_NAME = "heads.safetensors", "heads_config.json"
VLM_DIR, SAM_DIR, DEPTH_DIR = "vlm", "sam2", "depth_tokenizer"
# Trained parts used in training only (L_EyeDepth's head): a second stage (--init-from) may add or drop them.
TRAINING_ONLY = ("eye_depth.",)
TERMS = ("llm", "seg_bce", "seg_dice", "seg_text", "depth_marker", "depth_token", "depth_count", "depth_recon", "eye_depth")


@dataclass
class PerceptioOutput:
    loss: torch.Tensor
    terms: dict[str, torch.Tensor]  # detached values of every term in :data:`TERMS`


class PerceptioModel(nn.Module):
    """Base VLM (+LoRA) + [SEG] segmenter + frozen depth VQ-VAE; see the module docstring."""

    def __init__(
        self,
        config: PerceptioConfig,
        vlm: nn.Module,
        adapter: VLMAdapter,
        segmenter: SamSegmenter | None,
        depth_vqvae: nn.Module | None,
    ):
        super().__init__()
        self.config = config
        self.vlm = vlm
        self.adapter = adapter
        self.segmenter = segmenter
        self.depth_vqvae = depth_vqvae
        self.tokenizer = adapter.tokenizer
        num_codes = depth_vqvae.config.num_codes if depth_vqvae is not None else DEFAULT_NUM_CODES
        ids = self.tokenizer.convert_tokens_to_ids
        self.seg_token_id: int = ids(SEG)
        self.d_start_id: int = ids(D_START)
        self.d_end_id: int = ids(D_END)
        self.register_buffer(
            "depth_token_ids", torch.tensor([ids(depth_token(code)) for code in range(num_codes)]), persistent=False
        )
        # L_SegText's reader and what counts as a request's words (not chat markup, image or perception tokens).
        self.seg_reader: nn.Linear | None = None
        if segmenter is not None and config.seg_text > 0:
            width = adapter.model.config.get_text_config().hidden_size
            self.seg_reader = nn.Linear(width, width)
            markup = sorted(set(self.tokenizer.all_special_ids) | set(self.tokenizer.added_tokens_decoder))
            self.register_buffer("markup_token_ids", torch.tensor(markup), persistent=False)
        self.cell_embeddings: CellEmbeddings | None = None
        if config.cell_embeddings:
            text_config = adapter.model.config.get_text_config()
            self.cell_embeddings = CellEmbeddings(text_config.hidden_size, text_config.initializer_range,
                                                  config.num_depth_tokens, adapter.tokens_per_tile,
                                                  self.d_start_id, self.d_end_id)
            self.cell_embeddings.attach(adapter.model.get_input_embeddings(), adapter.image_projector())
        self.eye_depth: EyeDepthHead | None = None
        if config.eye_depth > 0:
            self.eye_depth = EyeDepthHead(adapter.model.config.get_text_config().hidden_size, adapter.tokens_per_tile,
                                          adapter.model.config.image_token_id)
            self.eye_depth.attach(adapter.image_projector())
        # What DataLoader workers get: no weights, only what turns an example into tensors.
        self.processor = PerceptioProcessor(self.tokenizer, ProcessorSettings(
            image_size=adapter.image_size,
            tokens_per_tile=adapter.tokens_per_tile,
            crop_to_patches=config.crop_to_patches,
            depth_size=int(getattr(getattr(depth_vqvae, "config", None), "image_size", DEPTH_SIZE)),
            sam_image_size=segmenter.image_size if segmenter is not None else None,
            max_length=config.max_length,
            use_depth_tokens=config.use_depth_tokens,
            use_segmentation=config.use_segmentation,
        ))

    # ------------------------------------------------------------------ building
    @classmethod
    def from_config(cls, config: PerceptioConfig, depth_vqvae: nn.Module | None = None) -> "PerceptioModel":
        """Load the base models, add the perception tokens, apply LoRA and freeze what is frozen.

        ``depth_vqvae`` overrides loading ``config.tokenizer`` (an already loaded VQ-VAE).
        """
        return cls._build(config, depth_vqvae=depth_vqvae, apply_lora=True)

    @classmethod
    def _build(
        cls,
        config: PerceptioConfig,
        depth_vqvae: nn.Module | None,
        apply_lora: bool,
        segmenter_state: dict[str, torch.Tensor] | None = None,
    ) -> "PerceptioModel":
        dtype = frozen_weight_dtype(config.dtype, torch.cuda.is_available())
        if depth_vqvae is None and config.use_depth_tokens:
            depth_vqvae = _load_depth_vqvae(config)
        if depth_vqvae is not None:
            depth_vqvae.requires_grad_(False).eval()
        vlm, tokenizer = _load_vlm(config, dtype)
        num_codes = depth_vqvae.config.num_codes if depth_vqvae is not None else DEFAULT_NUM_CODES
        new_tokens = special_tokens(num_codes)
        added = tokenizer.add_tokens(new_tokens, special_tokens=True)
        # Checkpoints often carry spare embedding rows: grow only when the new ids do not fit.
        if len(tokenizer) > vlm.get_input_embeddings().weight.shape[0]:
            vlm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        init_new_token_rows(vlm, range(len(tokenizer) - added, len(tokenizer)), config.new_token_init)
        vlm.requires_grad_(False)
        adapter = adapter_for(vlm, tokenizer)
        wrapped = vlm
        if apply_lora and config.train_language_model:
            adapter.language_model().requires_grad_(True)
            adapter.output_head().requires_grad_(True)  # the same weight as the embedding when tied
        elif apply_lora:
            # peft injects its layers in place: the adapter's model is the trained one either way.
            wrapped = _apply_lora(vlm, config, adapter, tokenizer.convert_tokens_to_ids(new_tokens))
        if not config.freeze_vision:
            for module in adapter.vision_modules():
                module.requires_grad_(True)
        if config.gradient_checkpointing:
            # Non-reentrant: the frozen embeddings give checkpointed blocks inputs without grad.
            vlm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        segmenter = None
        if config.use_segmentation:
            segmenter = SamSegmenter(_load_sam(config, dtype), vlm.config.get_text_config().hidden_size,
                                     train_encoder=not config.freeze_sam_encoder)
            if segmenter_state is not None:
                segmenter.projector.load_state_dict(segmenter_state)
        model = cls(config, wrapped, adapter, segmenter, depth_vqvae)
        # Master weights in fp32 (LoRA, token rows, decoder, projector), whatever the frozen ones are.
        for parameter in model.parameters():
            if parameter.requires_grad and parameter.dtype != torch.float32:
                parameter.data = parameter.data.float()
        return model

    @property
    def is_tiny(self) -> bool:
        """Built from ``--model tiny`` (directly, or reloaded from a merged export of it)."""
        return self.config.is_tiny or bool(getattr(self.adapter.model.config, "perceptio_tiny", False))

    # ------------------------------------------------------------------ training
    def forward(self, batch: dict[str, Any]) -> PerceptioOutput:
        config = self.config
        labels = batch["labels"]
        hidden = self.hidden_states(batch)
        supervised = losses.SupervisedLogits.from_hidden(hidden, labels, self.adapter.output_head())
        token_nll = supervised.token_nll()
        zero = hidden.sum() * 0.0
        terms = dict.fromkeys(TERMS, zero)
        spans = losses.find_depth_spans(labels, self.d_start_id, self.d_end_id)
        weights = None
        if config.span_weight != 1.0 or config.answer_weight != 1.0:
            answer_start = losses.answer_starts(labels, spans, self.depth_token_ids) if config.answer_weight != 1.0 else None
            weights = losses.llm_token_weights(supervised, spans, config.span_weight, answer_start, config.answer_weight)
        terms["llm"] = losses.llm_loss(supervised, token_nll, weights)
        if self.segmenter is not None:
            terms["seg_bce"], terms["seg_dice"], terms["seg_text"] = self._segmentation_terms(batch, hidden)
        if config.use_depth_tokens:
            terms["depth_marker"] = losses.depth_marker_loss(supervised, token_nll, spans)
            terms["depth_token"] = losses.depth_token_loss(supervised, token_nll, spans)
            terms["depth_count"] = losses.depth_count_loss(supervised, spans, self.depth_token_ids, config.num_depth_tokens)
            if self.depth_vqvae is not None:
                terms["depth_recon"] = losses.depth_recon_loss(
                    supervised,
                    spans,
                    self.depth_token_ids,
                    config.num_depth_tokens,
                    self.depth_vqvae.decode_soft,
                    batch["depth_target"],
                    batch["has_depth"],
                )
        loss = terms["llm"] + config.seg_bce * terms["seg_bce"] + config.seg_dice * terms["seg_dice"]
        if self.seg_reader is not None:
            loss = loss + config.seg_text * terms["seg_text"]
        if config.use_depth_loss:
            depth = config.lambda_m * terms["depth_marker"] + config.lambda_t * terms["depth_token"]
            loss = loss + config.lambda_d * (depth + config.lambda_c * terms["depth_count"])
        if config.use_depth_recon:
            loss = loss + config.lambda_r * terms["depth_recon"]
        if self.eye_depth is not None:
            terms["eye_depth"] = self.eye_depth.loss(batch["input_ids"], batch["depth_target"], batch["has_depth"])
            loss = loss + config.eye_depth * terms["eye_depth"]
        return PerceptioOutput(loss=loss, terms={name: value.detach() for name, value in terms.items()})

    def _segmentation_terms(self, batch: dict[str, Any], hidden: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """L_SegRecon (sigmoid CE, DICE) over every [SEG] target paired with a mask: the k-th [SEG] of
        a sample with its k-th mask, each prompting SAM2 with its own hidden state; averaged over all
        pairs. And L_SegText over the same [SEG]s (zero when off)."""
        rows, positions, mask_index = losses.seg_pairs(batch["labels"], self.seg_token_id, batch["num_masks"])
        heads = [self.segmenter] + ([self.seg_reader] if self.seg_reader is not None else [])
        if len(rows) == 0:
            # Keep every trainable head parameter in the graph so that DDP sees a gradient (zero) for
            # each of them on every rank, without find_unused_parameters.
            anchor = sum(param.sum() for head in heads for param in head.parameters() if param.requires_grad) * 0.0
            return anchor, anchor, anchor
        states = hidden[rows, positions]
        mask_logits = self.mask_logits(batch, rows, states)
        bce, dice = losses.segmentation_losses(mask_logits, batch["gt_masks"][rows, mask_index])
        text = bce * 0.0
        if self.seg_reader is not None:
            input_ids = batch["input_ids"]
            plain = batch["attention_mask"].bool() & ~torch.isin(input_ids, self.markup_token_ids)
            embedding = self.adapter.model.get_input_embeddings().weight
            counts = losses.request_counts(input_ids, plain, self.seg_token_id, rows, positions, embedding.shape[0])
            text = losses.seg_text_loss(self.seg_reader(states), counts, embedding)
        return bce, dice, text

    def hidden_states(self, batch: dict[str, Any]) -> torch.Tensor:
        """The language model's last hidden states (B, T, D) of a collated batch (teacher forcing)."""
        pixel_values = batch["pixel_values"].to(self._dtype())
        # A batch of text-only conversations has no tile at all.
        pixel_values = pixel_values if pixel_values.shape[0] else None
        return self.adapter.last_hidden_state(batch["input_ids"], batch["attention_mask"], pixel_values)

    def mask_logits(self, batch: dict[str, Any], rows: torch.Tensor, seg_hidden: torch.Tensor) -> torch.Tensor:
        """SAM2's mask logits (N, M, M) for the images ``rows`` (N,) of ``batch``, each prompted by
        its row of ``seg_hidden`` (N, D); each distinct image goes through SAM2's encoder once."""
        images, image_index = torch.unique(rows, return_inverse=True)
        sam_pixels = batch["sam_pixel_values"][images].to(self._dtype())
        return self.segmenter(sam_pixels, seg_hidden, image_index)

    def _dtype(self) -> torch.dtype:
        return self.adapter.model.dtype

    def fsdp_units(self) -> list[nn.Module]:
        """The blocks FSDP shards one by one: the base model family's transformer layers."""
        return self.adapter.fsdp_units()

    # ------------------------------------------------------------------ weights
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Every trained tensor: LoRA, new-token rows, [SEG] projector, SAM2 mask decoder, cell table, eye-depth head."""
        return {name: param.detach().clone() for name, param in self.named_parameters() if param.requires_grad}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor], optional: tuple[str, ...] = ()) -> None:
        """Copy ``state`` into the trained parameters; names starting with an ``optional`` prefix may be
        missing on either side (a missing parameter keeps its initial value)."""
        params = {name: param for name, param in self.named_parameters() if param.requires_grad}
        # Optional names the other side lacks drop out of the match (kept at their start, or ignored).
        params = {name: param for name, param in params.items() if name in state or not name.startswith(optional)}
        state = {name: tensor for name, tensor in state.items() if name in params or not name.startswith(optional)}
        missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        if missing or unexpected:
            raise PerceptioError(
                f"trainable weights do not match this model: {len(missing)} missing (e.g. {missing[:2]}), "
                f"{len(unexpected)} unexpected (e.g. {unexpected[:2]})"
            )
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(state[name].to(param.device, param.dtype))

    def save_pretrained(self, directory: str | os.PathLike, merged: bool = False) -> Path:
        """Write a loadable folder atomically (built under a temporary name, then renamed)."""
        record = {
            "format": "merged" if merged else "adapter",
            "perceptio_tiny": self.is_tiny,
            "config": asdict(self.config),
        }
        with atomic_directory(directory) as staging:
            self.processor.save_pretrained(staging)
            if self.depth_vqvae is not None:
                self.depth_vqvae.save_pretrained(staging / DEPTH_DIR)
            if merged:
                self._save_merged(staging)
            else:
                save_file(_contiguous(self.trainable_state_dict()), staging / TRAINABLE_NAME)
                self._save_ecosystem_files(staging)
            write_text_atomic(staging / CONFIG_NAME, json.dumps(record, indent=2, sort_keys=True))
        return Path(directory)

    def _save_ecosystem_files(self, staging: Path) -> None:
        """PEFT's adapter_config.json + adapter_model.safetensors (LoRA and the new tokens' rows; only
        when LoRA is on) and heads.safetensors + heads_config.json (the [SEG] projector and the SAM2
        mask decoder). trainable.safetensors keeps everything for an exact reload; these repeat the
        same tensors in the formats other tools read."""
        if hasattr(self.vlm, "peft_config"):
            for peft_config in self.vlm.peft_config.values():  # adapter_config.json names the exact base
                peft_config.base_model_name_or_path = self.config.model
                peft_config.revision = self.config.model_revision or None
            self.vlm.save_pretrained(staging)
        if self.segmenter is not None:
            heads = {name: param.detach() for name, param in self.segmenter.named_parameters() if param.requires_grad}
            save_file(_contiguous(heads), staging / HEADS_NAME)
            heads_config = {
                "sam_model": self.config.sam_model,
                "sam_revision": self.config.sam_revision,
                "text_hidden_size": self.vlm.config.get_text_config().hidden_size if hasattr(self.vlm, "config") else None,
                "tensors": sorted(heads),
                "load": "perceptio.train.sam.SamSegmenter(Sam2Model.from_pretrained(sam_model, revision=sam_revision), "
                        "text_hidden_size).load_state_dict(heads, strict=False)",
            }
            write_text_atomic(staging / HEADS_CONFIG_NAME, json.dumps(heads_config, indent=2, sort_keys=True))

    def _save_merged(self, staging: Path) -> None:
        """LoRA and token rows merged into a plain VLM folder (a copy: the live model keeps training)."""
        vlm = copy.deepcopy(self.vlm)
        merged_vlm = vlm.merge_and_unload() if hasattr(vlm, "merge_and_unload") else vlm
        if self.is_tiny:
            merged_vlm.config.perceptio_tiny = True
        merged_vlm.save_pretrained(staging / VLM_DIR)
        self.tokenizer.save_pretrained(staging / VLM_DIR)
        if self.segmenter is not None:
            self.segmenter.sam.save_pretrained(staging / SAM_DIR)
            save_file(_contiguous(self.segmenter.projector.state_dict()), staging / PROJECTOR_NAME)
        if self.cell_embeddings is not None:
            save_file(_contiguous(self.cell_embeddings.state_dict()), staging / CELLS_NAME)

    def load_trained_weights(self, directory: str | os.PathLike) -> None:
        """Take the trained weights of an adapter export (a run's OUT/model) of the same base models
        and trainable parts: the start of a second stage of fine-tuning (``--init-from``)."""
        folder = Path(directory)
        record = _export_record(folder)
        if record["format"] != "adapter":
            raise PerceptioError(f"--init-from {folder} is a merged export, a base model of its own: "
                                 f"pass its {VLM_DIR}/ and {SAM_DIR}/ as --model and --sam-model instead")
        for option, name in (("--model", "model"), ("--sam-model", "sam_model")):
            theirs, ours = absolute_location(record["config"][name]), absolute_location(getattr(self.config, name))
            if theirs != ours:
                raise PerceptioError(f"--init-from {folder} was trained on {option} {theirs}, not {ours}")
        self.load_trainable_state_dict(load_file(folder / TRAINABLE_NAME), optional=TRAINING_ONLY)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, dtype: str | None = None) -> "PerceptioModel":
        """Load a folder written by :meth:`save_pretrained` (either format); ``dtype`` overrides the
        saved storage dtype of the frozen weights (``PerceptioConfig.dtype``)."""
        folder = Path(directory)
        record = _export_record(folder)
        config = PerceptioConfig.from_dict(record["config"])
        config.tokenizer = str(folder / DEPTH_DIR) if (folder / DEPTH_DIR).is_dir() else ""
        if dtype is not None:
            config.dtype = dtype
        if record["format"] == "adapter":
            model = cls._build(config, depth_vqvae=None, apply_lora=True)
            model.load_trainable_state_dict(load_file(folder / TRAINABLE_NAME))
            return model
        # Merged: the folder's own VLM and SAM2 are the base models; no LoRA left to train.
        config.model, config.model_revision = str(folder / VLM_DIR), ""
        config.sam_model, config.sam_revision = str(folder / SAM_DIR), ""
        projector = load_file(folder / PROJECTOR_NAME) if (folder / PROJECTOR_NAME).is_file() else None
        model = cls._build(config, depth_vqvae=None, apply_lora=False, segmenter_state=projector)
        if model.cell_embeddings is not None:
            model.cell_embeddings.load_state_dict(load_file(folder / CELLS_NAME))
        return model


def _export_record(folder: Path) -> dict[str, Any]:
    """The record :meth:`PerceptioModel.save_pretrained` writes: the export's format and config."""
    record_path = folder / CONFIG_NAME
    if not record_path.is_file():
        raise PerceptioError(f"{folder} is not a perceptio model folder (no {CONFIG_NAME})")
    return json.loads(record_path.read_text())


def frozen_weight_dtype(name: str, cuda_available: bool) -> torch.dtype:
    """The storage dtype of the frozen base weights for ``PerceptioConfig.dtype``."""
    if name == "auto":
        return torch.bfloat16 if cuda_available else torch.float32
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(name)
    if dtype is None:
        raise PerceptioError(f"dtype must be auto, float32 or bfloat16, not {name!r}")
    return dtype


def _load_vlm(config: PerceptioConfig, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    if config.is_tiny:
        from perceptio.train.tiny import tiny_internvl, tiny_text_tokenizer

        tokenizer = tiny_text_tokenizer()
        return tiny_internvl(tokenizer).to(dtype), tokenizer
    if shapes.is_shape(config.model):
        shape = shapes.shape_for(config.model, "internvl")
        return shapes.build(shape).to(dtype), shapes.shaped_tokenizer(shape)
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    revision = config.model_revision or None
    try:
        tokenizer = AutoTokenizer.from_pretrained(config.model, revision=revision)
        vlm = AutoModelForImageTextToText.from_pretrained(config.model, dtype=dtype, revision=revision)
    except (OSError, ValueError) as error:
        raise PerceptioError(f"cannot load the vision-language model {config.model!r}: {error}") from error
    # Record the commit a hub id resolved to: an export then names exactly the base it was trained on.
    config.model_revision = config.model_revision or resolved_commit(config.model)
    return vlm, tokenizer


def _load_sam(config: PerceptioConfig, dtype: torch.dtype) -> Sam2Model:
    if config.is_tiny or config.sam_model == TINY:
        from perceptio.train.tiny import tiny_sam2

        return tiny_sam2().to(dtype)
    if shapes.is_shape(config.sam_model):
        return shapes.build(shapes.shape_for(config.sam_model, "sam2")).to(dtype)
    try:
        sam = Sam2Model.from_pretrained(config.sam_model, dtype=dtype, revision=config.sam_revision or None)
    except (OSError, ValueError) as error:
        raise PerceptioError(f"cannot load SAM2 {config.sam_model!r}: {error}") from error
    config.sam_revision = config.sam_revision or resolved_commit(config.sam_model)
    return sam


def _load_depth_vqvae(config: PerceptioConfig) -> nn.Module | None:
    if not config.tokenizer:
        if config.use_depth_recon:
            raise PerceptioError("a depth tokenizer folder (--tokenizer) is needed for the depth tokens and L_DepthRecon")
        return None
    if not Path(config.tokenizer).is_dir() and not looks_like_repo_id(config.tokenizer):
        raise PerceptioError(f"depth tokenizer folder {config.tokenizer} does not exist")
    from perceptio.tokenize import DepthVQVAE

    return DepthVQVAE.from_pretrained(config.tokenizer)


def init_new_token_rows(vlm: PreTrainedModel, new_ids: range, how: str) -> None:
    """Start the rows of ``new_ids`` (a range; the rows before it are the old tokens'): input rows at
    their mean, with ``how == "spread"`` plus Gaussian noise of the old rows' per-dimension deviation,
    so that each new token is as distinct from the others as two words are; untied output rows at the
    mean. Also where a checkpoint's spare rows take the new ids (nothing is resized there).

    ("mean" is transformers' mean resizing without its draw from the old rows' covariance scaled by
    1e-9, which moves the rows by about 1e-6 and costs a D x D covariance of the whole vocabulary.)"""
    if not new_ids:
        return
    inputs = vlm.get_input_embeddings().weight
    head = vlm.get_output_embeddings()
    with torch.no_grad():
        old = inputs[: new_ids.start].float()
        rows = old.mean(0).expand(len(new_ids), -1)
        if how == "spread":
            rows = rows + torch.randn(rows.shape, device=rows.device) * old.std(0)
        inputs[new_ids.start : new_ids.stop] = rows.to(inputs.dtype)
        if head is not None and head.weight is not inputs:
            head.weight[new_ids.start : new_ids.stop] = head.weight[: new_ids.start].float().mean(0).to(head.weight.dtype)


def _apply_lora(vlm: PreTrainedModel, config: PerceptioConfig, adapter: VLMAdapter, new_ids: list[int]) -> nn.Module:
    """LoRA on the language model's linear layers; the new tokens' input (and output) rows trainable."""
    from peft import LoraConfig, get_peft_model

    token_layers = {"embed_tokens": new_ids}
    if vlm.get_output_embeddings().weight is not vlm.get_input_embeddings().weight:
        token_layers["lm_head"] = new_ids  # untied output rows train separately
    lora = LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=adapter.lora_target_modules(),
        trainable_token_indices=token_layers,
    )
    return get_peft_model(vlm, lora)


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: tensor.contiguous() for name, tensor in state.items()}
