"""The training loop, readable top to bottom (nanoGPT style): set up, resume, step, log, save, export.

One process per device, launched alone or by ``torchrun`` (DDP, or FSDP for models too large to
replicate); gloo on CPU, NCCL on GPUs. Each optimizer step accumulates ``grad_accum`` micro-batches
of ``batch_size`` examples per rank, under bf16 autocast on GPUs; AdamW follows a linear warm-up
over the first 5% of the steps and a cosine to zero after it; gradients are clipped to norm 1.0.

Every step appends one JSON line to ``OUT/metrics.jsonl`` (each loss term, learning rate, gradient
norm, time spent waiting for data); a NaN or Inf loss or gradient stops the run before the
optimizer touches the weights, naming the step and the step's example keys, and nothing is saved
from that state. The loss terms stay on the device until the step's end: one host sync per
optimizer step reads them, the finiteness flags and the gradient norm together. Checkpoints are
atomic folders (see checkpoint.py); the final model is exported with the model's own (atomic)
``save_pretrained``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any, Iterator, Protocol

import numpy as np
import torch
import torch.distributed as dist

from perceptio.errors import PerceptioError
from perceptio.progress import ProgressLog
from perceptio.recipes import load_recipe
from perceptio.train.checkpoint import (
    Checkpoint,
    checkpoint_path,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    rng_state,
    save_checkpoint,
    set_rng_state,
    with_absolute_paths,
)
from perceptio.train.config import BadSampleLimit, StreamConfig, TrainConfig
from perceptio.train.data import EncodeCollate, ResumableLoader
from perceptio.train.preemption import StopRequest, resume_command


class TrainableModel(Protocol):
    """What the loop needs from a model (``perceptio.train.model.PerceptioModel`` provides it)."""

    processor: EncodeCollate  # handed to the DataLoader workers (never the model itself)

    def __call__(self, batch: dict[str, Any]) -> Any: ...  # -> output with .loss and .terms
    def fsdp_units(self) -> list[torch.nn.Module]: ...  # the blocks FSDP shards one by one
    def trainable_state_dict(self) -> dict[str, torch.Tensor]: ...
    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> Any: ...
    def save_pretrained(self, folder: str | os.PathLike[str], merged: bool = False) -> Any: ...  # atomic


@dataclass
class TrainResult:
    steps: int
    metrics: Path
    checkpoint: Path | None
    model: Path | None
    history: list[dict[str, Any]] = field(default_factory=list)  # this process's metric lines
    stopped: str | None = None  # why and where a signal stopped the run before its last step, and how to go on


# ------------------------------------------------------------------------------------- set-up
@dataclass(frozen=True)
class Processes:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def join_processes() -> Processes:
    """Join the torchrun group when there is one (WORLD_SIZE > 1); pick this process's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if world_size > 1 else 0
    return Processes(rank, world_size, device)


def lr_factor(step: int, total_steps: int, warmup: float) -> float:
    """Linear warm-up over ``warmup`` of the steps, then a cosine from 1 to 0 at the last step."""
    warmup_steps = max(1, math.ceil(warmup * total_steps))
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


HEAD_PREFIX = "segmenter."


def parameter_groups(model: torch.nn.Module, config: TrainConfig) -> list[dict[str, Any]]:
    """The trainable parameters in AdamW groups: the model's, and the segmentation head's at ``head_lr``."""
    body, head = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (head if name.startswith(HEAD_PREFIX) else body).append(parameter)
    head_lr = config.lr if config.head_lr is None else config.head_lr
    return [group for group in ({"params": body, "lr": config.lr}, {"params": head, "lr": head_lr}) if group["params"]]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, dict):
        return {key: to_device(item, device) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_device(item, device) for item in value)
    return value


def wrap_for_processes(model: torch.nn.Module, config: TrainConfig, processes: Processes) -> torch.nn.Module:
    """DDP or FSDP around the model under torchrun; the model itself when alone."""
    if not processes.distributed:
        return model
    if config.parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        # Shard every block the model's family names (its adapter knows them), then the rest; works on
        # CPU (gloo) and GPUs alike.
        for module in model.fsdp_units():
            fully_shard(module)
        fully_shard(model)
        return model
    # No find_unused_parameters: the model keeps every trainable parameter in the graph on every
    # batch (a batch without a [SEG] target gives the mask decoder a zero gradient), so DDP needs no
    # extra traversal of the graph after each forward to find parameters that sat out.
    device_ids = [processes.device.index] if processes.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


@contextlib.contextmanager
def full_parameters(model: torch.nn.Module, config: TrainConfig, processes: Processes) -> Iterator[None]:
    """Under FSDP, gather whole parameters for the block (to read or export them)."""
    if not sharded(config, processes):
        yield
        return
    from torch.distributed.fsdp import FSDPModule

    fsdp_modules = [module for module in model.modules() if isinstance(module, FSDPModule)]
    for module in fsdp_modules:
        module.unshard()
    try:
        yield
    finally:
        for module in fsdp_modules:
            module.reshard()


def sharded(config: TrainConfig, processes: Processes) -> bool:
    return processes.distributed and config.parallel == "fsdp"


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any],
                         config: TrainConfig, processes: Processes) -> None:
    """Under FSDP the checkpoint holds the whole (unsharded) state keyed by parameter name."""
    if sharded(config, processes):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state)


def run_settings(config: TrainConfig, data: StreamConfig, processes: Processes, model: Any = None) -> dict[str, Any]:
    """The settings a resumed run must share with the original to continue it exactly.

    Everything that changes the data (shards, mix, splits, seeds, shuffling, the prompt templates'
    content), the model (its config) or the numbers (precision as resolved on this device).
    """
    # Not the number of ranks or loader workers: a run may resume on another number (elastic, see
    # data.ReaderLayout); the loader refuses only more readers than the run started with.
    keep = ("steps", "batch_size", "grad_accum", "lr", "head_lr", "weight_decay", "warmup", "grad_clip", "seed", "parallel",
            "init_from")
    settings = {key: str(value) if isinstance(value, Path) else value for key, value in asdict(config).items() if key in keep}
    prompts = json.dumps(load_recipe(data.prompts), sort_keys=True).encode("utf-8")
    model_config = getattr(model, "config", None)
    settings.update(mix=data.mix, seed_data=data.seed, splits=list(data.splits),
                    use_depth_tokens=data.use_depth_tokens, reading_questions=data.reading_questions,
                    # where reading points fall matters only when there are reading questions
                    reading_spread=data.reading_spread if data.reading_questions else None,
                    reading_swaps=data.reading_swaps, mark_readouts=data.mark_readouts,
                    readout_cells=data.readout_cells, reading_in_text=data.reading_in_text,
                    reading_short_spans=list(data.reading_short_spans),
                    shards=sorted(map(str, data.shards)),
                    shuffle_buffer=data.shuffle_buffer, shuffle_initial=data.shuffle_initial,
                    prompts=f"{data.prompts}@{hashlib.sha256(prompts).hexdigest()[:12]}",
                    precision="bf16" if uses_bf16(config, processes, model) else "fp32",
                    model=json.loads(json.dumps(asdict(model_config), default=str)) if is_dataclass(model_config) else None)
    return with_absolute_paths(settings)


def uses_bf16(config: TrainConfig, processes: Processes, model: Any = None) -> bool:
    """bf16 autocast on GPUs, and wherever frozen weights are stored in bf16 (trainable ones are fp32)."""
    holds_bf16 = model is not None and any(parameter.dtype == torch.bfloat16 for parameter in model.parameters())
    return config.precision == "bf16" or (config.precision == "auto" and (processes.device.type == "cuda" or holds_bf16))


# ------------------------------------------------------------------------------------- metrics
class MetricsLog:
    """``metrics.jsonl``, one line per finished step; a resumed run drops lines past its checkpoint."""

    def __init__(self, path: Path, first_step: int, enabled: bool):
        self.path, self.enabled = path, enabled
        if enabled:
            kept = []
            if first_step > 0 and path.is_file():
                kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= first_step]
            path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")


class NonFiniteError(PerceptioError):
    """A NaN or Inf loss or gradient: nothing is saved from that state."""


def read_step(names: list[str], totals: torch.Tensor, grad_norm: torch.Tensor, step: int, keys: list[str],
              processes: Processes, counters: tuple[int, ...] = ()) -> tuple[dict[str, float], float, list[int]]:
    """The step's loss terms (averaged over ranks), gradient norm and ``counters`` (summed over
    ranks: skipped and read samples, stop requests), read with one host sync.

    A NaN or Inf stops every rank together (no rank is left waiting in a collective): the rank that
    saw it names the terms and the step's examples, the others say another rank stopped.
    """
    local_bad = (~torch.isfinite(totals)).any()[None]
    extra = torch.tensor(counters, dtype=torch.float64, device=totals.device)
    reduced = torch.cat([totals, local_bad.double(), extra])
    if processes.distributed:
        dist.all_reduce(reduced)
    values = torch.cat([totals, reduced, grad_norm.detach().double().reshape(1)]).tolist()
    count = len(names)
    local, mean = values[:count], [total / processes.world_size for total in values[count:2 * count]]
    bad_ranks, norm = values[2 * count], values[-1]
    summed = [int(value) for value in values[2 * count + 1 : 2 * count + 1 + len(counters)]]
    bad = [name for name, value in zip(names, local) if not math.isfinite(value)]
    if bad:
        shown = ", ".join(f"{name}={value:g}" for name, value in zip(names, local) if name in bad)
        raise NonFiniteError(f"non-finite loss at step {step + 1} ({shown}) on rank {processes.rank}; batch keys: {keys}")
    if bad_ranks:
        raise NonFiniteError(f"non-finite loss at step {step + 1} on another rank; stopped without saving")
    if not math.isfinite(norm):
        raise NonFiniteError(f"non-finite gradient norm at step {step + 1}; batch keys: {keys}")
    return dict(zip(names, mean)), norm, summed


# ------------------------------------------------------------------------------------- the loop
def train(model: TrainableModel, data: StreamConfig, config: TrainConfig) -> TrainResult:
    """Train ``model`` on the shards of ``data`` for ``config.steps`` optimizer steps."""
    config.check()
    processes = join_processes()
    out = Path(config.out)
    checkpoints = out / "checkpoints"
    settings = run_settings(config, data, processes, model)

    # Start fresh, or exactly where the newest checkpoint stopped: weights first (before any
    # sharding), then the optimizer and schedule built over the wrapped model's parameters.
    model = model.to(processes.device)
    seed_everything(config.seed + processes.rank)
    resumed = None
    if config.resume:
        found = latest_checkpoint(checkpoints)
        if found is None:
            raise PerceptioError(f"--resume: no checkpoint in {checkpoints}")
        resumed = load_checkpoint(found, settings)
        model.load_trainable_state_dict(resumed.trainable)
    net = wrap_for_processes(model, config, processes)
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(parameter_groups(model, config), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, config.steps, config.warmup))
    use_bf16 = uses_bf16(config, processes, model)
    first_step, loader_states, last_checkpoint = 0, None, None
    if resumed is not None:
        load_optimizer_state(model, optimizer, resumed.optimizer_state, config, processes)
        scheduler.load_state_dict(resumed.scheduler_state)
        if processes.rank < len(resumed.checkpoint.rng_states):  # a rank added by an elastic resume keeps its seed
            set_rng_state(resumed.checkpoint.rng_states[processes.rank])
        first_step, loader_states = resumed.checkpoint.step, resumed.checkpoint.loader_states
        last_checkpoint = found
    loader = ResumableLoader(data, model.processor, config.batch_size, config.workers,
                             processes.rank, processes.world_size, loader_states)

    out.mkdir(parents=True, exist_ok=True)
    metrics = MetricsLog(out / "metrics.jsonl", first_step, processes.is_main)
    history: list[dict[str, Any]] = []
    net.train()
    bad_limit = BadSampleLimit.parse(config.max_bad_samples)
    stopped = None

    def checkpoint_now(done: int, **states: Any) -> None:
        nonlocal last_checkpoint
        if last_checkpoint != checkpoint_path(checkpoints, done):
            last_checkpoint = save_training_state(done, model, optimizer, scheduler, loader, settings, checkpoints,
                                                  config, processes, **states)

    examples_per_step = config.batch_size * config.grad_accum * processes.world_size
    with ProgressLog("train", config.steps, unit="steps", rate_unit="examples", rate_scale=examples_per_step,
                     enabled=processes.is_main and config.progress, completed=first_step) as progress, \
            StopRequest() as stop:
        for step in range(first_step, config.steps):
            step_start = time.perf_counter()
            data_seconds = 0.0
            totals: torch.Tensor | None = None  # loss and terms, summed on the device
            names: list[str] = []
            keys: list[str] = []
            sources: dict[str, int] = {}
            before = {"loader_state": loader.state_dict(), "rng": rng_state()}  # for a checkpoint after a crash

            try:
                # Forward and backward over the micro-batches; DDP syncs gradients on the last one only.
                for micro in range(config.grad_accum):
                    wait_start = time.perf_counter()
                    batch = next(loader)
                    data_seconds += time.perf_counter() - wait_start
                    last_micro = micro == config.grad_accum - 1
                    sync = contextlib.nullcontext() if last_micro or not hasattr(net, "no_sync") else net.no_sync()
                    with sync:
                        with torch.autocast(processes.device.type, dtype=torch.bfloat16, enabled=use_bf16):
                            output = net(to_device(batch.inputs, processes.device))
                        (output.loss / config.grad_accum).backward()
                    values = {"loss": output.loss, **output.terms}
                    names = list(values)
                    stacked = torch.stack([value.detach().double().mean() for value in values.values()]) / config.grad_accum
                    totals = stacked if totals is None else totals + stacked
                    keys.extend(batch.keys)
                    for source in batch.sources:
                        sources[source] = sources.get(source, 0) + 1

                # One optimizer step, unless a loss term or the gradients are not finite.
                grad_norm = torch.nn.utils.clip_grad_norm_(trainable, config.grad_clip)
                if hasattr(grad_norm, "full_tensor"):  # FSDP returns a sharded tensor
                    grad_norm = grad_norm.full_tensor()
                means, norm, (skipped, read, stops) = read_step(
                    names, totals, grad_norm, step, keys, processes,
                    (*loader.bad_samples(), int(stop.received is not None)))
            except Exception as error:
                # The weights are still those of the last finished step: keep that progress, with the
                # loader and generators as they were when this step began, so --resume redoes it
                # exactly. Not after a NaN (nothing is saved from that state), and not under torchrun,
                # where the other ranks may be waiting in a collective and cannot join a save.
                if step > first_step and not processes.distributed and not isinstance(error, NonFiniteError):
                    checkpoint_now(step, **before)
                raise
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            # Log what this step did (losses averaged over ranks, skipped samples summed).
            record = {"step": step + 1, "lr": lr, **means, "grad_norm": norm, "data_s": data_seconds,
                      "step_s": time.perf_counter() - step_start, "sources": sources, "skipped_samples": skipped}
            metrics.write(record)
            history.append(record)
            progress.update(step + 1, loss=means["loss"])

            if (config.save_every and (step + 1) % config.save_every == 0) or step + 1 == config.steps:
                checkpoint_now(step + 1)
            if bad_limit.exceeded(skipped, read):  # every rank sees the same sums: all stop together
                checkpoint_now(step + 1)
                raise PerceptioError(
                    f"{skipped} of {read} samples read were bad, more than --max-bad-samples {config.max_bad_samples} "
                    f"allows; stopped after step {step + 1} with checkpoint {last_checkpoint} (the warnings name "
                    "the files: fix or remove them, or raise the limit, then --resume)")
            if stops and step + 1 < config.steps:  # a signal reached some rank: all stop after this step
                checkpoint_now(step + 1)
                stopped = (f"stopped by {stop.name} after step {step + 1} of {config.steps}; checkpoint "
                           f"{last_checkpoint}; to go on, run the same command with --resume: {resume_command()}")
                break

    if stopped is not None:
        return TrainResult(step + 1, out / "metrics.jsonl", last_checkpoint, None, history, stopped)
    exported = export_model(model, out / "model", config, processes)
    if processes.distributed:
        dist.barrier()
    return TrainResult(config.steps, out / "metrics.jsonl", last_checkpoint, exported, history)


def gather(value: Any, processes: Processes) -> list[Any]:
    """``value`` from every rank, in rank order, on every rank."""
    if not processes.distributed:
        return [value]
    gathered: list[Any] = [None] * processes.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def save_training_state(step: int, model: TrainableModel, optimizer: torch.optim.Optimizer,
                        scheduler: Any, loader: ResumableLoader, settings: dict[str, Any], root: Path,
                        config: TrainConfig, processes: Processes, loader_state: dict[str, Any] | None = None,
                        rng: dict[str, Any] | None = None) -> Path:
    """Gather every rank's loader position and RNG state (now, or as given); the main rank writes the folder.

    Then, with ``--keep-last N``, the main rank deletes all but the newest N checkpoints.
    """
    loader_states = gather(loader_state if loader_state is not None else loader.state_dict(), processes)
    rng_states = gather(rng if rng is not None else rng_state(), processes)
    if sharded(config, processes):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        optimizer_state = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        optimizer_state = optimizer.state_dict()
    with full_parameters(model, config, processes):
        trainable = model.trainable_state_dict() if processes.is_main else {}
    path = checkpoint_path(root, step)
    if processes.is_main:
        save_checkpoint(path, trainable, optimizer_state, scheduler.state_dict(),
                        Checkpoint(step, settings, loader_states, rng_states))
        if config.keep_last:
            prune_checkpoints(root, config.keep_last)
    if processes.distributed:
        dist.barrier()
    return path


def export_model(model: TrainableModel, folder: Path, config: TrainConfig, processes: Processes) -> Path | None:
    """The final model as a folder ``from_pretrained`` loads (adapters, or merged into the base)."""
    if config.export == "none":
        return None
    with full_parameters(model, config, processes):
        if processes.is_main:
            model.save_pretrained(folder, merged=config.export == "merged")
    return folder
