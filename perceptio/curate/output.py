"""Where a curation run writes: the dataset's own folder under ``--out``, made ready, and the files
other tools read it by.

One definition for every ``perceptio-curate`` dataset command (the perception datasets in
:mod:`perceptio.curate.commands`, the conversations in :mod:`perceptio.curate.conversations`):
:func:`dataset_out` picks ``OUT/DATASET``, :func:`prepare_out` creates it (or clears this dataset's
earlier results with ``--overwrite``) and refuses another dataset's folder, and
:func:`write_interop_files` adds the dataset card and wids indexes once the shards are done.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from perceptio import fs
from perceptio.curate.interop import write_dataset_card, write_wids_indexes
from perceptio.curate.plan import ShardPlan
from perceptio.curate.writer import read_stats
from perceptio.errors import PerceptioError
from perceptio.shards import DATASET_INFO_NAME, MANIFEST_NAME, ShardFile, meta_location


def dataset_out(out: str | Path, dataset: str) -> str | Path:
    """``OUT/DATASET``, so that several datasets curated into one ``--out`` each get a folder; ``OUT``
    itself when it already is that dataset's folder (named after it, or holding its dataset.json).
    A local ``OUT`` gives a Path, an object-store URL a URL."""
    if not fs.is_remote(out):
        out = Path(out)
    info = fs.join(out, DATASET_INFO_NAME)
    if fs.name(out) == dataset:
        return out
    if fs.exists(info):
        try:
            if json.loads(fs.read_text(info)).get("settings", {}).get("dataset") == dataset:
                return out
        except ValueError:
            pass  # not ours to judge here: prepare_out reads it again
    return fs.join(out, dataset) if fs.is_remote(out) else Path(out) / dataset


def prepare_out(out: str | Path, dataset: str, overwrite: bool) -> None:
    """Create ``out``; with ``overwrite`` remove this dataset's previous results; refuse a foreign folder."""
    out = str(out)
    fs.make_dirs(out)
    names = fs.list_names(out)
    if DATASET_INFO_NAME in names:
        info_path = fs.join(out, DATASET_INFO_NAME)
        try:
            other = json.loads(fs.read_text(info_path)).get("settings", {}).get("dataset")
        except ValueError as error:
            raise PerceptioError(f"{info_path} is not valid json ({error}); remove it or choose another --out") from error
        if other not in (None, dataset):
            raise PerceptioError(f"{out} holds curated {other}; give {dataset} its own --out folder")
    if overwrite:
        ours = (f"{dataset}-", f".{dataset}-")
        for folder in (out, meta_location(out)):
            for name in fs.list_names(folder):
                if name.startswith(ours) or name in (MANIFEST_NAME, DATASET_INFO_NAME):
                    fs.remove(fs.join(folder, name))


def write_interop_files(out: str | Path, shards: Sequence[ShardPlan], info: dict[str, Any], contents: str) -> None:
    """The dataset card (Hugging Face ``load_dataset(out)``) and one wids index per split; ``contents``
    says what a sample holds, e.g. "one sample per image (jpg, depth.npy, depth_tokens.npy, json)"."""
    out = str(out)
    files = [ShardFile.parse(fs.join(out, f"{shard.name}.tar")) for shard in shards]
    files = [shard for shard in files if shard is not None]
    counts = {shard.name: read_stats(out, shard.name)["samples"] for shard in files}
    made_by = ", ".join(f"{part} {identity}" for part, identity in
                        (("tokenizer", info["tokenizer"].get("identity")), ("teacher", info["teacher"].get("identity")))
                        if identity is not None)
    description = (f"Perceptio shards of {info['settings']['dataset']}: {contents}; "
                   f"{made_by + ', ' if made_by else ''}perceptio {info['perceptio_version']}.")
    write_dataset_card(out, files, description)
    write_wids_indexes(out, meta_location(out), files, counts)
