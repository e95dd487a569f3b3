"""The paper's data-mixture claim in miniature: perception data, conversations, or both?

The paper trains on RefCOCO/+/g and ADE20k perception data *mixed* with LLaVA-1.5 instructions and
GranD-f grounded conversations, so that the model keeps its general abilities while it gains
perception. Here the same comparison runs on the synthetic world, with the commands a user runs:

1. the training world and a held-out world (another seed), the hard HardBLINK-style split, the
   depth tokenizer and the refcoco/ade20k shards, and the model (its miniature VLM + SAM2 and trainer
   settings), exactly as ``benchmarks/ablation.py`` makes them;
2. both worlds' conversations (``perceptio-curate synth --conversations``'s files): the training
   world's LLaVA and GranD-f files curated with ``perceptio-curate llava|grandf``, the held-out
   world's LLaVA file curated as the held-out conversation set (images never trained on);
3. ``perceptio-train`` on the ablation's pretrained miniature (``--base-models``, or built on the
   training world) three times with the same seed, steps and batch size:
   perception only (``refcoco=1,ade20k=1``), conversations only (``llava=1``) and the mixture
   (``refcoco=1,ade20k=1,llava=2,grandf=0.5``, the issue's example weights);
4. each scored on held-out conversation exact match (``perceptio-evaluate conversation``),
   RefCOCO-style val cIoU (``refseg``) and the held-out HardBLINK questions (``hardblink``).

Writes OUT/mixture.json (every number, timings, training curves) and OUT/mixture.md (the README
table). ``--quick`` is a smoke run of the whole path (its numbers mean nothing).

    .venv/bin/python benchmarks/mixture.py --out mixture-out [--parallel]
    .venv/bin/python benchmarks/mixture.py --out mixture-out --reuse-data --train-steps 150 --parallel
    .venv/bin/python benchmarks/mixture.py --out mixture-out --quick
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from ablation import (  # noqa: E402
    CURATE,
    PRODUCTS,
    TRAIN,
    AblationConfig,
    build_data,
    evaluate_json,
    model_flags,
    read_curve,
    run,
)


ARMS = {  # name -> (shard folders, mix)
    "perception": (("refcoco", "ade20k"), "refcoco=1,ade20k=1"),
    "conversations": (("llava",), "llava=1"),
    "mixture": (("refcoco", "ade20k", "llava", "grandf"), "refcoco=1,ade20k=1,llava=2,grandf=0.5"),
}
LABELS = {"perception": "perception only", "conversations": "conversations only", "mixture": "mixture"}


@dataclass(frozen=True)
class MixtureConfig:
    # The data and model settings default to the ablation's, so one data folder serves both.
    world_images: int = AblationConfig.world_images
    heldout_images: int = AblationConfig.heldout_images
    seed: int = AblationConfig.world_seed
    tokenizer_steps: int = AblationConfig.tokenizer_steps
    train_steps: int = 300
    batch_size: int = AblationConfig.batch_size
    hard_per_variant: int = AblationConfig.hard_per_variant  # held-out HardBLINK questions per point count
    refseg_limit: int = 60
    conversation_limit: int = 120  # held-out answers scored
    hardblink_limit: int = 0  # questions scored (0: all)
    vlm_pretrain_steps: int = AblationConfig.vlm_pretrain_steps  # the miniature VLM's pretraining (ablation)
    base_models: str = ""  # pretrained miniature folder (vlm/, sam2/), as the ablation's --base-models
    threads: int = 1


QUICK = MixtureConfig(world_images=40, heldout_images=16, tokenizer_steps=20, train_steps=4, batch_size=2,
                      hard_per_variant=4, refseg_limit=2, conversation_limit=4, hardblink_limit=0, vlm_pretrain_steps=40)


def data_config(config: MixtureConfig) -> AblationConfig:
    """The ablation's data stage and model (its miniature VLM + SAM2 and trainer settings) at these sizes."""
    return AblationConfig(world_images=config.world_images, heldout_images=config.heldout_images,
                          world_seed=config.seed, tokenizer_steps=config.tokenizer_steps,
                          hard_per_variant=config.hard_per_variant, batch_size=config.batch_size,
                          refseg_limit=config.refseg_limit, threads=config.threads,
                          vlm_pretrain_steps=config.vlm_pretrain_steps, base_models=config.base_models)


def build_conversations(config: MixtureConfig, out: Path, timings: dict[str, float]) -> dict[str, Any]:
    from perceptio.sources.synth.conversations import write_conversations

    started = time.perf_counter()
    counts = {"train_world": asdict(write_conversations(out / "world")),
              "heldout_world": asdict(write_conversations(out / "heldout-world"))}
    common = ["--samples-per-shard", "50", "--no-progress", "--overwrite"]
    threads = config.threads
    run([*CURATE, "llava", "--json", str(out / "world/llava/synth_train.json"), "--images", str(out / "world"),
         "--out", str(out / "shards/llava"), *common], out / "logs/curate-llava.log", threads)
    run([*CURATE, "grandf", "--json", str(out / "world/GranDf/annotations/train/GranDf_HA_GCG_train.json"),
         "--images", str(out / "world"), "--out", str(out / "shards/grandf"), *common], out / "logs/curate-grandf.log", threads)
    # Every conversation of the held-out world is a held-out conversation.
    run([*CURATE, "llava", "--json", str(out / "heldout-world/llava/synth_train.json"), "--images",
         str(out / "heldout-world"), "--split", "val", "--out", str(out / "shards/llava-heldout"), *common],
        out / "logs/curate-llava-heldout.log", threads)
    timings["conversations_s"] = time.perf_counter() - started
    return {name: {"llava": value["llava"], "grandf": value["grandf"]} for name, value in counts.items()}


def train_and_evaluate(config: MixtureConfig, out: Path, name: str, timings: dict[str, float]) -> dict[str, Any]:
    folders, mix = ARMS[name]
    run_dir = out / "runs" / name
    shards = [argument for folder in folders for argument in ("--shards", str(out / "shards" / folder))]
    started = time.perf_counter()
    run([*TRAIN, *shards, "--mix", mix, "--tokenizer", str(out / "tokenizer"), "--steps", str(config.train_steps),
         "--seed", str(config.seed), "--workers", "0", "--out", str(run_dir), "--no-progress",
         *model_flags(data_config(config), out, config.seed)], out / "logs" / f"train-{name}.log", config.threads)
    timings[f"train_{name}_s"] = time.perf_counter() - started

    started = time.perf_counter()
    common = ["--checkpoint", str(run_dir / "model"), "--threads", str(config.threads)]
    talk = evaluate_json(["conversation", *common, "--shards", str(out / "shards/llava-heldout"), "--split", "val",
                          "--limit", str(config.conversation_limit), "--max-new-tokens", "24"],
                         out / "results" / f"conversation-{name}.json", out / "logs" / f"conversation-{name}.log",
                         config.threads)
    refseg = evaluate_json(["refseg", *common, "--shards", str(out / "heldout-shards" / "refcoco"), "--split", "train",
                            "--limit", str(config.refseg_limit)],
                           out / "results" / f"refseg-{name}.json", out / "logs" / f"refseg-{name}.log", config.threads)
    blink_limit = ["--limit", str(config.hardblink_limit)] if config.hardblink_limit else []
    blink = evaluate_json(["hardblink", *common, "--data", str(out / "heldout-blink"), *blink_limit],
                          out / "results" / f"hardblink-{name}.json", out / "logs" / f"hardblink-{name}.log", config.threads)
    timings[f"evaluate_{name}_s"] = time.perf_counter() - started
    return {"conversation": talk["scores"], "conversation_examples": talk["examples"], "refseg": refseg["scores"],
            "hardblink": blink["scores"], "checkpoint": blink["checkpoint"]["identity"],
            "curve": read_curve(run_dir / "metrics.jsonl")}


def table(results: dict[str, Any]) -> str:
    """The README table: one row per training arm."""
    from perceptio.evaluate.cli import percent

    config = results["config"]
    lines = [f"| training data ({config['train_steps']} steps x batch {config['batch_size']}, same seed) | mix | "
             "held-out conversation exact match | refseg cIoU (held-out world) | HardBLINK (synthetic hard split, mean) |",
             "| --- | --- | --- | --- | --- |"]
    for name, model in results["models"].items():
        ciou = next(iter(model["refseg"].values()))["ciou"]
        lines.append(f"| {LABELS[name]} | `{ARMS[name][1]}` | {percent(model['conversation']['exact_match'])} "
                     f"(n={model['conversation']['answers']}) | {percent(ciou)} | {percent(model['hardblink']['average'])} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("mixture-out"), help="work folder (worlds, shards, runs, results)")
    parser.add_argument("--quick", action="store_true", help="a smoke run of every step (numbers mean nothing)")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {', '.join(ARMS)}")
    parser.add_argument("--reuse-data", action="store_true",
                        help="keep the worlds, tokenizer and shards already in --out (made by an earlier run with the same data settings)")
    parser.add_argument("--parallel", action="store_true",
                        help="train and evaluate the arms at the same time (one process each; on a shared CPU they get more of it)")
    for option in fields(MixtureConfig):
        parser.add_argument(f"--{option.name.replace('_', '-')}", type=type(option.default), dest=option.name,
                            help=f"default {option.default} (quick: {getattr(QUICK, option.name)})")
    arguments = parser.parse_args()
    overrides = {option.name: getattr(arguments, option.name) for option in fields(MixtureConfig)
                 if getattr(arguments, option.name) is not None}
    config = replace(QUICK if arguments.quick else MixtureConfig(), **overrides)
    out = arguments.out
    out.mkdir(parents=True, exist_ok=True)
    for product in ("runs", "results") if arguments.reuse_data else PRODUCTS:
        shutil.rmtree(out / product, ignore_errors=True)

    started = time.perf_counter()
    timings: dict[str, float] = {}
    print(f"mixture ({'quick' if arguments.quick else 'measured'}): {asdict(config)}", flush=True)
    if arguments.reuse_data:
        data = json.loads((out / "data.json").read_text())
    else:
        data = build_data(data_config(config), out)
        data["conversations"] = build_conversations(config, out, timings)
        (out / "data.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    print(f"data: {json.dumps(data)}", flush=True)
    names = arguments.arms.split(",")
    print(f"training and evaluating: {', '.join(names)}{' in parallel' if arguments.parallel else ''}", flush=True)
    with ThreadPoolExecutor(max_workers=len(names) if arguments.parallel else 1) as pool:
        futures = {name: pool.submit(train_and_evaluate, config, out, name, timings) for name in names}
        models = {name: future.result() for name, future in futures.items()}
    timings["total_s"] = time.perf_counter() - started
    results = {"config": asdict(config), "quick": arguments.quick, "data": data, "models": models, "timings": timings}
    (out / "mixture.json").write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    markdown = table(results)
    (out / "mixture.md").write_text(markdown + "\n")
    print(markdown)
    print(f"\ntimings (s): {json.dumps({k: round(v, 1) for k, v in timings.items()})}")


if __name__ == "__main__":
    main()
