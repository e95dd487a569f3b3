"""Training checkpoints: one folder per step, built under a temporary name and renamed when whole.

A checkpoint ``OUT/checkpoints/step-000200/`` holds everything a run needs to go on exactly:

- ``trainable.safetensors``: the model's ``trainable_state_dict()`` (LoRA adapters, the new token
  rows, the [SEG] projector, the mask decoder); the frozen weights are rebuilt from ``--model``.
- ``optimizer.pt``, ``scheduler.pt``: their ``state_dict()``s.
- ``rng.pt``: every rank's Python, NumPy and torch (CPU and CUDA) generator states.
- ``trainer_state.json``: the step, the run's settings and every rank's loader position.

The folder is built with :func:`perceptio.io.atomic_directory`: a crash while writing leaves at
most a hidden ``.step-*.tmp`` folder, never a ``step-*`` folder that lacks a file, so :func:`latest_checkpoint` only ever finds whole checkpoints.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from perceptio.errors import PerceptioError
from perceptio.io import atomic_directory

STEP_PREFIX = "step-"
TRAINABLE_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
RNG_FILE = "rng.pt"
STATE_FILE = "trainer_state.json"


def rng_state() -> dict[str, Any]:
    """This process's generator states, in types that ``torch.load(weights_only=True)`` accepts."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    kind, keys, position, has_gauss, cached = state["numpy"]
    random.setstate(state["python"])
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_path(root: str | os.PathLike[str], step: int) -> Path:
    return Path(root) / f"{STEP_PREFIX}{step:06d}"


def latest_checkpoint(root: str | os.PathLike[str]) -> Path | None:
    """The whole checkpoint with the highest step under ``root``, or None."""
    steps = sorted(Path(root).glob(f"{STEP_PREFIX}[0-9]*")) if Path(root).is_dir() else []
    return steps[-1] if steps else None


def prune_checkpoints(root: str | os.PathLike[str], keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` checkpoints under ``root``; the deleted ones come back.

    Each is renamed to a hidden name first, so a crash half-way through a deletion never leaves a
    ``step-*`` folder that lacks a file.
    """
    steps = sorted(Path(root).glob(f"{STEP_PREFIX}[0-9]*"))
    removed = steps[: max(len(steps) - keep, 0)]
    for path in removed:
        retired = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.rename(path, retired)
        shutil.rmtree(retired)
    return removed


@dataclass
class Checkpoint:
    """What a checkpoint restores besides the weights and the optimizer."""

    step: int
    settings: dict[str, Any]  # the run's settings that must not change across a resume
    loader_states: list[dict[str, Any]]  # one per rank
    rng_states: list[dict[str, Any]]  # one per rank


def save_checkpoint(path: Path, trainable: dict[str, torch.Tensor], optimizer_state: dict[str, Any],
                    scheduler_state: dict[str, Any], checkpoint: Checkpoint) -> Path:
    """Write a checkpoint folder atomically (call on one rank, with every rank's states gathered)."""
    with atomic_directory(path) as folder:
        save_file({name: tensor.detach().contiguous().cpu() for name, tensor in trainable.items()},
                  str(folder / TRAINABLE_FILE))
        torch.save(optimizer_state, folder / OPTIMIZER_FILE)
        torch.save(scheduler_state, folder / SCHEDULER_FILE)
        torch.save(checkpoint.rng_states, folder / RNG_FILE)
        state = {"step": checkpoint.step, "settings": checkpoint.settings, "loader_states": checkpoint.loader_states}
        (folder / STATE_FILE).write_text(json.dumps(state, indent=1, sort_keys=True))
    return path


@dataclass
class LoadedCheckpoint:
    checkpoint: Checkpoint
    trainable: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any]
    scheduler_state: dict[str, Any]


# Settings that may name local folders (shards; the model's base, SAM2 and depth tokenizer).
PATH_SETTINGS = ("shards", "init_from", "model.model", "model.sam_model", "model.tokenizer")


def absolute_location(value: Any) -> Any:
    """A local folder (or a list of them) as an absolute path; hub ids, URLs and anything else as they are."""
    if isinstance(value, list):
        return sorted(absolute_location(item) for item in value)
    if isinstance(value, str) and value and "://" not in value and Path(value).exists():
        return str(Path(value).resolve())
    return value


def with_absolute_paths(settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` with every local folder it names written as an absolute path (hub ids and URLs
    as they are), so that a run resumed with ``data/shards`` matches one started with
    ``/home/me/data/shards``."""
    resolved = json.loads(json.dumps(settings))
    for dotted in PATH_SETTINGS:
        *parents, name = dotted.split(".")
        holder = resolved
        for parent in parents:
            holder = holder.get(parent) if isinstance(holder, dict) else None
        if isinstance(holder, dict) and name in holder:
            holder[name] = absolute_location(holder[name])
    return resolved


# Settings added after checkpoints were first written: an older checkpoint ran with these values.
# (Runs with reading questions from before reading_spread drew at 1/3: they resume only as they were
# written, so they are refused, "reading_spread: None -> ...".)
LATER_SETTINGS: dict[str, Any] = {"reading_questions": 0, "reading_spread": None, "init_from": None, "reading_swaps": 0.0,
                                  "mark_readouts": False, "readout_cells": False, "reading_in_text": 0.0,
                                  "reading_short_spans": []}
# The same for the model's PerceptioConfig, recorded under "model".
LATER_MODEL_SETTINGS: dict[str, Any] = {"mark_readouts": False, "answer_weight": 1.0, "new_token_init": "mean",
                                        "cell_embeddings": False, "eye_depth": 0.0}


def load_checkpoint(path: Path, settings: dict[str, Any]) -> LoadedCheckpoint:
    """Read a checkpoint, refusing one written by a run whose settings differ from ``settings``
    (local folders compared as absolute paths)."""
    missing = [name for name in (TRAINABLE_FILE, OPTIMIZER_FILE, SCHEDULER_FILE, RNG_FILE, STATE_FILE)
               if not (path / name).is_file()]
    if missing:
        raise PerceptioError(f"checkpoint {path} lacks {', '.join(missing)}")
    state = json.loads((path / STATE_FILE).read_text())
    saved = {**LATER_SETTINGS, **state["settings"]}
    if isinstance(saved.get("model"), dict):
        saved["model"] = {**LATER_MODEL_SETTINGS, **saved["model"]}
    settings, saved = with_absolute_paths(settings), with_absolute_paths(saved)
    changed = sorted(key for key in settings.keys() | saved.keys() if settings.get(key) != saved.get(key))
    if changed:
        details = ", ".join(f"{key}: {saved.get(key)!r} -> {settings.get(key)!r}" for key in changed)
        raise PerceptioError(f"cannot resume exactly from {path}: settings changed ({details})")
    # Everything to the CPU first: tensors saved from cuda:0 would otherwise all land on cuda:0 on
    # every rank; load_state_dict then moves each to its parameter's device.
    return LoadedCheckpoint(
        Checkpoint(state["step"], state["settings"], state["loader_states"],
                   torch.load(path / RNG_FILE, weights_only=True, map_location="cpu")),
        load_file(str(path / TRAINABLE_FILE), device="cpu"),
        torch.load(path / OPTIMIZER_FILE, weights_only=True, map_location="cpu"),
        torch.load(path / SCHEDULER_FILE, weights_only=True, map_location="cpu"),
    )
