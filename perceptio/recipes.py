"""Where the dataset recipes in ``manifests/`` live, in a checkout and in an installed wheel."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from perceptio.errors import PerceptioError

_PACKAGE_DIR = Path(__file__).resolve().parent
# An installed wheel carries the recipes inside the package; an editable checkout reads them in place.
_CANDIDATES = (_PACKAGE_DIR / "_manifests", _PACKAGE_DIR.parent / "manifests")


def manifests_dir() -> Path:
    for candidate in _CANDIDATES:
        if candidate.is_dir():
            return candidate
    raise PerceptioError("the dataset recipes (manifests/) are missing from this installation")


def load_recipe(name: str) -> Any:
    """Load ``manifests/<name>`` (JSON)."""
    path = manifests_dir() / name
    if not path.is_file():
        raise PerceptioError(f"recipe {name!r} not found in {manifests_dir()}")
    return json.loads(path.read_text())
