"""``perceptio-inspect validate``: open every shard, decode every sample, and list what is wrong.

Each problem names its shard and sample key. Reading goes one level below :func:`iter_shard`
(raw members from :func:`perceptio.shards.iter_members`) because a validator must survive what a
reader may refuse: a sample with a missing member, a member that does not decode, a key that
appears twice, and a tar cut short.
"""

from __future__ import annotations

import io
import json
import math
import tarfile
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np

from perceptio.errors import PerceptioError
from perceptio.inspect.folder import ShardFolder, recorded_tokenizer
from perceptio.shards import (
    CONVERSATION_FIELD,
    DEPTH_SIZE,
    GROUNDED_FIELD,
    KEPT,
    META_TYPES,
    NULLABLE_META,
    PHRASE_TYPES,
    QUESTION_FIELD,
    QUESTIONS_FIELD,
    QUESTION_TYPES,
    QUESTIONS_FIELD,
    REF_TYPES,
    ShardFile,
    ShardSample,
    iter_members,
    required_members,
    rle_to_mask,
    sample_key,
)
from perceptio.tokens import DEFAULT_NUM_CODES, DEFAULT_NUM_DEPTH_TOKENS

ADE_MEMBERS = ("seg.png", "marked.jpg")
# The tokenizer's normalisation maps depth into [-1, 1]; float16 rounding stays well inside this.
DEPTH_RANGE_LIMIT = 1.001


@dataclass(frozen=True)
class Finding:
    """One thing the validator found wrong, where it is, and a short kind to filter on.

    (A dataset reader's bad input is a :class:`perceptio.sources.problems.Problem`; a finding is about
    the shards curation wrote.)
    """

    shard: str  # shard file name, or the folder-level file the problem is in
    key: str | None
    kind: str
    message: str


@dataclass(frozen=True)
class Expectations:
    """What every sample must agree with; taken from dataset.json or the tokenizer when known."""

    num_codes: int = DEFAULT_NUM_CODES
    num_tokens: int = DEFAULT_NUM_DEPTH_TOKENS
    depth_size: int = DEPTH_SIZE
    tokenizer: str | None = None  # identity every sample's json must carry, when known


@dataclass
class Report:
    shards: int
    samples: int
    problems: list[Finding]

    @classmethod
    def merged(cls, reports: list["Report"]) -> "Report":
        return cls(
            sum(report.shards for report in reports),
            sum(report.samples for report in reports),
            [problem for report in reports for problem in report.problems],
        )

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "shards": self.shards,
            "samples": self.samples,
            "problems_by_kind": dict(Counter(problem.kind for problem in self.problems).most_common()),
            "problems": [asdict(problem) for problem in self.problems],
        }


def _type_problems(
    where: str, record: Any, types: dict[str, type], problem: Callable[[str, str], None], nullable: tuple[str, ...] = ()
) -> bool:
    """Report missing and mistyped fields; True when ``record`` is usable (a dict with every field)."""
    if not isinstance(record, dict):
        problem("json-schema", f"{where} is {type(record).__name__}, expected an object")
        return False
    usable = True
    for name, expected in types.items():
        if name not in record:
            problem("json-schema", f"{where} lacks {name!r}")
            usable = False
        elif record[name] is None and name in nullable:
            continue
        elif not isinstance(record[name], expected) or isinstance(record[name], bool):
            problem("json-schema", f"{where}.{name} is {type(record[name]).__name__}, expected {expected.__name__}")
            usable = False
    return usable


def _image_size(data: bytes) -> tuple[int, int]:
    """Decode an image fully (not only its header) and return (width, height)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return image.size


def check_sample(
    shard: ShardFile, key: str, members: dict[str, bytes], expect: Expectations
) -> tuple[list[Finding], ShardSample | None]:
    """Every check of one sample; the decoded sample comes back when its members could be read."""
    problems: list[Finding] = []

    def problem(kind: str, message: str) -> None:
        problems.append(Finding(shard.path.name, key, kind, message))

    try:
        promised = json.loads(members["json"]) if "json" in members else {}
    except ValueError:
        promised = {}
    missing = [name for name in required_members(promised if isinstance(promised, dict) else {}) if name not in members]
    if missing:
        problem("missing-member", f"no {', '.join(missing)} member")
        return problems, None
    try:
        sample = ShardSample.from_members(key, members)
    except (ValueError, OSError) as error:  # npy or json that does not parse
        problem("undecodable", f"{type(error).__name__}: {error}")
        return problems, None

    meta = sample.meta
    meta_ok = _type_problems("json", meta, META_TYPES, problem, NULLABLE_META)
    if meta_ok:
        try:
            expected_key = sample_key(meta["dataset"], meta["split"], meta["image_id"])
        except ValueError as error:  # a dot in the dataset or split name
            problem("key", str(error))
        else:
            if key != expected_key:
                problem("key", f"key does not match its json (expected {expected_key})")
        if shard.split != "?" and (meta["dataset"], meta["split"]) != (shard.dataset, shard.split):
            problem("key", f"sample of {meta['dataset']}/{meta['split']} in a {shard.dataset}/{shard.split} shard")
        # A sample without depth (a text-only conversation) has no tokens, so no tokenizer to disagree with.
        if expect.tokenizer and meta["teacher"] is not None and meta["tokenizer"] != expect.tokenizer:
            problem("tokenizer", f"tokens from {meta['tokenizer']}, the folder's tokenizer is {expect.tokenizer}")

    image_size = None
    try:
        image_size = _image_size(sample.jpg) if sample.jpg is not None else None
    except Exception as error:  # PIL raises many types for broken image data
        problem("image", f"jpg does not decode: {error}")
    if meta_ok and image_size and image_size != (meta["width"], meta["height"]):
        problem("image", f"jpg is {image_size[0]}x{image_size[1]}, json says {meta['width']}x{meta['height']}")
    if meta_ok:
        _check_conversation(sample, meta, problem)
    if sample.depth is None or sample.depth_tokens is None:
        return problems, sample
    depth = sample.depth
    if depth.dtype != np.float16:
        problem("depth-dtype", f"depth is {depth.dtype}, expected float16")
    if depth.shape != (expect.depth_size, expect.depth_size):
        problem("depth-shape", f"depth is {depth.shape}, expected ({expect.depth_size}, {expect.depth_size})")
    elif not np.issubdtype(depth.dtype, np.floating) or not np.isfinite(depth).all():
        problem("depth-values", "depth is not all finite floating-point values")
    elif np.abs(depth).max() > DEPTH_RANGE_LIMIT:
        problem("depth-values", f"depth spans [{depth.min():.3f}, {depth.max():.3f}], normalised depth lies in [-1, 1]")

    tokens = sample.depth_tokens
    if tokens.dtype != np.int16:
        problem("token-dtype", f"depth tokens are {tokens.dtype}, expected int16")
    if tokens.ndim != 1 or tokens.size != expect.num_tokens:
        problem("token-length", f"depth tokens have shape {tokens.shape}, expected ({expect.num_tokens},)")
    if np.issubdtype(tokens.dtype, np.integer) and tokens.size:
        low, high = int(tokens.min()), int(tokens.max())
        if low < 0 or high >= expect.num_codes:
            problem("token-range", f"depth tokens span [{low}, {high}], the codebook has {expect.num_codes} codes")
    elif tokens.size:
        problem("token-dtype", f"depth tokens are {tokens.dtype}, not integers")

    if meta_ok:
        for position, ref in enumerate(meta["refs"]):
            _check_ref(f"refs[{position}]", ref, (meta["height"], meta["width"]), problem)
        if meta["dataset"].startswith("ade20k"):
            _check_ade(sample, meta, image_size, problem)
    return problems, sample


def _check_conversation(sample: ShardSample, meta: dict[str, Any], problem: Callable[[str, str], None]) -> None:
    """A conversation alternates from the user and ends with an answer; phrase masks fit the image."""
    turns = meta.get(CONVERSATION_FIELD)
    if turns is not None:
        roles = [turn.get("role") if isinstance(turn, dict) else None for turn in turns] if isinstance(turns, list) else []
        expected = ["user" if position % 2 == 0 else "assistant" for position in range(len(roles))]
        if not roles or roles != expected or roles[-1] != "assistant":
            problem("conversation", f"turns are {roles}, expected user/assistant alternating and ending with an answer")
    grounded = meta.get(GROUNDED_FIELD)
    if grounded is not None:
        phrases = grounded.get("phrases") if isinstance(grounded, dict) else None
        if not isinstance(phrases, list) or not phrases:
            problem("grounded", "grounded_caption has no phrases")
            return
        for position, phrase in enumerate(phrases):
            where = f"grounded_caption.phrases[{position}]"
            if _type_problems(where, phrase, PHRASE_TYPES, problem) and phrase["mask"].get("size") != [meta["height"], meta["width"]]:
                problem("rle-size", f"{where} mask is {phrase['mask'].get('size')} (h, w), the image is {[meta['height'], meta['width']]}")


def _check_ref(where: str, ref: Any, image_hw: tuple[int, int], problem: Callable[[str, str], None]) -> None:
    if not _type_problems(where, ref, REF_TYPES, problem):
        return
    rle = ref["mask"]
    size = rle.get("size")
    if not isinstance(size, list) or size != list(image_hw):
        problem("rle-size", f"{where} mask is {size} (h, w), the image is {list(image_hw)}")
        return
    try:
        mask = rle_to_mask(rle)
    except Exception as error:  # pycocotools raises bare exceptions on bad counts
        problem("rle", f"{where} mask does not decode: {error}")
        return
    if not mask.any():
        problem("rle", f"{where} mask is empty")
    if len(ref["bbox"]) != 4 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in ref["bbox"]):
        problem("json-schema", f"{where}.bbox is {ref['bbox']}, expected [x, y, w, h]")
    for position, sentence in enumerate(ref["sentences"]):
        if not isinstance(sentence, dict) or not isinstance(sentence.get("sent"), str) or not sentence["sent"].strip():
            problem("json-schema", f"{where}.sentences[{position}] has no text")
    if not ref["sentences"]:
        problem("json-schema", f"{where} has no sentences")
    if not {"median", "rank"} <= set(ref["depth"]):
        problem("json-schema", f"{where}.depth lacks median or rank")


def _check_ade(
    sample: ShardSample, meta: dict[str, Any], image_size: tuple[int, int] | None, problem: Callable[[str, str], None]
) -> None:
    has_question = meta.get(QUESTION_FIELD) is not None
    for member, data in (("seg.png", sample.seg_png), ("marked.jpg", sample.marked_jpg)):
        if data is None:
            if member == "seg.png" or has_question:
                problem("missing-member", f"ADE20k sample has no {member}")
            continue
        try:
            size = _image_size(data)
        except Exception as error:  # PIL raises many types for broken image data
            problem("image", f"{member} does not decode: {error}")
            continue
        if image_size and size != image_size:
            problem("image", f"{member} is {size[0]}x{size[1]}, the image is {image_size[0]}x{image_size[1]}")
    question = meta.get(QUESTION_FIELD)
    if question is None:
        # Curation writes no question (and no marked image) when no point set could be drawn.
        if sample.marked_jpg is not None:
            problem("question", "marked.jpg without a question")
        return
    _check_question(QUESTION_FIELD, question, meta, problem)
    questions = meta.get(QUESTIONS_FIELD)
    if questions is None:
        return  # the older one-question format
    if not isinstance(questions, list) or not questions or questions[0] != question:
        problem("question", f"{QUESTIONS_FIELD} is not a list of questions starting with {QUESTION_FIELD}")
        return
    for index, one in enumerate(questions[1:], start=1):
        _check_question(f"{QUESTIONS_FIELD}[{index}]", one, meta, problem)


def _check_question(where: str, question: Any, meta: dict[str, Any], problem: Callable[[str, str], None]) -> None:
    if not _type_problems(where, question, QUESTION_TYPES, problem):
        return
    if question["answer"] not in question["labels"]:
        problem("question", f"{where}: answer {question['answer']!r} is not one of the labels {question['labels']}")
    if not len(question["points"]) == len(question["labels"]) == len(question["point_depths"]):
        problem("question", f"{where}: points, labels and point_depths differ in length")
    if question.get("target", "depth") not in ("direct", "depth"):
        problem("question", f"{where}: target {question['target']!r} is neither 'direct' nor 'depth'")
    width, height = meta["width"], meta["height"]
    for point in question["points"]:
        inside = isinstance(point, list) and len(point) == 2 and 0 <= point[0] < width and 0 <= point[1] < height
        if not inside:
            problem("question", f"{where}: point {point} is outside the {width}x{height} image")


RefIds = set[tuple[str, int]]  # (sample key, ref_id)


@dataclass
class Contents:
    """The keys of a shard's samples and the refs inside them."""

    keys: set[str]
    refs: RefIds

    @classmethod
    def of_rows(cls, rows: list[dict[str, Any]]) -> "Contents":
        """What curation's rows say was kept (ADE20k rows are per image, without a ref_id)."""
        kept = [row for row in rows if row.get("status") == KEPT]
        refs = {(str(row["key"]), row["ref_id"]) for row in kept if row.get("ref_id") is not None}
        return cls({str(row["key"]) for row in kept}, refs)

    def add(self, sample: ShardSample) -> None:
        refs = sample.meta.get("refs") if isinstance(sample.meta, dict) else None
        if isinstance(refs, list):
            self.refs |= {(sample.key, ref.get("ref_id")) for ref in refs if isinstance(ref, dict)}


def _compare(shard_name: str, source: str, kind: str, listed: Contents, stored: Contents) -> list[Finding]:
    """What ``source`` lists as kept against what the tar holds, both ways."""

    def problem(key: str, message: str) -> Finding:
        return Finding(shard_name, key, kind, message)

    problems = [problem(key, f"kept in {source}, missing from the tar") for key in sorted(listed.keys - stored.keys)]
    problems += [problem(key, f"in the tar, not kept in {source}") for key in sorted(stored.keys - listed.keys)]
    # A key missing from the tar is reported once above, not once per ref.
    missing_refs = sorted(((key, ref_id) for key, ref_id in listed.refs - stored.refs if key in stored.keys), key=str)
    problems += [problem(key, f"ref {ref_id} kept in {source}, missing from the tar") for key, ref_id in missing_refs]
    extra_refs = sorted(stored.refs - listed.refs, key=str)
    problems += [problem(key, f"ref {ref_id} in the tar, not kept in {source}") for key, ref_id in extra_refs]
    return problems


def _check_side_files(shard: ShardFile, stored: Contents) -> list[Finding]:
    """The done marker and the per-shard table against what the tar holds."""
    name, marker = shard.path.name, shard.stats_path.name
    stats = shard.stats()
    if stats is None:
        return [Finding(name, None, "no-done-marker", f"{marker} is missing or unreadable: the shard is unfinished")]
    problems = []
    if isinstance(stats.get("samples"), int) and stats["samples"] != len(stored.keys):
        message = f"{marker} counts {stats['samples']} samples, the tar holds {len(stored.keys)}"
        problems.append(Finding(name, None, "marker-mismatch", message))
    try:
        rows = shard.table()
    except PerceptioError as error:
        return [*problems, Finding(name, None, "unreadable", str(error))]
    if rows is not None:
        problems += _compare(name, shard.table_path.name, "table-mismatch", Contents.of_rows(rows), stored)
    return problems


def _check_manifest(folder: ShardFolder, stored_by_shard: dict[str, Contents]) -> list[Finding]:
    """The manifest's kept keys and refs, shard by shard, against the tars it covers."""
    if folder.manifest_path is None:
        return []
    manifest = folder.manifest_path.name
    try:
        rows = folder.manifest_rows or []
    except PerceptioError as error:
        return [Finding(manifest, None, "unreadable", str(error))]
    by_shard: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if row.get("shard"):  # rows without a shard are refs the reader rejected before sharding
            by_shard.setdefault(f"{str(row['shard']).removesuffix('.tar')}.tar", []).append(row)
    problems = [
        Finding(manifest, None, "manifest-mismatch", f"lists shard {name}, which is not in the folder")
        for name in sorted(set(by_shard) - set(stored_by_shard))
    ]
    covered = folder.manifest_shards()
    for name, stored in sorted(stored_by_shard.items()):
        if name in by_shard or name in covered:
            listed = Contents.of_rows(by_shard.get(name, []))
            problems += _compare(name, manifest, "manifest-mismatch", listed, stored)
    return problems


def validate(folder: ShardFolder, expect: Expectations, advance: Callable[[], None] = lambda: None) -> Report:
    problems: list[Finding] = [
        Finding(path.name, None, "stray-file", "not a complete shard (a temporary file or an unexpected name)")
        for path in folder.strays
    ]
    first_seen: dict[str, str] = {}
    stored_by_shard: dict[str, Contents] = {}
    total = 0
    for shard in folder.shards:
        name = shard.path.name
        # Only keys and ref ids are kept from each sample: a shard's images would not fit in memory.
        stored = stored_by_shard[name] = Contents(set(), set())
        try:
            for key, members in iter_members(shard.path):
                total += 1
                if key in first_seen:
                    problems.append(Finding(name, key, "duplicate-key", f"key already in {first_seen[key]}"))
                first_seen.setdefault(key, name)
                stored.keys.add(key)
                try:
                    sample_problems, sample = check_sample(shard, key, members, expect)
                except Exception as error:  # a validator reports whatever a sample holds; it never crashes
                    sample = None
                    sample_problems = [Finding(name, key, "undecodable", f"{type(error).__name__}: {error}")]
                problems.extend(sample_problems)
                if sample is not None:
                    stored.add(sample)
        except (tarfile.TarError, EOFError, OSError) as error:
            last = f" after {len(stored.keys)} samples" if stored.keys else ""
            problems.append(Finding(name, None, "truncated", f"tar is damaged{last}: {error}"))
        problems += _check_side_files(shard, stored)
        advance()
    problems += _check_manifest(folder, stored_by_shard)
    return Report(len(folder.shards), total, problems)


def render_report(report: Report, console: Any) -> None:
    from rich.table import Table

    if report.problems:
        table = Table(title=f"{len(report.problems)} problems")
        for column in ("shard", "key", "kind", "problem"):
            table.add_column(column, overflow="fold")
        for problem in report.problems:
            table.add_row(problem.shard, problem.key or "-", problem.kind, problem.message)
        console.print(table)
    verdict = "[green]clean[/green]" if report.ok else f"[red]{len(report.problems)} problems[/red]"
    console.print(f"{report.shards} shards, {report.samples} samples: {verdict}")


def load_expectations(folder: ShardFolder, tokenizer: Any | None) -> Expectations:
    """Codebook size, token count and tokenizer identity from the tokenizer, else dataset.json."""
    if tokenizer is not None:
        return Expectations(tokenizer.config.num_codes, tokenizer.num_tokens, DEPTH_SIZE, tokenizer.identity)
    recorded = recorded_tokenizer(folder.dataset_info)
    return Expectations(
        num_codes=recorded.num_codes or DEFAULT_NUM_CODES,
        num_tokens=recorded.num_tokens or DEFAULT_NUM_DEPTH_TOKENS,
        tokenizer=recorded.identity,
    )
