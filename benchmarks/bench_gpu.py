"""GPU proof at the real shapes (issue 15): one short run that measures what a GPU node will do.

Sections (each in its own try/except: one failure still reports the others):

``curate``   Curation images/s on synthetic-world images of three sizes mixed in every batch, for a
             Depth Anything V2 Large- and Small-shaped teacher (random weights) + the paper-shaped
             depth VQ-VAE: (a) the bare teacher forward on pre-decoded images, (b) the model stage
             (teacher + tokenizer) and the tokenizer's share of it, (c) end to end through the very
             function a Ray shard task runs (``curate_shard``: read-ahead thread -> ``DepthWorker``
             -> assemble -> tar + side tables written to a local folder): steady state (model
             built and warm) and cold (model build included). Ray itself (~70 MB of wheels) cannot
             travel to the device machine, so it is not used here; the function is the same.
``train``    One optimizer step (forward, backward, AdamW) of the InternVL3-1B shape (InternViT-300M +
             Qwen2.5-0.5B from the published config, LoRA r256) with one 448 tile, under bf16
             autocast with fp32 weights: with the perception heads (SAM2.1-large-shaped [SEG]
             decoder + the four depth losses) and without (L_LLM alone on the same model and batch),
             at batch 1 and 4; then the same with gradient checkpointing, and with frozen weights
             cast to bf16. Median step time and peak GPU memory.
``generate`` Greedy generation samples/s of that model at batch 1, 8 and 16 (left padding, a fixed
             number of new tokens: the random weights would stop at arbitrary places).

Run on the device: ``bash benchmarks/gpu.sh`` (writes ``$OUT/gpu.json`` and a table). Here:
``python benchmarks/bench_gpu.py --cpu-smoke`` runs every section at tiny sizes on the CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import dataclasses
import functools
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image


@dataclass(frozen=True)
class Sizes:
    """How big each section runs: the device run, or the CPU smoke test."""

    world_images: int  # per image size; 3/4 of them are COCO (RefCOCO) images
    image_sizes: tuple[tuple[int, int], ...]
    teachers: tuple[str, ...]  # shape names
    teacher_input: int  # Depth Anything's input side (518 = the published one)
    unit_images: int  # images per model batch (curation's --batch-size)
    vlm: str
    sam: str
    train_batches: tuple[int, ...]
    timed_steps: int
    generate_batches: tuple[int, ...]
    new_tokens: int


DEVICE_SIZES = Sizes(
    world_images=96, image_sizes=((384, 288), (288, 384), (512, 288)),
    teachers=("depth-anything-v2-large", "depth-anything-v2-small"), teacher_input=518, unit_images=16,
    vlm="shape:internvl3-1b", sam="shape:sam2.1-hiera-large", train_batches=(1, 4), timed_steps=5,
    generate_batches=(1, 8, 16), new_tokens=110,
)
SMOKE_SIZES = Sizes(
    world_images=4, image_sizes=((96, 72), (72, 96)), teachers=("depth-anything-v2-small",), teacher_input=70,
    unit_images=3, vlm="tiny", sam="tiny", train_batches=(1, 2), timed_steps=1,
    generate_batches=(1, 2), new_tokens=4,
)


def failure(where: str, error: BaseException) -> dict[str, str]:
    """Record a failed measurement (and print it at once: the JSON is written per section)."""
    text = traceback.format_exc()[-3000:]
    print(f"FAILED {where}: {type(error).__name__}: {error}\n{text}", flush=True)
    return {"error": f"{type(error).__name__}: {error}", "traceback": text}


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(function: Callable[[], Any]) -> tuple[float, Any]:
    sync()
    started = time.perf_counter()
    result = function()
    sync()
    return time.perf_counter() - started, result


def peak_memory_mib() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


def reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


# ----------------------------------------------------------------------------------------- curate


def save_teacher(shape_name: str, folder: Path, input_size: int) -> Path:
    """A random-weight Depth Anything of the published shape, saved as a local model folder."""
    from perceptio.train import shapes

    shapes.build(shapes.SHAPES[shape_name]).save_pretrained(folder)
    shapes.depth_anything_processor(input_size).save_pretrained(folder)
    return folder


def mixed_size_shard(root: Path, sizes: Sizes) -> Any:
    """One shard of RefCOCO images from one synthetic world per image size, sizes interleaved (so
    every batch mixes them); renumbered, since each world counts its image ids from the start."""
    from perceptio.curate.plan import ShardPlan, refer_images

    from perceptio.sources import refer, synth
    from perceptio.sources.synth import scene
    per_size = []
    for index, (width, height) in enumerate(sizes.image_sizes):
        world = root / f"world-{width}x{height}"
        synth.generate_world(world, images=sizes.world_images, seed=index, config=scene.SceneConfig(width=width, height=height))
        reader = refer.ReferDataset(world, "refcoco", "unc")
        per_size.append([image for split in reader.splits for image in refer_images(reader, split)])
    mixed = [image for group in zip(*per_size) for image in group]  # a, b, c, a, b, c, ...
    images = tuple(dataclasses.replace(image, split="bench", image_id=number) for number, image in enumerate(mixed))
    return ShardPlan(images[0].dataset, "bench", 0, images)


def run_pipeline(shard: Any, out: Path, spec: Any, tokenizer_dir: Path, batch_size: int, build: Any) -> int:
    """One shard through ``curate_shard``, the function each Ray shard task runs; the samples written."""
    from perceptio.curate.distributor import ShardJob, curate_shard

    shutil.rmtree(out, ignore_errors=True)
    job = ShardJob(shard, str(out), {}, None, build, spec, str(tokenizer_dir), batch_size)
    return curate_shard(job, torch_threads=0, model_workers=1).samples


def bench_curate(sizes: Sizes, root: Path) -> dict[str, Any]:
    from perceptio.curate.distributor import TeacherSpec, _depth_worker, _prepare_batch
    from perceptio.curate.sample_builder import BuildConfig, image_for_teacher
    from perceptio.tokenize.vqvae import DepthVQVAE

    tokenizer_dir = root / "vqvae"
    torch.manual_seed(0)
    DepthVQVAE().save_pretrained(tokenizer_dir)  # the paper's shape: 320 -> 10x10 codes, K = 128
    started = time.perf_counter()
    shard = mixed_size_shard(root, sizes)
    units = shard.batches(sizes.unit_images)
    images = len(shard.images)
    results: dict[str, Any] = {"images": images, "units": len(units), "unit_images": sizes.unit_images,
                               "image_sizes": [f"{w}x{h}" for w, h in sizes.image_sizes],
                               "world_seconds": time.perf_counter() - started}
    build = BuildConfig()
    # Decoded images for the bare teacher, made by the same prepare function.
    prepared = [_prepare_batch(unit, build) for unit in units]
    batches = [[image_for_teacher(one) for one in unit if one.problem is None] for unit in prepared]
    usable = [[one for one in unit if one.problem is None] for unit in prepared]
    for name in sizes.teachers:
        entry: dict[str, Any] = {}
        results[name] = entry
        try:
            teacher_dir = save_teacher(name, root / name, sizes.teacher_input)
            spec = TeacherSpec(model=str(teacher_dir), cache_dir=None)  # no cache: every run computes
            out = root / f"shards-{name}"
            # Cold: model build + the whole shard, as a fresh shard task pays them.
            _depth_worker.cache_clear()
            cold_start = time.perf_counter()
            build_s, worker = timed(lambda: _depth_worker(spec, str(tokenizer_dir), 0, 1))
            run_pipeline(shard, out, spec, tokenizer_dir, sizes.unit_images, build)
            entry["cold_seconds"] = time.perf_counter() - cold_start
            entry["build_seconds"] = build_s
            # Steady state: the same worker (cached per process, as in a shard task), everything warm.
            warm_s, samples = timed(lambda: run_pipeline(shard, out, spec, tokenizer_dir, sizes.unit_images, build))
            entry["steady_seconds"], entry["samples"] = warm_s, samples
            teacher, vqvae = worker.source.teacher, worker.tokenizer
            teacher_s, raw = timed(lambda: [teacher.predict(batch) for batch in batches])
            tokenizer_s, _ = timed(lambda: [vqvae.encode_normalized(vqvae.normalize(maps)) for maps in raw])
            model_stage_s, _ = timed(lambda: [worker.predict(batch) for batch in usable])
            teacher_again_s, _ = timed(lambda: [teacher.predict(batch) for batch in batches])
            bare = images / statistics.mean([teacher_s, teacher_again_s])
            entry.update({
                "device": str(teacher.device), "teacher_batch": teacher.batch_size, "bf16_autocast": teacher.autocast,
                "bare_teacher_images_s": bare,
                "bare_teacher_images_s_before_after": [images / teacher_s, images / teacher_again_s],
                "model_stage_images_s": images / model_stage_s,
                "tokenizer_share_of_teacher": tokenizer_s / statistics.mean([teacher_s, teacher_again_s]),
                "steady_images_s": images / warm_s, "steady_ratio": images / warm_s / bare,
                "cold_images_s": images / entry["cold_seconds"], "cold_ratio": images / entry["cold_seconds"] / bare,
            })
            print(f"  curate {name}: {entry}", flush=True)
            del worker, teacher, vqvae
            _depth_worker.cache_clear()
        except Exception as error:  # noqa: BLE001 - one failure must not hide the other results
            entry.update(failure(f"curate {name}", error))
        reset_peak()
    return results


# ------------------------------------------------------------------------------------------ train


def build_model(sizes: Sizes, root: Path) -> Any:
    """The PerceptioModel of the issue: InternVL3-1B shape, SAM2.1-large shape, paper VQ-VAE."""
    from perceptio.tokenize.vqvae import DepthVQVAE
    from perceptio.train.config import PerceptioConfig
    from perceptio.train.model import PerceptioModel

    tokenizer_dir = root / "vqvae-train"
    torch.manual_seed(0)
    DepthVQVAE().save_pretrained(tokenizer_dir)
    config = PerceptioConfig(model=sizes.vlm, sam_model=sizes.sam, tokenizer=str(tokenizer_dir), lora_rank=256,
                             lora_alpha=512, dtype="float32")
    torch.manual_seed(0)
    return PerceptioModel.from_config(config)


def example_batch(model: Any, batch_size: int) -> dict[str, Any]:
    """``batch_size`` grounding examples with a [SEG] and a 100-code depth span, one 448 tile each."""
    from perceptio.tokens import SEG, depth_span

    rng = np.random.default_rng(0)
    examples = []
    for index in range(batch_size):
        pixels = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
        mask = np.zeros((480, 640), dtype=np.uint8)
        mask[100 + index * 10:300, 200:400] = 1
        codes = rng.integers(0, 128, 100)
        side = model.processor.settings.depth_size
        depth = rng.uniform(-1, 1, (side, side)).astype(np.float32)
        examples.append(model.processor.encode_example(
            Image.fromarray(pixels), f"Please segment the red sphere on the left, number {index}, and describe its depth.",
            f"{SEG} {depth_span(codes)} It is the nearest of the three spheres.", mask=mask, depth=depth,
        ))
    return model.processor.collate(examples)


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}


def llm_only_loss(model: Any, batch: dict[str, Any]) -> torch.Tensor:
    """L_LLM alone on the same model and batch: the bare VLM step (no SAM2, no depth losses)."""
    from perceptio.train import losses

    pixel_values = batch["pixel_values"].to(model.adapter.model.dtype)
    hidden = model.adapter.last_hidden_state(batch["input_ids"], batch["attention_mask"], pixel_values)
    supervised = losses.SupervisedLogits.from_hidden(hidden, batch["labels"], model.adapter.output_head())
    return losses.llm_loss(supervised, supervised.token_nll())


def step_stats(model: Any, batch: dict[str, Any], loss_fn: Callable[[], torch.Tensor], steps: int,
               device: torch.device, autocast: bool | None = None) -> dict[str, Any]:
    """Median time of one optimizer step and the peak memory over the timed steps.

    bf16 autocast is on for GPUs (as in training), and wherever ``autocast`` asks for it: weights
    of mixed dtypes (frozen bf16, trainable fp32) need it on any device.
    """
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    use_bf16 = device.type == "cuda" if autocast is None else autocast

    def step() -> float:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            loss = loss_fn()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    for _ in range(2 if steps > 1 else 1):  # warm-up: allocator, kernels, optimizer state
        step()
    reset_peak()
    times, loss = [], 0.0
    for _ in range(steps):
        seconds, loss = timed(step)
        times.append(seconds)
    del optimizer
    return {"step_s": statistics.median(times), "peak_mib": peak_memory_mib(), "loss": loss}


def bench_train(sizes: Sizes, root: Path, device: torch.device) -> tuple[dict[str, Any], Any]:
    from perceptio.train import shapes

    results: dict[str, Any] = {"vlm": sizes.vlm, "sam": sizes.sam, "lora_rank": 256, "precision": "fp32 weights, bf16 autocast"}
    build_s, model = timed(lambda: build_model(sizes, root))
    results["build_seconds"] = build_s
    model.to(device)
    parameters = shapes.count_parameters(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    results.update(parameters=parameters, trainable=trainable, embedding_rows=model.vlm.get_input_embeddings().weight.shape[0]
                   if hasattr(model.vlm, "get_input_embeddings") else None)
    arms = {"perception": lambda b: model(b).loss, "bare_vlm": lambda b: llm_only_loss(model, b)}
    for batch_size in sizes.train_batches:
        batch = to_device(example_batch(model, batch_size), device)
        results[f"tokens_b{batch_size}"] = int(batch["input_ids"].numel())
        for arm, loss in arms.items():
            key = f"{arm}_b{batch_size}"
            try:
                results[key] = step_stats(model, batch, functools.partial(loss, batch), sizes.timed_steps, device)
                print(f"  {key}: {results[key]}", flush=True)
            except Exception as error:  # noqa: BLE001
                results[key] = failure(key, error)
            reset_peak()
        if "step_s" in results.get(f"perception_b{batch_size}", {}) and "step_s" in results.get(f"bare_vlm_b{batch_size}", {}):
            results[f"heads_overhead_b{batch_size}"] = (
                results[f"perception_b{batch_size}"]["step_s"] / results[f"bare_vlm_b{batch_size}"]["step_s"] - 1)
    # Gradient checkpointing on the language model: memory saved vs time paid, same batch.
    batch_size = sizes.train_batches[-1]
    batch = to_device(example_batch(model, batch_size), device)
    try:
        model.vlm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        results[f"perception_b{batch_size}_checkpointing"] = step_stats(model, batch, lambda: model(batch).loss,
                                                                        sizes.timed_steps, device)
        print(f"  {results[f'perception_b{batch_size}_checkpointing']}", flush=True)
    except Exception as error:  # noqa: BLE001
        results[f"perception_b{batch_size}_checkpointing"] = failure("checkpointing", error)
    finally:
        model.vlm.gradient_checkpointing_disable()
    reset_peak()
    # Frozen weights in bf16, trainable ones kept fp32 (the intended GPU default, issue 15).
    try:
        with torch.no_grad():
            for parameter in model.parameters():
                if not parameter.requires_grad and parameter.is_floating_point():
                    parameter.data = parameter.data.to(torch.bfloat16)
        results[f"perception_b{batch_size}_frozen_bf16"] = step_stats(model, batch, lambda: model(batch).loss,
                                                                      sizes.timed_steps, device, autocast=True)
        print(f"  {results[f'perception_b{batch_size}_frozen_bf16']}", flush=True)
    except Exception as error:  # noqa: BLE001
        results[f"perception_b{batch_size}_frozen_bf16"] = failure("frozen bf16", error)
    reset_peak()
    return results, model


# --------------------------------------------------------------------------------------- generate


def bench_generate(sizes: Sizes, model: Any, device: torch.device) -> dict[str, Any]:
    """Greedy generation samples/s by batch size, left-padded prompts of different lengths."""
    model.eval()
    tokenizer = model.tokenizer
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rng = np.random.default_rng(1)
    largest = max(sizes.generate_batches)
    prompts, pixels = [], []
    for index in range(largest):
        image = Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8))
        values = model.processor.pixel_values(image)
        text = model.processor.prompt_text("Please segment " + "the small red sphere " * (1 + index % 4) + "and give its depth.",
                                         num_tiles=values.shape[0])
        prompts.append(tokenizer(text, add_special_tokens=False)["input_ids"])
        pixels.append(values)
    results: dict[str, Any] = {"new_tokens": sizes.new_tokens, "prompt_tokens": [min(map(len, prompts)), max(map(len, prompts))]}

    def generate(rows: list[int]) -> torch.Tensor:
        length = max(len(prompts[row]) for row in rows)
        ids = torch.tensor([[pad] * (length - len(prompts[row])) + prompts[row] for row in rows], device=device)
        mask = torch.tensor([[0] * (length - len(prompts[row])) + [1] * len(prompts[row]) for row in rows], device=device)
        values = torch.cat([pixels[row] for row in rows]).to(device, model.adapter.model.dtype)
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            return model.vlm.generate(input_ids=ids, attention_mask=mask, pixel_values=values, do_sample=False,
                                      max_new_tokens=sizes.new_tokens, min_new_tokens=sizes.new_tokens, pad_token_id=pad)

    generate([0])  # warm-up
    for batch_size in sizes.generate_batches:
        try:
            rows = list(range(batch_size))
            repeats = max(1, 4 // batch_size) if batch_size < 4 else 1
            seconds, output = timed(lambda: [generate(rows) for _ in range(repeats)])
            results[f"b{batch_size}"] = {"samples_s": batch_size * repeats / seconds,
                                         "tokens_s": batch_size * repeats * sizes.new_tokens / seconds,
                                         "seconds": seconds, "peak_mib": peak_memory_mib()}
            print(f"  generate b{batch_size}: {results[f'b{batch_size}']}", flush=True)
        except Exception as error:  # noqa: BLE001
            results[f"b{batch_size}"] = failure(f"generate b{batch_size}", error)
        reset_peak()
    if "samples_s" in results.get(f"b{largest}", {}) and "samples_s" in results.get("b1", {}):
        results["speedup_largest_vs_1"] = results[f"b{largest}"]["samples_s"] / results["b1"]["samples_s"]
    return results


# ------------------------------------------------------------------------------------------- main


def environment() -> dict[str, Any]:
    import transformers

    info = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "cuda_available": torch.cuda.is_available(), "cpus": os.cpu_count()}
    try:
        import peft

        info["peft"] = peft.__version__
    except ImportError:
        info["peft"] = None
    if torch.cuda.is_available():
        info.update(gpu=torch.cuda.get_device_name(0), cuda=torch.version.cuda,
                    gpu_memory_gib=torch.cuda.get_device_properties(0).total_memory / 2**30)
    return info


def _fmt(value: Any, digits: int = 2) -> str:
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def table(report: dict[str, Any]) -> str:
    """The compact summary printed at the end (the JSON holds everything)."""
    env = report["environment"]
    lines = [f"GPU {env.get('gpu', 'none')} | torch {env['torch']} | transformers {env['transformers']} | "
             f"peft {env.get('peft')} | python {env['python']} | {env['cpus']} CPUs"]
    curate = report.get("curate", {})
    if "error" in curate:
        lines.append(f"curate: ERROR {curate['error']}")
    for name, entry in curate.items():
        if not isinstance(entry, dict):
            continue
        if "error" in entry:
            lines.append(f"curate {name}: ERROR {entry['error']}")
            continue
        lines.append(
            f"curate {name} ({curate['images']} images {'/'.join(curate['image_sizes'])}, batches of {curate['unit_images']}): "
            f"bare teacher {_fmt(entry['bare_teacher_images_s'], 1)} img/s | model stage {_fmt(entry['model_stage_images_s'], 1)} | "
            f"end to end steady {_fmt(entry['steady_images_s'], 1)} (ratio {_fmt(entry['steady_ratio'])}) | "
            f"cold incl. build {_fmt(entry['cold_images_s'], 1)} (ratio {_fmt(entry['cold_ratio'])}, build "
            f"{_fmt(entry['build_seconds'], 1)} s) | tokenizer/teacher time {_fmt(entry['tokenizer_share_of_teacher'], 3)}")
    train = report.get("train", {})
    if "error" in train:
        lines.append(f"train: ERROR {train['error']}")
    elif train:
        lines.append(f"train {train['vlm']} + {train['sam']}: {train['parameters'] / 1e6:.1f}M parameters, "
                     f"{train['trainable'] / 1e6:.1f}M trainable, built in {_fmt(train['build_seconds'], 1)} s")
        for key, value in train.items():
            if isinstance(value, dict):
                cell = (f"ERROR {value['error']}" if "error" in value else
                        f"{value['step_s'] * 1000:.0f} ms/step, peak {_fmt(value['peak_mib'], 0)} MiB")
                lines.append(f"  {key:38s} {cell}")
            elif key.startswith("heads_overhead"):
                lines.append(f"  {key:38s} {value * 100:+.1f}% (target <= +30%)")
    generate = report.get("generate", {})
    if "error" in generate:
        lines.append(f"generate: ERROR {generate['error']}")
    elif generate:
        cells = [f"b{key[1:]} {_fmt(value['samples_s'])} samples/s" if "samples_s" in value else f"{key} ERROR {value['error']}"
                 for key, value in generate.items() if key.startswith("b") and isinstance(value, dict)]
        lines.append(f"generate ({generate['new_tokens']} new tokens): " + " | ".join(cells)
                     + (f" | speed-up {_fmt(generate['speedup_largest_vs_1'], 1)}x" if "speedup_largest_vs_1" in generate else ""))
    lines.append(f"total {report['total_seconds']:.0f} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU (checks the script, measures nothing)")
    parser.add_argument("--sections", default="curate,train,generate")
    parser.add_argument("--vlm", default=None, help="override the vision-language model (e.g. shape:internvl3-1b, tiny)")
    parser.add_argument("--sam", default=None, help="override the SAM2 model (e.g. shape:sam2.1-hiera-large, tiny)")
    parser.add_argument("--json", type=Path, default=None, help="write the report here")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder [default: a temporary one]")
    args = parser.parse_args(argv)
    sizes = SMOKE_SIZES if args.cpu_smoke else DEVICE_SIZES
    sizes = dataclasses.replace(sizes, vlm=args.vlm or sizes.vlm, sam=args.sam or sizes.sam)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu_smoke else "cpu")
    root = args.work or Path(tempfile.mkdtemp(prefix="bench_gpu_"))
    root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    report: dict[str, Any] = {"environment": environment(), "sizes": sizes.__dict__, "device": str(device)}
    print(json.dumps(report["environment"]), flush=True)
    sections = args.sections.split(",")
    model = None

    def save() -> None:
        report["total_seconds"] = time.perf_counter() - started
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=2, default=str))

    for section in sections:
        section_start = time.perf_counter()
        try:
            if section == "curate":
                report["curate"] = bench_curate(sizes, root)
            elif section == "train":
                report["train"], model = bench_train(sizes, root, device)
            elif section == "generate":
                if model is None:
                    model = build_model(sizes, root).to(device)
                report["generate"] = bench_generate(sizes, model, device)
            else:
                raise ValueError(f"unknown section {section!r}")
        except Exception as error:  # noqa: BLE001
            report[section] = failure(section, error)
        print(f"[{section}] {time.perf_counter() - section_start:.1f} s", flush=True)
        save()
    print(table(report), flush=True)
    return report


if __name__ == "__main__":
    main()
