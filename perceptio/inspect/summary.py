"""``perceptio-inspect summary``: what a shard folder holds, per dataset and split.

Counts, rejects and disk size come from the side files curation wrote where they exist; the
distributions (depth tokens, mask areas, expression lengths) need the samples, so the tars are
always read. Mask areas are taken from the RLE directly, without decoding the masks.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np

from perceptio.errors import PerceptioError
from perceptio.inspect.folder import ShardFolder, read_shard
from perceptio.shards import KEPT, ShardFile

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
SPARK_BARS = "▁▂▃▄▅▆▇█"


@dataclass
class Distribution:
    """A few order statistics and a coarse histogram of one quantity."""

    count: int
    mean: float | None
    quantiles: dict[str, float]  # "p5", "p25", ... -> value
    histogram: list[int]
    bin_edges: list[float]

    @classmethod
    def of(cls, values: list[float], bins: int, value_range: tuple[float, float] | None = None) -> "Distribution":
        if not values:
            return cls(0, None, {}, [], [])
        array = np.asarray(values, dtype=np.float64)
        counts, edges = np.histogram(array, bins=bins, range=value_range)
        return cls(
            count=len(values),
            mean=float(array.mean()),
            quantiles={f"p{round(q * 100)}": float(np.quantile(array, q)) for q in QUANTILES},
            histogram=counts.tolist(),
            bin_edges=edges.tolist(),
        )


@dataclass
class SplitSummary:
    """Everything ``summary`` reports about one dataset split."""

    dataset: str
    split: str
    shards: int
    shards_done: int
    images: int = 0
    refs: int = 0
    sentences: int = 0
    rejects: dict[str, int] = field(default_factory=dict)
    tokens_per_sample: dict[str, int] = field(default_factory=dict)  # min, max
    num_codes: int = 0
    token_histogram: list[int] = field(default_factory=list)
    codes_used: int = 0
    code_perplexity: float = 0.0
    mask_area: Distribution | None = None  # fraction of the image
    expression_words: Distribution | None = None
    disk_bytes: int = 0
    teachers: list[str] = field(default_factory=list)
    tokenizers: list[str] = field(default_factory=list)


def expression_words(sentence: dict[str, Any]) -> int:
    return len(str(sentence.get("sent") or sentence.get("raw") or "").split())


def mask_area_fraction(rle: dict[str, Any]) -> float:
    from pycocotools import mask as mask_utils

    height, width = rle["size"]
    counts = rle["counts"]
    encoded = {"size": [height, width], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    return float(mask_utils.area(encoded)) / max(1, height * width)


def reject_reasons(rows: list[dict[str, Any]]) -> dict[str, int]:
    """Rejected refs (or ADE20k images) by reason code, most frequent first."""
    # Reasons may carry details after a colon ("tiny_mask: 3 px < 16"); count by their code.
    reasons = Counter(
        str(row.get("reason") or row.get("status")).split(":", 1)[0]
        for row in rows
        if row.get("status") not in (None, KEPT)
    )
    return dict(reasons.most_common())


def split_rows(folder: ShardFolder, dataset: str, split: str, shards: list[ShardFile]) -> list[dict[str, Any]]:
    """Curation's rows of one split: from manifest.parquet (which also holds refs rejected before
    sharding) when it covers these shards, else from the per-shard tables (empty when there are none)."""
    manifest = folder.manifest_rows
    if manifest is not None and {shard.path.name for shard in shards} <= folder.manifest_shards():
        return [row for row in manifest if row.get("dataset") == dataset and row.get("split") == split]
    return [row for shard in shards for row in shard.table() or []]


def summarise_split(
    folder: ShardFolder, shards: list[ShardFile], num_codes: int, advance: Callable[[], None] = lambda: None
) -> SplitSummary:
    first = shards[0]
    summary = SplitSummary(first.dataset, first.split, len(shards), sum(shard.done for shard in shards))
    token_counts = np.zeros(num_codes, dtype=np.int64)
    lengths: list[int] = []
    areas: list[float] = []
    words: list[float] = []
    teachers: set[str] = set()
    tokenizers: set[str] = set()
    for shard in shards:
        summary.disk_bytes += sum(
            path.stat().st_size for path in (shard.path, shard.table_path, shard.stats_path) if path.is_file()
        )
        for sample in read_shard(shard):
            try:
                tokens = np.asarray(sample.depth_tokens, dtype=np.int64).ravel()
                refs = sample.meta.get("refs") or []
                sample_areas = [mask_area_fraction(ref["mask"]) for ref in refs if "mask" in ref]
                sample_words = [expression_words(sentence) for ref in refs for sentence in ref.get("sentences") or []]
            except (AttributeError, TypeError, KeyError, ValueError) as error:
                message = f"{shard.path.name} {sample.key}: unexpected content ({type(error).__name__}: {error})"
                raise PerceptioError(f"{message}; run `perceptio-inspect validate`") from error
            summary.images += 1
            summary.refs += len(refs)
            summary.sentences += len(sample_words)
            lengths.append(int(tokens.size))
            # Codes outside [0, K) are validate's business; the histogram counts only valid ones.
            valid = tokens[(tokens >= 0) & (tokens < num_codes)]
            token_counts += np.bincount(valid, minlength=num_codes)
            areas += sample_areas
            words += sample_words
            teachers.add(str(sample.meta.get("teacher")))
            tokenizers.add(str(sample.meta.get("tokenizer")))
        advance()
    summary.rejects = reject_reasons(split_rows(folder, first.dataset, first.split, shards))
    if lengths:
        summary.tokens_per_sample = {"min": min(lengths), "max": max(lengths)}
    summary.num_codes = num_codes
    summary.token_histogram = token_counts.tolist()
    summary.codes_used = int((token_counts > 0).sum())
    total = token_counts.sum()
    if total:
        probabilities = token_counts[token_counts > 0] / total
        summary.code_perplexity = float(np.exp(-(probabilities * np.log(probabilities)).sum()))
    summary.mask_area = Distribution.of(areas, bins=10, value_range=(0.0, 1.0))
    summary.expression_words = Distribution.of(words, bins=10)
    summary.teachers = sorted(teachers)
    summary.tokenizers = sorted(tokenizers)
    return summary


def summarise(folder: ShardFolder, num_codes: int, advance: Callable[[], None] = lambda: None) -> list[SplitSummary]:
    return [summarise_split(folder, shards, num_codes, advance) for shards in folder.groups().values()]


def summaries_json(summaries: list[SplitSummary]) -> list[dict[str, Any]]:
    return [asdict(summary) for summary in summaries]


def sparkline(counts: list[int], width: int) -> str:
    """Counts as a row of block characters, merged into at most ``width`` columns."""
    if not counts or max(counts) == 0:
        return ""
    columns = np.array_split(np.asarray(counts, dtype=np.float64), min(width, len(counts)))
    sums = np.array([column.sum() for column in columns])
    levels = np.ceil(sums / sums.max() * len(SPARK_BARS)).astype(int)
    return "".join(" " if level == 0 else SPARK_BARS[level - 1] for level in levels)


def human_bytes(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _describe(distribution: Distribution | None, unit: Callable[[float], str]) -> str:
    if distribution is None or distribution.count == 0:
        return "-"
    q = distribution.quantiles
    return (
        f"median {unit(q['p50'])}  (p5 {unit(q['p5'])}, p95 {unit(q['p95'])})  "
        f"{sparkline(distribution.histogram, 10)}"
    )


def render_tables(summaries: list[SplitSummary], console: Any) -> None:
    """An overview table of every split, then one table per dataset split with its distributions."""
    from rich import box
    from rich.table import Table

    overview = Table(title="Shards by dataset and split (shards: done / all)", box=box.SIMPLE_HEAD, pad_edge=False)
    for column in ("dataset / split", "shards", "images", "refs", "sentences", "rejects", "disk"):
        overview.add_column(column, justify="left" if column == "dataset / split" else "right", no_wrap=True)
    for summary in summaries:
        overview.add_row(
            f"{summary.dataset} / {summary.split}",
            f"{summary.shards_done}/{summary.shards}",
            str(summary.images),
            str(summary.refs),
            str(summary.sentences),
            str(sum(summary.rejects.values())),
            human_bytes(summary.disk_bytes),
        )
    console.print(overview)

    for summary in summaries:
        table = Table(title=f"{summary.dataset} / {summary.split}", show_header=False)
        table.add_column("what", style="bold")
        table.add_column("value")
        table.add_row(
            "rejects by reason",
            ", ".join(f"{reason}: {count}" for reason, count in summary.rejects.items()) or "none recorded",
        )
        lengths = summary.tokens_per_sample
        table.add_row(
            "depth tokens per sample",
            "-" if not lengths else " .. ".join(sorted({str(lengths["min"]), str(lengths["max"])}, key=int)),
        )
        table.add_row(
            "codebook usage",
            f"{summary.codes_used}/{summary.num_codes} codes used, perplexity {summary.code_perplexity:.1f}",
        )
        histogram = sparkline(summary.token_histogram, 64)
        table.add_row(f"depth-token histogram (codes 0..{summary.num_codes - 1})", histogram)
        table.add_row("mask area (of the image)", _describe(summary.mask_area, lambda v: f"{v:.1%}"))
        table.add_row("expression length (words)", _describe(summary.expression_words, lambda v: f"{v:.0f}"))
        table.add_row("teacher", ", ".join(summary.teachers) or "-")
        table.add_row("tokenizer", ", ".join(summary.tokenizers) or "-")
        console.print(table)
