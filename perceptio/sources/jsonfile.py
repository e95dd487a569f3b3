"""Annotation files read whole as JSON, with bad files reported as one-line :class:`PerceptioError`s.

A file is a local path or an object-store URL (:mod:`perceptio.fs`)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from perceptio import fs
from perceptio.errors import PerceptioError


def load_json(path: Path | str, what: str) -> Any:
    """The parsed JSON of ``path``; ``what`` names the file in the error (e.g. "GranD-f annotation file")."""
    if not fs.is_file(path):
        raise PerceptioError(f"{what} {path} not found")
    try:
        with fs.open_input(path) as raw, io.TextIOWrapper(raw, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError) as error:
        raise PerceptioError(f"{path} is not readable JSON: {error}") from error


def load_json_list(path: Path | str, what: str) -> list[Any]:
    """A JSON file that must hold a list of records."""
    data = load_json(path, what)
    if not isinstance(data, list):
        raise PerceptioError(f"{path} holds a JSON {type(data).__name__}, expected a list of records")
    return data
