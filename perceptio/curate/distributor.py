"""The Ray Data pipeline of curation: CPU tasks around an actor pool that runs the models.

Rows are *work units*: the model batches of the plan (perceptio/curate/plan.py). Three stages:

1. ``prepare`` (tasks, fractional CPU): read and decode the images, rasterise masks, filter refs;
2. ``depth`` (actor pool, one teacher + one tokenizer per actor, on a GPU when asked): the teacher
   through the depth cache (the rule of ``perceptio.tokenize.data.DepthSource``), then the
   tokenizer's normalisation and codes, once per image;
3. ``assemble`` (tasks, fractional CPU): descriptions, region depth, ADE20k questions, the sample.

Every resource request is fractional, so that on a 2-CPU laptop the actor never holds a whole core
that the tasks wait for (Ray Data would otherwise stall), while on a cluster the same code spreads
tasks over all nodes and GPU actors over the GPUs. Results come back in plan order to the driver,
which writes the shards (perceptio/curate/writer.py). Between the stages a unit travels as one typed
payload: :class:`WorkUnit`, :class:`PreparedUnit`, :class:`DepthUnit`, then :class:`UnitResult`.
"""

from __future__ import annotations

import functools
import logging
import os
import pickle
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from perceptio.curate.describe import load_captioner
from perceptio.curate.plan import ImageItem
from perceptio.curate.sample_builder import (
    BuildConfig,
    BuiltImage,
    DepthResult,
    PreparedImage,
    assemble,
    image_for_teacher,
    prepare,
)
from perceptio.errors import PerceptioError
from perceptio.tokenize.config import DEFAULT_DEPTH_MODEL, DEPTH_SOURCES


@dataclass(frozen=True)
class TeacherSpec:
    """Which depth teacher the actors build (they build it themselves: models do not travel)."""

    source: str = "model"  # "model": Depth Anything through transformers; "gt": ground-truth depth PNGs
    model: str = DEFAULT_DEPTH_MODEL  # hub id or local folder (source "model")
    depth_dir: str | None = None  # source "gt": DATA_ROOT/depth
    cache_dir: str | None = None  # depth cache for the model teacher (never used for "gt": reading is the cost)
    device: str | None = None  # None: cuda when the actor has a GPU, else cpu

    def __post_init__(self) -> None:
        # The one place the depth source is validated: the CLI, check() and build() rely on it.
        if self.source not in DEPTH_SOURCES:
            raise PerceptioError(f"--depth-source must be one of {', '.join(DEPTH_SOURCES)}, got {self.source!r}")

    def check(self) -> None:
        """Fail on the driver, before any actor starts, when the teacher cannot be built anywhere.

        An actor whose constructor raises would otherwise be restarted by Ray; the user would see
        retries and tracebacks instead of one line.
        """
        if self.source == "gt":
            if not self.depth_dir or not Path(self.depth_dir).is_dir():
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
    model_workers: int = 1  # upper bound of the model actor pool (it starts with one)
    num_gpus_per_worker: float = 0.0
    cpus_per_model_worker: float = 0.5
    cpus_per_task: float = 0.25
    torch_threads: int = 0  # threads per model actor; 0: the node's cores / model_workers


@dataclass(frozen=True)
class WorkUnit:
    """One model batch: consecutive images of one shard, starting at ``first_position`` in it."""

    shard: str
    first_position: int
    images: tuple[ImageItem, ...]


@dataclass
class PreparedUnit:
    """A work unit after the ``prepare`` stage."""

    unit: WorkUnit
    prepared: list[PreparedImage]


@dataclass
class DepthUnit:
    """A work unit after the model stage: per image its depth, None when it never reached the model."""

    unit: WorkUnit
    prepared: list[PreparedImage]
    depths: list[DepthResult | None]
    teacher: str | None  # None when no image of the unit reached the model
    model_seconds: float


@dataclass
class UnitResult:
    """A work unit after the ``assemble`` stage, as the writer receives it."""

    shard: str
    first_position: int
    built: list[BuiltImage]
    teacher: str | None  # None when no image of the unit reached the model
    model_seconds: float


# Ray Data moves rows of plain columns; each stage's dataclass travels pickled in one column.
PAYLOAD = "payload"


def _row(payload: WorkUnit | PreparedUnit | DepthUnit | UnitResult) -> dict[str, bytes]:
    return {PAYLOAD: pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL)}


def _payload(row: dict[str, Any], expected: type) -> Any:
    payload = pickle.loads(row[PAYLOAD])
    if not isinstance(payload, expected):
        raise TypeError(f"a {expected.__name__} was expected between the stages, got {type(payload).__name__}")
    return payload


@functools.lru_cache(maxsize=2)
def _captioner(spec: str) -> Any:
    return load_captioner(spec)


def _prepare_unit(row: dict[str, Any], build: BuildConfig) -> dict[str, Any]:
    unit: WorkUnit = _payload(row, WorkUnit)
    return _row(PreparedUnit(unit, [prepare(item, build) for item in unit.images]))


class DepthWorker:
    """One Ray actor: one teacher and one tokenizer, loaded once and used for every batch."""

    def __init__(self, teacher: TeacherSpec, tokenizer_dir: str, torch_threads: int, model_workers: int):
        import torch

        from perceptio.tokenize.cache import DepthCache
        from perceptio.tokenize.data import DepthSource
        from perceptio.tokenize.vqvae import DepthVQVAE

        # Ray pins fractional actors to one thread; the model is the bottleneck, so by default the
        # actors share this node's cores (the CPU tasks are light and interleave).
        torch.set_num_threads(torch_threads or max(1, (os.cpu_count() or 1) // max(1, model_workers)))
        # The same teacher-or-cache rule as the tokenizer's fit (DepthSource: the oracle skips the cache).
        self.source = DepthSource(teacher.build(), DepthCache(teacher.cache_dir) if teacher.cache_dir else None)
        device = "cuda" if torch.cuda.is_available() and teacher.source == "model" else "cpu"
        self.tokenizer = DepthVQVAE.from_pretrained(tokenizer_dir, device=teacher.device or device)
        self.tokenizer_identity = self.tokenizer.identity

    def predict(self, prepared: Sequence[PreparedImage]) -> list[DepthResult]:
        """Depth and tokens of a batch of decoded images, in one teacher call and one tokenizer call."""
        raw = self.source.depths([one.item.image_path for one in prepared], [image_for_teacher(one) for one in prepared],
                                 [one.image_hash for one in prepared])
        normalized = self.tokenizer.normalize(raw)
        tokens = self.tokenizer.encode_normalized(normalized)
        return [
            DepthResult(depth.cpu().numpy().astype(np.float16), codes.cpu().numpy().astype(np.int16),
                        self.source.teacher.identity, self.tokenizer_identity)
            for depth, codes in zip(normalized, tokens)
        ]

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        stage: PreparedUnit = _payload(row, PreparedUnit)
        prepared = stage.prepared
        started = time.perf_counter()
        usable = [index for index, one in enumerate(prepared) if one.problem is None]
        depths: list[DepthResult | None] = [None] * len(prepared)
        for index, result in zip(usable, self.predict([prepared[index] for index in usable]) if usable else []):
            depths[index] = result
        seconds = time.perf_counter() - started
        teacher = self.source.teacher.identity if usable else None
        return _row(DepthUnit(stage.unit, prepared, depths, teacher, seconds))


def _assemble_unit(row: dict[str, Any], build: BuildConfig) -> dict[str, Any]:
    stage: DepthUnit = _payload(row, DepthUnit)
    captioner = _captioner(build.captioner)
    built = [assemble(one, depth, build, captioner) for one, depth in zip(stage.prepared, stage.depths)]
    return _row(UnitResult(stage.unit.shard, stage.unit.first_position, built, stage.teacher, stage.model_seconds))


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


def run_units(
    units: Sequence[WorkUnit],
    build: BuildConfig,
    teacher: TeacherSpec,
    tokenizer_dir: str | Path,
    config: RayConfig,
) -> Iterator[UnitResult]:
    """Run every work unit through the three stages; yields results in the order of ``units``.

    Call inside :func:`ray_session`.
    """
    import ray.data

    if not units:
        return
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # the writer streams shards in plan order
    context.enable_progress_bars = False  # the command draws its own
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "progress bars disabled"

    rows = [_row(unit) for unit in units]
    dataset = ray.data.from_items(rows, override_num_blocks=len(rows))
    dataset = dataset.map(_prepare_unit, fn_kwargs={"build": build}, num_cpus=config.cpus_per_task)
    with warnings.catch_warnings():
        # Ray deprecates passing actor options such as max_restarts as keywords but offers no
        # other way to set them yet.
        warnings.simplefilter("ignore", DeprecationWarning)
        dataset = _model_stage(dataset, teacher, str(tokenizer_dir), config)
    dataset = dataset.map(_assemble_unit, fn_kwargs={"build": build}, num_cpus=config.cpus_per_task)
    try:
        for row in dataset.iter_rows():
            yield _payload(row, UnitResult)
    except Exception as error:
        user_error = _find_user_error(error)
        if user_error is None:
            raise
        raise PerceptioError(str(user_error).strip().splitlines()[-1]) from None


def _model_stage(dataset: Any, teacher: TeacherSpec, tokenizer_dir: str, config: RayConfig) -> Any:
    import ray.data

    return dataset.map(
        DepthWorker,
        fn_constructor_kwargs={"teacher": teacher, "tokenizer_dir": tokenizer_dir, "torch_threads": config.torch_threads,
                               "model_workers": config.model_workers},
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, config.model_workers)),
        num_cpus=config.cpus_per_model_worker,
        num_gpus=config.num_gpus_per_worker or None,
        # An actor that dies fails the run at once instead of being restarted forever (a model that
        # cannot load would loop); re-running the command resumes, which is cheaper than restarts.
        max_restarts=0,
    )


def _find_user_error(error: BaseException | None) -> PerceptioError | None:
    """The PerceptioError a worker raised, unwrapped from Ray's task and user-code exceptions.

    A task's exception arrives as its ``cause``; an actor that died in its constructor only as
    text (``ActorDiedError``), from which the error's first line is recovered.
    """
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        cause = getattr(error, "cause", None)
        if isinstance(cause, PerceptioError):
            return cause
        if type(error) is PerceptioError:
            return error
        text = str(error)
        if type(error).__name__ == "ActorDiedError" and "PerceptioError: " in text:
            return PerceptioError(text.rsplit("PerceptioError: ", 1)[1].splitlines()[0])
        error = cause if isinstance(cause, BaseException) else error.__cause__
    return None
