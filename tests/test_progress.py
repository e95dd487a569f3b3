"""Plain periodic progress lines when the output is not a terminal (perceptio/progress.py)."""

from __future__ import annotations

import io

from perceptio.progress import ProgressLog


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_non_terminal_stream_gets_a_line_every_n_seconds_and_one_at_the_end():
    stream, clock = io.StringIO(), Clock()
    with ProgressLog("train", 100, unit="steps", rate_unit="examples", rate_scale=8, stream=stream, every_s=30,
                     clock=clock) as progress:
        for step in range(1, 101):
            clock.now += 1.0  # one step per second
            progress.update(step, loss=2.0 / step)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 100 // 30 + 1  # at 30, 60, 90 s, then the final line
    assert lines[0].startswith("train: 30/100 steps (30%) | loss 0.0667 | 8.00 examples/s | ETA 0:01:10")
    assert lines[-1].startswith("train: 100/100 steps (100%) | loss 0.0200 | 8.00 examples/s | ETA 0:00:00")
    assert "\x1b" not in stream.getvalue()  # no terminal control codes in a log file


def test_resumed_runs_count_the_rate_from_where_they_resumed():
    stream, clock = io.StringIO(), Clock()
    with ProgressLog("train", 1000, unit="steps", stream=stream, every_s=10, completed=900, clock=clock) as progress:
        clock.now += 10
        progress.update(910)
    first = stream.getvalue().splitlines()[0]
    assert "910/1000 steps (91%)" in first and "1.00 steps/s" in first and "ETA 0:01:30" in first


def test_unknown_totals_and_disabled_progress():
    stream, clock = io.StringIO(), Clock()
    with ProgressLog("evaluate", None, unit="samples", stream=stream, every_s=5, clock=clock) as progress:
        clock.now += 5
        progress.update(3)
    assert stream.getvalue().splitlines()[0].startswith("evaluate: 3 samples | 0.60 samples/s | ETA ?")
    quiet = io.StringIO()
    with ProgressLog("evaluate", 3, stream=quiet, enabled=False, clock=clock) as progress:
        clock.now += 100
        progress.update(3)
    assert quiet.getvalue() == ""


def test_a_terminal_gets_the_live_bar_not_plain_lines():
    stream, clock = Terminal(), Clock()
    with ProgressLog("curate", 10, unit="images", stream=stream, every_s=0, clock=clock) as progress:
        for done in range(1, 11):
            clock.now += 1
            progress.update(done, written=done)
    assert "curate: 10/10 images" not in stream.getvalue()  # rich drew a bar instead
    assert "10/10" in stream.getvalue()
