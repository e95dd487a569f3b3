"""A folder of curated shards as ``perceptio-inspect`` sees it: the tars and what curation wrote beside them.

The names of the tars and their side files are defined in :mod:`perceptio.shards`. Every side file
is optional here: a folder of bare tars (or a single tar) can still be summarised, validated and shown.
"""

from __future__ import annotations

import json
import tarfile
from collections import defaultdict
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from perceptio.errors import PerceptioError
from perceptio.shards import (
    DATASET_INFO_NAME,
    MANIFEST_NAME,
    ShardFile,
    ShardSample,
    iter_shard,
    read_parquet_rows,
)

@dataclass
class ShardFolder:
    """The shards under ``root`` in (dataset, split, index) order, with the folder-level files."""

    root: Path
    shards: list[ShardFile]
    dataset_info: dict[str, Any] | None
    manifest_path: Path | None
    # Tars whose names do not follow the pattern, and temporary files a killed run left behind.
    strays: list[Path]

    @classmethod
    def open(cls, location: str | Path) -> "ShardFolder":
        """Open a shard folder, or a single ``.tar`` (its folder's side files still apply)."""
        location = Path(location)
        if location.is_file() and location.suffix == ".tar":
            root, candidates = location.parent, [location]
        elif location.is_dir():
            root, candidates = location, sorted(location.glob("*.tar"))
        else:
            raise PerceptioError(f"{location} is neither a shard folder nor a .tar file")
        shards, strays = [], sorted(root.glob(".*.tmp"))
        for path in candidates:
            shard = ShardFile.parse(path)
            if shard is None:
                # A single tar named by hand is still inspectable; in a folder it is a stray.
                if len(candidates) == 1 and location.is_file():
                    shard = ShardFile(path, dataset=path.stem, split="?", index=0)
                else:
                    strays.append(path)
                    continue
            shards.append(shard)
        if not shards:
            raise PerceptioError(f"no shards ({{dataset}}-{{split}}-{{index:06d}}.tar) in {location}")
        shards.sort(key=lambda shard: (shard.dataset, shard.split, shard.index))
        info_path = root / DATASET_INFO_NAME
        dataset_info = None
        if info_path.is_file():
            try:
                dataset_info = json.loads(info_path.read_text())
            except ValueError as error:
                raise PerceptioError(f"{info_path} is not valid json: {error}") from error
        manifest_path = root / MANIFEST_NAME
        return cls(root, shards, dataset_info, manifest_path if manifest_path.is_file() else None, strays)

    def groups(self) -> dict[tuple[str, str], list[ShardFile]]:
        grouped: dict[tuple[str, str], list[ShardFile]] = defaultdict(list)
        for shard in self.shards:
            grouped[(shard.dataset, shard.split)].append(shard)
        return dict(grouped)

    @cached_property
    def manifest_rows(self) -> list[dict[str, Any]] | None:
        """The rows of manifest.parquet (read once: summary wants them for every split)."""
        return read_parquet_rows(self.manifest_path) if self.manifest_path else None

    def manifest_shards(self) -> set[str]:
        """Tar names the manifest must cover: those dataset.json lists (one curation run), else all."""
        listed = (self.dataset_info or {}).get("shards")
        if isinstance(listed, list):
            return {f"{str(name).removesuffix('.tar')}.tar" for name in listed}
        return {shard.path.name for shard in self.shards}


def open_folders(location: str | Path) -> list[ShardFolder]:
    """The shard folder at ``location``, or each shard folder directly under it (curation writes one
    folder per dataset, so ``SHARDS/`` may hold ``refcoco/``, ``ade20k/``, ...)."""
    location = Path(location)
    if location.is_dir() and not any(location.glob("*.tar")):
        children = sorted(child for child in location.iterdir() if child.is_dir() and any(child.glob("*.tar")))
        if children:
            return [ShardFolder.open(child) for child in children]
    return [ShardFolder.open(location)]


def find_sample(
    folders: list[ShardFolder], key: str | None = None, index: int | None = None
) -> tuple[ShardFolder, ShardFile, ShardSample, int]:
    """The sample with ``key``, or the ``index``-th sample (0-based, folders and shards in name order),
    with its folder, its shard and its position.

    Shards that cannot hold it are skipped by their name and tar headers, without reading samples.
    """
    if (key is None) == (index is None):
        raise PerceptioError("give exactly one of --key and --index")
    if index is not None and index < 0:
        raise PerceptioError(f"--index must be >= 0, got {index}")
    position = 0
    for folder in folders:
        for shard in folder.shards:
            count = shard.count()
            if (index is None or position <= index < position + count) and (key is None or shard.may_hold(key)):
                for offset, sample in enumerate(read_shard(shard)):
                    if sample.key == key or position + offset == index:
                        return folder, shard, sample, position + offset
            position += count
    where = ", ".join(str(folder.root) for folder in folders)
    if key is not None:
        raise PerceptioError(f"no sample with key {key!r} in {where}")
    raise PerceptioError(f"--index {index} is past the last sample ({position} samples in {where})")


def random_samples(folders: list[ShardFolder], n: int, seed: int) -> list[tuple[int, ShardFile, ShardSample]]:
    """``n`` distinct samples drawn uniformly (all of them when there are fewer), as (position, shard,
    sample) in folder order; only the shards that hold a drawn sample are read."""
    shards = [shard for folder in folders for shard in folder.shards]
    counts = [shard.count() for shard in shards]
    total = sum(counts)
    if total == 0:
        raise PerceptioError(f"no samples in {', '.join(str(folder.root) for folder in folders)}")
    chosen = set(np.random.default_rng(seed).choice(total, size=min(n, total), replace=False).tolist())
    picked: list[tuple[int, ShardFile, ShardSample]] = []
    start = 0
    for shard, count in zip(shards, counts):
        wanted = {position - start for position in chosen if start <= position < start + count}
        if wanted:
            picked += [(start + i, shard, sample) for i, sample in enumerate(read_shard(shard)) if i in wanted]
        start += count
    return picked


def read_shard(shard: ShardFile) -> Iterator[ShardSample]:
    """:func:`iter_shard` with a damaged tar turned into a one-line error that points to ``validate``."""
    try:
        yield from iter_shard(shard.path)
    except (tarfile.TarError, EOFError, OSError, KeyError, ValueError) as error:
        raise PerceptioError(
            f"cannot read {shard.path}: {type(error).__name__}: {error} (run `perceptio-inspect validate`)"
        ) from error


@dataclass(frozen=True)
class RecordedTokenizer:
    """What dataset.json says about the tokenizer that made the folder's depth tokens."""

    identity: str | None = None
    path: Path | None = None
    num_codes: int | None = None
    num_tokens: int | None = None


def recorded_tokenizer(info: dict[str, Any] | None) -> RecordedTokenizer:
    entry = (info or {}).get("tokenizer")
    if isinstance(entry, str):
        return RecordedTokenizer(identity=entry)
    if not isinstance(entry, dict):
        return RecordedTokenizer()
    path = entry.get("path")
    return RecordedTokenizer(
        identity=entry.get("identity"),
        path=Path(path) if path else None,
        num_codes=entry.get("num_codes"),
        num_tokens=entry.get("num_tokens"),
    )


def load_tokenizer(option: Path | None, folder: ShardFolder) -> tuple[Any | None, str]:
    """The depth tokenizer from ``--tokenizer``, else from the path dataset.json records.

    Returns (tokenizer or None, a sentence saying which one or why there is none). A missing
    ``--tokenizer`` folder is the user's error; a recorded path that no longer exists only means
    the decoded depth cannot be drawn.
    """
    recorded = recorded_tokenizer(folder.dataset_info)
    if option is None and recorded.path is not None and not recorded.path.is_dir():
        return None, f"the tokenizer recorded in dataset.json ({recorded.path}) is not here: pass --tokenizer"
    path = option or recorded.path
    if path is None:
        return None, "no tokenizer (pass --tokenizer TOK/): teacher depth only"
    if not path.is_dir():
        raise PerceptioError(f"--tokenizer {path}: not a folder")
    from perceptio.tokenize.vqvae import DepthVQVAE

    tokenizer = DepthVQVAE.from_pretrained(path)
    note = f"tokenizer {tokenizer.identity} from {path}"
    if recorded.identity and recorded.identity != tokenizer.identity:
        note += f" (the shards were tokenized by {recorded.identity}: decoded depth may not match)"
    return tokenizer, note


def decode_depth(tokenizer: Any, tokens: np.ndarray) -> np.ndarray:
    """The normalised (S, S) depth map a tokenizer decodes from one sample's tokens."""
    return tokenizer.decode(np.asarray(tokens, dtype=np.int64))[0].float().cpu().numpy()
