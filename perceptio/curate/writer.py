"""Shards on disk: tar + per-shard parquet + stats marker, ``manifest.parquet`` and ``dataset.json``.

For each shard ``NAME`` the writer produces, in this order and each under a temporary name first:
``NAME.tar`` (via :class:`perceptio.shards.ShardWriter`), ``NAME.parquet`` (one row per ref, kept
or rejected, with status and reason; one row per image for ADE20k), and ``NAME_stats.json`` (counts,
settings, timings), the "shard done" marker; the side tables go to ``__meta__/`` (see
:data:`perceptio.shards.META_DIR`). A shard without its marker is unfinished: a re-run
deletes whatever it left and redoes it. Everything but the timings in the stats is a function of
the inputs, so a resumed run ends with the same tars and parquets as an uninterrupted one.

``--out`` may be an object store (``s3://bucket/shards``, see perceptio/fs.py): a shard task then
writes its files in a local staging folder and uploads them, the marker last; each upload appears
whole or not at all, and readers of an object store take only shards that have their marker.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import tempfile
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

import perceptio
from perceptio import fs
from perceptio.curate.plan import ShardPlan
from perceptio.curate.sample_builder import BuildConfig, BuiltImage
from perceptio.errors import PerceptioError
from perceptio.io import atomic_path, write_text_atomic
from perceptio.shards import (
    DATASET_INFO_NAME,
    KEPT,
    MANIFEST_NAME,
    STATS_SUFFIX,
    ManifestRow,
    ShardWriter,
    manifest_schema,
    manifest_table,
    meta_file,
    meta_folder,
    meta_location,
)

# Settings that change shard bytes: a resumed run must use the same ones as the finished shards.
RESUME_SETTINGS = ("dataset", "samples_per_shard", "batch_size", "tokenizer", "teacher_source", "build")

def tar_path(out: Path, name: str) -> Path:
    return out / f"{name}.tar"


def parquet_path(out: Path, name: str) -> Path:
    return meta_folder(out) / f"{name}.parquet"


def stats_path(out: Path, name: str) -> Path:
    return meta_folder(out) / f"{name}{STATS_SUFFIX}"


def done_shards(out: str, names: Sequence[str]) -> list[str]:
    """The shards of ``names`` whose done marker is in ``out``'s ``__meta__/`` (one listing, also on
    an object store)."""
    present = set(fs.list_names(meta_location(out)))
    return [name for name in names if f"{name}{STATS_SUFFIX}" in present]


@contextmanager
def staging_folder(out: str) -> Iterator[Path]:
    """Where a shard task writes: ``out`` itself when local, else a temporary local folder."""
    if not fs.is_remote(out):
        yield fs.local_path(out)
        return
    with tempfile.TemporaryDirectory(prefix="perceptio-shard-") as folder:
        yield Path(folder)


def publish(folder: Path, out: str, name: str) -> None:
    """Upload a shard staged in ``folder`` to a remote ``out``: tar and table first, the marker last."""
    if not fs.is_remote(out):
        return
    fs.upload(tar_path(folder, name), fs.join(out, f"{name}.tar"))
    fs.upload(parquet_path(folder, name), meta_file(out, f"{name}.parquet"))
    fs.upload(stats_path(folder, name), meta_file(out, f"{name}{STATS_SUFFIX}"))


def clear_unfinished(out: Path, name: str) -> None:
    """Remove what a killed run may have left of shard ``name`` (final names and temporary files)."""
    for path in (tar_path(out, name), parquet_path(out, name)):
        path.unlink(missing_ok=True)
    for temporary in [*out.glob(f".{name}*"), *meta_folder(out).glob(f".{name}*")]:
        temporary.unlink(missing_ok=True)


def write_rows(path: Path, rows: Sequence[ManifestRow]) -> None:
    """Rows as parquet with the manifest schema, atomically (written to a temporary name, then renamed)."""
    write_table(path, manifest_table(rows))


def write_table(path: Path, table: pa.Table) -> None:
    with atomic_path(path) as temporary:
        pq.write_table(table, temporary)


def write_json(path: Path, value: Any) -> None:
    write_text_atomic(path, json.dumps(value, indent=2, sort_keys=True) + "\n")


def read_stats(out: str, name: str) -> dict[str, Any]:
    location = meta_file(out, f"{name}{STATS_SUFFIX}")
    try:
        return json.loads(fs.read_text(location))
    except (OSError, ValueError) as error:
        raise PerceptioError(f"{location} is unreadable ({error}); delete it to redo the shard") from error


def with_later_defaults(saved: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """``saved`` with the keys it lacks, at any depth of its dicts, taken from ``defaults``: a shard
    curated before a build setting existed was curated as that setting's default says (e.g. the
    marks' style), so upgrading the toolkit does not refuse to resume it."""
    filled = dict(saved)
    for key, default in defaults.items():
        if key not in filled:
            filled[key] = default
        elif isinstance(filled[key], dict) and isinstance(default, dict):
            filled[key] = with_later_defaults(filled[key], default)
    return filled


def check_resumable(out: str, done: Sequence[str], settings: dict[str, Any]) -> str | None:
    """The teacher identity of the finished shards, after checking they used today's settings."""
    teachers = set()
    default_build = dataclasses.asdict(BuildConfig())
    for name in done:
        stats = read_stats(out, name)
        previous = stats.get("settings", {})
        if isinstance(previous.get("build"), dict):
            previous = {**previous, "build": with_later_defaults(previous["build"], default_build)}
        for setting in RESUME_SETTINGS:
            if previous.get(setting) != settings.get(setting):
                raise PerceptioError(
                    f"{meta_file(out, name + STATS_SUFFIX)} was curated with {setting}={previous.get(setting)!r}, this run has "
                    f"{settings.get(setting)!r}; use --overwrite to start again"
                )
        teachers.add(stats.get("teacher"))
    if len(teachers) > 1:
        raise PerceptioError(f"finished shards in {out} come from different teachers {sorted(map(str, teachers))}; use --overwrite")
    return next(iter(teachers), None)


@dataclass
class _OpenShard:
    plan: ShardPlan
    writer: ShardWriter
    started: float
    next_position: int = 0
    pending: dict[int, BuiltImage] = field(default_factory=dict)
    rows: list[ManifestRow] = field(default_factory=list)
    seconds: Counter = field(default_factory=Counter)


class ShardSetWriter:
    """Receives built images (any order) and writes each shard when all of its images have arrived."""

    def __init__(self, out: Path, shards: Sequence[ShardPlan], settings: dict[str, Any], expected_teacher: str | None):
        self.out = out
        self.shards = {shard.name: shard for shard in shards}
        self.settings = settings
        self.teacher = expected_teacher
        self.open: dict[str, _OpenShard] = {}
        self.samples_written = 0
        self.refs_rejected = 0
        self.images_done = 0

    def add(self, shard_name: str, position: int, built: BuiltImage, teacher: str | None, model_seconds: float) -> None:
        if teacher is not None:
            if self.teacher is not None and teacher != self.teacher:
                raise PerceptioError(
                    f"the finished shards in {self.out} were made with teacher {self.teacher}, this run uses "
                    f"{teacher}; use --overwrite"
                )
            self.teacher = teacher
        shard = self.open.get(shard_name)
        if shard is None:
            plan = self.shards[shard_name]
            clear_unfinished(self.out, shard_name)
            shard = self.open[shard_name] = _OpenShard(plan, ShardWriter(tar_path(self.out, shard_name)), time.perf_counter())
        shard.pending[position] = built
        shard.seconds.update({**built.seconds, "model": model_seconds})
        # Write in plan order whatever is now contiguous, so tars do not depend on arrival order.
        while shard.next_position in shard.pending:
            ready = shard.pending.pop(shard.next_position)
            self._write(shard, ready)
            shard.next_position += 1
        if shard.next_position == len(shard.plan.images):
            self._finish(shard)
            del self.open[shard_name]

    def _write(self, shard: _OpenShard, built: BuiltImage) -> None:
        if built.sample is not None:
            shard.writer.write(built.sample)
            self.samples_written += 1
        shard.rows += [dataclasses.replace(row, shard=shard.plan.name) for row in built.rows]
        self.refs_rejected += sum(row.status != KEPT for row in built.rows)
        self.images_done += 1

    def _finish(self, shard: _OpenShard) -> None:
        name = shard.plan.name
        shard.writer.close()
        write_rows(parquet_path(self.out, name), shard.rows)
        kept = [row for row in shard.rows if row.status == KEPT]
        stats = {
            "shard": name,
            "dataset": shard.plan.dataset,
            "split": shard.plan.split,
            "images": len(shard.plan.images),
            "samples": shard.writer.count,
            "refs_kept": sum(row.ref_id is not None for row in kept),
            "refs_rejected": sum(row.status != KEPT for row in shard.rows),
            "sentences": sum(row.sentences for row in kept),
            "rejects": dict(sorted(Counter(row.reason for row in shard.rows if row.status != KEPT).items())),
            "teacher": self.teacher,
            "settings": self.settings,
            "timings": {
                "wall_s": round(time.perf_counter() - shard.started, 3),
                **{f"{stage}_s": round(seconds, 3) for stage, seconds in sorted(shard.seconds.items())},
            },
        }
        write_json(stats_path(self.out, name), stats)  # last: the shard-done marker

    def abort(self) -> None:
        """Drop every half-written shard (its temporary tar) after an error or an interrupt."""
        for shard in self.open.values():
            shard.writer.abort()
        self.open.clear()


MANIFEST_METADATA_KEY = b"perceptio"


def write_manifest(out: str, shards: Sequence[ShardPlan], extra_rows: Sequence[ManifestRow],
                   metadata: dict[str, Any] | None = None) -> pa.Table:
    """``__meta__/manifest.parquet``: every shard's rows in plan order, then rows for refs no shard
    holds; ``metadata`` (dataset, tokenizer and teacher identity, perceptio version) goes into the
    file's schema metadata under ``perceptio``, as json."""
    schema = manifest_schema()
    tables = [pq.read_table(pa.BufferReader(fs.read_bytes(meta_file(out, f"{shard.name}.parquet"))), schema=schema)
              for shard in shards]
    tables.append(manifest_table(extra_rows))
    manifest = pa.concat_tables(tables)
    if metadata is not None:
        manifest = manifest.replace_schema_metadata({MANIFEST_METADATA_KEY: json.dumps(metadata, sort_keys=True)})
    with fs.atomic_output(meta_file(out, MANIFEST_NAME)) as temporary:
        pq.write_table(manifest, temporary)
    return manifest


def write_dataset_json(
    out: str, shards: Sequence[ShardPlan], manifest: pa.Table, identity: dict[str, Any], settings: dict[str, Any]
) -> dict[str, Any]:
    """``dataset.json``: command line, version, teacher/tokenizer identity, per-split counts and rejects."""
    all_stats = [read_stats(out, shard.name) for shard in shards]
    splits: dict[str, dict[str, Any]] = {}
    for stats in all_stats:
        split = splits.setdefault(stats["split"], {"shards": 0, "images": 0, "samples": 0, "refs_kept": 0,
                                                   "refs_rejected": 0, "sentences": 0, "rejects": Counter()})
        split["shards"] += 1
        for count in ("images", "samples", "refs_kept", "refs_rejected", "sentences"):
            split[count] += stats[count]
        split["rejects"].update(stats["rejects"])
    unassigned = Counter(
        reason for shard, reason in zip(manifest.column("shard").to_pylist(), manifest.column("reason").to_pylist())
        if shard is None
    )
    info = {
        "command": " ".join(sys.argv),
        "perceptio_version": perceptio.__version__,
        "teacher": {"identity": next((stats["teacher"] for stats in all_stats if stats.get("teacher")), None),
                    "source": settings["teacher_source"]},
        "tokenizer": identity,
        "settings": settings,
        "splits": {name: {**counts, "rejects": dict(sorted(counts["rejects"].items()))} for name, counts in splits.items()},
        "rejected_by_reader": dict(sorted(unassigned.items())),
        "shards": [shard.name for shard in shards],
    }
    fs.write_text(fs.join(out, DATASET_INFO_NAME), json.dumps(info, indent=2, sort_keys=True) + "\n")
    return info
