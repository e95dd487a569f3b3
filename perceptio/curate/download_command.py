"""``perceptio-curate download``: get the datasets' files into a DATA_ROOT (see perceptio/sources/download.py).

This module is the command line around :class:`~perceptio.sources.download.Downloader`: options,
a transfer display (a rich bar with bytes/s on a terminal, a plain line every few seconds
otherwise, so that logs of batch jobs stay readable) and the closing summary.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

PLAIN_INTERVAL_SECONDS = 10.0


def _megabytes(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"


class TransferDisplay:
    """One progress line per dataset: a rich bar on a terminal, periodic plain lines elsewhere."""

    def __init__(self, console: Console, interval: float = PLAIN_INTERVAL_SECONDS):
        self.console = console
        self.interval = interval
        self.progress: Progress | None = None
        if console.is_terminal:
            self.progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                console=console,
            )

    def __enter__(self) -> "TransferDisplay":
        if self.progress is not None:
            self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.stop()

    def log(self, line: str) -> None:
        self.console.print(line, markup=False, highlight=False)

    def start(self, label: str, total: int | None) -> Callable[[int], None]:
        if self.progress is not None:
            task = self.progress.add_task(label, total=total)
            return lambda n: self.progress.update(task, advance=n)  # type: ignore[union-attr]
        started = last = time.monotonic()
        done = 0

        def advance(n: int) -> None:
            nonlocal done, last
            done += n
            now = time.monotonic()
            if now - last >= self.interval:
                last = now
                of = f" of {_megabytes(total)} ({100 * done / total:.0f}%)" if total else ""
                self.log(f"{label}: {_megabytes(done)}{of}, {_megabytes(done / max(now - started, 1e-9))}/s")

        return advance


def register(app: typer.Typer) -> None:
    @app.command()
    def download(
        datasets: list[str] = typer.Argument(
            ..., help="Datasets to fetch: refcoco refcoco+ refcocog coco2014 ade20k hardblink (see manifests/downloads/)."
        ),
        root: Path = typer.Option(..., "--root", help="DATA_ROOT: the readers' layout is built here."),
        from_archives: Optional[Path] = typer.Option(
            None, "--from-archives", help="Use the archives already in this folder (same names, same checks) instead of downloading."
        ),
        images_dir: Optional[Path] = typer.Option(
            None,
            "--images-dir",
            help="An existing COCO train2014 folder: recorded in DATA_ROOT/perceptio-data.json for the readers; coco2014 is then skipped.",
        ),
        keep_archives: bool = typer.Option(False, "--keep-archives", help="Keep verified archives in DATA_ROOT/.downloads."),
        retries: int = typer.Option(5, "--retries", min=1, help="Failed attempts in a row per mirror before the next mirror."),
        manifest_dir: Optional[Path] = typer.Option(
            None, "--manifest-dir", help="Read the mirror lists from this folder instead of manifests/downloads (e.g. an internal mirror)."
        ),
    ) -> None:
        """Download, verify and unpack datasets into DATA_ROOT; a second run downloads nothing."""
        from perceptio.sources.download import Downloader, DownloadOptions

        console = Console(stderr=True)
        with TransferDisplay(console) as display:
            downloader = Downloader(
                root=root,
                options=DownloadOptions(retries=retries, keep_archives=keep_archives),
                manifest_dir=manifest_dir,
                from_archives=from_archives,
                log=display.log,
                start_progress=display.start,
            )
            reports = downloader.run(datasets, images_dir=images_dir)
        for report in reports:
            line = f"{report.dataset}: {report.installed} installed, {report.skipped} already there, {_megabytes(report.downloaded_bytes)} downloaded"
            if report.recorded:
                line += f"; no published checksum for {', '.join(report.recorded)}: sha256 recorded in {root / 'downloads.lock.json'}"
            Console().print(line, markup=False, highlight=False)
