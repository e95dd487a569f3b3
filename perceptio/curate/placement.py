"""Where curation runs its models: the GPUs Ray finds, unless told otherwise, said in one line.

Ray hides GPUs from a task that asks for none, so a run that does not ask runs Depth Anything on
the CPU of a GPU node, silently, for hours. :func:`place` resolves the model stage's resources from
what the cluster has:

- GPUs found, nothing asked: every GPU gets ``actors_per_gpu`` shard tasks (each a teacher + tokenizer) (from the
  teacher's size: 1 for a Large/Giant ViT, 2 for Base, 4 for Small, whose tasks are bound by their
  own CPU preprocessing more than by the GPU; ``--actors-per-gpu`` overrides);
- ``--num-gpus-per-worker`` given: as asked; 0 on a node with GPUs is honoured with a warning;
- no GPU: one CPU shard task at a time (or ``--model-workers``); asking for GPUs there is an error.

The ground-truth teacher reads PNGs and needs no GPU.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

from perceptio.curate.distributor import RayConfig, TeacherSpec
from perceptio.errors import PerceptioError

# Actors per GPU by the width of the teacher's ViT (Depth Anything V2: S 384, B 768, L 1024, G 1536).
ACTORS_BY_WIDTH = ((1024, 1), (768, 2), (0, 4))
ACTORS_BY_NAME = (("giant", 1), ("large", 1), ("base", 2), ("small", 4))


@dataclass(frozen=True)
class Placement:
    config: RayConfig  # with model_workers and num_gpus_per_worker resolved
    summary: str  # one line: what runs where
    warning: str | None = None


def actors_per_gpu(teacher: TeacherSpec) -> int:
    """How many shard tasks (teacher + tokenizer each) share one GPU, from the teacher's width (local config) or its name."""
    config = Path(teacher.model) / "config.json"
    if config.is_file():
        backbone = json.loads(config.read_text()).get("backbone_config") or {}
        width = int(backbone.get("hidden_size", 0))
        if width:
            return next(actors for minimum, actors in ACTORS_BY_WIDTH if width >= minimum)
    name = teacher.model.lower()
    return next((actors for word, actors in ACTORS_BY_NAME if word in name), 2)


def place(config: RayConfig, teacher: TeacherSpec, gpus: float, cpus: float) -> Placement:
    """Resolve the model stage for a cluster of ``gpus`` GPUs and ``cpus`` CPUs (module docstring)."""
    where = f"{cpus:g} CPUs in the cluster"
    if teacher.source == "gt":
        workers = config.model_workers or 1
        resolved = replace(config, model_workers=workers, num_gpus_per_worker=0.0)
        return Placement(resolved, f"curation: ground-truth depth, {workers} tokenizer shard task(s) at once on CPU; {where}")
    model = Path(teacher.model).name or teacher.model
    asked = config.num_gpus_per_worker
    if gpus <= 0:
        if asked:
            raise PerceptioError(f"--num-gpus-per-worker {asked:g} asks for GPUs, but Ray sees none on this cluster")
        workers = config.model_workers or 1
        resolved = replace(config, model_workers=workers, num_gpus_per_worker=0.0)
        return Placement(resolved, f"curation: {workers} {model} shard task(s) at once on CPU (no GPU found); {where}")
    if asked == 0:
        workers = config.model_workers or 1
        resolved = replace(config, model_workers=workers, num_gpus_per_worker=0.0)
        warning = (f"{gpus:g} GPU(s) found but --num-gpus-per-worker 0 runs the depth teacher on the CPU; "
                   "leave the option out to use them")
        return Placement(resolved, f"curation: {workers} {model} shard task(s) at once on CPU, {gpus:g} GPU(s) unused; {where}",
                         warning)
    if asked is None:
        per_gpu = config.actors_per_gpu or actors_per_gpu(teacher)
        asked = 1.0 / per_gpu
    else:
        per_gpu = 1.0 / asked
    workers = config.model_workers or max(1, math.floor(gpus / asked + 1e-9))
    resolved = replace(config, model_workers=workers, num_gpus_per_worker=asked)
    return Placement(resolved, f"curation: {workers} {model} shard task(s) at once, {per_gpu:g} per GPU, on {gpus:g} GPU(s); {where}")
