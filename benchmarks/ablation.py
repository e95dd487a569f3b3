"""The depth-token ablation on the synthetic world, where the true depth is known (issue 11).

The paper's central claim: writing depth tokens before answering helps relative depth (HardBLINK
71.0 with, 45.2 without). Here the same comparison runs with the perceptio commands a user runs,
every arm with the same seed, steps, batch, data and learning rates:

- ``full``: marked-point questions answered after writing the depth span; grounding targets
  ``[SEG] span description``;
- ``no_depth_tokens``: no depth span anywhere (questions answered directly);
- ``direct_depth_elsewhere``: questions answered directly, the depth span still taught on the
  grounding samples (depth supervision elsewhere: the paper's mix without the span before the answer);
- ``no_depth_recon`` (optional): ``full`` without L_DepthRecon.

Steps: a training world and a held-out world (another seed); ``perceptio-tokenize fit`` on the
training world's ground-truth depth; ``perceptio-curate refcoco`` and ``ade20k`` (many marked-point
questions per image, both target variants recorded); the held-out world's refcoco shards and a HARD
synthetic HardBLINK split (the lowest point and the largest object are nearest only at chance);
the miniature base models (benchmarks/miniature.py, every part trained); then per seed and arm
``perceptio-train`` and ``perceptio-evaluate hardblink`` (with the decomposition: (a) the answer read
from the ground-truth tokens, (b) from the tokens the model wrote, (c) the letter it wrote, and the
token accuracy of its spans) and ``perceptio-evaluate refseg`` on the held-out world.

Writes OUT/ablation.json (every number, per-question hits, curves, wall and CPU times),
OUT/ablation.md (the README table, with 95% bootstrap intervals over questions and seeds) and
OUT/ablation.png (training curves), and prints the table.

    .venv/bin/python benchmarks/ablation.py --out ablation-out                   # one seed, all arms
    .venv/bin/python benchmarks/ablation.py --out ablation-out --seeds 0,1,2     # the full run
    .venv/bin/python benchmarks/ablation.py --out demo-out/ablation --quick      # smoke run (numbers mean nothing)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields, replace
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ siblings: miniature, plot

from perceptio.curate.marked_points import COLOURED_MARKS, MARK_STYLES  # noqa: E402
from perceptio.train.config import PerceptioConfig, StreamConfig, TrainConfig  # noqa: E402 (torch-free)
from miniature import MINIATURE  # noqa: E402
from perceptio.train.miniature import VlmPretraining  # noqa: E402


def command(module: str) -> list[str]:
    """A perceptio console command through this interpreter (works where no console script is installed)."""
    return [sys.executable, "-c", f"from perceptio.{module} import main; main()"]


TOKENIZE, CURATE, TRAIN, EVALUATE = (command(m) for m in ("tokenize.cli", "curate.cli", "train.cli", "evaluate.cli"))


@dataclass(frozen=True)
class Arm:
    flags: tuple[str, ...]  # perceptio-train options
    answer: str  # how hardblink asks: "depth" (write the span, then the letter) or "direct"
    label: str


ARMS = {
    "full": Arm(("--question-targets", "depth"), "depth", "full (span, then letter)"),
    "no_depth_tokens": Arm(("--no-depth-tokens",), "direct", "without depth tokens"),
    "direct_depth_elsewhere": Arm(("--question-targets", "direct"), "direct", "direct answers, depth span on grounding only"),
    "no_depth_recon": Arm(("--question-targets", "depth", "--no-depth-recon"), "depth", "full without L_DepthRecon"),
}
# What a run writes under --out; an earlier run's copies are removed first, so nothing stale is read.
PRODUCTS = ("tokenizer", "depth-cache", "shards", "heldout-shards", "heldout-blink", "miniature", "runs", "results", "logs")


@dataclass(frozen=True)
class AblationConfig:
    world_images: int = 400
    heldout_images: int = 200
    world_seed: int = 0  # the held-out world uses world_seed + 1000
    seeds: str = "0"  # training seeds, comma-separated (model weights and data order)
    arms: str = "full,no_depth_tokens,direct_depth_elsewhere"
    tokenizer_steps: int = 300
    questions_per_image: int = 30  # marked-point questions per ADE-layout training image (~11 kept after balancing)
    # Balance the training questions too (no height or size shortcut to learn): a model that
    # answers them must read depth, from the picture or from its own tokens.
    hard_training_questions: bool = True
    # How the questions' points are marked, in training, pretraining and held-out questions alike:
    # the miniature's vision tower finds HardBLINK's marks but cannot read their 8-pixel letters
    # (README section 4), so each mark is a disc in its letter's own colour ("hardblink": red rings).
    mark_style: str = COLOURED_MARKS
    train_steps: int = 1500
    batch_size: int = TrainConfig.TINY_DEFAULTS["batch_size"]  # the tiny model's defaults, for the miniature too
    # The pretrained miniature is fine-tuned at a tenth of the random tiny model's language-model
    # rate, as a pretrained checkpoint is: 1e-2 would overwrite what its pretraining taught.
    lr: float = 1e-3
    head_lr: float = TrainConfig.TINY_DEFAULTS["head_lr"]
    mix: str = "refcoco=1,ade20k=1"
    # Marked-point questions drawn afresh per ADE-layout picture and epoch on any cells, answered by
    # the depth map (perceptio-train --reading-questions): the span-reading curriculum, in every arm.
    reading_questions: int = 0
    reading_spread: float = StreamConfig.reading_spread  # where in its cell a reading point falls (perceptio-train --reading-spread)
    reading_swaps: float = StreamConfig.reading_swaps  # reading questions only the span answers (perceptio-train --reading-swaps)
    mark_readouts: bool = False  # each mark's code written after the span (perceptio-train --mark-readouts; span arms only)
    span_weight: float = 1.0  # weight of the span's tokens in L_LLM (perceptio-train --span-weight; 1: the paper's)
    answer_weight: float = 1.0  # weight of the answer after a span and its readouts in L_LLM (perceptio-train --answer-weight)
    readout_cells: bool = False  # each readout names its mark's cell (perceptio-train --readout-cells)
    reading_in_text: float = 0.0  # reading questions asked in text alone (perceptio-train --reading-in-text)
    reading_short_spans: str = ""  # reading questions' spans short in the first epochs, e.g. "16,36" (perceptio-train --reading-short-spans)
    cell_embeddings: bool = False  # a learned vector per grid cell on image tokens and span codes (perceptio-train --cell-embeddings)
    eye_depth: float = 0.0  # weight of each image token regressing the depth under it (perceptio-train --eye-depth), every arm
    new_token_init: str = PerceptioConfig.new_token_init  # the new tokens' input rows (perceptio-train --new-token-init)
    hard_per_variant: int = 110  # held-out HARD questions per point count (3, 4, 5)
    hard_questions_per_image: int = 16
    refseg_limit: int = 150  # held-out referring expressions scored
    miniature: bool = True  # False: the built-in --model tiny (frozen random encoders)
    train_sam_encoder: bool = True  # False: SAM2's image encoder frozen (a pretrained one, from --base-models)
    seg_text: float = 0.0  # weight of L_SegText (perceptio-train --seg-text; not in the paper)
    vlm_pretrain_steps: int = 4000  # the miniature VLM's pretraining on the training world (perceptio.train.miniature)
    vlm_map_share: float = VlmPretraining.map_share  # its examples that are colour maps
    vlm_mark_share: float = VlmPretraining.mark_share  # its examples that are mark maps (where marked letters are)
    fresh_language_model: bool = False  # after the pretraining, the language model back to random (vision kept)
    text_layers: int = MINIATURE.text_layers  # the miniature language model's depth
    text_kv_heads: int = MINIATURE.text_kv_heads  # its key-value heads (4 let a probe learn the span lookup, README section 4)
    # The miniature SAM2's pretraining: segment the training shards' referents from a prompt made of
    # learned word vectors (benchmarks/oracle_prompt.py), batch 16, lr 1e-3. 0: SAM2 stays random.
    sam_pretrain_steps: int = 0
    # 0: SAM2 is pretrained on the training shards' expressions; N: on a pretraining world of N
    # images (seed world_seed + 2000), other pictures than the fine-tuning and held-out worlds, as
    # SAM2's own pretraining data is.
    sam_pretrain_world_images: int = 0
    base_models: str = ""  # a folder with vlm/ and sam2/ pretrained beforehand (benchmarks/miniature.py), used for every seed
    threads: int = 1  # torch threads per process: one is fastest for these models on a busy CPU
    parallel: int = 1  # (seed, arm) runs at a time (one per free core; on a GPU machine several share the GPU)
    workers: int = 0  # loader worker processes per training run (0: decode in the training process)


QUICK = AblationConfig(world_images=40, heldout_images=16, tokenizer_steps=20, questions_per_image=2, train_steps=4,
                       batch_size=2, hard_per_variant=4, hard_questions_per_image=1, refseg_limit=4, vlm_pretrain_steps=40,
                       sam_pretrain_steps=2, sam_pretrain_world_images=8, vlm_mark_share=0.3, fresh_language_model=True,
                       reading_questions=2, reading_swaps=0.5, mark_readouts=True, readout_cells=True,
                       reading_in_text=0.5, reading_short_spans="16,36", cell_embeddings=True, eye_depth=1.0)


# ------------------------------------------------------------------------------------ running
class Timer:
    """Wall and CPU seconds per stage; CPU time is summed over the commands a stage ran (each
    measured with ``os.wait4``, so runs in parallel threads are told apart)."""

    def __init__(self) -> None:
        self.stages: dict[str, dict[str, float]] = {}
        self._local = threading.local()

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self._local.cpu, started = 0.0, time.perf_counter()
        yield
        self.stages[name] = {"wall_s": time.perf_counter() - started, "cpu_s": self._local.cpu}

    def add_cpu(self, seconds: float) -> None:
        self._local.cpu = getattr(self._local, "cpu", 0.0) + seconds

    def total(self) -> dict[str, float]:
        return {"cpu_s": sum(stage["cpu_s"] for stage in self.stages.values())}


TIMER = Timer()


def run(arguments: list[str], log: Path, threads: int) -> None:
    """Run one perceptio command into ``log``; a failure stops the ablation, naming the log."""
    log.parent.mkdir(parents=True, exist_ok=True)
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": str(threads),
                   "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as handle:
        handle.write("$ " + " ".join(arguments) + "\n")
        handle.flush()
        process = subprocess.Popen(arguments, stdout=handle, stderr=subprocess.STDOUT, env=environment)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
    TIMER.add_cpu(usage.ru_utime + usage.ru_stime)
    if process.returncode != 0:
        tail = log.read_text().splitlines()[-15:]
        raise SystemExit(f"failed ({process.returncode}): {' '.join(arguments)}\n  see {log}\n" + "\n".join(tail))


def evaluate_json(arguments: list[str], out: Path, log: Path, threads: int) -> dict[str, Any]:
    run([*EVALUATE, *arguments, "--out", str(out)], log, threads)
    return json.loads(out.read_text())


def read_curve(metrics: Path) -> list[dict[str, float]]:
    keep = ("step", "loss", "llm", "seg_bce", "seg_dice", "depth_token", "depth_recon")
    lines = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return [{key: line[key] for key in keep if key in line} for line in lines]


# ------------------------------------------------------------------------------------ stages
def build_data(config: AblationConfig, out: Path, timer: Timer = TIMER) -> dict[str, Any]:
    """Worlds, tokenizer, training shards, held-out shards and the HARD held-out question split."""
    from perceptio.sources.synth import generate_world

    with timer.stage("worlds"):
        before = _own_cpu()
        generate_world(out / "world", images=config.world_images, seed=config.world_seed, workers=2)
        generate_world(out / "heldout-world", images=config.heldout_images, seed=config.world_seed + 1000, workers=2)
        timer.add_cpu(_own_cpu() - before)
    with timer.stage("tokenizer"):
        run([*TOKENIZE, "fit", "--data-root", str(out / "world"), "--dataset", "synth",
             "--depth-source", "gt", "--out", str(out / "tokenizer"), "--steps", str(config.tokenizer_steps),
             "--cache-dir", str(out / "depth-cache"), "--seed", str(config.world_seed), "--threads", str(config.threads)],
            out / "logs" / "tokenize.log", config.threads)
    with timer.stage("curation"):
        curate = CURATE
        common = ["--tokenizer", str(out / "tokenizer"), "--depth-source", "gt", "--samples-per-shard", "50",
                  "--num-cpus", "2", "--no-progress", "--overwrite", "--cache-dir", str(out / "depth-cache")]
        run([*curate, "refcoco", "--data-root", str(out / "world"), "--out", str(out / "shards" / "refcoco"), *common],
            out / "logs" / "curate-refcoco.log", config.threads)
        run([*curate, "ade20k", "--data-root", str(out / "world"), "--out", str(out / "shards" / "ade20k"),
             "--questions-per-image", str(config.questions_per_image), "--mark-style", config.mark_style,
             "--hard-questions" if config.hard_training_questions else "--any-questions", *common], out / "logs" / "curate-ade20k.log", config.threads)
        run([*curate, "refcoco", "--data-root", str(out / "heldout-world"), "--out", str(out / "heldout-shards" / "refcoco"),
             *common], out / "logs" / "curate-heldout.log", config.threads)
    with timer.stage("hard_split"):
        blink = json.loads(_synth_blink(config, out).read_text())
    return {"hard_split": blink}


def _own_cpu() -> float:
    """CPU seconds of this process and its reaped children (the world's rendering pool)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _synth_blink(config: AblationConfig, out: Path) -> Path:
    target = out / "results" / "synth-blink.json"
    run([*EVALUATE, "synth-blink", "--world", str(out / "heldout-world"), "--out",
         str(out / "heldout-blink"), "--hard", "--per-variant", str(config.hard_per_variant), "--questions-per-image",
         str(config.hard_questions_per_image), "--seed", str(config.world_seed), "--mark-style", config.mark_style,
         "--tokenizer", str(out / "tokenizer"),
         "--json-out", str(target)], out / "logs" / "synth-blink.log", config.threads)
    return target


def model_flags(config: AblationConfig, out: Path, seed: int) -> list[str]:
    """The base models and the trainer settings every arm shares."""
    shared = ["--lr", str(config.lr), "--head-lr", str(config.head_lr), "--batch-size", str(config.batch_size),
              "--train-language-model", "--seg-text", str(config.seg_text),
              "--reading-questions", str(config.reading_questions), "--reading-spread", str(config.reading_spread),
              "--reading-swaps", str(config.reading_swaps),
              "--mark-readouts" if config.mark_readouts else "--no-mark-readouts",
              "--readout-cells" if config.readout_cells else "--no-readout-cells",
              "--reading-in-text", str(config.reading_in_text),
              "--reading-short-spans", config.reading_short_spans,
              "--cell-embeddings" if config.cell_embeddings else "--no-cell-embeddings",
              "--eye-depth", str(config.eye_depth),
              "--span-weight", str(config.span_weight), "--answer-weight", str(config.answer_weight),
              "--new-token-init", config.new_token_init]
    if not config.miniature:
        return ["--model", "tiny", *shared]
    vlm, sam = base_models(config, out, seed)
    encoder = ["--train-sam-encoder"] if config.train_sam_encoder else []
    return ["--model", str(vlm), "--sam-model", str(sam), "--train-vision", *encoder, *shared]


def base_models(config: AblationConfig, out: Path, seed: int) -> tuple[Path, Path]:
    """The folder holding the miniature's vlm/ and sam2/: ``--base-models`` as given (pretrained once
    and cached, like a downloaded checkpoint), or built for the seed (its VLM pretrained on the
    training world for ``vlm_pretrain_steps``, its SAM2 on the training shards for
    ``sam_pretrain_steps``) on first use."""
    from perceptio.train.tiny import SAM_FOLDER, VLM_FOLDER

    folder = Path(config.base_models) if config.base_models else out / "miniature" / f"seed{seed}"
    if not (folder / SAM_FOLDER).is_dir():
        import torch
        from miniature import build_miniature

        # The pretraining runs in this process: on config.threads threads like every command, so
        # that it does not oversubscribe the cores that --parallel runs share.
        torch.set_num_threads(config.threads)
        with TIMER.stage(f"miniature_seed{seed}"):
            before = _own_cpu()
            build_miniature(folder, seed, out / "world", config.vlm_pretrain_steps,
                            size=replace(MINIATURE, text_layers=config.text_layers, text_kv_heads=config.text_kv_heads),
                            pretraining=VlmPretraining(map_share=config.vlm_map_share, mark_share=config.vlm_mark_share,
                                                       mark_style=config.mark_style),
                            fresh_language_model=config.fresh_language_model)
            if config.sam_pretrain_steps > 0:
                from oracle_prompt import train_oracle

                world = out / "miniature" / "pretrain-world" if config.sam_pretrain_world_images > 0 else None
                if world is not None and not (world / "world.json").is_file():  # one world for every seed
                    from perceptio.sources.synth import generate_world

                    generate_world(world, images=config.sam_pretrain_world_images, seed=config.world_seed + 2000, workers=2)
                train_oracle(folder / SAM_FOLDER, out / "shards" / "refcoco", out / "heldout-shards" / "refcoco",
                             config.sam_pretrain_steps, heldout=config.refseg_limit, seed=seed, save=folder / SAM_FOLDER,
                             world=world)
            TIMER.add_cpu(_own_cpu() - before)
    return folder / VLM_FOLDER, folder / SAM_FOLDER


def miniature_report(config: AblationConfig, out: Path, seed: int) -> dict[str, float]:
    """What the seed's pretrained VLM reads from the held-out world's pictures (written once)."""
    from miniature import report

    target = out / "runs" / f"miniature-seed{seed}.json"  # runs/ is rebuilt with every training
    if not target.is_file():
        with TIMER.stage(f"miniature_report_seed{seed}"):
            before = _own_cpu()
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(json.dumps(report(base_models(config, out, seed)[0], out / "heldout-world",
                                                min(40, config.heldout_images), config.mark_style), indent=2) + "\n")
            TIMER.add_cpu(_own_cpu() - before)
    return json.loads(target.read_text())


def train_and_evaluate(config: AblationConfig, out: Path, seed: int, name: str, timer: Timer = TIMER) -> dict[str, Any]:
    arm = ARMS[name]
    tag = f"{name}-seed{seed}"
    run_dir = out / "runs" / tag
    with timer.stage(f"train_{tag}"):
        run([*TRAIN, "--shards", str(out / "shards" / "refcoco"), "--shards", str(out / "shards" / "ade20k"),
             "--mix", config.mix, "--tokenizer", str(out / "tokenizer"), "--steps", str(config.train_steps),
             "--seed", str(seed), "--workers", str(config.workers), "--out", str(run_dir), "--no-progress", "--export", "adapter",
             *model_flags(config, out, seed), *arm.flags], out / "logs" / f"train-{tag}.log", config.threads)
    common = ["--checkpoint", str(run_dir / "model"), "--threads", str(config.threads)]
    with timer.stage(f"evaluate_{tag}"):
        blink = evaluate_json(["hardblink", *common, "--data", str(out / "heldout-blink"), "--answer", arm.answer,
                               "--world", str(out / "heldout-world"), "--tokenizer", str(out / "tokenizer")],
                              out / "results" / f"hardblink-{tag}.json", out / "logs" / f"hardblink-{tag}.log", config.threads)
        refseg = evaluate_json(["refseg", *common, "--shards", str(out / "heldout-shards" / "refcoco"), "--split", "train",
                                "--limit", str(config.refseg_limit)],
                               out / "results" / f"refseg-{tag}.json", out / "logs" / f"refseg-{tag}.log", config.threads)
    scores = next(iter(refseg["scores"].values()))
    return {"hardblink": blink["scores"], "replies": blink["replies"], "refseg": scores,
            "checkpoint": blink["checkpoint"]["identity"], "curve": read_curve(run_dir / "metrics.jsonl")}


# ------------------------------------------------------------------------------------ report
def hits(model: dict[str, Any], key: str) -> list[float]:
    """Per-question 0/1 of one decomposition column, in question order (None counts as a miss)."""
    return [float(reply[key] is not None and reply[key] == reply["answer"]) for reply in model["replies"]]


def summarise(results: dict[str, Any]) -> dict[str, Any]:
    """Per arm: the letter's accuracy (c), the answer read from its tokens (b), the letter after the
    true span (d), token accuracy, and bootstrap intervals over questions and seeds; the
    full-minus-no-depth difference, paired."""
    from perceptio.evaluate.stats import bootstrap_difference, bootstrap_mean

    arms = results["arms"]
    summary: dict[str, Any] = {}
    for name in arms:
        runs = [results["models"][f"{name}-seed{seed}"] for seed in results["seeds"]]
        letter = [hits(run, "choice") for run in runs]
        entry = {"letter": bootstrap_mean(letter).to_dict(),
                 "refseg_ciou": [run["refseg"]["ciou"] for run in runs],
                 "letter_per_seed": [sum(h) / len(h) for h in letter]}
        if ARMS[name].answer == "depth":
            entry["from_tokens"] = bootstrap_mean([hits(run, "token_choice") for run in runs]).to_dict()
            entry["after_true_span"] = bootstrap_mean([hits(run, "truth_fed_choice") for run in runs]).to_dict()
            accuracies = [run["hardblink"]["decomposition"]["token_accuracy"] for run in runs]
            entry["token_accuracy"] = [a for a in accuracies]
        summary[name] = entry
    if "full" in arms and "no_depth_tokens" in arms:
        full = [hits(results["models"][f"full-seed{seed}"], "choice") for seed in results["seeds"]]
        none = [hits(results["models"][f"no_depth_tokens-seed{seed}"], "choice") for seed in results["seeds"]]
        summary["full_minus_no_depth_tokens"] = bootstrap_difference(full, none).to_dict()
    return summary


def _ci(interval: dict[str, float]) -> str:
    return f"{100 * interval['mean']:.1f} [{100 * interval['low']:.1f}, {100 * interval['high']:.1f}]"


def table(results: dict[str, Any]) -> str:
    """The README table: hard HardBLINK accuracy with intervals, the decomposition, refseg cIoU."""
    summary, blink = results["summary"], results["data"]["hard_split"]
    questions = sum(int(n) for n in blink["questions"].values())
    lines = [f"Hard synthetic HardBLINK, {questions} held-out questions ({', '.join(f'{v} points: {n}' for v, n in blink['questions'].items())}); "
             f"seeds {', '.join(map(str, results['seeds']))}; {results['config']['train_steps']} steps. "
             "Accuracy %, mean over seeds [95% bootstrap interval over questions and seeds].", "",
             "| | (c) letter written | (b) answer read from its tokens | (d) letter after the true span | token accuracy % | held-out refseg cIoU % |",
             "| --- | --- | --- | --- | --- | --- |"]
    scores = blink["scores"]
    for name, by_variant in scores.items():
        values = list(by_variant.values())
        mean = sum(values) / len(values)
        label = "(a) answer read from the ground-truth tokens" if name == "gt_token_ceiling" else f"heuristic: {name}"
        lines.append(f"| {label} | {100 * mean:.1f} (mean over point counts) | | | | |")
    for name in results["arms"]:
        entry = summary[name]
        tokens = _ci(entry["from_tokens"]) if "from_tokens" in entry else "-"
        after_truth = _ci(entry["after_true_span"]) if "after_true_span" in entry else "-"
        accuracy = ("/".join(f"{100 * a:.1f}" for a in entry["token_accuracy"] if a is not None)
                    if "token_accuracy" in entry else "-")
        ciou = "/".join(f"{100 * c:.1f}" for c in entry["refseg_ciou"])
        lines.append(f"| {ARMS[name].label} | {_ci(entry['letter'])} | {tokens} | {after_truth} | {accuracy} | {ciou} |")
    if "full_minus_no_depth_tokens" in summary:
        lines += ["", f"full minus without depth tokens (letter, paired): {_ci(summary['full_minus_no_depth_tokens'])} points"]
    return "\n".join(lines)


def plot(results: dict[str, Any], out: Path) -> Path:
    from plot import Series, line_charts, smooth

    panels: dict[str, list[Series]] = {"total loss": [], "L_LLM": [], "mask DICE": [], "depth token CE": []}
    keys = {"total loss": "loss", "L_LLM": "llm", "mask DICE": "seg_dice", "depth token CE": "depth_token"}
    for name in results["arms"]:
        for seed in results["seeds"]:
            curve = results["models"][f"{name}-seed{seed}"]["curve"]
            window = max(1, len(curve) // 30)
            for panel, key in keys.items():
                if key == "depth_token" and ARMS[name].answer != "depth" and name != "direct_depth_elsewhere":
                    continue
                steps = [point["step"] for point in curve]
                panels[panel].append(Series(f"{name} seed {seed}", steps, smooth([point.get(key, 0.0) for point in curve], window)))
    quick = " (SMOKE RUN: numbers mean nothing)" if results["quick"] else ""
    return line_charts(panels, out, f"training curves, moving average{quick}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("ablation-out"), help="work folder (worlds, shards, runs, results)")
    parser.add_argument("--quick", action="store_true", help="a smoke run of every step for make demo (numbers mean nothing)")
    parser.add_argument("--data-only", action="store_true", help="build the data (worlds, tokenizer, shards, hard split) and stop")
    parser.add_argument("--reuse-data", action="store_true", help="keep OUT's worlds, tokenizer, shards and questions (ablation-data.json) and train again")
    for option in fields(AblationConfig):  # every setting can be overridden, e.g. --train-steps 100
        kind = (lambda text: text.lower() in ("1", "true", "yes")) if isinstance(option.default, bool) else type(option.default)
        parser.add_argument(f"--{option.name.replace('_', '-')}", type=kind, dest=option.name,
                            help=f"default {option.default} (quick: {getattr(QUICK, option.name)})")
    arguments = parser.parse_args()
    overrides = {option.name: getattr(arguments, option.name) for option in fields(AblationConfig)
                 if getattr(arguments, option.name) is not None}
    config = replace(QUICK if arguments.quick else AblationConfig(), **overrides)
    arms = [name.strip() for name in config.arms.split(",") if name.strip()]
    unknown = [name for name in arms if name not in ARMS]
    if unknown:
        raise SystemExit(f"unknown arm(s) {unknown}; known: {', '.join(ARMS)}")
    if config.mark_style not in MARK_STYLES:
        raise SystemExit(f"unknown mark style {config.mark_style!r}; known: {', '.join(MARK_STYLES)}")
    seeds = [int(seed) for seed in config.seeds.split(",") if seed.strip()]
    out = arguments.out
    out.mkdir(parents=True, exist_ok=True)
    data_record = out / "ablation-data.json"
    reuse = arguments.reuse_data and data_record.is_file()
    for product in PRODUCTS if not reuse else ("miniature", "runs", "logs"):
        shutil.rmtree(out / product, ignore_errors=True)

    timer = TIMER
    started = time.perf_counter()
    label = "SMOKE RUN (quick; numbers mean nothing)" if arguments.quick else "measured run"
    print(f"ablation, {label}: {asdict(config)}", flush=True)
    if reuse:
        data = json.loads(data_record.read_text())
        print(f"reusing the data of {data_record}", flush=True)
    else:
        data = build_data(config, out, timer)
        data_record.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    print(f"hard split: {json.dumps(data['hard_split']['questions'])} questions; cues and ceiling: "
          f"{json.dumps(data['hard_split']['scores'])}", flush=True)
    if arguments.data_only:
        return
    runs = [(seed, name) for seed in seeds for name in arms]
    for seed in seeds:  # base models first: parallel runs of one seed share its folder
        model_flags(config, out, seed)
    base = {seed: miniature_report(config, out, seed) for seed in seeds} if config.miniature else {}
    print(f"pretrained VLM on the held-out world: {json.dumps(base)}", flush=True)
    with ThreadPoolExecutor(max_workers=config.parallel) as pool:
        futures = {run_id: pool.submit(train_and_evaluate, config, out, run_id[0], run_id[1]) for run_id in runs}
        models = {f"{name}-seed{seed}": futures[(seed, name)].result() for seed, name in runs}
    results = {"config": asdict(config), "quick": arguments.quick, "arms": arms, "seeds": seeds, "data": data,
               "models": models, "base_models": base, "timings": timer.stages,
               "total": {"wall_s": time.perf_counter() - started, **timer.total()}}
    results["summary"] = summarise(results)
    (out / "ablation.json").write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    markdown = ("**SMOKE RUN: numbers mean nothing.**\n\n" if arguments.quick else "") + table(results)
    (out / "ablation.md").write_text(markdown + "\n")
    print(markdown)
    print(f"\ncurves: {plot(results, out / 'ablation.png')}")
    print(f"time: {json.dumps({k: {m: round(v, 1) for m, v in t.items()} for k, t in timer.stages.items()})}")
    print(f"total: {results['total']['wall_s']:.0f} s wall, {results['total']['cpu_s']:.0f} s CPU (children)")


if __name__ == "__main__":
    main()
