"""``perceptio-evaluate``: referring segmentation, HardBLINK, depth tokens, where learning breaks (diagnose), and one-image predictions.

Every benchmark prints a rich table (or JSON with ``--json``; ``--out FILE`` also writes the JSON)
that names the checkpoint (path and identity) and counts the data, so two runs can be compared.
Run under ``torchrun --nproc-per-node N`` to split the samples across processes; the records are
gathered once per sample and only rank 0 reports.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import typer
from rich.console import Console
from rich.table import Table

from perceptio.errors import PerceptioError, run_cli
from perceptio.evaluate.distributed import ProcessGroup, init_process_group
from perceptio.evaluate.synth_blink import SynthBlinkConfig
from perceptio.io import write_text_atomic
from perceptio.progress import ProgressLog

app = typer.Typer(
    help="Evaluate a Perceptio checkpoint: refseg (cIoU/gIoU), hardblink (relative depth), depth tokens, conversations, diagnose (where learning breaks), predict.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console(stderr=True)

CHECKPOINT_HELP = "Model folder exported by perceptio-train (PerceptioModel.save_pretrained: perceptio.json + weights)."
LIMIT_HELP = "Evaluate only the first N samples (in dataset order), e.g. for a quick look."
JSON_HELP = "Print the results as JSON on stdout instead of a table."
OUT_HELP = "Also write the results as JSON to this file."
TOKENS_HELP = "Most tokens to generate per sample (the depth span alone takes 102)."
THREADS_HELP = "CPU threads for torch (default: torch's choice); 1 is fastest for the tiny model on a busy CPU."
# Options the benchmark commands share (typer reads a default's OptionInfo; one object serves all).
CHECKPOINT_OPTION = typer.Option(..., help=CHECKPOINT_HELP)
SHARDS_OPTION = typer.Option(..., help="Shard folder(s) of perceptio-curate (repeat for several).")
LIMIT_OPTION = typer.Option(None, help=LIMIT_HELP)
TOKENS_OPTION = typer.Option(160, help=TOKENS_HELP)
THREADS_OPTION = typer.Option(None, help=THREADS_HELP)
JSON_OPTION = typer.Option(False, "--json", help=JSON_HELP)
OUT_OPTION = typer.Option(None, help=OUT_HELP)
BATCH_OPTION = typer.Option(1, "--batch-size", min=1, help="Samples generated together (left-padded prompts, the format constraint per row; the same tokens as one at a time). 8-16 on a GPU.")
DTYPE_OPTION = typer.Option("auto", "--dtype", help="Storage of the frozen weights: auto (bfloat16 on a GPU, float32 on the CPU), bfloat16 or float32.")


def _limited(items: Sequence[Any], limit: Optional[int]) -> list[Any]:
    if limit is not None and limit < 1:
        raise PerceptioError(f"--limit must be at least 1, not {limit}")
    return list(items[:limit] if limit is not None else items)


def percent(value: Optional[float]) -> str:
    """A share as a percentage with one decimal, "-" when there is none."""
    return "-" if value is None else f"{100 * value:.1f}"


def _share(items: Sequence[Any], group: ProcessGroup) -> int:
    return len(group.take(items))


def report(results: dict[str, Any], table: Table, as_json: bool, out: Optional[Path]) -> None:
    """Print the table (or the JSON) and write ``out`` atomically."""
    text = json.dumps(results, indent=2, sort_keys=True)
    if out is not None:
        write_text_atomic(out, text + "\n")
    if as_json:
        typer.echo(text)
    else:
        Console().print(table)


def _header(results: dict[str, Any]) -> str:
    checkpoint = results["checkpoint"]
    return f"{results['benchmark']} | {checkpoint['identity']} | {results['processes']} process(es)"


def _load_predictor(checkpoint: Path, max_new_tokens: int, threads: Optional[int], dtype: str = "auto"):
    import torch

    from perceptio.evaluate.predict import Predictor

    if threads is not None:
        if threads < 1:
            raise PerceptioError(f"--threads must be at least 1, not {threads}")
        torch.set_num_threads(threads)
    return Predictor.from_checkpoint(checkpoint, max_new_tokens=max_new_tokens, dtype=dtype)


def _checkpoint_info(checkpoint: Path, predictor: Any) -> dict[str, str]:
    return {"path": str(checkpoint), "identity": predictor.identity}


def _require(items: Sequence[Any], what: str, shards: Sequence[Path], split: str) -> None:
    if not items:
        raise PerceptioError(f"no {what} in split {split!r} of {', '.join(map(str, shards))}")


def _results(benchmark: str, checkpoint: Path, predictor: Any, processes: int, data: dict[str, Any],
             **rest: Any) -> dict[str, Any]:
    """The head every benchmark's results share (what was scored, by which model, on what data)."""
    return {"benchmark": benchmark, "checkpoint": _checkpoint_info(checkpoint, predictor), "data": data,
            "processes": processes, **rest}


def _table(results: dict[str, Any], columns: Sequence[str], suffix: str = "", caption: Optional[str] = None) -> Table:
    table = Table(title=_header(results) + suffix, caption=caption)
    for column in columns:
        table.add_column(column)
    return table


def _predict_all(
    label: str, items: list, group: ProcessGroup, checkpoint: Path, max_new_tokens: int, threads: Optional[int],
    query: Callable[[Any], Any], score: Callable[[Any, Any], dict], sample_id: Callable[[Any], str],
    batch_size: int = 1, dtype: str = "auto",
) -> tuple[Any, list[dict] | None]:
    """Load the model, score this process's share of ``items``, gather; records on rank 0 only."""
    from perceptio.evaluate.benchmarks import evaluate_items

    predictor = _load_predictor(checkpoint, max_new_tokens, threads, dtype)
    with ProgressLog(label, _share(items, group), unit="samples", enabled=group.is_main) as progress:
        records = evaluate_items(items, predictor, query, score, group, sample_id, batch_size,
                                 lambda done: progress.update(progress.completed + done))
    return predictor, records if group.is_main else None


@app.command()
def refseg(
    checkpoint: Path = CHECKPOINT_OPTION,
    shards: list[Path] = SHARDS_OPTION,
    split: str = typer.Option("val", help="Split to evaluate (val, testA, testB, test)."),
    limit: Optional[int] = LIMIT_OPTION,
    max_new_tokens: int = TOKENS_OPTION,
    threads: Optional[int] = THREADS_OPTION,
    batch_size: int = BATCH_OPTION,
    dtype: str = DTYPE_OPTION,
    as_json: bool = JSON_OPTION,
    out: Optional[Path] = OUT_OPTION,
) -> None:
    """Referring segmentation: cIoU, gIoU and precision@0.5 per dataset and split (every sentence one
    sample); the JSON also lists every expression's prompt, intersection and union (``per_expression``),
    to slice the scores by kind of expression."""
    from perceptio.evaluate.benchmarks import read_shard_items, refseg_score, shard_query
    from perceptio.evaluate.metrics import refseg_scores_by_group

    group = init_process_group()
    items = _limited([item for item in read_shard_items(shards, split) if item.mask_rle is not None], limit)
    _require(items, "referring expressions", shards, split)
    predictor, records = _predict_all(f"refseg {split}", items, group, checkpoint, max_new_tokens, threads,
                                      shard_query, refseg_score, lambda item: item.id, batch_size, dtype)
    if records is None:
        return
    scores = refseg_scores_by_group(records)
    results = _results("refseg", checkpoint, predictor, group.world_size,
                       {"shards": [str(path) for path in shards], "split": split, "expressions": len(records),
                        "images": len({record["id"].split("/")[0] for record in records}), "limit": limit},
                       scores={name: score.to_dict() for name, score in scores.items()}, per_expression=records)
    table = _table(results, ("dataset/split", "expressions", "cIoU", "gIoU", "P@0.5", "no [SEG]"))
    for name, score in scores.items():
        table.add_row(name, str(score.expressions), percent(score.ciou), percent(score.giou),
                      percent(score.precision_at_50), str(score.missing_seg))
    report(results, table, as_json, out)


@app.command()
def conversation(
    checkpoint: Path = CHECKPOINT_OPTION,
    shards: list[Path] = SHARDS_OPTION,
    split: str = typer.Option("val", help="Split of the conversation shards (perceptio-curate llava) to evaluate."),
    limit: Optional[int] = LIMIT_OPTION,
    max_new_tokens: int = typer.Option(256, help="Most tokens per answer: conversations answer at length."),
    threads: Optional[int] = THREADS_OPTION,
    batch_size: int = BATCH_OPTION,
    dtype: str = DTYPE_OPTION,
    as_json: bool = JSON_OPTION,
    out: Optional[Path] = OUT_OPTION,
) -> None:
    """Held-out conversations: exact match of every answer (lower case, no punctuation or articles),
    each generated after the conversation's earlier turns as they were written."""
    from perceptio.evaluate.benchmarks import conversation_query, conversation_score, read_conversation_items
    from perceptio.evaluate.metrics import conversation_scores

    group = init_process_group()
    items = _limited(read_conversation_items(shards, split), limit)
    _require(items, "conversation", shards, split)
    predictor, records = _predict_all(f"conversation {split}", items, group, checkpoint, max_new_tokens, threads,
                                      conversation_query, conversation_score, lambda item: item.id, batch_size, dtype)
    if records is None:
        return
    scores = conversation_scores(records)
    results = _results("conversation", checkpoint, predictor, group.world_size,
                       {"shards": [str(path) for path in shards], "split": split, "answers": len(records), "limit": limit},
                       scores=scores.as_dict(), examples=records[:5])
    table = _table(results, ("answers", "exact match", "conversations", "all answers right"))
    table.add_row(str(scores.answers), percent(scores.exact_match), str(scores.conversations), percent(scores.all_turns_right))
    report(results, table, as_json, out)


@app.command()
def hardblink(
    checkpoint: Path = CHECKPOINT_OPTION,
    data: Path = typer.Option(..., help="HardBLINK folder (images/, questions/, answers/)."),
    variants: str = typer.Option("3,4,5", help="Point counts to evaluate, comma-separated."),
    answer: str = typer.Option("auto", help="How to ask: 'depth' (write the depth span, then the letter), 'direct' (the letter alone), or 'auto' (depth when the model was trained with depth tokens)."),
    world: Optional[Path] = typer.Option(None, help="The synthetic world the questions were drawn from (perceptio-evaluate synth-blink): adds (a), the answer read from its ground-truth depth tokens, and the token accuracy of the generated spans."),
    tokenizer: Optional[Path] = typer.Option(None, help="Depth tokenizer folder for the decomposition (default: the checkpoint's own; needed for a model trained without depth tokens)."),
    limit: Optional[int] = LIMIT_OPTION,
    max_new_tokens: int = TOKENS_OPTION,
    threads: Optional[int] = THREADS_OPTION,
    batch_size: int = BATCH_OPTION,
    dtype: str = DTYPE_OPTION,
    as_json: bool = JSON_OPTION,
    out: Optional[Path] = OUT_OPTION,
) -> None:
    """HardBLINK relative depth ("which point is closest"): accuracy per point count and their mean.

    On questions that record their points (the synthetic split) it also reports the decomposition:
    (a) the answer read from the ground-truth tokens (with --world), (b) the answer read from the
    tokens the model generated, (c) the letter it wrote, and the token accuracy of its spans; asked
    for the span (with --world), (d) the letter it writes after the true span, given to it.
    """
    from perceptio.evaluate.benchmarks import ANSWER_STYLES, hardblink_query, hardblink_score
    from perceptio.evaluate.decomposition import TokenReader, decomposition_scores
    from perceptio.evaluate.hardblink import load_hardblink, parse_choice, score_hardblink

    try:
        chosen = tuple(int(part) for part in variants.split(",") if part.strip())
    except ValueError:
        raise PerceptioError(f"--variants {variants!r} is not a comma-separated list of point counts") from None
    if answer not in ("auto", *ANSWER_STYLES):
        raise PerceptioError(f"--answer must be auto, depth or direct, not {answer!r}")
    if world is not None and not (world / "depth").is_dir():
        raise PerceptioError(f"--world {world} is not a synthetic world (no depth/ folder)")
    group = init_process_group()
    questions = _limited(load_hardblink(data, chosen), limit)
    predictor = _load_predictor(checkpoint, max_new_tokens, threads, dtype)
    model = predictor.model
    style = answer if answer != "auto" else ("depth" if model.config.use_depth_tokens else "direct")
    vqvae = model.depth_vqvae
    if tokenizer is not None:
        from perceptio.tokenize import DepthVQVAE

        vqvae = DepthVQVAE.from_pretrained(tokenizer)
    reader = TokenReader(vqvae, world) if vqvae is not None and any("points" in q.row for q in questions) else None
    from perceptio.evaluate.benchmarks import evaluate_items

    with ProgressLog("hardblink", _share(questions, group), unit="samples", enabled=group.is_main) as progress:
        records = evaluate_items(questions, predictor, lambda question: hardblink_query(question, style),
                                 lambda question, prediction: hardblink_score(question, prediction, reader, style),
                                 group, lambda question: question.sample_id, batch_size,
                                 lambda done: progress.update(progress.completed + done))
    if reader is not None and world is not None and style == "depth":
        # (d): the same questions with the answer begun by the true span: can the letter read it?
        with ProgressLog("hardblink, true span given", _share(questions, group), unit="samples",
                         enabled=group.is_main) as progress:
            fed = evaluate_items(questions, predictor, lambda question: hardblink_query(question, style),
                                 lambda question, prediction: {"id": question.sample_id,
                                                               "choice": parse_choice(prediction.text, question.variant)},
                                 group, lambda question: question.sample_id, batch_size,
                                 lambda done: progress.update(progress.completed + done),
                                 answer_prefix=lambda question: reader.truth_span(question.row))
        for record, given in zip(records, fed):
            record["truth_fed_choice"] = given["choice"]
    if not group.is_main:
        return
    scores = score_hardblink(records)
    decomposition = decomposition_scores(records) if reader is not None else None
    results = _results("hardblink", checkpoint, predictor, group.world_size,
                       {"root": str(data), "questions": len(records), "limit": limit, "answer": style,
                        "world": str(world) if world else None},
                       scores={**scores.to_dict(), "decomposition": decomposition}, replies=records)
    columns = ["points", "questions", "(c) letter %", "unparsed"]
    readouts = bool(decomposition) and decomposition["readout_copy"] is not None
    if decomposition:
        columns += ["(b) from its tokens %", "(a) from true tokens %", "(d) letter after the true span %",
                    "well-formed %", "token accuracy %"] + (["readouts = its span %", "readouts = truth %"] if readouts else [])
    table = _table(results, columns, f" | asked: {style}")
    for variant, accuracy in scores.accuracy.items():
        row = [str(variant), str(scores.questions[variant]), percent(accuracy), str(scores.unparsed[variant])]
        if decomposition:
            parts = decomposition["by_variant"][str(variant)]
            row += [percent(parts["token_choice"]), percent(parts["truth_choice"]), percent(parts["truth_fed_choice"]),
                    percent(parts["well_formed"]), percent(parts["token_accuracy"])]
            row += [percent(parts["readout_copy"]), percent(parts["readout_truth"])] if readouts else []
        table.add_row(*row)
    table.add_row("average", str(len(records)), percent(scores.average), "")
    report(results, table, as_json, out)


@app.command()
def depth(
    checkpoint: Path = CHECKPOINT_OPTION,
    shards: list[Path] = SHARDS_OPTION,
    split: str = typer.Option("val", help="Split to evaluate."),
    limit: Optional[int] = LIMIT_OPTION,
    max_new_tokens: int = TOKENS_OPTION,
    threads: Optional[int] = THREADS_OPTION,
    batch_size: int = BATCH_OPTION,
    dtype: str = DTYPE_OPTION,
    as_json: bool = JSON_OPTION,
    out: Optional[Path] = OUT_OPTION,
) -> None:
    """Depth tokens: well-formed span rate, token accuracy and decoded depth against the teacher (one sample per image)."""
    from perceptio.evaluate.benchmarks import depth_score, read_shard_items, shard_query
    from perceptio.evaluate.metrics import depth_token_scores

    group = init_process_group()
    items = _limited(read_shard_items(shards, split, per_image=True), limit)
    _require(items, "samples", shards, split)
    predictor, records = _predict_all(f"depth {split}", items, group, checkpoint, max_new_tokens, threads,
                                      shard_query, depth_score, lambda item: item.id, batch_size, dtype)
    if records is None:
        return
    scores = depth_token_scores(records)
    results = _results("depth", checkpoint, predictor, group.world_size,
                       {"shards": [str(path) for path in shards], "split": split, "images": len(records), "limit": limit},
                       scores=scores.to_dict())
    table = _table(results, ("images", "well-formed %", "token accuracy %", "AbsRel", "delta<1.25"))
    table.add_row(
        str(scores.samples), percent(scores.well_formed_rate), percent(scores.token_accuracy),
        "-" if scores.abs_rel is None else f"{scores.abs_rel:.3f}", "-" if scores.delta1 is None else f"{scores.delta1:.3f}",
    )
    report(results, table, as_json, out)


SYNTH_BLINK_DEFAULTS = SynthBlinkConfig()


@app.command("synth-blink")
def synth_blink(
    world: Path = typer.Option(..., help="A synthetic world (perceptio-curate synth); use one the model was not trained on."),
    out: Path = typer.Option(..., help="Folder to write the questions into, in the HardBLINK layout (replaced whole)."),
    per_variant: Optional[int] = typer.Option(None, help="Most questions per point count (default: as many as the world gives)."),
    questions_per_image: int = typer.Option(1, help="Questions per image and point count, each on its own objects and points."),
    hard: bool = typer.Option(False, "--hard/--easy", help="Balance the split so that the lowest point and the point on the largest object are nearest only as often as chance."),
    seed: int = typer.Option(0, help="Seed of the choice of objects, points and letters."),
    min_answer_gap: float = typer.Option(SYNTH_BLINK_DEFAULTS.min_answer_gap, help="How much nearer (relative depth) the nearest point is than the next."),
    mark_style: str = typer.Option(SYNTH_BLINK_DEFAULTS.mark_style, help="How the points are marked: 'hardblink' (red ring, letter in a white box) or 'coloured' (a disc in each letter's own colour, the letter inside); as the model's training questions were."),
    tokenizer: Optional[Path] = typer.Option(None, help="Depth tokenizer folder: also report the answer read from the ground-truth depth tokens (the ceiling)."),
    as_json: bool = JSON_OPTION,
    json_out: Optional[Path] = typer.Option(None, "--json-out", help="Also write the counts and scores as JSON to this file."),
) -> None:
    """Write HardBLINK-style questions (3, 4, 5 marked points, true depth decides) for a synthetic world,
    and score chance and every single-cue heuristic on them (and the ground-truth-token ceiling)."""
    from perceptio.evaluate.synth_blink import SynthBlinkConfig, baselines, build_questions, token_ceiling

    if questions_per_image < 1:
        raise PerceptioError(f"--questions-per-image must be at least 1, not {questions_per_image}")
    if min_answer_gap < 0:
        raise PerceptioError(f"--min-answer-gap must be at least 0, not {min_answer_gap}")
    config = SynthBlinkConfig(seed=seed, hard=hard, questions_per_image=questions_per_image, min_answer_gap=min_answer_gap,
                              mark_style=mark_style)
    counts = build_questions(world, out, config, limit_per_variant=per_variant)
    if not any(counts.values()):
        raise PerceptioError(f"{world} gave no question (too few visible objects per image)")
    scores = baselines(out)
    if tokenizer is not None:
        from perceptio.tokenize.vqvae import DepthVQVAE

        scores["gt_token_ceiling"] = token_ceiling(out, world, DepthVQVAE.from_pretrained(tokenizer))
    results = {"benchmark": "synth-blink", "world": str(world), "out": str(out), "split": "hard" if hard else "easy",
               "seed": seed, "min_answer_gap": min_answer_gap, "mark_style": mark_style, "questions": {str(v): n for v, n in counts.items()},
               "scores": {name: {str(v): value for v, value in by_variant.items()} for name, by_variant in scores.items()}}
    variants = [variant for variant, count in counts.items() if count]
    table = Table(title=f"synthetic HardBLINK ({results['split']}) in {out}: accuracy % per point count")
    for column in ("cue", *(f"{v} points (n={counts[v]})" for v in variants), "mean"):
        table.add_column(column)
    for name, by_variant in scores.items():
        values = [by_variant[v] for v in variants if v in by_variant]
        table.add_row(name, *(percent(by_variant.get(v)) for v in variants), percent(sum(values) / len(values)))
    report(results, table, as_json, json_out)


@app.command()
def diagnose(
    checkpoint: Path = CHECKPOINT_OPTION,
    shards: list[Path] = SHARDS_OPTION,
    split: str = typer.Option("train", help="Split to diagnose (train: does the model use what it was taught?)."),
    limit: Optional[int] = typer.Option(64, help="Diagnose the first N samples (in dataset order) that have an image."),
    batch_size: int = typer.Option(8, "--batch-size", help="Samples per teacher-forced batch (at least 2: images and [SEG] states are swapped within a batch)."),
    threads: Optional[int] = THREADS_OPTION,
    dtype: str = DTYPE_OPTION,
    as_json: bool = JSON_OPTION,
    out: Optional[Path] = OUT_OPTION,
) -> None:
    """Where the learning chain breaks: does the model look at the picture, do its [SEG] states differ
    between expressions, does SAM2's decoder follow its prompt (teacher-forced probes, one reading each)."""
    from perceptio.evaluate.benchmarks import read_shard_examples
    from perceptio.evaluate.diagnose import diagnose as run_probes
    from perceptio.evaluate.diagnose import readings

    if batch_size < 2:
        raise PerceptioError(f"--batch-size must be at least 2 (images and [SEG] states are swapped within a batch), not {batch_size}")
    if limit is not None and limit < 2:
        raise PerceptioError(f"--limit must be at least 2 (a sample is compared with another), not {limit}")
    predictor = _load_predictor(checkpoint, 0, threads, dtype)
    model = predictor.model
    examples = read_shard_examples(shards, split, use_depth_tokens=model.config.use_depth_tokens)
    pictured = [example for example in examples if example.image_bytes is not None]
    chosen = _limited(pictured, limit)
    if len(chosen) < 2:
        raise PerceptioError(f"fewer than 2 samples with an image in split {split!r} of {', '.join(map(str, shards))}")
    with ProgressLog(f"diagnose {split}", len(chosen), unit="samples") as progress:
        probes = run_probes(model, chosen, batch_size, predictor.device, predictor.autocast,
                            lambda done: progress.update(progress.completed + done))
    rows, broken = readings(probes, model.segmenter is not None, model.config.use_depth_tokens)
    verdict = broken[0] if broken else "no link found broken by these probes"
    results = _results("diagnose", checkpoint, predictor, 1,
                       {"shards": [str(path) for path in shards], "split": split, "samples": probes.examples,
                        "text_only_skipped": len(examples) - len(pictured), "batches": probes.batches,
                        "batch_size": batch_size, "limit": limit},
                       readings=[row.to_dict() for row in rows], broken_links=broken,
                       first_break=verdict if broken else None)
    table = _table(results, ("probe", "quantity", "value", "reading"),
                   f" | {probes.examples} samples in {probes.batches} batches", f"where the chain breaks first: {verdict}")
    for index, row in enumerate(rows):
        probe = row.probe if index == 0 or rows[index - 1].probe != row.probe else ""
        table.add_row(probe, row.quantity, "-" if row.value is None else f"{row.value:.4g}", row.reading)
    report(results, table, as_json, out)


@app.command()
def predict(
    checkpoint: Path = CHECKPOINT_OPTION,
    image: Path = typer.Option(..., help="Image file to ask about."),
    prompt: str = typer.Option(..., help="What to ask, e.g. 'Please segment the object described as \"the red cube\".'"),
    out: Path = typer.Option(..., help="Picture to write (PNG): the mask, the depth and the answer."),
    max_new_tokens: int = TOKENS_OPTION,
    dtype: str = DTYPE_OPTION,
    threads: Optional[int] = THREADS_OPTION,
    as_json: bool = typer.Option(False, "--json", help="Print the answer, span and mask facts as JSON."),
) -> None:
    """One image and prompt -> one picture with the predicted mask, the decoded depth and the answer."""
    from PIL import Image, UnidentifiedImageError

    from perceptio.evaluate.picture import render_prediction
    from perceptio.inspect.render import save_png

    if not image.is_file():
        raise PerceptioError(f"image not found: {image}")
    try:
        with Image.open(image) as opened:
            picture = opened.convert("RGB")
    except (UnidentifiedImageError, OSError) as error:
        raise PerceptioError(f"cannot read image {image}: {error}") from None
    predictor = _load_predictor(checkpoint, max_new_tokens, threads, dtype)
    prediction = predictor.predict(picture, prompt)
    notes = f"{predictor.identity}; depth span {'well formed' if prediction.well_formed else 'missing or malformed'}"
    save_png(render_prediction(picture, prediction.mask, prediction.depth, prompt, prediction.text, notes), out)
    facts = {
        "checkpoint": _checkpoint_info(checkpoint, predictor), "image": str(image), "prompt": prompt,
        "answer": prediction.text, "mask_pixels": None if prediction.mask is None else int(prediction.mask.sum()),
        "depth_span_well_formed": prediction.well_formed, "picture": str(out),
    }
    if as_json:
        typer.echo(json.dumps(facts, indent=2))
    else:
        console.print(f"answer: {prediction.text!r}; picture written to {out}")


main = run_cli(app)
