"""``perceptio-curate``: make the synthetic world, and turn datasets into perception-token shards.

Each dataset command is a subcommand of this Typer app; the curation pipeline registers its
``refcoco|refcoco+|refcocog|ade20k`` commands from ``perceptio/curate/commands.py``.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from perceptio.errors import run_cli

app = typer.Typer(
    help="Curate RefCOCO/RefCOCO+/RefCOCOg and ADE20k (or the built-in synthetic world) into shards.",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def _group() -> None:
    """Curate RefCOCO/RefCOCO+/RefCOCOg and ADE20k (or the built-in synthetic world) into shards."""
    # A callback keeps this app a command group even while it has a single command.


@app.command()
def synth(
    out: Path = typer.Option(
        ...,
        "--out",
        help="DATA_ROOT to write the world into: a new or empty folder, or an earlier world, which is replaced.",
    ),
    images: int = typer.Option(
        200, "--images", min=1, help="Number of images; every 4th goes to ADE20k, the rest to COCO/RefCOCO."
    ),
    seed: int = typer.Option(0, "--seed", help="World seed; the same seed gives byte-identical files."),
    workers: int = typer.Option(
        2, "--workers", min=1, help="Processes that render images in parallel (the output does not depend on it)."
    ),
) -> None:
    """Write the synthetic world (RGB, metric depth, instances) in the RefCOCO/+/g and ADE20k layouts.

    Files follow docs/architecture.md: the REFER layout (images/mscoco/..., refcoco/, refcoco+/,
    refcocog/), ADEChallengeData2016/, depth/ and instances/ (16-bit PNG per image stem), and
    world.json (cameras, objects, which refs are deliberately ambiguous or duplicated).
    """
    from perceptio.sources.synth.world import check_out_dir, generate_world  # numpy-heavy: import when used

    check_out_dir(out)  # before the progress bar, so that bad input is a single line

    console = Console(stderr=True)
    with Progress(
        TextColumn("[bold]rendering"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
    ) as progress:
        task = progress.add_task("render", total=images)
        summary = generate_world(
            out, images=images, seed=seed, workers=workers, progress=lambda done: progress.update(task, completed=done)
        )
    table = Table(title=f"synthetic world in {summary.root} (seed {summary.seed}, {summary.seconds:.1f} s)")
    for column in ("part", "images", "refs", "sentences"):
        table.add_column(column)
    for dataset, refs in summary.refs.items():
        table.add_row(dataset, str(summary.coco_images), str(refs), str(summary.sentences[dataset]))
    for split, count in summary.ade_images.items():
        table.add_row(f"ADE20k {split}", str(count), "-", "-")
    Console().print(table)


from perceptio.curate.commands import register as _register_dataset_commands  # noqa: E402  (refcoco, refcoco+, refcocog, ade20k)

_register_dataset_commands(app)
main = run_cli(app)
