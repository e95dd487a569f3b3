"""``perceptio-inspect``: summarise, validate and look at curated shards.

Tables and pictures for people; ``--json`` on every subcommand for scripts. Progress goes to
stderr, so ``--json`` output on stdout stays parseable.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from perceptio.errors import PerceptioError, run_cli
from perceptio.inspect.folder import (
    decode_depth,
    find_sample,
    load_tokenizer,
    open_folders,
    random_samples,
    recorded_tokenizer,
)
from perceptio.inspect.render import dialogue_lines, missing_parts, render_grid, render_sample, save_png
from perceptio.inspect.summary import mask_area_fraction, render_tables, summaries_json, summarise
from perceptio.inspect.validate import Report, load_expectations, render_report, validate
from perceptio.shards import CONVERSATION_FIELD, GROUNDED_FIELD, QUESTION_FIELD, ShardSample
from perceptio.tokens import DEFAULT_NUM_CODES

app = typer.Typer(
    help="Summarise, validate and render perceptio shards (the output of perceptio-curate).",
    no_args_is_help=True,
    add_completion=False,
)
console = Console()
progress_console = Console(stderr=True)

SHARDS_ARGUMENT = typer.Argument(
    ...,
    help="Shard folder written by perceptio-curate, a folder of such folders (one per dataset), or one .tar.",
    show_default=False,
)
JSON_OPTION = typer.Option(False, "--json", help="Print machine-readable JSON on stdout instead of tables.")
TOKENIZER_OPTION = typer.Option(
    None,
    "--tokenizer",
    help="Depth tokenizer folder (config.json + model.safetensors). Default: the path recorded in dataset.json.",
)


def _print_json(payload: Any) -> None:
    typer.echo(json.dumps(payload, indent=2, default=str))


def _with_progress(description: str, total: int, work: Callable[[Callable[[], None]], Any]) -> Any:
    """Run ``work(advance)`` under a progress bar on stderr (hidden when stderr is not a terminal)."""
    columns = (TextColumn(description), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    hidden = not progress_console.is_terminal
    with Progress(*columns, console=progress_console, transient=True, disable=hidden) as progress:
        task = progress.add_task(description, total=total)
        return work(lambda: progress.advance(task))


@app.command()
def summary(shards: Path = SHARDS_ARGUMENT, as_json: bool = JSON_OPTION) -> None:
    """Tables per dataset and split: counts, rejects, depth-token use, distributions, disk size.

    Shards, images, refs, sentences, rejects by reason, depth tokens per sample, the depth-token
    histogram and codebook usage, mask-area and expression-length distributions, and disk size.
    Counts of rejects come from manifest.parquet (or the per-shard tables); the rest from the tars.
    """
    folders = open_folders(shards)

    def work(advance: Callable[[], None]) -> list:
        summaries = []
        for folder in folders:
            num_codes = recorded_tokenizer(folder.dataset_info).num_codes or DEFAULT_NUM_CODES
            summaries += summarise(folder, num_codes, advance)
        return summaries

    summaries = _with_progress("reading shards", sum(len(folder.shards) for folder in folders), work)
    if as_json:
        folder_info = [{"root": str(folder.root), "dataset_json": folder.dataset_info} for folder in folders]
        _print_json({"folders": folder_info, "splits": summaries_json(summaries)})
    else:
        render_tables(summaries, console)


@app.command("validate")
def validate_command(
    shards: Path = SHARDS_ARGUMENT,
    tokenizer_dir: Optional[Path] = TOKENIZER_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Decode and check every sample; exit code 1 when anything is wrong, 0 when clean.

    Checks member keys, the json schema, mask RLE size against the image size, depth-token range and
    length, depth shape and dtype, duplicate keys across shards, done markers, and that the
    per-shard tables and manifest.parquet agree with the tars.
    """
    folders = open_folders(shards)
    tokenizer = load_tokenizer(tokenizer_dir, folders[0])[0] if tokenizer_dir else None

    def work(advance: Callable[[], None]) -> Report:
        return Report.merged([validate(folder, load_expectations(folder, tokenizer), advance) for folder in folders])

    report = _with_progress("validating", sum(len(folder.shards) for folder in folders), work)
    if as_json:
        _print_json(report.to_json())
    else:
        render_report(report, console)
    raise typer.Exit(0 if report.ok else 1)


@contextmanager
def _damage_is_an_error(keys: str) -> Iterator[None]:
    """A sample that cannot be drawn (an image that does not decode, a bad mask) is a one-line error."""
    try:
        yield
    except (OSError, ValueError, KeyError, TypeError) as error:
        message = f"cannot draw {keys}: {type(error).__name__}: {error} (run `perceptio-inspect validate`)"
        raise PerceptioError(message) from error


def _metadata_tables(sample: ShardSample, shard_name: str, index: int) -> list[Table]:
    meta = sample.meta
    overview = Table(title=sample.key, show_header=False)
    overview.add_column("field", style="bold")
    overview.add_column("value")
    for field, value in (
        ("shard", f"{shard_name} (sample {index} of the folder)"),
        ("dataset / split", f"{meta.get('dataset')} / {meta.get('split')}"),
        ("image", f"{meta.get('file_name')} ({meta.get('width')}x{meta.get('height')}, id {meta.get('image_id')})"),
        ("teacher", str(meta.get("teacher"))),
        ("tokenizer", str(meta.get("tokenizer"))),
        ("depth tokens", " ".join(str(int(code)) for code in sample.depth_tokens) if sample.depth_tokens is not None
         else "none"),
    ):
        overview.add_row(field, value)
    for part, reason in missing_parts(sample).items():
        overview.add_row(f"no {part}", reason)
    question = meta.get(QUESTION_FIELD)
    if question:
        overview.add_row("question", str(question.get("text")))
        overview.add_row("answer", str(question.get("answer")))
    tables = [overview]
    dialogue = dialogue_lines(sample)
    if dialogue:
        turns = Table(title=CONVERSATION_FIELD if meta.get(CONVERSATION_FIELD) else GROUNDED_FIELD, show_header=False)
        turns.add_column("text", overflow="fold")
        for text, _, _ in dialogue:
            turns.add_row(text)
        tables.append(turns)
    refs = meta.get("refs") or []
    if refs:
        ref_table = Table(title="refs")
        for column in ("#", "ref", "category", "mask area", "depth", "expressions", "description"):
            ref_table.add_column(column, overflow="fold")
        for number, ref in enumerate(refs, start=1):
            depth = ref.get("depth") or {}
            ref_table.add_row(
                str(number),
                str(ref.get("ref_id")),
                str(ref.get("category")),
                f"{mask_area_fraction(ref['mask']):.1%}" if "mask" in ref else "-",
                f"rank {depth.get('rank')}, median {depth.get('median', float('nan')):+.2f}",
                "\n".join(str(s.get("sent")) for s in ref.get("sentences") or []),
                str(ref.get("description", "")),
            )
        tables.append(ref_table)
    return tables


@app.command()
def show(
    shards: Path = SHARDS_ARGUMENT,
    key: Optional[str] = typer.Option(None, "--key", help="Sample key, e.g. refcoco-unc_train_000000581857."),
    index: Optional[int] = typer.Option(
        None, "--index", help="Position of the sample in the folder (0-based, shards in name order)."
    ),
    out: Path = typer.Option(Path("sample.png"), "--out", help="Where to write the picture (PNG)."),
    tokenizer_dir: Optional[Path] = TOKENIZER_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Print one sample's metadata and draw it (--out).

    The picture: the image with each ref's mask, expressions and description; the teacher depth and
    the depth decoded from the tokens side by side with a colour bar; for ADE20k the marked image
    with its answer; for a conversation its turns, for a grounded caption its phrases with their
    masks. Without a tokenizer only the teacher depth is drawn; a sample without an image (a text-only
    conversation) or without depth members gets a grey panel that says what is missing.
    """
    folder, shard, sample, position = find_sample(open_folders(shards), key=key, index=index)
    tokenizer, tokenizer_note = load_tokenizer(tokenizer_dir, folder)
    decoded = None
    if sample.depth_tokens is None:
        tokenizer_note = "no depth tokens to decode (the sample has no depth members)"
    elif tokenizer is not None:
        decoded = decode_depth(tokenizer, sample.depth_tokens)
    with _damage_is_an_error(sample.key):
        picture = render_sample(sample, decoded, tokenizer_note)
    save_png(picture, out)
    if as_json:
        _print_json(
            {
                "key": sample.key,
                "shard": shard.path.name,
                "index": position,
                "meta": sample.meta,
                "depth_tokens": sample.depth_tokens.tolist() if sample.depth_tokens is not None else None,
                "decoded_depth": decoded is not None,
                "missing": missing_parts(sample),
                "tokenizer": tokenizer_note,
                "out": str(out),
                "size": list(picture.size),
                "panels": picture.panels,
            }
        )
        return
    for table in _metadata_tables(sample, shard.path.name, position):
        console.print(table)
    console.print(tokenizer_note)
    console.print(f"wrote {out} ({picture.size[0]}x{picture.size[1]})")


@app.command()
def grid(
    shards: Path = SHARDS_ARGUMENT,
    n: int = typer.Option(16, "--n", min=1, help="How many random samples to draw."),
    columns: int = typer.Option(4, "--columns", min=1, help="Cells per row."),
    seed: int = typer.Option(0, "--seed", help="Random seed: the same seed draws the same samples."),
    out: Path = typer.Option(Path("grid.png"), "--out", help="Where to write the contact sheet (PNG)."),
    as_json: bool = JSON_OPTION,
) -> None:
    """A contact sheet of random samples: each image with its masks (or marked points) and its depth.

    A sample without an image or without depth gets a grey cell part that says so.
    """
    picked = random_samples(open_folders(shards), n, seed)
    with _damage_is_an_error(", ".join(sample.key for _, _, sample in picked)):
        picture = render_grid([sample for _, _, sample in picked], columns)
    save_png(picture, out)
    if as_json:
        samples = [{"index": at, "shard": shard.path.name, "key": sample.key} for at, shard, sample in picked]
        _print_json({"out": str(out), "size": list(picture.size), "samples": samples, "panels": picture.panels})
    else:
        console.print(f"wrote {out} ({picture.size[0]}x{picture.size[1]}): {len(picked)} random samples")


main = run_cli(app)
