"""Settings recorded in a DATA_ROOT: where its COCO train2014 images live when not in the REFER layout.

``perceptio-curate download --images-dir FOLDER`` writes ``DATA_ROOT/perceptio-data.json``
(``{"coco_train2014": "/abs/FOLDER"}``); the REFER reader then looks for images there instead of
``DATA_ROOT/images/mscoco/images/train2014``, so an existing COCO copy anywhere on disk is used
as it is, without symlinks or copies. A data root may be an object-store URL (:mod:`perceptio.fs`);
its recorded folder may be one too.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from perceptio import fs
from perceptio.errors import PerceptioError
from perceptio.io import write_text_atomic

SETTINGS_FILE = "perceptio-data.json"
COCO_TRAIN2014_KEY = "coco_train2014"
# Where the REFER API expects the COCO train2014 images, relative to the data root.
IMAGE_DIR = Path("images", "mscoco", "images", "train2014")


def read_settings(data_root: str | os.PathLike[str]) -> dict[str, Any]:
    path = fs.child(data_root, SETTINGS_FILE)
    if not fs.is_file(path):
        return {}
    try:
        settings = json.loads(fs.read_text(path))
    except (OSError, ValueError) as error:
        raise PerceptioError(f"{path} is not readable JSON: {error}") from error
    if not isinstance(settings, dict):
        raise PerceptioError(f"{path} holds a {type(settings).__name__}, not an object of settings")
    return settings


def coco_image_dir(data_root: str | os.PathLike[str]) -> Path | str:
    """The COCO train2014 folder of ``data_root``: the recorded one, else the REFER layout's."""
    recorded = read_settings(data_root).get(COCO_TRAIN2014_KEY)
    return fs.as_location(recorded) if recorded else fs.child(data_root, *IMAGE_DIR.parts)


def record_coco_image_dir(data_root: str | os.PathLike[str], folder: str | os.PathLike[str]) -> Path:
    """Check that ``folder`` holds COCO train2014 images and record it for ``data_root``."""
    folder = Path(folder).expanduser().resolve()
    if not folder.is_dir():
        raise PerceptioError(f"--images-dir {folder} is not a folder")
    if next(folder.glob("COCO_train2014_*.jpg"), None) is None:
        raise PerceptioError(f"--images-dir {folder} holds no COCO_train2014_*.jpg (give the train2014 folder itself)")
    settings = read_settings(data_root)
    settings[COCO_TRAIN2014_KEY] = str(folder)
    write_text_atomic(Path(data_root) / SETTINGS_FILE, json.dumps(settings, indent=2, sort_keys=True) + "\n")
    return folder
