"""``perceptio-train``: stream shards into the joint text + segmentation + depth objective.

One command; run it alone (one process: CPU or one GPU) or under ``torchrun --nproc-per-node N``
(DDP, or ``--parallel fsdp``). It builds the model (:class:`PerceptioModel`), streams the shards
(:mod:`perceptio.train.data`), runs the loop (:mod:`perceptio.train.loop`) and exports the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from perceptio.errors import PerceptioError, run_cli
from perceptio.train.config import PerceptioConfig, StreamConfig, TrainConfig, writes_readouts
from perceptio.train.memory_plan import PlanRequest, render

app = typer.Typer(
    help="Train a vision-language model to write [SEG] [D_START] d_1..d_100 [D_END] answer, from shards.",
    no_args_is_help=True,
    add_completion=False,
)

TINY = TrainConfig.TINY_DEFAULTS
PANEL_DATA, PANEL_MODEL, PANEL_LOOP, PANEL_LOSS = "Data", "Model", "Optimisation and runs", "Losses and ablations"
PANEL_PLAN = "Memory plan"


@app.command()
def train_command(
    shards: Optional[List[str]] = typer.Option(None, "--shards", help="Shard folder from perceptio-curate (a dataset's folder or their parent), or an object-store URL (s3://bucket/shards/refcoco-unc; there only shards with their __meta__/NAME_stats.json marker are read); repeat the option for several folders (required unless --plan).", show_default=False, rich_help_panel=PANEL_DATA),
    mix: Optional[str] = typer.Option(None, "--mix", help="Weighted mix, e.g. 'refcoco=1,refcocog=1,ade20k=0.5': each example's dataset is drawn with probability weight/sum. A name matches a sample's json 'dataset' exactly ('refcoco-unc') or by its family before the first dash ('refcoco' takes refcoco-unc and refcoco-google, not refcoco+ or refcocog); the exact name wins. Datasets not named are left out. Default: every dataset found, weight 1.", rich_help_panel=PANEL_DATA),
    splits: str = typer.Option(",".join(StreamConfig.splits), "--splits", help="Comma-separated shard splits to train on (the split part of {dataset}-{split}-{index}.tar).", rich_help_panel=PANEL_DATA),
    shuffle_buffer: int = typer.Option(StreamConfig.shuffle_buffer, "--shuffle-buffer", min=1, help="Examples held per stream and reader for shuffling.", rich_help_panel=PANEL_DATA),
    max_bad_samples: str = typer.Option(TrainConfig.max_bad_samples, "--max-bad-samples", help="Bad samples (unreadable tar, a member that does not decode or is missing) are skipped with a warning and counted (skipped_samples in metrics.jsonl); past this many the run writes a checkpoint and stops. A count (100), a share of the samples read (0.01 or 1%; at least one is always allowed), or 0 to stop at the first.", rich_help_panel=PANEL_DATA),
    workers: int = typer.Option(TrainConfig.workers, "--workers", min=0, help="DataLoader worker processes per rank (0: read in the training process). A dataset with fewer shards than ranks x workers is shared sample by sample.", rich_help_panel=PANEL_DATA),
    model: str = typer.Option(PerceptioConfig.model, "--model", help="Base vision-language model: 'tiny' (built-in random-weight TINY model for tests and demos), a hub id or a local folder (transformers format).", rich_help_panel=PANEL_MODEL),
    sam_model: str = typer.Option(PerceptioConfig.sam_model, "--sam-model", help="SAM2 in transformers format (hub id or folder); ignored with --model tiny.", rich_help_panel=PANEL_MODEL),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="Depth VQ-VAE: a folder from perceptio-tokenize or a hub id (frozen; its decoder gives L_DepthRecon).", rich_help_panel=PANEL_MODEL),
    lora_rank: int = typer.Option(PerceptioConfig.lora_rank, "--lora-rank", min=1, help="LoRA rank on the language model (the paper's 256).", rich_help_panel=PANEL_MODEL),
    lora_alpha: int = typer.Option(PerceptioConfig.lora_alpha, "--lora-alpha", min=1, help="LoRA alpha (scale alpha/rank).", rich_help_panel=PANEL_MODEL),
    lora_dropout: float = typer.Option(PerceptioConfig.lora_dropout, "--lora-dropout", min=0.0, max=1.0, help="Dropout on the LoRA branch.", rich_help_panel=PANEL_MODEL),
    train_language_model: Optional[bool] = typer.Option(None, "--train-language-model/--lora", help="Fine-tune every weight of the language model instead of LoRA + the new tokens' rows. Default: on for --model tiny (random weights: LoRA on a frozen random model learns too slowly to write well-formed spans in a short run), LoRA otherwise.", show_default=False, rich_help_panel=PANEL_MODEL),
    train_vision: Optional[bool] = typer.Option(None, "--train-vision/--freeze-vision", help="Train the vision tower (and projector). Default: frozen, as in the paper; trained for --model tiny, whose random encoders must learn to see (README, 'Perceptio in miniature').", show_default=False, rich_help_panel=PANEL_MODEL),
    train_sam_encoder: Optional[bool] = typer.Option(None, "--train-sam-encoder/--freeze-sam-encoder", help="Train SAM2's image encoder. Default: frozen, as in the paper; trained for --model tiny.", show_default=False, rich_help_panel=PANEL_MODEL),
    crop_to_patches: bool = typer.Option(PerceptioConfig.crop_to_patches, "--crop-to-patches", help="InternVL's dynamic tiling (default: one 448 tile, 256 image tokens).", rich_help_panel=PANEL_MODEL),
    gradient_checkpointing: bool = typer.Option(PerceptioConfig.gradient_checkpointing, "--gradient-checkpointing", help="Recompute activations in the backward pass: keeps each decoder layer's input only (1B at batch 4 x 512 tokens: activations 6.1 -> 0.4 GiB by --plan), at the cost of a second forward through the language model.", rich_help_panel=PANEL_MODEL),
    dtype: str = typer.Option(PerceptioConfig.dtype, "--dtype", help="Storage of the frozen base weights: auto (bfloat16 on a GPU, float32 on the CPU), bfloat16 or float32. Trainable weights are always float32 (with bf16 autocast).", rich_help_panel=PANEL_MODEL),
    max_length: int = typer.Option(PerceptioConfig.max_length, "--max-length", min=16, help="Longest token sequence; longer examples lose their tail.", rich_help_panel=PANEL_MODEL),
    new_token_init: str = typer.Option(PerceptioConfig.new_token_init, "--new-token-init", help="Input rows of the new tokens ([SEG], span markers, depth codes): 'mean' (transformers' mean resizing: all one vector) or 'spread' (around the old rows' mean with their spread: every code distinct from the start).", rich_help_panel=PANEL_MODEL),
    out: Path = typer.Option(TrainConfig.out, "--out", help="Run folder: metrics.jsonl, checkpoints/step-NNNNNN/, model/ (the export).", rich_help_panel=PANEL_LOOP),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="Optimizer steps (every rank makes exactly this many; required unless --plan).", show_default=False, rich_help_panel=PANEL_LOOP),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help=f"Examples per micro-batch and rank. Default: {TrainConfig.batch_size}; {TINY['batch_size']} with --model tiny (a step of it takes a fraction of a second, and batches of 1 are too noisy for it to learn to write 100 codes in 200 steps).", show_default=False, rich_help_panel=PANEL_LOOP),
    grad_accum: int = typer.Option(TrainConfig.grad_accum, "--grad-accum", min=1, help="Micro-batches per optimizer step (the paper: 8).", rich_help_panel=PANEL_LOOP),
    lr: Optional[float] = typer.Option(None, "--lr", min=0.0, help=f"Peak AdamW learning rate. Default: the paper's {TrainConfig.lr:g}; {TINY['lr']:g} with --model tiny, whose random weights must move far in a short run.", rich_help_panel=PANEL_LOOP),
    head_lr: Optional[float] = typer.Option(None, "--head-lr", min=0.0, help=f"Peak learning rate of the segmentation head ([SEG] projector, SAM2 decoder; SAM2 encoder with --train-sam-encoder). Default: --lr; {TINY['head_lr']:g} with --model tiny (its decoder stalls at the tiny lr).", show_default=False, rich_help_panel=PANEL_LOOP),
    weight_decay: float = typer.Option(TrainConfig.weight_decay, "--weight-decay", min=0.0, help="AdamW weight decay.", rich_help_panel=PANEL_LOOP),
    warmup: float = typer.Option(TrainConfig.warmup, "--warmup", min=0.0, max=1.0, help="Share of the steps with a linear warm-up; a cosine to zero follows.", rich_help_panel=PANEL_LOOP),
    grad_clip: float = typer.Option(TrainConfig.grad_clip, "--grad-clip", min=0.0, help="Clip the gradient's global norm to this.", rich_help_panel=PANEL_LOOP),
    seed: int = typer.Option(TrainConfig.seed, "--seed", help="Seed of the model's new weights, the data order and dropout; the same seed gives the same run.", rich_help_panel=PANEL_LOOP),
    save_every: int = typer.Option(TrainConfig.save_every, "--save-every", min=0, help="Write a checkpoint every N steps (0: only after the last step).", rich_help_panel=PANEL_LOOP),
    keep_last: int = typer.Option(TrainConfig.keep_last, "--keep-last", min=0, help="Keep only the newest N checkpoints (0: keep all).", rich_help_panel=PANEL_LOOP),
    init_from: Optional[Path] = typer.Option(None, "--init-from", help="Start from the trained weights of an exported model (a run's OUT/model, adapter format) on the same --model, --sam-model and trainable parts, instead of new weights: a second stage of fine-tuning, e.g. a curriculum (README section 4). The optimizer and schedule start afresh.", show_default=False, rich_help_panel=PANEL_LOOP),
    resume: bool = typer.Option(TrainConfig.resume, "--resume", help="Go on from the newest checkpoint in OUT/checkpoints with the same options: exactly on the same number of processes, or on fewer/more (up to the first start's ranks x workers) without repeating or skipping data.", rich_help_panel=PANEL_LOOP),
    precision: str = typer.Option(TrainConfig.precision, "--precision", help="auto (bf16 autocast on GPUs, fp32 on CPU), bf16 or fp32.", rich_help_panel=PANEL_LOOP),
    parallel: str = typer.Option(TrainConfig.parallel, "--parallel", help="Under torchrun: ddp (replicate the model) or fsdp (shard it; for 8B-size models).", rich_help_panel=PANEL_LOOP),
    export: str = typer.Option(TrainConfig.export, "--export", help="Final model in OUT/model: adapter (trained weights, base models by id), merged (LoRA merged into a plain transformers folder) or none.", rich_help_panel=PANEL_LOOP),
    progress: bool = typer.Option(TrainConfig.progress, "--progress/--no-progress", help="Show the progress bar (rank 0 only).", rich_help_panel=PANEL_LOOP),
    lambda_m: float = typer.Option(PerceptioConfig.lambda_m, "--lambda-m", min=0.0, help="Weight of L_marker inside L_depth.", rich_help_panel=PANEL_LOSS),
    lambda_t: float = typer.Option(PerceptioConfig.lambda_t, "--lambda-t", min=0.0, help="Weight of L_token inside L_depth.", rich_help_panel=PANEL_LOSS),
    lambda_c: float = typer.Option(PerceptioConfig.lambda_c, "--lambda-c", min=0.0, help="Weight of L_count inside L_depth.", rich_help_panel=PANEL_LOSS),
    lambda_d: float = typer.Option(PerceptioConfig.lambda_d, "--lambda-d", min=0.0, help="Weight of L_depth.", rich_help_panel=PANEL_LOSS),
    lambda_r: float = typer.Option(PerceptioConfig.lambda_r, "--lambda-r", min=0.0, help="Weight of L_DepthRecon.", rich_help_panel=PANEL_LOSS),
    seg_bce: float = typer.Option(PerceptioConfig.seg_bce, "--seg-bce", min=0.0, help="Weight of the mask's sigmoid cross-entropy in L_SegRecon.", rich_help_panel=PANEL_LOSS),
    seg_dice: float = typer.Option(PerceptioConfig.seg_dice, "--seg-dice", min=0.0, help="Weight of the mask's DICE loss in L_SegRecon.", rich_help_panel=PANEL_LOSS),
    seg_text: float = typer.Option(PerceptioConfig.seg_text, "--seg-text", min=0.0, help="Weight of L_SegText (not in the paper): the [SEG] state must tell the words that asked for it from the batch's other requests. 0: off.", rich_help_panel=PANEL_LOSS),
    span_weight: float = typer.Option(PerceptioConfig.span_weight, "--span-weight", min=0.0, help="Weight in L_LLM of each depth-span token against 1 for the other answer tokens (not in the paper; 1: its plain mean). Below 1 the answer after a span is not drowned by it; L_depth still trains the span.", rich_help_panel=PANEL_LOSS),
    answer_weight: float = typer.Option(PerceptioConfig.answer_weight, "--answer-weight", min=0.0, help="Weight in L_LLM of each answer token after a depth span and its mark readouts (the letter), against 1 for the other tokens (not in the paper; 1: its plain mean).", rich_help_panel=PANEL_LOSS),
    depth_tokens: bool = typer.Option(PerceptioConfig.use_depth_tokens, "--depth-tokens/--no-depth-tokens", help="Ablation: without depth tokens the targets have no depth span (and the depth losses are off).", rich_help_panel=PANEL_LOSS),
    question_targets: str = typer.Option(StreamConfig.question_targets, "--question-targets", help="Marked-point questions: as each records ('recorded': half direct, half depth span first), all 'direct', all 'depth', or 'both' (two examples each).", rich_help_panel=PANEL_LOSS),
    reading_questions: int = typer.Option(StreamConfig.reading_questions, "--reading-questions", min=0, help="Per ADE20k picture with a depth map, this many more marked-point questions drawn afresh each epoch on any cells and answered by the map: a curriculum for reading the depth span (README section 4).", rich_help_panel=PANEL_LOSS),
    reading_spread: float = typer.Option(StreamConfig.reading_spread, "--reading-spread", help="Where in its cell a reading question's point falls: the central share of the cell, in (0, 1]; 1: anywhere, as curated points fall (1/3 keeps a disc mark inside its cell).", rich_help_panel=PANEL_LOSS),
    reading_swaps: float = typer.Option(StreamConfig.reading_swaps, "--reading-swaps", help="The share of reading questions asked after a span whose codes at the marked cells are shuffled among them, answered by that span (the picture names the answer only by chance): questions only the span answers; the span is context, not a target. In [0, 1]; only where reading questions are written span first (not with --no-depth-tokens or --question-targets direct).", rich_help_panel=PANEL_LOSS),
    mark_readouts: bool = typer.Option(PerceptioConfig.mark_readouts, "--mark-readouts/--no-mark-readouts", help="Questions written span first name, after the span, each mark's letter and its cell's depth code (\"A[D_017] B[D_052]\") before the letter (not in the paper): the lookup from mark to span is written out and supervised, and the letter compares codes just before it (README section 4). Only where questions are written span first (not with --no-depth-tokens or --question-targets direct).", rich_help_panel=PANEL_LOSS),
    readout_cells: bool = typer.Option(StreamConfig.readout_cells, "--readout-cells/--no-readout-cells", help="With --mark-readouts each readout also names its mark's grid cell, \"A 3 7[D_055]\" (not in the paper): the model writes where it found the mark, then looks the code up from those words.", rich_help_panel=PANEL_LOSS),
    reading_in_text: float = typer.Option(StreamConfig.reading_in_text, "--reading-in-text", help="The share of reading questions asked in text alone (not in the paper): no picture, each mark named by its grid cell in the prompt, the span as context, without the image tokens and prompt in front of it (README section 4). In [0, 1]; only where reading questions are written span first.", rich_help_panel=PANEL_LOSS),
    reading_short_spans: str = typer.Option("", "--reading-short-spans", help="A curriculum for the reading questions (not in the paper): comma-separated cell counts, e.g. '16,36': in the first epoch each reading question's span shows only 16 of its cells (the marked ones and random others; the rest hidden from attention), in the second 36, later the whole span. Fewer cells compete for each mark while the lookup is learnt (README section 4). A short span is context, not a depth target.", rich_help_panel=PANEL_LOSS),
    cell_embeddings: bool = typer.Option(PerceptioConfig.cell_embeddings, "--cell-embeddings/--no-cell-embeddings", help="Add a learned vector per depth-grid cell to the image tokens over that cell and to the depth-span code of that cell (not in the paper): a mark and its code are then matched by content across the positions between them (README section 4). Needs one tile per image (no --crop-to-patches).", rich_help_panel=PANEL_MODEL),
    eye_depth: float = typer.Option(PerceptioConfig.eye_depth, "--eye-depth", min=0.0, help="Weight of L_EyeDepth (not in the paper): a linear head on each image token regresses the depth under its patch, so that the vision tower learns depth from a dense signal (use with --train-vision; README section 4). 0: off. Needs one tile per image (no --crop-to-patches).", rich_help_panel=PANEL_LOSS),
    segmentation: bool = typer.Option(PerceptioConfig.use_segmentation, "--segmentation/--no-segmentation", help="Ablation: without [SEG] and the SAM2 head.", rich_help_panel=PANEL_LOSS),
    depth_recon: bool = typer.Option(PerceptioConfig.use_depth_recon, "--depth-recon/--no-depth-recon", help="Ablation: without L_DepthRecon.", rich_help_panel=PANEL_LOSS),
    depth_loss: bool = typer.Option(PerceptioConfig.use_depth_loss, "--depth-loss/--no-depth-loss", help="Ablation: without L_depth (marker, token, count).", rich_help_panel=PANEL_LOSS),
    plan: bool = typer.Option(False, "--plan", help="Print exact parameter counts and the estimated memory per GPU for --model/--sam-model (hub ids of the published models or shape:NAME), --lora-rank, --batch-size, --gradient-checkpointing, --parallel, --precision, --plan-gpus and --plan-tokens, with a recommended setting for 1x24GB, 1x80GB and 8x80GB; trains nothing.", rich_help_panel=PANEL_PLAN),
    plan_gpus: int = typer.Option(1, "--plan-gpus", min=1, help="GPUs to plan for (--plan).", rich_help_panel=PANEL_PLAN),
    plan_tokens: int = typer.Option(PlanRequest.sequence_length, "--plan-tokens", min=1, help="Tokens per example to plan for (--plan): 256 per 448 tile + prompt + the ~104-token target.", rich_help_panel=PANEL_PLAN),
) -> None:
    """Train on shards: weighted mix, shuffled, one example per (ref, sentence) or ADE20k question.

    Writes OUT/metrics.jsonl (one line per step), atomic checkpoints in OUT/checkpoints/ and the final model in OUT/model/.

    Several processes: torchrun --nproc-per-node N $(which perceptio-train) ...
    """
    if plan:
        typer.echo(render(PlanRequest(
            model=model, sam_model=sam_model, lora_rank=lora_rank, batch_size=batch_size or 1,
            sequence_length=plan_tokens, gradient_checkpointing=gradient_checkpointing, gpus=plan_gpus,
            strategy=parallel, precision={"auto": "bf16-mixed", "bf16": "bf16-mixed"}.get(precision, precision),
        )))
        return
    if not shards or steps is None:
        raise PerceptioError("--shards and --steps are required (or --plan to print the memory plan only)")
    import torch

    from perceptio.train.data import parse_mix, plan_streams, sample_split_notes
    from perceptio.train.loop import join_processes, train
    from perceptio.train.model import PerceptioModel

    split_names = tuple(name.strip() for name in splits.split(",") if name.strip())
    mark_readouts = writes_readouts(mark_readouts, depth_tokens, question_targets)
    stream = StreamConfig(list(shards), mix=parse_mix(mix) if mix else None, splits=split_names, seed=seed,
                          shuffle_buffer=shuffle_buffer, shuffle_initial=min(StreamConfig.shuffle_initial, shuffle_buffer),
                          use_depth_tokens=depth_tokens, question_targets=question_targets,
                          reading_questions=reading_questions, reading_spread=reading_spread,
                          reading_swaps=reading_swaps, mark_readouts=mark_readouts,
                          readout_cells=readout_cells and mark_readouts, reading_in_text=reading_in_text,
                          reading_short_spans=cell_counts(reading_short_spans))
    model_config = PerceptioConfig.for_model(
        model=model, sam_model=sam_model, tokenizer=str(tokenizer) if tokenizer else "", lora_rank=lora_rank,
        lora_alpha=lora_alpha, lora_dropout=lora_dropout,
        train_language_model=train_language_model,
        freeze_vision=None if train_vision is None else not train_vision,
        freeze_sam_encoder=None if train_sam_encoder is None else not train_sam_encoder,
        crop_to_patches=crop_to_patches, gradient_checkpointing=gradient_checkpointing, dtype=dtype,
        max_length=max_length, new_token_init=new_token_init, lambda_m=lambda_m, lambda_t=lambda_t, lambda_c=lambda_c, lambda_d=lambda_d,
        lambda_r=lambda_r, seg_bce=seg_bce, seg_dice=seg_dice, seg_text=seg_text, span_weight=span_weight, answer_weight=answer_weight,
        use_depth_tokens=depth_tokens, mark_readouts=mark_readouts, cell_embeddings=cell_embeddings, eye_depth=eye_depth,
        use_segmentation=segmentation, use_depth_recon=depth_recon and depth_tokens,
        use_depth_loss=depth_loss and depth_tokens,
    )
    config = TrainConfig.for_model(model_config.is_tiny, out=out, steps=steps, batch_size=batch_size,
                                   grad_accum=grad_accum, lr=lr, head_lr=head_lr, weight_decay=weight_decay, warmup=warmup,
                                   grad_clip=grad_clip, seed=seed, workers=workers, save_every=save_every,
                                   precision=precision, parallel=parallel, resume=resume, init_from=init_from, export=export,
                                   progress=progress, max_bad_samples=max_bad_samples, keep_last=keep_last)

    config.check()
    processes = join_processes()
    console = Console(stderr=True, quiet=not processes.is_main)
    # Bad shards or mix fail here, in a second, before a model is loaded.
    streams = plan_streams(stream, processes.world_size, workers)
    console.print("streams: " + ", ".join(f"{s.name} x{s.weight:g} ({len(s.shards)} shards: {', '.join(s.datasets)})"
                                          for s in streams))
    for note in sample_split_notes(streams, processes.world_size, workers):
        console.print(note)
    if model_config.is_tiny:
        console.print("[yellow]TINY model: random weights, for tests and demos only[/yellow]")
    torch.manual_seed(seed)  # every rank builds the same new weights (LoRA, projector) from the seed
    perceptio_model = PerceptioModel.from_config(model_config)
    if config.init_from is not None:  # a resumed run then loads its checkpoint over these
        perceptio_model.load_trained_weights(config.init_from)
    result = train(perceptio_model, stream, config)
    if result.stopped:
        console.print(result.stopped, soft_wrap=True, markup=False, highlight=False)  # one line, copyable
        return

    if processes.is_main and result.history:
        first, last = result.history[0], result.history[-1]
        table = Table(title=f"{'TINY model, ' if model_config.is_tiny else ''}steps {first['step']}..{last['step']}")
        for column in ("term", "first step", "last step"):
            table.add_column(column)
        for name in [key for key in last if key not in ("step", "lr", "grad_norm", "data_s", "step_s", "sources",
                                                        "skipped_samples")]:
            table.add_row(name, f"{first[name]:.4f}", f"{last[name]:.4f}")
        Console().print(table)
        console.print(f"skipped samples: {last['skipped_samples']} (see the warnings above)\n"
                      f"metrics: {result.metrics}\ncheckpoint: {result.checkpoint}\nmodel: {result.model}")


def cell_counts(text: str) -> tuple[int, ...]:
    """``--reading-short-spans``: '16,36' -> (16, 36)."""
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise PerceptioError(f"--reading-short-spans takes comma-separated cell counts (16,36), not {text!r}") from None


main = run_cli(app)
