"""What the link probes (``oracle_prompt.py``, ``seg_route.py``) share: their data options, words and record."""

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
