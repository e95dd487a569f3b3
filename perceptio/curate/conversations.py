"""``perceptio-curate llava|grandf``: LLaVA-1.5 conversations and GranD-f grounded captions into shards.

The same shard contract, resume, manifest and ``dataset.json`` as the perception datasets
(:mod:`perceptio.curate.commands`): one sample per record, keyed by the record's position in the
file (``{dataset}_{split}_{position:012d}``, since record ids are not unique integers), with the
record's own id as ``source_id``. The paper trains on these without perception tokens, so by
default no depth teacher runs (``--depth-source none``): samples have no depth members and a
text-only record no ``jpg`` (perceptio/shards.py). With ``--depth-source model|gt`` and a
``--tokenizer``, every sample with an image gets ``depth.npy`` and ``depth_tokens.npy`` as the
perception datasets' do, from the same teacher and tokenizer code (:class:`DepthWorker`), in batches
of ``--batch-size`` images; text-only records stay without depth. Every record is decoded and its
depth computed in this process (no Ray): one teacher, one tokenizer.

Rejected (one manifest row each, with the reason): what the readers refuse (``empty_conversation``,
``bad_turns``, ``placeholder_mismatch``, ``no_phrases``, ``phrase_mismatch``, ``bad_record``, listed
as rejected by the reader), images that are missing, corrupt or of another size than stated
(``missing_image``, ``corrupt_image``, ``size_mismatch``), and GranD-f phrases whose mask does not
fit the image (``invalid_mask``) or covers no pixel (``empty_mask``): a ``[SEG]`` without its mask
would teach the segmentation head nothing true. For the same reason a text that already holds a
perception token (``[SEG]``, ``[D_START]``, a depth code) is rejected as ``reserved_token``.
"""

from __future__ import annotations

import dataclasses
import io
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
from PIL import Image

import perceptio
from perceptio.curate.depth_models import resolve_tokenizer, tokenizer_identity
from perceptio.curate.distributor import DepthWorker, TeacherSpec
from perceptio.curate.output import dataset_out, prepare_out, write_interop_files
from perceptio.curate.plan import plan_shards
from perceptio.curate.sample_builder import BuiltImage
from perceptio.curate.writer import ShardSetWriter, check_resumable, done_shards, write_dataset_json, write_manifest
from perceptio.errors import PerceptioError
from perceptio.progress import ProgressLog
from perceptio.shards import (
    CONVERSATION_FIELD,
    GROUNDED_FIELD,
    KEPT,
    REJECTED,
    SOURCE_ID_FIELD,
    ManifestRow,
    ShardSample,
    mask_to_rle,
    sample_key,
)
from perceptio.sources.masks import MALFORMED, parse_segmentation, segmentation_to_mask
from perceptio.sources.problems import BadImage, decode_image
from perceptio.tokenize.cache import content_hash
from perceptio.tokenize.config import DEPTH_SOURCES as TEACHER_SOURCES
from perceptio.tokens import special_tokens

LLAVA, GRANDF = "llava", "grandf"
# Text that already holds a perception token would put a [SEG] without a mask (or a depth span
# without depth) into a target; the tokenizer reads these strings as the special tokens.
RESERVED = tuple(special_tokens())
NO_DEPTH = "none"
DEPTH_SOURCES = (NO_DEPTH, *TEACHER_SOURCES)  # none: the paper's way; model / gt as for the perception datasets


@dataclass(frozen=True)
class ConversationItem:
    """One record, everything needed to build its sample without the reader."""

    dataset: str  # "llava" or "grandf-<subset>"
    split: str
    image_id: int  # the record's position in its file
    source_id: str
    image_path: str | None  # None: a text-only conversation
    file_name: str | None
    width: int | None = None  # as the annotations state it (checked against the image), else None
    height: int | None = None
    turns: tuple[tuple[str, str], ...] = ()  # LLaVA: (role, text)
    caption: str | None = None  # GranD-f
    phrases: tuple[Any, ...] = ()  # GranD-f: perceptio.sources.grandf.Phrase

    @property
    def key(self) -> str:
        return sample_key(self.dataset, self.split, self.image_id)


@dataclass
class ConversationRequest:
    """Everything one ``perceptio-curate llava|grandf`` run needs."""

    kind: str  # LLAVA or GRANDF
    json: Path
    images: Path
    out: Path
    split: str | None = None  # LLaVA: default "train"; GranD-f: default from the file name
    samples_per_shard: int = 1000
    teacher: TeacherSpec | None = None  # None: no depth members (--depth-source none)
    tokenizer: Path | None = None  # needed with a teacher: depth.npy is stored under its normalisation
    batch_size: int = 8  # images per teacher/tokenizer forward pass
    overwrite: bool = False
    progress: bool = True
    settings: dict[str, Any] = field(default_factory=dict)  # filled by curate_conversations


def read_items(request: ConversationRequest) -> tuple[str, str, list[ConversationItem], list[Any]]:
    """(dataset name, split, items, reader problems) of the request's file."""
    if request.kind == LLAVA:
        from perceptio.sources.llava import LlavaDataset

        reader = LlavaDataset(request.json, request.images)
        split = request.split or "train"
        items = [
            ConversationItem(LLAVA, split, conversation.index, conversation.id,
                             str(reader.image_path(conversation)) if conversation.image else None, conversation.image,
                             turns=tuple((turn.role, turn.text) for turn in conversation.turns))
            for conversation in reader.conversations
        ]
        return LLAVA, split, items, reader.problems
    if request.kind == GRANDF:
        from perceptio.sources.grandf import GrandfDataset

        data = GrandfDataset(request.json, request.images, request.split)
        items = [
            ConversationItem(data.name, data.split, caption.index, caption.id, str(data.image_path(caption)),
                             caption.file_name, caption.width, caption.height, caption=caption.caption,
                             phrases=caption.phrases)
            for caption in data.captions
        ]
        return data.name, data.split, items, data.problems
    raise PerceptioError(f"unknown conversation dataset {request.kind!r}; expected {LLAVA} or {GRANDF}")


def _phrase_masks(item: ConversationItem, height: int, width: int) -> tuple[list[dict[str, Any]], int, str | None]:
    """The json phrases with their RLE masks and their total area, or the reason the sample is rejected."""
    phrases, area = [], 0
    for phrase in item.phrases:
        parsed = parse_segmentation(phrase.segmentation, height, width)
        malformed = [issue.detail for issue in parsed.issues if issue.kind == MALFORMED]
        if malformed or not parsed.usable:
            detail = (malformed or [issue.detail for issue in parsed.issues] or ["no part"])[0]
            return [], 0, f"invalid_mask: phrase {phrase.text!r}: {detail}"
        mask = segmentation_to_mask(phrase.segmentation, height, width)
        if not mask.any():
            return [], 0, f"empty_mask: phrase {phrase.text!r} covers no pixel"
        phrases.append({"text": phrase.text, "start": phrase.start, "end": phrase.end, "mask": mask_to_rle(mask)})
        area += int(np.count_nonzero(mask))
    return phrases, area, None


def build_sample(item: ConversationItem) -> BuiltImage:
    """The shard sample and manifest row of one record (a pure function of the item and its image)."""
    started = time.perf_counter()
    answers = sum(role == "assistant" for role, _ in item.turns) or len(item.phrases)

    def row(reason: str | None, mask_area: int | None = None) -> ManifestRow:
        return ManifestRow(key=item.key, dataset=item.dataset, split=item.split, image_id=item.image_id,
                           sentences=answers, status=REJECTED if reason else KEPT,
                           reason=reason.split(":", 1)[0] if reason else None, detail=reason, mask_area=mask_area)

    def built(sample: ShardSample | None, reason: str | None, mask_area: int | None = None) -> BuiltImage:
        return BuiltImage(item.key, sample, [row(reason, mask_area)], {"build": time.perf_counter() - started})

    texts = [text for _, text in item.turns] + ([item.caption] if item.caption is not None else [])
    reserved = next((token for token in RESERVED for text in texts if token in text), None)
    if reserved is not None:
        return built(None, f"reserved_token: the text holds {reserved}, which only the model's perception output may")
    jpg, width, height = None, None, None
    if item.image_path is not None:
        stated = (item.width, item.height) if item.width and item.height else None
        try:
            image = decode_image(Path(item.image_path), item.source_id, stated)
        except BadImage as bad:
            return built(None, f"{bad.problem.kind}: {bad.problem.reason}")
        jpg = Path(item.image_path).read_bytes()
        width, height = image.size
    meta: dict[str, Any] = {
        "dataset": item.dataset, "split": item.split, "image_id": item.image_id, "file_name": item.file_name,
        "width": width, "height": height, "teacher": None, "tokenizer": None, "refs": [],
        SOURCE_ID_FIELD: item.source_id,
    }
    mask_area = None
    if item.caption is not None:
        assert width is not None and height is not None  # GranD-f records always have an image
        phrases, mask_area, reason = _phrase_masks(item, height, width)
        if reason is not None:
            return built(None, reason)
        meta[GROUNDED_FIELD] = {"caption": item.caption, "phrases": phrases}
    else:
        meta[CONVERSATION_FIELD] = [{"role": role, "text": text} for role, text in item.turns]
    return built(ShardSample(item.key, jpg, None, None, meta), None, mask_area)


def with_depth(items: list[ConversationItem], built: list[BuiltImage],
               worker: DepthWorker) -> tuple[list[BuiltImage], str | None, float]:
    """The built samples of a batch of items, those with an image given the teacher's depth and the
    tokenizer's tokens in one call of each (text-only and rejected records pass unchanged); also the
    teacher's identity (None when no sample had an image) and the seconds it took."""
    started = time.perf_counter()
    todo = [index for index, one in enumerate(built) if one.sample is not None and one.sample.jpg is not None]
    if not todo:
        return built, None, 0.0
    jpgs: list[bytes] = [built[index].sample.jpg for index in todo]  # type: ignore[union-attr,misc]
    images = []
    for jpg in jpgs:
        with Image.open(io.BytesIO(jpg)) as image:
            images.append(image.convert("RGB"))
    results = worker.predict_images([str(items[index].image_path) for index in todo], images,
                                    [content_hash(jpg) for jpg in jpgs])
    done = list(built)
    for index, result in zip(todo, results):
        sample = built[index].sample
        assert sample is not None
        meta = {**sample.meta, "teacher": result.teacher, "tokenizer": result.tokenizer}
        done[index] = dataclasses.replace(built[index], sample=dataclasses.replace(
            sample, depth=result.depth, depth_tokens=result.tokens, meta=meta))
    return done, results[0].teacher, time.perf_counter() - started


def _check_depth(request: ConversationRequest) -> tuple[str, dict[str, Any] | None]:
    """The teacher source as settings record it, and the tokenizer's identity (None without depth)."""
    if request.batch_size < 1:
        raise PerceptioError(f"--batch-size must be >= 1, got {request.batch_size}")
    if request.teacher is None:
        if request.tokenizer is not None:
            raise PerceptioError(f"--tokenizer is only used with --depth-source {' or '.join(TEACHER_SOURCES)}; "
                                 f"{request.kind} samples without depth have no depth tokens")
        return NO_DEPTH, None
    if request.tokenizer is None:
        raise PerceptioError(f"--depth-source {request.teacher.source} needs --tokenizer: depth.npy is stored under "
                             "the tokenizer's normalisation, beside its tokens")
    request.tokenizer = resolve_tokenizer(request.tokenizer)
    request.teacher.check()
    source = request.teacher.source if request.teacher.source == "gt" else f"model:{request.teacher.model}"
    return source, tokenizer_identity(request.tokenizer)


def curate_conversations(request: ConversationRequest) -> dict[str, Any]:
    """Curate one LLaVA or GranD-f file into ``request.out``/NAME (as the other datasets: ``OUT`` itself when it
    already is that dataset's folder); finished shards are kept (resume). Returns dataset.json."""
    teacher_source, tokenizer = _check_depth(request)
    name, split, items, problems = read_items(request)
    shards = plan_shards({split: items}, request.samples_per_shard) if items else []
    settings = {"dataset": name, "splits": [split], "samples_per_shard": request.samples_per_shard,
                "batch_size": request.batch_size if tokenizer else None,
                "tokenizer": tokenizer["identity"] if tokenizer else None, "teacher_source": teacher_source, "build": None}
    out = dataset_out(request.out, name)
    prepare_out(out, name, request.overwrite)
    done = set(done_shards(str(out), [shard.name for shard in shards]))
    expected_teacher = check_resumable(out, sorted(done), settings)
    todo = [shard for shard in shards if shard.name not in done]
    writer = ShardSetWriter(out, todo, settings, expected_teacher)
    worker = None
    if request.teacher is not None and todo:
        worker = DepthWorker(request.teacher, str(request.tokenizer), torch_threads=0, model_workers=1)
    try:
        with ProgressLog(f"curate {name}", sum(len(shard.images) for shard in todo), unit="records",
                         enabled=request.progress) as progress:
            for shard in todo:
                for start in range(0, len(shard.images), request.batch_size):
                    batch = shard.images[start:start + request.batch_size]
                    built = [build_sample(item) for item in batch]
                    teacher, seconds = None, 0.0
                    if worker is not None:
                        built, teacher, seconds = with_depth(batch, built, worker)
                    for offset, one in enumerate(built):
                        writer.add(shard.name, start + offset, one, teacher, seconds / len(built))
                    progress.update(writer.images_done, written=writer.samples_written, rejected=writer.refs_rejected)
    except BaseException:
        writer.abort()
        raise
    reader_rows = [ManifestRow.from_problem(name, problem) for problem in problems]
    file_metadata = {"dataset": name, "tokenizer": settings["tokenizer"], "teacher": writer.teacher,
                     "perceptio_version": perceptio.__version__}
    manifest = write_manifest(out, shards, reader_rows, file_metadata)
    info = write_dataset_json(out, shards, manifest, tokenizer or {"identity": None}, settings)
    contents = "one sample per record (json; jpg when it has an image" + (
        ", with depth.npy and depth_tokens.npy)" if tokenizer else "), no depth members")
    write_interop_files(out, shards, info, contents)
    return info


# ----------------------------------------------------------------------------------- Typer


def teacher_spec(depth_source: str, model: str, depth_dir: Path, cache_dir: Path | None) -> TeacherSpec | None:
    """The depth teacher ``--depth-source`` names (None for 'none')."""
    if depth_source == NO_DEPTH:
        return None
    if depth_source not in DEPTH_SOURCES:
        raise PerceptioError(f"--depth-source must be one of {', '.join(DEPTH_SOURCES)}, got {depth_source!r}")
    from perceptio.tokenize.cache import default_cache_dir

    return TeacherSpec(source=depth_source, model=model, depth_dir=str(depth_dir) if depth_source == "gt" else None,
                       cache_dir=str(cache_dir or default_cache_dir()))


def _command(kind: str):
    """The Typer command of one conversation dataset."""
    import typer

    json_help = ("llava_v1_5_mix665k.json (or any file in its format)" if kind == LLAVA
                 else "a GranD-f GCG file as distributed, e.g. GranDf/annotations/train/GranDf_HA_GCG_train.json")
    images_help = ("the images root the records' 'image' paths are relative to" if kind == LLAVA
                   else "the folder the records' file names are relative to (GranDf_HA_images/train, coco_2014/train2014, ...)")
    split_help = "split name of the shards [default: train]" if kind == LLAVA else "split name [default: from the file name]"

    def command(
        json_file: Path = typer.Option(..., "--json", help=json_help),
        images: Path = typer.Option(..., "--images", help=images_help),
        out: Path = typer.Option(..., "--out", help="output folder for the shards of this one dataset"),
        split: str = typer.Option(None, "--split", help=split_help),
        samples_per_shard: int = typer.Option(ConversationRequest.samples_per_shard, "--samples-per-shard", help="records per shard"),
        depth_source: str = typer.Option(NO_DEPTH, "--depth-source", help="'none': no depth members (as the paper uses these datasets); 'model': the --depth-model teacher; 'gt': ground-truth depth PNGs in --depth-dir"),
        tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="depth tokenizer (a folder or a hub id), needed with --depth-source model|gt", show_default=False),
        depth_model: str = typer.Option(TeacherSpec.model, "--depth-model", help="Depth Anything model (hub id or local folder) used as the depth teacher"),
        depth_dir: Optional[Path] = typer.Option(None, "--depth-dir", help="--depth-source gt: the folder of {image stem}.png depth maps (default: IMAGES/depth)", show_default=False),
        cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="depth cache of the model teacher, shared with perceptio-tokenize (default: $PERCEPTIO_CACHE/depth or ~/.cache/perceptio/depth)", show_default=False),
        batch_size: int = typer.Option(ConversationRequest.batch_size, "--batch-size", help="images per teacher/tokenizer forward pass"),
        overwrite: bool = typer.Option(ConversationRequest.overwrite, "--overwrite", help="discard this dataset's earlier shards instead of resuming"),
        progress: bool = typer.Option(ConversationRequest.progress, "--progress/--no-progress", help="show the live progress display"),
    ) -> None:
        info = curate_conversations(ConversationRequest(
            kind, json_file, images, out, split, samples_per_shard,
            teacher=teacher_spec(depth_source, depth_model, depth_dir or images / "depth", cache_dir),
            tokenizer=tokenizer, batch_size=batch_size, overwrite=overwrite, progress=progress))
        for split_name, counts in info["splits"].items():
            rejects = ", ".join(f"{reason} {count}" for reason, count in counts["rejects"].items()) or "none"
            typer.echo(f"{info['settings']['dataset']} {split_name}: {counts['samples']} samples from {counts['images']} "
                       f"records, rejected: {rejects}")
        by_reader = ", ".join(f"{reason} {count}" for reason, count in info["rejected_by_reader"].items()) or "none"
        typer.echo(f"rejected by the reader: {by_reader}; {len(info['shards'])} shards in "
                   f"{dataset_out(out, info['settings']['dataset'])}")

    command.__doc__ = (
        "Curate LLaVA-1.5 conversations (multi-turn, with or without an image) into shards"
        if kind == LLAVA else
        "Curate GranD-f grounded captions (phrases tied to masks, stored as COCO RLE) into shards"
    ) + (", without depth members unless --depth-source model|gt (with --tokenizer) gives each image depth.npy and "
         "depth_tokens.npy. Re-running resumes.")
    return command


def register(app: Any) -> None:
    """Add the llava and grandf commands to the ``perceptio-curate`` app."""
    for kind in (LLAVA, GRANDF):
        app.command(kind)(_command(kind))
