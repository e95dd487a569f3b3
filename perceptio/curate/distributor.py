"""Curation on Ray: one deterministic task per shard, which writes its own files (img2dataset's design).

A shard task reads its shard's images, runs the models on them in batches of ``--batch-size``
(consecutive images of the shard, so the batches, and with them the bytes, never depend on the
cluster), assembles the samples and writes ``NAME.tar``, then ``__meta__/NAME.parquet`` and the
done marker ``__meta__/NAME_stats.json`` (perceptio/curate/writer.py) to ``--out`` itself, a local
folder or an object store. Only a few counts travel back to the driver, which never holds a sample: on a cluster the
driver is no bottleneck, and a shard's bytes are the same whatever node, worker or retry made it.

Each task loads one teacher + tokenizer (:class:`DepthWorker`) once per worker process and reuses
it for the shards that process runs next; ``--model-workers`` tasks run at once (each holds a model
copy), on whichever nodes have room; perceptio/curate/placement.py sizes them to the GPUs found. A task whose node dies is run again elsewhere by Ray (system
failures are retried); the shard is written whole again, and readers never see half of it (the
marker is written last).
"""

from __future__ import annotations

import functools
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from perceptio import fs
from perceptio.curate.describe import load_captioner
from perceptio.curate.plan import ImageItem, ShardPlan
from perceptio.curate.sample_builder import (
    BuildConfig,
    DepthResult,
    PreparedImage,
    assemble,
    image_for_teacher,
    prepare,
)
from perceptio.curate.writer import ShardSetWriter, publish, staging_folder
from perceptio.errors import PerceptioError
from perceptio.tokenize.config import DEFAULT_DEPTH_MODEL, DEPTH_SOURCES


@dataclass(frozen=True)
class TeacherSpec:
    """Which depth teacher the shard tasks build (they build it themselves: models do not travel)."""

    source: str = "model"  # "model": Depth Anything through transformers; "gt": ground-truth depth PNGs
    model: str = DEFAULT_DEPTH_MODEL  # hub id or local folder (source "model")
    depth_dir: str | None = None  # source "gt": DATA_ROOT/depth
    cache_dir: str | None = None  # depth cache for the model teacher (never used for "gt": reading is the cost)
    device: str | None = None  # None: cuda when the task has a GPU, else cpu

    def __post_init__(self) -> None:
        # The one place the depth source is validated: the CLI, check() and build() rely on it.
        if self.source not in DEPTH_SOURCES:
            raise PerceptioError(f"--depth-source must be one of {', '.join(DEPTH_SOURCES)}, got {self.source!r}")

    def check(self) -> None:
        """Fail on the driver, before any task starts, when the teacher cannot be built anywhere.

        Otherwise every shard task would fail on its own; the user would see one failure per task
        instead of one line.
        """
        if self.source == "gt":
            if not self.depth_dir or not fs.is_dir(self.depth_dir):
                raise PerceptioError(f"--depth-source gt needs ground-truth depth PNGs in {self.depth_dir}; not found")
            return
        local = Path(self.model)
        if local.exists() or self.model.startswith((".", "/", "~")):
            if not (local / "config.json").is_file():
                raise PerceptioError(f"--depth-model {self.model}: not a model folder (no config.json)")
        elif os.environ.get("HF_HUB_OFFLINE") == "1":
            from huggingface_hub import try_to_load_from_cache

            if not isinstance(try_to_load_from_cache(self.model, "config.json"), str):
                raise PerceptioError(f"--depth-model {self.model} is not in the local model cache and HF_HUB_OFFLINE=1")

    def build(self) -> Any:
        from perceptio.tokenize.teacher import OracleTeacher, PipelineTeacher

        if self.source == "gt":
            return OracleTeacher(str(self.depth_dir))
        return PipelineTeacher(self.model, device=self.device)


@dataclass(frozen=True)
class RayConfig:
    """Where and how wide the pipeline runs."""

    address: str | None = None  # None: an embedded local Ray; else attach to this cluster
    num_cpus: int | None = None  # CPUs of the embedded local Ray (None: this machine's cores)
    # None: resolved from the cluster by perceptio.curate.placement.place (GPUs used when found).
    model_workers: int | None = None  # shard tasks running at once, each with its own teacher + tokenizer
    num_gpus_per_worker: float | None = None  # GPUs per shard task; 0: CPU
    actors_per_gpu: int | None = None  # shard tasks sharing one GPU (None: from the teacher's size)
    cpus_per_model_worker: float = 0.5  # per shard task: fractional, so a small machine runs several
    max_retries: int = 3  # runs of a shard task lost with its node (system failures), on other nodes
    torch_threads: int = 0  # torch threads per shard task; 0: the node's cores / model_workers


@functools.lru_cache(maxsize=2)
def _captioner(spec: str) -> Any:
    return load_captioner(spec)


class DepthWorker:
    """One teacher and one tokenizer, loaded once per worker process and used for every batch."""

    def __init__(self, teacher: TeacherSpec, tokenizer_dir: str, torch_threads: int, model_workers: int):
        import torch

        from perceptio.tokenize.cache import DepthCache
        from perceptio.tokenize.data import DepthSource
        from perceptio.tokenize.vqvae import DepthVQVAE

        # The model is the bottleneck: by default the tasks running at once share this node's cores.
        torch.set_num_threads(torch_threads or max(1, (os.cpu_count() or 1) // max(1, model_workers)))
        # The same teacher-or-cache rule as the tokenizer's fit (DepthSource: the oracle skips the cache).
        self.source = DepthSource(teacher.build(), DepthCache(teacher.cache_dir) if teacher.cache_dir else None)
        device = "cuda" if torch.cuda.is_available() and teacher.source == "model" else "cpu"
        self.tokenizer = DepthVQVAE.from_pretrained(tokenizer_dir, device=teacher.device or device)
        self.tokenizer_identity = self.tokenizer.identity

    def predict(self, prepared: Sequence[PreparedImage]) -> list[DepthResult]:
        """Depth and tokens of a batch of decoded images, in one teacher call and one tokenizer call."""
        return self.predict_images([one.item.image_path for one in prepared], [image_for_teacher(one) for one in prepared],
                                   [one.image_hash for one in prepared])

    def predict_images(self, paths: Sequence[str], images: Sequence[Any], hashes: Sequence[str]) -> list[DepthResult]:
        """Depth and tokens of decoded RGB images (PIL), given their files (the oracle finds depth by
        name) and the sha256 of their bytes (the depth cache's key)."""
        raw = self.source.depths(paths, images, hashes)
        normalized = self.tokenizer.normalize(raw)
        tokens = self.tokenizer.encode_normalized(normalized)
        return [
            DepthResult(depth.cpu().numpy().astype(np.float16), codes.cpu().numpy().astype(np.int16),
                        self.source.teacher.identity, self.tokenizer_identity)
            for depth, codes in zip(normalized, tokens)
        ]

    def depths(self, prepared: Sequence[PreparedImage]) -> tuple[list[DepthResult | None], str | None, float]:
        """Per image its depth (None for an image that failed preparation), the teacher, the seconds."""
        started = time.perf_counter()
        usable = [index for index, one in enumerate(prepared) if one.problem is None]
        depths: list[DepthResult | None] = [None] * len(prepared)
        for index, result in zip(usable, self.predict([prepared[index] for index in usable]) if usable else []):
            depths[index] = result
        return depths, self.source.teacher.identity if usable else None, time.perf_counter() - started


@functools.lru_cache(maxsize=1)
def _depth_worker(teacher: TeacherSpec, tokenizer_dir: str, torch_threads: int, model_workers: int) -> DepthWorker:
    return DepthWorker(teacher, tokenizer_dir, torch_threads, model_workers)


@dataclass(frozen=True)
class ShardJob:
    """Everything one shard task needs; it travels to a worker pickled (no model, no pixels)."""

    plan: ShardPlan
    out: str  # a folder path or an object-store URL (perceptio.fs)
    settings: dict[str, Any]
    expected_teacher: str | None  # the teacher of the shards finished before, if any
    build: BuildConfig
    teacher: TeacherSpec
    tokenizer_dir: str
    batch_size: int


@dataclass(frozen=True)
class ShardDone:
    """What a shard task reports back: counts, not samples."""

    shard: str
    images: int
    samples: int
    refs_rejected: int
    teacher: str | None


def _prepare_batch(batch: Sequence[ImageItem], build: BuildConfig) -> list[PreparedImage]:
    return [prepare(item, build) for item in batch]


def curate_shard(job: ShardJob, torch_threads: int = 0, model_workers: int = 1) -> ShardDone:
    """Read, run the models on, assemble and write one shard, on whichever node runs this."""
    worker = _depth_worker(job.teacher, job.tokenizer_dir, torch_threads, model_workers)
    captioner = _captioner(job.build.captioner)
    batches = job.plan.batches(job.batch_size)
    with staging_folder(job.out) as folder, ThreadPoolExecutor(max_workers=1) as reader:
        writer = ShardSetWriter(folder, [job.plan], job.settings, job.expected_teacher)
        # The next batch is read and decoded in a thread while the models run on this one (torch
        # releases the GIL), so reading hides behind the teacher as in a pipeline.
        upcoming = reader.submit(_prepare_batch, batches[0], job.build)
        try:
            for number in range(len(batches)):
                prepared = upcoming.result()
                if number + 1 < len(batches):
                    upcoming = reader.submit(_prepare_batch, batches[number + 1], job.build)
                depths, teacher, seconds = worker.depths(prepared)
                for offset, (one, depth) in enumerate(zip(prepared, depths)):
                    writer.add(job.plan.name, number * job.batch_size + offset, assemble(one, depth, job.build, captioner),
                               teacher, seconds / len(prepared))
        except BaseException:
            writer.abort()
            raise
        publish(folder, job.out, job.plan.name)
    return ShardDone(job.plan.name, writer.images_done, writer.samples_written, writer.refs_rejected, writer.teacher)


@contextmanager
def ray_session(config: RayConfig) -> Iterator[None]:
    """Attach to ``config.address``, reuse a Ray already started in this process, or start a local one."""
    import ray

    if ray.is_initialized():
        yield
        return
    quiet = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.WARNING,
             "configure_logging": False}
    try:
        if config.address:
            ray.init(address=config.address, **quiet)
        else:
            ray.init(num_cpus=config.num_cpus or os.cpu_count() or 1, **quiet)
    except (ConnectionError, ValueError, RuntimeError) as error:
        raise PerceptioError(f"cannot start or reach Ray ({config.address or 'local'}): {error}") from error
    try:
        yield
    finally:
        ray.shutdown()


def run_shards(jobs: Sequence[ShardJob], config: RayConfig) -> Iterator[ShardDone]:
    """Run one task per shard, ``config.model_workers`` at a time; yields each as it finishes.

    Call inside :func:`ray_session`. A task on a node that dies is retried by Ray on another node;
    an error raised by the task (bad input) is not retried and comes back as one line.
    """
    import ray

    task = ray.remote(curate_shard).options(
        num_cpus=config.cpus_per_model_worker, num_gpus=config.num_gpus_per_worker or None,
        max_retries=config.max_retries, retry_exceptions=False)
    pending = list(reversed(jobs))
    running: list[Any] = []
    try:
        while pending or running:
            while pending and len(running) < max(1, config.model_workers or 1):
                running.append(task.remote(pending.pop(), config.torch_threads, config.model_workers or 1))
            finished, running = ray.wait(running, num_returns=1)
            yield ray.get(finished[0])
    except Exception as error:
        user_error = _find_user_error(error)
        if user_error is None:
            raise
        raise PerceptioError(str(user_error).strip().splitlines()[-1]) from None
    finally:
        for reference in running:  # an interrupted run leaves no task behind
            ray.cancel(reference, force=True)


def _find_user_error(error: BaseException | None) -> PerceptioError | None:
    """The PerceptioError a shard task raised, unwrapped from Ray's task and user-code exceptions
    (a task's exception arrives as its ``cause``)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        cause = getattr(error, "cause", None)
        if isinstance(cause, PerceptioError):
            return cause
        if type(error) is PerceptioError:
            return error
        error = cause if isinstance(cause, BaseException) else error.__cause__
    return None
