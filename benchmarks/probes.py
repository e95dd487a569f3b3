"""What the link probes (``oracle_prompt.py``, ``seg_route.py``, ``span_reading.py``, ``cell_lookup.py``) share:
their data options, words, record and the short-span curriculum."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any


def probe_parser(description: str, steps: int, batch_size: int, lr: float) -> argparse.ArgumentParser:
    """Options every probe takes: the training and held-out referring shards, the budget, the record."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--shards", type=Path, required=True, help="referring shards to train on (split train)")
    parser.add_argument("--heldout-shards", type=Path, required=True, help="referring shards to score (split train)")
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--lr", type=float, default=lr)
    parser.add_argument("--heldout", type=int, default=200, help="held-out expressions scored")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the curve as JSON here")
    return parser


def words(text: str) -> list[str]:
    """The lower-case words of a prompt or an expression."""
    return re.findall(r"[a-z]+", text.lower())


def write_record(arguments: argparse.Namespace, **record: Any) -> None:
    """The probe's options and results as JSON at ``--out`` (nothing without it)."""
    if arguments.out is not None:
        options = {key: str(value) for key, value in vars(arguments).items()}
        arguments.out.write_text(json.dumps({"arguments": options, **record}, indent=2))


def parse_schedule(text: str) -> list[tuple[int, int]]:
    """``16:500,36:500`` -> [(16, 500), (36, 500)]: span lengths and how many steps each lasts."""
    try:
        stages = [tuple(int(number) for number in stage.split(":")) for stage in text.split(",") if stage]
    except ValueError:
        stages = [()]
    if not all(len(stage) == 2 and min(stage) > 0 for stage in stages):
        raise argparse.ArgumentTypeError(f"expected LENGTH:STEPS[,LENGTH:STEPS...], not {text!r}")
    return stages


def span_length_at(step: int, schedule: list[tuple[int, int]]) -> int | None:
    """The curriculum's span length at ``step`` (1-based); None once it is over (the full span)."""
    for length, steps in schedule:
        if step <= steps:
            return length
        step -= steps
    return None
