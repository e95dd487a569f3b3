"""``perceptio-curate refcoco|refcoco+|refcocog|ade20k``: a dataset in, WebDataset shards out.

:func:`curate` is the library entry point (plan, resume, Ray pipeline, writer, manifest);
:func:`register` adds one Typer command per dataset to the ``perceptio-curate`` app.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import typer

import perceptio
from perceptio import fs
from perceptio.curate.depth_models import resolve_tokenizer, tokenizer_identity
from perceptio.curate.distributor import RayConfig, ShardJob, TeacherSpec, ray_session, run_shards
from perceptio.curate.marked_points import MarkedPointsConfig
from perceptio.curate.output import dataset_out, prepare_out, write_interop_files
from perceptio.curate.placement import Placement, place
from perceptio.curate.plan import ade_images, plan_shards, refer_images
from perceptio.curate.sample_builder import BuildConfig
from perceptio.curate.writer import check_resumable, done_shards, write_dataset_json, write_manifest
from perceptio.errors import PerceptioError
from perceptio.progress import ProgressLog
from perceptio.shards import ManifestRow
from perceptio.sources.problems import Problem
from perceptio.tokenize.cache import default_cache_dir

REFER_DATASETS = {"refcoco": "unc", "refcoco+": "unc", "refcocog": "umd"}  # dataset -> default --split-by
ADE20K = "ade20k"
PERCEPTION_CONTENTS = "one sample per image (jpg, depth.npy, depth_tokens.npy, json)"  # for the dataset card
# Reader problems that concern an annotation's geometry, not a ref: the ref itself is reported
# (rejected in its shard, or as an unknown_annotation row) so these would count it twice.
_GEOMETRY_PROBLEMS = ("empty_segmentation", "degenerate_polygon", "malformed_segmentation", "missing_image")


@dataclass
class CurationRequest:
    """Everything one ``perceptio-curate <dataset>`` run needs; the command's option defaults are its
    field defaults (and those of TeacherSpec, RayConfig and BuildConfig)."""

    dataset: str  # "refcoco" | "refcoco+" | "refcocog" | "ade20k"
    data_root: str | Path  # a folder, or an object-store URL such as s3://bucket/coco (perceptio.fs)
    out: str | Path  # a folder, or an object-store URL such as s3://bucket/shards (perceptio.fs)
    tokenizer: Path
    teacher: TeacherSpec = field(default_factory=TeacherSpec)
    split_by: str | None = None
    splits: list[str] | None = None  # None: every official split present, each into its own shards
    samples_per_shard: int = 1000
    batch_size: int = 8
    ray: RayConfig = field(default_factory=RayConfig)
    build: BuildConfig = field(default_factory=BuildConfig)
    overwrite: bool = False
    progress: bool = True


@dataclass
class CurationSummary:
    out: str | Path
    shards: list[str]  # every shard of the dataset
    redone: list[str]  # the shards this run wrote (the others were finished before)
    info: dict[str, Any]  # dataset.json
    images: int  # images processed by this run
    seconds: float  # wall time of the pipeline (Ray start-up excluded when Ray was already running)
    first_result_s: float | None  # from start until the first shard was written


def _read_dataset(request: CurationRequest) -> tuple[str, dict[str, list], list]:
    """(dataset name, images per split, reader problems) for the requested splits."""
    if request.dataset == ADE20K:
        from perceptio.sources.ade20k import SPLIT_ALIASES, ADE20kDataset

        reader = ADE20kDataset(request.data_root)
        splits = [SPLIT_ALIASES.get(split, split) for split in request.splits or reader.splits]
        return ADE20K, {split: ade_images(reader, split) for split in splits}, reader.problems
    if request.dataset not in REFER_DATASETS:
        raise PerceptioError(f"unknown dataset {request.dataset!r}; expected one of {', '.join([*REFER_DATASETS, ADE20K])}")
    from perceptio.sources.refer import ReferDataset

    reader = ReferDataset(request.data_root, request.dataset, request.split_by or REFER_DATASETS[request.dataset])
    splits = request.splits or reader.splits
    return reader.name, {split: refer_images(reader, split) for split in splits}, reader.problems


def _problem_rows(dataset: str, problems: list[Problem]) -> list[ManifestRow]:
    return [ManifestRow.from_problem(dataset, problem) for problem in problems if problem.kind not in _GEOMETRY_PROBLEMS]


def _placement(request: CurationRequest) -> Placement:
    """Where the models run on the cluster Ray reached, said on stderr in one line (+ a warning)."""
    import ray

    resources = ray.cluster_resources()
    placement = place(request.ray, request.teacher, resources.get("GPU", 0.0), resources.get("CPU", 0.0))
    print(placement.summary, file=sys.stderr, flush=True)
    if placement.warning:
        print(f"warning: {placement.warning}", file=sys.stderr, flush=True)
    return placement


def curate(request: CurationRequest) -> CurationSummary:
    """Curate one dataset into ``request.out``/NAME (:func:`dataset_out`); finished shards of an earlier
    run are kept (resume)."""
    if request.dataset == ADE20K and request.split_by:
        raise PerceptioError("--split-by applies to RefCOCO/+/g only")
    if request.batch_size < 1:
        raise PerceptioError(f"--batch-size must be >= 1, got {request.batch_size}")
    request.tokenizer = resolve_tokenizer(request.tokenizer)  # a hub id: its cached snapshot
    request.teacher.check()
    name, images_by_split, problems = _read_dataset(request)
    shards = plan_shards(images_by_split, request.samples_per_shard)
    tokenizer = tokenizer_identity(request.tokenizer)
    teacher = request.teacher
    settings = {
        "dataset": name,
        "splits": list(images_by_split),
        "samples_per_shard": request.samples_per_shard,
        "batch_size": request.batch_size,
        "tokenizer": tokenizer["identity"],
        "teacher_source": teacher.source if teacher.source == "gt" else f"model:{teacher.model}",
        "build": dataclasses.asdict(request.build),
    }
    out_folder = dataset_out(request.out, name)
    out = str(out_folder)
    prepare_out(out, name, request.overwrite)
    done = done_shards(out, [shard.name for shard in shards])
    expected_teacher = check_resumable(out, done, settings)
    todo = [shard for shard in shards if shard.name not in set(done)]
    jobs = [ShardJob(shard, out, settings, expected_teacher, request.build, teacher, str(request.tokenizer),
                     request.batch_size) for shard in todo]

    total = sum(len(shard.images) for shard in todo)
    started = time.perf_counter()
    first_result_s = None
    images = samples = rejected = 0
    teachers = {expected_teacher} - {None}
    with ProgressLog(f"curate {name}", total, unit="images", enabled=request.progress) as progress:
        if jobs:
            with ray_session(request.ray):
                placement = _placement(request)
                for finished in run_shards(jobs, placement.config):
                    if first_result_s is None:
                        first_result_s = time.perf_counter() - started
                    images, samples, rejected = (images + finished.images, samples + finished.samples,
                                                 rejected + finished.refs_rejected)
                    teachers |= {finished.teacher} - {None}
                    progress.update(images, written=samples, rejected=rejected)
    if len(teachers) > 1:  # each task checked against the finished shards; this catches a change between tasks
        raise PerceptioError(f"shards in {out} come from different teachers {sorted(teachers)}; use --overwrite")
    file_metadata = {"dataset": name, "tokenizer": tokenizer["identity"], "teacher": next(iter(teachers), None),
                     "perceptio_version": perceptio.__version__}
    manifest = write_manifest(out, shards, _problem_rows(name, problems), file_metadata)
    seconds = time.perf_counter() - started
    info = write_dataset_json(out, shards, manifest, tokenizer, settings)
    write_interop_files(out, shards, info, PERCEPTION_CONTENTS)
    return CurationSummary(out_folder, [shard.name for shard in shards], [shard.name for shard in todo], info, total,
                           seconds, first_result_s)


# ----------------------------------------------------------------------------------- Typer


def _run(request: CurationRequest) -> None:
    """Curate and print one line per split."""
    summary = curate(request)
    splits = summary.info["splits"]
    for split_name, counts in splits.items():
        rejects = ", ".join(f"{reason} {count}" for reason, count in counts["rejects"].items()) or "none"
        refs = f", {counts['refs_kept']} refs kept" if request.dataset != ADE20K else ""
        typer.echo(f"{summary.info['settings']['dataset']} {split_name}: {counts['samples']} samples from "
                   f"{counts['images']} images{refs}, rejected: {rejects}")
    typer.echo(f"{len(summary.shards)} shards in {summary.out} ({len(summary.redone)} written by this run)")


def _command(dataset: str):
    """The Typer command for one dataset (the four differ only in the dataset and --split-by help)."""
    from perceptio.sources.refer import SPLIT_BYS

    split_by_help = (
        f"REFER split scheme: {' or '.join(SPLIT_BYS[dataset])} [default: {REFER_DATASETS[dataset]}]"
        if dataset in REFER_DATASETS else "not used for ADE20k"
    )

    def command(
        data_root: str = typer.Option(..., "--data-root", help="dataset root (REFER layout, or a folder holding ADEChallengeData2016): a folder or an object-store URL (s3://bucket/coco; on an object store, ADE20k's root must be the ADEChallengeData2016 folder if the store does not list folders)"),
        out: str = typer.Option(..., "--out", help="Shards folder or object-store URL (s3://bucket/shards; gs:// with gcsfs installed): this dataset goes to OUT/{dataset}-{split-by} (ade20k: OUT/ade20k), or to OUT itself when it is already that folder."),
        tokenizer: Path = typer.Option(..., "--tokenizer", help="depth tokenizer: a folder (perceptio-tokenize fit) or a hub id"),
        split: Optional[list[str]] = typer.Option(None, "--split", help="official split to curate (repeatable); default all, each into its own shards"),
        split_by: Optional[str] = typer.Option(None, "--split-by", help=split_by_help),
        depth_model: str = typer.Option(TeacherSpec.model, "--depth-model", help="Depth Anything model (hub id or local folder) used as the depth teacher"),
        depth_source: str = typer.Option(TeacherSpec.source, "--depth-source", help="'model' (the --depth-model teacher) or 'gt' (DATA_ROOT/depth/*.png ground truth)"),
        cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="depth cache of the model teacher, shared with perceptio-tokenize [default: $PERCEPTIO_CACHE/depth or ~/.cache/perceptio/depth]"),
        samples_per_shard: int = typer.Option(CurationRequest.samples_per_shard, "--samples-per-shard", help="images per shard"),
        batch_size: int = typer.Option(CurationRequest.batch_size, "--batch-size", help="images per teacher/tokenizer forward pass"),
        ray_address: Optional[str] = typer.Option(RayConfig.address, "--ray-address", help="attach to this Ray cluster (e.g. 'auto' or ray://host:10001); default: an embedded local Ray"),
        num_cpus: Optional[int] = typer.Option(RayConfig.num_cpus, "--num-cpus", help="CPUs of the embedded local Ray [default: all cores]"),
        model_workers: Optional[int] = typer.Option(RayConfig.model_workers, "--model-workers", min=1, help="shard tasks running at once, on any nodes (each loads one teacher + tokenizer) [default: GPUs x tasks per GPU, or 1 without GPUs]", show_default=False),
        num_gpus_per_worker: Optional[float] = typer.Option(RayConfig.num_gpus_per_worker, "--num-gpus-per-worker", min=0.0, help="GPUs per shard task (0: CPU, with a warning when GPUs exist; 0.5: two tasks share a GPU) [default: every GPU Ray finds, --actors-per-gpu tasks each]", show_default=False),
        actors_per_gpu: Optional[int] = typer.Option(RayConfig.actors_per_gpu, "--actors-per-gpu", min=1, help="shard tasks per GPU when --num-gpus-per-worker is not given [default: from the teacher's size: 1 Large, 2 Base, 4 Small]", show_default=False),
        captioner: str = typer.Option(BuildConfig.captioner, "--captioner", help="description writer: 'attributes' or package.module:ClassName"),
        questions_per_image: int = typer.Option(MarkedPointsConfig.questions_per_image, "--questions-per-image", min=0, help="ADE20k: marked-point questions per image (2-5 points on distinct objects each)"),
        hard_questions: bool = typer.Option(MarkedPointsConfig.balanced, "--hard-questions/--any-questions", help="ADE20k: balance each image's questions so that the lowest point, the largest object and the object reaching lowest are nearest about as often as chance"),
        mark_style: str = typer.Option(MarkedPointsConfig.mark_style, "--mark-style", help="ADE20k: how the questions' points are marked: 'hardblink' (red ring, letter in a white box) or 'coloured' (a disc in each letter's own colour, the letter inside, for models that cannot read small glyphs)"),
        overwrite: bool = typer.Option(CurationRequest.overwrite, "--overwrite", help="discard this dataset's earlier shards instead of resuming"),
        progress: bool = typer.Option(CurationRequest.progress, "--progress/--no-progress", help="show the live progress display"),
    ) -> None:
        teacher = TeacherSpec(
            source=depth_source,  # validated here, once (TeacherSpec.__post_init__)
            model=depth_model,
            depth_dir=str(fs.child(data_root, "depth")) if depth_source == "gt" else None,
            cache_dir=str(cache_dir or default_cache_dir()),
        )
        _run(CurationRequest(
            dataset=dataset,
            data_root=data_root,
            out=out,
            tokenizer=tokenizer,
            teacher=teacher,
            split_by=split_by,
            splits=list(split) if split else None,
            samples_per_shard=samples_per_shard,
            batch_size=batch_size,
            ray=RayConfig(address=ray_address, num_cpus=num_cpus, model_workers=model_workers,
                          num_gpus_per_worker=num_gpus_per_worker, actors_per_gpu=actors_per_gpu),
            build=BuildConfig(captioner=captioner, marked_points=MarkedPointsConfig(
                questions_per_image=questions_per_image, balanced=hard_questions,
                mark_style=mark_style)),
            overwrite=overwrite,
            progress=progress,
        ))

    title = "ADE20k scenes" if dataset == ADE20K else dataset.replace("refcoco", "RefCOCO")
    command.__doc__ = (
        f"Curate {title} into WebDataset shards with masks, depth maps, depth tokens and descriptions. "
        "Re-running resumes: only shards without their _stats.json marker are redone."
    )
    return command


def register(app: typer.Typer) -> None:
    """Add the refcoco, refcoco+, refcocog and ade20k commands to the ``perceptio-curate`` app."""
    for dataset in (*REFER_DATASETS, ADE20K):
        app.command(dataset)(_command(dataset))
