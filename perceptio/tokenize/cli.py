"""``perceptio-tokenize``: fit, evaluate and apply the depth VQ-VAE tokenizer.

``fit`` runs the depth teacher (through the depth cache) over a dataset's images, trains the
tokenizer, evaluates it on a held-out split and saves it; rerun with the same ``--out`` and it
resumes from its last checkpoint. ``eval`` scores a saved tokenizer; ``encode`` / ``decode`` handle
single files. Progress goes to stderr; results to stdout.
"""

from __future__ import annotations

import dataclasses
import json
import re
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import typer
from PIL import Image
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from perceptio import fs
from perceptio.errors import PerceptioError, run_cli
from perceptio.io import atomic_path, write_text_atomic
from perceptio.tokenize.cache import DepthCache, default_cache_dir
from perceptio.tokenize.data import DepthSource, MaskSource, list_images, path_order, split_held_out
from perceptio.tokenize.config import DEPTH_SOURCES, DepthDataConfig, DepthVQVAEConfig, FitConfig
from perceptio.tokenize.fit import evaluate, evaluate_pairs, train
from perceptio.tokenize.metrics import codebook_usage
from perceptio.tokenize.teacher import (
    DEFAULT_DEPTH_ENCODING,
    DEPTH_ENCODINGS,
    OracleTeacher,
    PipelineTeacher,
    inverse_depth_from_metres,
    read_depth_png,
)
from perceptio.tokenize.vqvae import DepthVQVAE
from perceptio.tokens import depth_codes_in, depth_span

app = typer.Typer(
    help="Fit, evaluate and apply the depth VQ-VAE tokenizer (inverse depth <-> 10x10 codes).",
    no_args_is_help=True,
    add_completion=False,
)
console = Console()
progress_console = Console(stderr=True)

FIT_RECORD = "fit.json"
METRICS_RECORD = "metrics.json"


class Dataset(str, Enum):
    refcoco = "refcoco"
    refcoco_plus = "refcoco+"
    refcocog = "refcocog"
    ade20k = "ade20k"
    synth = "synth"


# The choices of --depth-source, from the config's one list.
DepthSourceName = Enum("DepthSourceName", {name: name for name in DEPTH_SOURCES}, type=str)


class HeldOut(str, Enum):
    held_out = "held-out"
    all = "all"


DATA_ROOT_OPTION = typer.Option(
    ..., "--data-root", help="Folder with the dataset (the synthetic world's root for synth), or an object-store URL (s3://bucket/world)."
)
DATASET_OPTION = typer.Option(
    Dataset.synth, "--dataset", help="Whose images: REFER train images, ADE20k training images, or the whole synthetic world."
)
DEPTH_MODEL_OPTION = typer.Option(
    DepthDataConfig.depth_model, "--depth-model", help="Depth Anything hub id or local folder (used with --depth-source model)."
)
DEPTH_SOURCE_OPTION = typer.Option(
    DepthSourceName(DepthDataConfig.depth_source),
    "--depth-source",
    help="'model': run the depth teacher; 'gt': read DATA_ROOT/depth/{stem}.png (uint16 mm), the synthetic world's ground truth.",
)
CACHE_OPTION = typer.Option(
    None, "--cache-dir", help="Depth cache folder shared with perceptio-curate. Default: ~/.cache/perceptio/depth."
)
DEVICE_OPTION = typer.Option(None, "--device", help="cuda or cpu. Default: cuda when available.")
TEACHER_BATCH_OPTION = typer.Option(DepthDataConfig.teacher_batch_size, "--teacher-batch-size", min=1, help="Images per depth-teacher forward.")
DEPTH_ENCODING_OPTION = typer.Option(
    DEFAULT_DEPTH_ENCODING, "--depth-encoding", help=f"How a depth PNG stores metres: {', '.join(DEPTH_ENCODINGS)}."
)
TOKENIZER_OPTION = typer.Option(..., "--tokenizer", help="Tokenizer folder (config.json + model.safetensors).")
THREADS_OPTION = typer.Option(
    0, "--threads", min=0, help="CPU threads for torch (0: torch's default). On a machine busy with other work, 1 is often fastest."
)


def _set_threads(threads: int) -> None:
    if threads:
        torch.set_num_threads(threads)


def _progress() -> Progress:
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    return Progress(*columns, TextColumn("{task.fields[status]}"), console=progress_console, transient=False)


def _make_source(
    source: DepthSourceName,
    depth_model: str,
    data_root: str | Path,
    cache_dir: Optional[Path],
    device: Optional[str],
    batch_size: int,
) -> DepthSource:
    """The ground truth of DATA_ROOT/depth, or the depth model behind the shared depth cache."""
    if source is DepthSourceName.gt:
        return DepthSource(OracleTeacher(fs.child(data_root, "depth")), cache=None)
    teacher = PipelineTeacher(depth_model, device=device, batch_size=batch_size)
    return DepthSource(teacher, DepthCache(cache_dir or default_cache_dir()))


def _depths_with_progress(
    source: DepthSource, paths: Sequence[Path], batch_size: int, description: str, keep: Callable[[list[np.ndarray]], Any]
) -> list[Any]:
    """Depth of every path in batches, each batch reduced by ``keep`` (so raw maps need not pile up)."""
    kept: list[Any] = []
    with _progress() as progress:
        task = progress.add_task(description, total=len(paths), status="")
        for start in range(0, len(paths), batch_size):
            batch = paths[start : start + batch_size]
            kept.append(keep(source.depths(batch)))
            progress.update(task, advance=len(batch))
            if source.cache is not None:
                progress.update(task, status=f"cache hits {source.cache.hits}, teacher runs {source.cache.misses}")
    return kept


def _render_metrics(title: str, rows: dict[str, dict[str, float]]) -> None:
    table = Table(title=title)
    for column in ("set", "images", "AbsRel", "RMSE", "delta<1.25", "codes used", "perplexity"):
        table.add_column(column, justify="right" if column != "set" else "left")
    for name, values in rows.items():
        table.add_row(
            name,
            str(values["images"]),
            f"{values['abs_rel']:.4f}",
            f"{values['rmse']:.4f}",
            f"{values['delta1']:.4f}",
            f"{values['codes_used']} ({values['usage']:.0%})",
            f"{values['perplexity']:.1f}",
        )
    console.print(table)


@app.command()
def fit(
    data_root: str = DATA_ROOT_OPTION,
    datasets: list[Dataset] = typer.Option(
        [Dataset.synth], "--dataset",
        help="Whose images (repeat for several: one tokenizer for all of them; images they share count once): "
        "REFER train images, ADE20k training images, or the whole synthetic world.",
    ),
    out: Path = typer.Option(..., "--out", help="Tokenizer folder to write (and to resume from)."),
    depth_model: str = DEPTH_MODEL_OPTION,
    depth_source: DepthSourceName = DEPTH_SOURCE_OPTION,
    cache_dir: Optional[Path] = CACHE_OPTION,
    steps: int = typer.Option(FitConfig.steps, "--steps", min=1, help="Optimiser steps."),
    batch_size: int = typer.Option(FitConfig.batch_size, "--batch-size", min=1, help="Maps per step."),
    learning_rate: float = typer.Option(FitConfig.learning_rate, "--lr", help="Peak AdamW learning rate (cosine decay)."),
    num_codes: int = typer.Option(DepthVQVAEConfig.num_codes, "--num-codes", min=2, help="Codebook size K."),
    code_dim: int = typer.Option(DepthVQVAEConfig.code_dim, "--code-dim", min=1, help="Dimension of each code vector."),
    held_out_fraction: float = typer.Option(DepthDataConfig.held_out_fraction, "--held-out", min=0.0, max=0.9, help="Share of images held out for evaluation (by stem hash)."),
    max_images: Optional[int] = typer.Option(None, "--max-images", min=2, help="Fit on at most this many images (a fixed subset)."),
    device: Optional[str] = DEVICE_OPTION,
    teacher_batch_size: int = TEACHER_BATCH_OPTION,
    seed: int = typer.Option(FitConfig.seed, "--seed", help="Seed of every random draw of the fit."),
    threads: int = THREADS_OPTION,
) -> None:
    """Fit a depth tokenizer on the teacher depth of one or more datasets, evaluate it on held-out images, save it to --out."""
    _set_threads(threads)
    names = list(dict.fromkeys(dataset.value for dataset in datasets))
    paths = sorted({path for name in names for path in list_images(data_root, name)}, key=path_order)
    if max_images is not None:
        paths = paths[:max_images]
    train_paths, held_out_paths = split_held_out(paths, held_out_fraction)
    source = _make_source(depth_source, depth_model, data_root, cache_dir, device, teacher_batch_size)
    tokenizer_config = DepthVQVAEConfig(num_codes=num_codes, code_dim=code_dim)
    fit_config = FitConfig(steps=steps, batch_size=batch_size, learning_rate=learning_rate, seed=seed)
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "dataset": "+".join(names),
        "datasets": names,
        "data_root": data_root if fs.is_remote(data_root) else str(Path(data_root).resolve()),
        "teacher": source.teacher.identity,
        "depth_source": depth_source.value,
        "held_out_fraction": held_out_fraction,
        "train_images": len(train_paths),
        "held_out_images": [fs.name(path) for path in held_out_paths],
        "fit_config": dataclasses.asdict(fit_config),
    }
    write_text_atomic(out / FIT_RECORD, json.dumps(record, indent=2) + "\n")

    normalizer = DepthVQVAE(tokenizer_config)  # normalisation needs only the config, not weights
    maps = torch.cat(
        _depths_with_progress(
            source, train_paths, teacher_batch_size, "teacher depth (train)", lambda depths: normalizer.pool(normalizer.normalize(depths)).half()
        )
    )
    with _progress() as progress:
        task = progress.add_task("fitting tokenizer", total=fit_config.steps, status="")

        def on_step(step: int, losses: dict[str, float]) -> None:
            progress.update(task, completed=step, status=f"mse {losses['mse']:.4f} commit {losses['commit']:.4f}")

        model = train(maps, tokenizer_config, fit_config, out, on_step=on_step, device=device)
    model.save_pretrained(out)

    train_codes = torch.cat([model.encode_pooled(maps[start : start + 256].float()) for start in range(0, len(maps), 256)])
    results = {"train codebook": codebook_usage(train_codes, num_codes)}
    if held_out_paths:
        depths = _depths_with_progress(source, held_out_paths, teacher_batch_size, "teacher depth (held out)", list)
        results["held-out"] = evaluate(model, [depth for batch in depths for depth in batch])
        _render_metrics(f"{out}: held-out reconstruction ({' + '.join(names)})", {"held-out": results["held-out"]})
    write_text_atomic(out / METRICS_RECORD, json.dumps({"identity": model.identity, **results}, indent=2) + "\n")
    usage = results["train codebook"]
    console.print(f"codes used on train: {usage['codes_used']}/{num_codes}, perplexity {usage['perplexity']:.1f}")
    console.print(f"saved {model.identity} to {out}")


@app.command("eval")
def eval_command(
    tokenizer: Path = typer.Argument(..., help="Tokenizer folder written by fit."),
    data_root: Optional[Path] = typer.Option(None, "--data-root", help="Dataset folder (not needed with --depth-png only)."),
    dataset: Dataset = DATASET_OPTION,
    split: HeldOut = typer.Option(HeldOut.held_out, "--split", help="'held-out': the images fit held out (same stem-hash rule); 'all': every image."),
    depth_model: str = DEPTH_MODEL_OPTION,
    depth_source: DepthSourceName = DEPTH_SOURCE_OPTION,
    cache_dir: Optional[Path] = CACHE_OPTION,
    depth_png: Optional[list[Path]] = typer.Option(None, "--depth-png", help="Metric depth PNG(s) to score instead of / besides a dataset."),
    depth_encoding: str = DEPTH_ENCODING_OPTION,
    device: Optional[str] = DEVICE_OPTION,
    teacher_batch_size: int = TEACHER_BATCH_OPTION,
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    pairs: bool = typer.Option(True, "--pairs/--no-pairs", help="Also score object-pair order: of the object pairs (synth instances, REFER ref masks, ADE20k thing segments) whose teacher depths differ by > 5%, the share whose order the reconstruction keeps."),
    threads: int = THREADS_OPTION,
) -> None:
    """Score a tokenizer's round trip (AbsRel, RMSE, delta<1.25 after scale-and-shift; codebook use)
    and, on a dataset, the near/far order of its object pairs."""
    _set_threads(threads)
    model = DepthVQVAE.from_pretrained(tokenizer, device=device)
    rows: dict[str, dict[str, float]] = {}
    pair_rows: dict[str, dict[str, Any]] = {}
    if data_root is not None:
        paths = list_images(data_root, dataset.value)
        if split is HeldOut.held_out:
            fraction = _recorded_held_out_fraction(tokenizer)
            paths = split_held_out(paths, fraction)[1]
        source = _make_source(depth_source, depth_model, data_root, cache_dir, device, teacher_batch_size)
        depths = [depth for batch in _depths_with_progress(source, paths, teacher_batch_size, f"teacher depth ({split.value})", list)
                  for depth in batch]
        name = f"{dataset.value} {split.value}"
        rows[name] = evaluate(model, depths)
        mask_source = MaskSource(data_root, dataset.value) if pairs else None
        if mask_source is not None and not mask_source.available:
            progress_console.print(f"no object masks under {data_root} (no instances/): object pairs not scored")
        elif mask_source is not None:
            pair_rows[name] = evaluate_pairs(model, depths, (mask_source.masks(path) for path in paths))
    if depth_png:
        for path in depth_png:
            rows[path.name] = evaluate(model, [inverse_depth_from_metres(read_depth_png(path, depth_encoding))])
    if not rows:
        raise PerceptioError("nothing to evaluate: give --data-root and/or --depth-png")
    if as_json:
        typer.echo(json.dumps({"identity": model.identity, **rows, **({"object_pairs": pair_rows} if pair_rows else {})}, indent=2))
    else:
        _render_metrics(f"{model.identity}", rows)
        if pair_rows:
            _render_pairs(pair_rows)


def _render_pairs(rows: dict[str, dict[str, Any]]) -> None:
    table = Table(title="object pairs whose depths differ by > 5%: share whose near/far order is kept")
    for column in ("set", "images", "pairs", "decoded", "normalised input", "lower is nearer"):
        table.add_column(column, justify="right" if column != "set" else "left")
    for name, values in rows.items():
        shares = [values[key] for key in ("decoded", "normalised input", "lower is nearer")]
        table.add_row(name, str(values["images"]), str(values["pairs"]), *("-" if v is None else f"{v:.1%}" for v in shares))
    console.print(table)


def _recorded_held_out_fraction(tokenizer: Path) -> float:
    record = tokenizer / FIT_RECORD
    if not record.is_file():
        raise PerceptioError(f"{tokenizer}: no {FIT_RECORD} (not written by fit); use --split all")
    return float(json.loads(record.read_text(encoding="utf-8"))["held_out_fraction"])


def _is_depth_png(path: Path) -> bool:
    """16-bit single-channel PNGs are depth maps; anything else is a picture for the teacher."""
    with Image.open(path) as image:
        return image.mode in ("I;16", "I;16B", "I;16L", "I")


@app.command()
def encode(
    source_file: Path = typer.Argument(..., exists=True, dir_okay=False, help="An RGB image (run through the teacher) or a uint16 depth PNG."),
    tokenizer: Path = TOKENIZER_OPTION,
    depth_encoding: str = DEPTH_ENCODING_OPTION,
    depth_model: str = DEPTH_MODEL_OPTION,
    device: Optional[str] = DEVICE_OPTION,
    span: bool = typer.Option(False, "--span", help="Print [D_START][D_k]...[D_END] instead of the code numbers."),
    out: Optional[Path] = typer.Option(None, "--out", help="Also write the result to this text file."),
) -> None:
    """Print the 100 depth codes of one image or depth map (row-major 10x10)."""
    model = DepthVQVAE.from_pretrained(tokenizer, device=device)
    try:
        depth_file = _is_depth_png(source_file)
    except OSError as error:
        raise PerceptioError(f"{source_file}: unreadable image ({error})") from error
    if depth_file:
        depth = inverse_depth_from_metres(read_depth_png(source_file, depth_encoding))
    else:
        with Image.open(source_file) as image:
            depth = PipelineTeacher(depth_model, device=device).predict([image.convert("RGB")])[0]
    codes = model.encode(depth)[0].tolist()
    text = depth_span(codes) if span else " ".join(map(str, codes))
    typer.echo(text)
    if out is not None:
        write_text_atomic(out, text + "\n")


def parse_codes(text: str) -> list[int]:
    """Codes from '[D_START][D_012]...[D_END]' or from numbers separated by spaces / commas."""
    if "[D_" in text:
        return depth_codes_in(text)
    try:
        return [int(value) for value in re.split(r"[\s,]+", text.strip()) if value]
    except ValueError as error:
        raise PerceptioError(f"depth codes must be integers or [D_k] tokens ({error})") from error


@app.command()
def decode(
    tokens: str = typer.Argument(..., help="A text file of codes, or the codes themselves (numbers or [D_k] tokens)."),
    tokenizer: Path = TOKENIZER_OPTION,
    out: Path = typer.Option(..., "--out", help=".png: uint16, 0..65535 for -1..+1 (near = bright); .npy: float32 in [-1, 1]."),
) -> None:
    """Decode 100 depth codes into the tokenizer's normalised inverse-depth map (320x320)."""
    model = DepthVQVAE.from_pretrained(tokenizer)
    token_path = Path(tokens)
    codes = parse_codes(token_path.read_text(encoding="utf-8") if token_path.is_file() else tokens)
    if len(codes) != model.num_tokens:
        raise PerceptioError(f"need {model.num_tokens} depth codes, got {len(codes)}")
    depth = model.decode(torch.tensor(codes))[0].cpu().numpy()
    suffix = out.suffix.lower()
    if suffix not in (".png", ".npy"):
        raise PerceptioError(f"{out}: output must end in .png or .npy")
    with atomic_path(out) as temporary:
        if suffix == ".npy":
            with open(temporary, "wb") as handle:
                np.save(handle, depth.astype(np.float32))
        else:
            scaled = np.round((depth + 1) / 2 * 65535).astype(np.uint16)
            Image.fromarray(scaled).save(temporary, format="PNG")
    console.print(f"wrote {out}")


main = run_cli(app)
