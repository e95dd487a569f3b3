"""Progress of long work: a rich bar on a terminal, a plain line every N seconds otherwise.

A batch job's log (SLURM, nohup, CI) is not a terminal: a live bar writes nothing useful there, and
hours pass with an empty log. :class:`ProgressLog` draws rich's bar when its stream is a terminal and
otherwise prints one self-contained line every ``every_s`` seconds, and a last one at the end::

    train: 120/1000 steps (12%) | loss 1.2345 | 6.40 examples/s | ETA 0:45:10

Curation, training and evaluation report through it.
"""

from __future__ import annotations

import sys
import time
from datetime import timedelta
from typing import Any, Callable, TextIO

DEFAULT_EVERY_S = 30.0


def is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def _format_value(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


class ProgressLog:
    """``update(completed, **fields)`` as work advances; use as a context manager.

    ``rate_unit`` / ``rate_scale`` name what the rate counts: a training step of 8 examples is
    ``ProgressLog("train", steps, unit="steps", rate_unit="examples", rate_scale=8)``.
    """

    def __init__(
        self,
        name: str,
        total: int | None,
        unit: str = "items",
        rate_unit: str | None = None,
        rate_scale: float = 1.0,
        stream: TextIO | None = None,
        every_s: float = DEFAULT_EVERY_S,
        enabled: bool = True,
        completed: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name, self.total, self.unit = name, total, unit
        self.rate_unit, self.rate_scale = rate_unit or unit, rate_scale
        self.stream = stream if stream is not None else sys.stderr
        self.every_s, self.enabled, self.clock = every_s, enabled, clock
        self.first = self.completed = completed  # a resumed run counts its rate from where it resumed
        self.fields: dict[str, Any] = {}
        self.plain = not is_terminal(self.stream)
        self._bar: Any = None
        self._task: Any = None

    def __enter__(self) -> "ProgressLog":
        self.started = self.last_line = self.clock()
        if self.enabled and not self.plain:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(TextColumn(f"[bold]{self.name}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[text]}"), TimeRemainingColumn(),
                                 console=Console(file=self.stream))
            self._bar.__enter__()
            self._task = self._bar.add_task(self.name, total=self.total, completed=self.completed, text="")
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)
        elif self.enabled and self.plain:
            self._print()

    def update(self, completed: int, **fields: Any) -> None:
        self.completed = completed
        self.fields.update(fields)
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(self._task, completed=completed, text=self._fields_text())
        elif self.clock() - self.last_line >= self.every_s:
            self._print()

    def rate(self) -> float:
        """``rate_unit`` per second since the start (0 before any time has passed)."""
        elapsed = self.clock() - self.started
        return (self.completed - self.first) * self.rate_scale / elapsed if elapsed > 0 else 0.0

    def eta_s(self) -> float | None:
        elapsed = self.clock() - self.started
        done = self.completed - self.first
        if self.total is None or done <= 0 or elapsed <= 0:
            return None
        return (self.total - self.completed) * elapsed / done

    def line(self) -> str:
        total = f"/{self.total}" if self.total is not None else ""
        share = f" ({100 * self.completed / self.total:.0f}%)" if self.total else ""
        parts = [f"{self.name}: {self.completed}{total} {self.unit}{share}"]
        if self.fields:
            parts.append(self._fields_text())
        parts.append(f"{self.rate():.2f} {self.rate_unit}/s")
        eta = self.eta_s()
        parts.append(f"ETA {timedelta(seconds=round(eta))}" if eta is not None else "ETA ?")
        return " | ".join(parts)

    def _fields_text(self) -> str:
        return " | ".join(f"{key} {_format_value(value)}" for key, value in self.fields.items())

    def _print(self) -> None:
        print(self.line(), file=self.stream, flush=True)
        self.last_line = self.clock()
