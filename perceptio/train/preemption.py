"""Stop cleanly when the scheduler asks: SIGTERM / SIGINT end the run at a step boundary.

SLURM and Kubernetes send SIGTERM (SLURM: ``--signal``; Kubernetes: before the grace period ends),
a user at a terminal sends SIGINT. The handler only records the signal; after every step the loop
sums the ranks' flags in the collective it makes anyway (every rank learns whether any rank was
signalled), so all ranks stop after the same step, write one checkpoint together and exit 0 with a
line that says how to resume. A second signal while the checkpoint is written is left to
the default action (a second Ctrl-C kills at once).

DataLoader workers ignore both signals (:func:`ignore_stop_signals`, their ``worker_init_fn``): a
terminal's Ctrl-C reaches the whole process group, and a worker that died with it would take the
step it was reading for down with it; the training process ends its workers itself.
"""

from __future__ import annotations

import shlex
import signal
import sys
from types import FrameType
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """Records SIGTERM / SIGINT while installed (a context manager) instead of dying of them."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _record(self, number: int, frame: FrameType | None) -> None:
        self.received = number
        for stop_signal, previous in self._previous.items():  # a second signal acts as usual
            signal.signal(stop_signal, previous)

    def __enter__(self) -> "StopRequest":
        for stop_signal in STOP_SIGNALS:
            self._previous[stop_signal] = signal.signal(stop_signal, self._record)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        for stop_signal, previous in self._previous.items():
            signal.signal(stop_signal, previous)
        self._previous.clear()

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else "a signal on another rank"


def ignore_stop_signals(_worker_id: int = 0) -> None:
    """``worker_init_fn`` of the DataLoader: its workers leave stopping to the training process."""
    for stop_signal in STOP_SIGNALS:
        signal.signal(stop_signal, signal.SIG_IGN)


def resume_command(argv: list[str] | None = None) -> str:
    """The command line that goes on from the newest checkpoint: this one, with ``--resume``."""
    args = list(sys.argv if argv is None else argv)
    if "--resume" not in args:
        args.append("--resume")
    return shlex.join(args)
