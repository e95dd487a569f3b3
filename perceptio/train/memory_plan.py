"""``perceptio-train --plan``: exact parameter counts and an estimate of GPU memory per device.

Counts are exact: the published shapes (perceptio/train/shapes.py) are built on the meta device
(no memory), and the trainable part is counted as ``PerceptioModel`` makes it: LoRA of rank r on
every linear layer of the language model (q, k, v, o, gate, up, down: r x (in + out) each), the new
token rows (``[SEG]``, the two depth markers and K codes, in the embedding and, when untied, the
output head), the [SEG] projector MLP and the SAM2 mask decoder (without its IoU and object-score
heads, which nothing trains).

Memory is an estimate, per GPU:

- weights: frozen ones in their storage dtype (bf16 by default on GPUs), trainable ones in fp32;
- gradients (fp32) and AdamW's two moments (fp32) of the trainable parameters;
- FSDP (full sharding) divides those three by the GPU count and adds one gathered layer; DDP keeps
  them whole and adds its gradient buckets (a second fp32 copy of the gradients);
- activations kept for backward in the language model: a per-token, per-layer count of the tensors a
  Qwen2 layer with LoRA saves under bf16 autocast (:func:`activation_bytes_per_token_layer`, SDPA
  attention: nothing quadratic in the sequence); with gradient checkpointing only each layer's
  input is kept, plus one layer recomputed at a time;
- the output head's logits at supervised positions only (restricted logits), fp32 for the loss;
- the frozen vision tower and SAM2 encoder run without saving activations (transient only);
- a fixed allowance for the CUDA context, cuBLAS workspaces and allocator fragmentation.

It is checked against the peak memory measured on a GPU (README, "Memory per GPU").
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from functools import lru_cache

from perceptio.errors import PerceptioError
from perceptio.tokens import DEFAULT_NUM_CODES, special_tokens
from perceptio.train import shapes

GIB = 2**30
OVERHEAD_BYTES = int(1.5 * GIB)  # CUDA context, cuBLAS/cuDNN workspaces, allocator slack
LORA_LAYERS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PRECISIONS = {
    # name: (bytes of a frozen weight, bytes of a trainable weight, of its gradient)
    "bf16-mixed": (2, 4, 4),  # frozen bf16, trainable fp32 + bf16 autocast (the GPU default)
    "fp32": (4, 4, 4),  # everything fp32 (autocast still runs the matmuls in bf16 on GPUs)
    "bf16": (2, 2, 2),  # everything bf16: no fp32 master copy (small updates round away)
}
STRATEGIES = ("ddp", "fsdp")
SAM_SIDE = 1024
# Transient peak of SAM2's frozen image encoder per image at 1024x1024 (no activations kept).
SAM_ENCODER_TRANSIENT = {"sam2": 0.6 * GIB}


@dataclass(frozen=True)
class PlanRequest:
    """One training setting to plan for (defaults: the paper's LoRA r256 on the 1B shape)."""

    model: str = "shape:internvl3-1b"
    sam_model: str = "shape:sam2.1-hiera-large"
    precision: str = "bf16-mixed"
    batch_size: int = 1  # examples per GPU per micro-batch
    sequence_length: int = 512  # tokens per example: 256 per 448 tile + prompt + the ~104-token target
    supervised_tokens: int = 120  # target tokens per example (the perception span + a short answer)
    lora_rank: int = 256
    strategy: str = "ddp"
    gpus: int = 1
    gradient_checkpointing: bool = False
    num_codes: int = DEFAULT_NUM_CODES

    def check(self) -> None:
        if self.precision not in PRECISIONS:
            raise PerceptioError(f"--precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")
        if self.strategy not in STRATEGIES:
            raise PerceptioError(f"--strategy must be ddp or fsdp, not {self.strategy!r}")
        for name in ("batch_size", "sequence_length", "lora_rank", "gpus"):
            if getattr(self, name) < 1:
                raise PerceptioError(f"--{name.replace('_', '-')} must be >= 1")


@dataclass(frozen=True)
class ParameterCounts:
    total: int  # after adding the perception tokens, LoRA included
    base: int  # the published model as built (VLM + SAM2 image model)
    lora: int
    new_token_rows: int  # rows added to the embedding (and to the head when untied)
    token_row_parameters: int  # trainable parameters of the new token rows
    segmenter: int  # trainable: SAM2 mask decoder + [SEG] projector
    trainable: int
    hidden_size: int
    layers: int
    intermediate_size: int
    kv_size: int
    vocab_rows: int
    tied: bool
    largest_layer: int  # parameters of the largest decoder layer (what FSDP gathers at once)


@lru_cache(maxsize=8)
def count_parameters(model: str, sam_model: str, lora_rank: int, num_codes: int = DEFAULT_NUM_CODES) -> ParameterCounts:
    """Exact counts for a shape (built on the meta device; see the module docstring)."""
    from torch import nn

    vlm_shape = shapes.shape_for(model, "internvl")
    vlm = shapes.build(vlm_shape, device="meta")
    text = vlm.config.get_text_config()
    hidden = text.hidden_size
    tied = vlm.get_output_embeddings().weight is vlm.get_input_embeddings().weight
    tokenizer_length = vlm.config.text_config.vocab_size + 1  # + <video>, as InternVL's conversion adds
    new_tokens = len(special_tokens(num_codes))
    rows = max(tokenizer_length + new_tokens, text.vocab_size)
    added_rows = rows - text.vocab_size
    lora = 0
    for name, module in vlm.model.language_model.named_modules():
        if isinstance(module, nn.Linear) and re.search(r"\.(%s)$" % "|".join(LORA_LAYERS), name):
            lora += lora_rank * (module.in_features + module.out_features)
    token_rows = new_tokens * hidden * (1 if tied else 2)
    sam = shapes.build(shapes.shape_for(sam_model, "sam2"), device="meta")
    decoder = sam.mask_decoder
    untrained = sum(p.numel() for head in (decoder.iou_prediction_head, decoder.pred_obj_score_head) for p in head.parameters())
    prompt = sam.config.prompt_encoder_config.hidden_size
    projector = hidden * hidden + hidden + hidden * prompt + prompt
    segmenter = shapes.count_parameters(decoder) - untrained + projector
    base = shapes.count_parameters(vlm) + shapes.count_parameters(sam)
    layer = shapes.count_parameters(vlm.model.language_model.layers[0])
    total = base + added_rows * hidden * (1 if tied else 2) + lora + token_rows + projector
    return ParameterCounts(
        total=total, base=base, lora=lora, new_token_rows=added_rows, token_row_parameters=token_rows,
        segmenter=segmenter, trainable=lora + token_rows + segmenter, hidden_size=hidden,
        layers=text.num_hidden_layers, intermediate_size=text.intermediate_size,
        kv_size=text.num_key_value_heads * (hidden // text.num_attention_heads), vocab_rows=rows, tied=tied,
        largest_layer=max(layer, shapes.count_parameters(vlm.model.vision_tower.encoder.layer[0])),
    )


def activation_bytes_per_token_layer(hidden: int, intermediate: int, kv: int, rank: int) -> int:
    """Bytes one Qwen2 decoder layer with LoRA keeps per token for backward, under bf16 autocast.

    Counted tensor by tensor: the fp32 residual stream and RMSNorm inputs/outputs (4 x 4h), the bf16
    casts each linear layer saves (q, k, v, gate, up: 2h each; o: 2h), LoRA's dropout input (fp32,
    4h + a 1-byte mask) and its bf16 cast and rank-r middle (2h + 2r) on the seven projections of
    width h (down's input is i wide: 5i + 2r), q/k/v/attention output for SDPA (4h + 4kv), and the
    SwiGLU MLP (gate, up, SiLU and product: 8i).
    """
    lora_h = 7 * hidden + 2 * rank
    return (16 * hidden + 12 * hidden + 6 * lora_h + 4 * hidden + 4 * kv + 8 * intermediate
            + 5 * intermediate + 2 * rank)


@dataclass(frozen=True)
class MemoryPlan:
    request: PlanRequest
    counts: ParameterCounts
    weights: int
    gradients: int
    optimizer: int
    activations: int
    logits: int
    transient: int
    overhead: int

    @property
    def total(self) -> int:
        return (self.weights + self.gradients + self.optimizer + self.activations + self.logits + self.transient
                + self.overhead)


def plan(request: PlanRequest) -> MemoryPlan:
    request.check()
    counts = count_parameters(request.model, request.sam_model, request.lora_rank, request.num_codes)
    frozen_bytes, trainable_bytes, gradient_bytes = PRECISIONS[request.precision]
    frozen = counts.total - counts.trainable
    weights = frozen * frozen_bytes + counts.trainable * trainable_bytes
    gradients = counts.trainable * gradient_bytes
    optimizer = counts.trainable * 8
    if request.strategy == "fsdp" and request.gpus > 1:
        weights = weights // request.gpus + counts.largest_layer * frozen_bytes
        gradients //= request.gpus
        optimizer //= request.gpus
    elif request.gpus > 1:
        gradients *= 2  # DDP's bucket copy of the gradients
    tokens = request.batch_size * request.sequence_length
    per_layer = activation_bytes_per_token_layer(counts.hidden_size, counts.intermediate_size, counts.kv_size,
                                                 request.lora_rank)
    if request.gradient_checkpointing:
        activations = tokens * (counts.layers * 4 * counts.hidden_size + per_layer)
    else:
        activations = tokens * counts.layers * per_layer
    # bf16 logits, their fp32 copy for the loss and its gradient, at supervised positions only.
    logits = request.batch_size * request.supervised_tokens * counts.vocab_rows * (2 + 4 + 4)
    transient = request.batch_size * SAM_ENCODER_TRANSIENT["sam2"]
    return MemoryPlan(request, counts, weights, gradients, optimizer, int(activations), logits, int(transient),
                      OVERHEAD_BYTES)


def largest_batch(request: PlanRequest, budget_bytes: float, limit: int = 64) -> int:
    """The largest per-GPU batch whose estimate fits ``budget_bytes`` (0 when none does)."""
    best = 0
    for batch in range(1, limit + 1):
        if plan(replace(request, batch_size=batch)).total > budget_bytes:
            break
        best = batch
    return best


TARGETS = (("1x24GB", 1, 24), ("1x80GB", 1, 80), ("8x80GB", 8, 80))


def recommend(request: PlanRequest, gpus: int, gib: float) -> tuple[PlanRequest, int] | None:
    """The fastest setting that fits: no checkpointing before checkpointing, DDP before FSDP, the
    default precision; the batch is the largest that fits with 10% headroom (None: nothing fits)."""
    budget = 0.9 * gib * GIB
    options = []
    for strategy in (("ddp", "fsdp") if gpus > 1 else ("ddp",)):
        for checkpointing in (False, True):
            options.append(replace(request, strategy=strategy, gpus=gpus, gradient_checkpointing=checkpointing))
    for option in options:
        batch = largest_batch(option, budget)
        # Prefer a setting that reaches a useful batch; fall back to whatever fits at all.
        if batch >= 4:
            return replace(option, batch_size=batch), batch
    fitting = [(option, largest_batch(option, budget)) for option in options]
    fitting = [(option, batch) for option, batch in fitting if batch > 0]
    if not fitting:
        return None
    option, batch = max(fitting, key=lambda item: item[1])
    return replace(option, batch_size=batch), batch


def render(request: PlanRequest) -> str:
    """The text ``perceptio-train --plan`` prints."""
    result = plan(request)
    counts = result.counts
    lines = [
        f"model {request.model} + {request.sam_model}, LoRA r{request.lora_rank}, {request.precision}, "
        f"{request.strategy} on {request.gpus} GPU(s), batch {request.batch_size} x {request.sequence_length} tokens, "
        f"gradient checkpointing {'on' if request.gradient_checkpointing else 'off'}",
        f"parameters: {counts.total:,} total ({counts.base:,} published shape + new rows + LoRA + projector), "
        f"{counts.trainable:,} trainable = LoRA {counts.lora:,} + token rows {counts.token_row_parameters:,} "
        f"+ SAM2 decoder and [SEG] projector {counts.segmenter:,}",
        f"new token rows: {counts.new_token_rows} (embedding{'' if counts.tied else ' and output head'}, "
        f"{counts.vocab_rows:,} rows after resizing)",
        "memory per GPU (estimate):",
    ]
    for name in ("weights", "gradients", "optimizer", "activations", "logits", "transient", "overhead"):
        lines.append(f"  {name:12s} {getattr(result, name) / GIB:7.2f} GiB")
    lines.append(f"  {'total':12s} {result.total / GIB:7.2f} GiB")
    lines.append("recommended (largest batch with 10% headroom):")
    for label, gpus, gib in TARGETS:
        choice = recommend(request, gpus, gib)
        if choice is None:
            lines.append(f"  {label:7s} does not fit at LoRA r{request.lora_rank} even at batch 1 with checkpointing")
            continue
        option, batch = choice
        estimate = plan(option).total / GIB
        lines.append(f"  {label:7s} {option.strategy}, gradient checkpointing {'on' if option.gradient_checkpointing else 'off'}, "
                     f"batch {batch} per GPU ({estimate:.1f} GiB)")
    return "\n".join(lines)
