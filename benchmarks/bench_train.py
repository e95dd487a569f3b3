"""Trainer speed and memory on the TINY model (CPU), as ratios measured side by side in one run.

1. Data wait: the share of step time spent waiting for the next batch, 2 loader workers vs none.
2. Perception-loss overhead: forward + backward time of the whole objective over L_LLM alone,
   same model, same batch.
3. Restricted logits: peak memory of the output head + L_LLM (forward and backward) at a 150k
   vocabulary, logits for every position vs for supervised positions only (each in a fresh process).
4. With ``--span-rate STEPS``: train with ``perceptio-train`` for STEPS steps, then count greedy
   (unconstrained) generations on held-out images that hold a well-formed depth span, untrained vs
   trained; and every loss term's mean over the first and last 20 steps.

Run: ``.venv/bin/python benchmarks/bench_train.py [--span-rate 200]``; ``--report-run RUN --held-out DIR
--tokenizer TOK`` gives item 4 for a run made elsewhere (e.g. on the demo's shards). Shards come from the trainer
tests' factory (tests/train_factory.py): the curation schema, small images.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repository root: the tests package holds the shard factory

from perceptio.train.config import PerceptioConfig, StreamConfig, TrainConfig  # noqa: E402
from perceptio.train.data import PromptTemplates, expand_sample  # noqa: E402
from perceptio.train.loop import train  # noqa: E402
from perceptio.train.model import PerceptioModel  # noqa: E402
from tests.train_factory import write_shards, write_tiny_tokenizer  # noqa: E402

WIDE_VOCABULARY = 150_000


def make_inputs(folder: Path) -> tuple[Path, Path]:
    """Training shards (grounding + ADE20k questions), held-out shards and a tiny depth tokenizer."""
    write_shards(folder / "shards", "refcoco-unc", shards=4, images_per_shard=8, first_image_id=1)
    write_shards(folder / "shards", "ade20k", split="training", shards=2, images_per_shard=8, first_image_id=1001, question=True)
    write_shards(folder / "held-out", "refcoco-unc", split="val", shards=1, images_per_shard=12, first_image_id=501)
    write_shards(folder / "held-out", "ade20k", split="validation", shards=1, images_per_shard=8, first_image_id=1501, question=True)
    return folder / "shards", write_tiny_tokenizer(folder / "tok")


def tiny_config(tokenizer: Path) -> PerceptioConfig:
    return PerceptioConfig(model="tiny", tokenizer=str(tokenizer), lora_rank=8, lora_alpha=16, lora_dropout=0.0)


def build(tokenizer: Path) -> PerceptioModel:
    torch.manual_seed(0)
    return PerceptioModel.from_config(tiny_config(tokenizer))


def data_wait_share(shards: Path, tokenizer: Path, workers: int, out: Path, steps: int = 12) -> float:
    result = train(build(tokenizer), StreamConfig([shards]),
                   TrainConfig(out=out, steps=steps, batch_size=2, workers=workers, progress=False, export="none"))
    measured = result.history[2:]  # the first steps include starting the workers and filling their queues
    return sum(r["data_s"] for r in measured) / sum(r["step_s"] for r in measured)


def loss_overhead(shards: Path, tokenizer: Path, repeats: int = 5) -> float:
    from perceptio.train import losses

    model = build(tokenizer)
    templates = PromptTemplates.load()
    import webdataset as wds

    raw = next(iter(wds.tarfile_samples([{"url": str(sorted(shards.glob("refcoco-unc-*.tar"))[0])}])))
    batch = model.processor.collate([model.processor.encode_example(**example.decode()) for example in expand_sample(raw, templates)[:2]])

    def llm_only() -> torch.Tensor:
        hidden = model.adapter.last_hidden_state(batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
        supervised = losses.SupervisedLogits.from_hidden(hidden, batch["labels"], model.adapter.output_head())
        return losses.llm_loss(supervised, supervised.token_nll())

    def timed(loss_fn) -> float:
        start = time.perf_counter()
        loss_fn().backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    full_times, llm_times = [], []
    for _ in range(repeats):  # interleaved, so that machine load hits both alike
        full_times.append(timed(lambda: model(batch).loss))
        llm_times.append(timed(llm_only))
    return statistics.median(full_times) / statistics.median(llm_times)


def logits_peak_mb(mode: str, tokenizer: Path, shards: Path) -> tuple[float, int, int]:
    """Peak RSS growth (MB) of head + L_LLM forward/backward at a 150k vocabulary (run in a fresh
    process), with the supervised and total position counts of the batch."""
    from perceptio.train import losses

    model = build(tokenizer)
    import webdataset as wds

    raw = next(iter(wds.tarfile_samples([{"url": str(sorted(shards.glob("refcoco-unc-*.tar"))[0])}])))
    examples = expand_sample(raw, PromptTemplates.load())[:2]
    batch = model.processor.collate([model.processor.encode_example(**example.decode()) for example in examples])
    with torch.no_grad():
        hidden = model.adapter.last_hidden_state(batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
    hidden = hidden.detach().requires_grad_(True)
    head = torch.nn.Linear(hidden.shape[-1], WIDE_VOCABULARY, bias=False)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if mode == "restricted":
        supervised = losses.SupervisedLogits.from_hidden(hidden, batch["labels"], head)
    else:
        supervised = losses.SupervisedLogits.from_full_logits(head(hidden), batch["labels"])
    losses.llm_loss(supervised, supervised.token_nll()).backward()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024, len(supervised.targets), batch["labels"].numel()


def logits_memory_ratio(tokenizer: Path, shards: Path) -> tuple[float, float, str]:
    peaks, positions = {}, ""
    for mode in ("full", "restricted"):
        child = subprocess.run([sys.executable, __file__, "--logits-peak", mode, "--tokenizer", str(tokenizer), "--shards", str(shards)],
                               capture_output=True, text=True)
        if child.returncode != 0:
            raise RuntimeError(f"--logits-peak {mode} failed:\n{child.stderr[-3000:]}")
        peak, supervised, total = child.stdout.strip().splitlines()[-1].split()
        peaks[mode], positions = float(peak), f"{supervised} of {total} positions supervised"
    return peaks["full"], peaks["restricted"], positions


def well_formed_rate(model: PerceptioModel, held_out: Path) -> tuple[float, float, int]:
    """Shares of held-out prompts whose greedy, unconstrained generation has a well-formed span.

    Two readings: the evaluation's strict one (one [D_START], n codes, one [D_END], and no depth
    token or marker anywhere else in the answer) and the issue's ([D_START], exactly n codes,
    [D_END], whatever follows).
    """
    import webdataset as wds

    from perceptio.evaluate.metrics import PerceptionVocabulary, depth_span

    vocabulary = PerceptionVocabulary(tuple(model.depth_token_ids.tolist()), model.d_start_id, model.d_end_id,
                                      model.config.num_depth_tokens)
    end_of_turn = model.tokenizer.convert_tokens_to_ids(model.processor.end_of_turn())
    templates = PromptTemplates.load()
    examples = [example for raw in wds.tarfile_samples([{"url": str(p)} for p in sorted(held_out.glob("*.tar"))])
                for example in expand_sample(raw, templates)[:1]]  # one prompt per held-out image
    model.eval()
    strict = spans = 0
    with torch.inference_mode():
        for example in examples:
            image = example.decode()["image"]
            pixel_values = model.processor.pixel_values(image)
            prompt = model.processor.prompt_text(example.prompt, num_tiles=pixel_values.shape[0])
            input_ids = torch.tensor([model.tokenizer(prompt, add_special_tokens=False)["input_ids"]])
            output = model.adapter.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                                  pixel_values=pixel_values, max_new_tokens=model.config.num_depth_tokens + 24,
                                                  do_sample=False, eos_token_id=end_of_turn, pad_token_id=end_of_turn)
            answer = output[0, input_ids.shape[1]:].tolist()
            well_formed, codes = depth_span(answer, vocabulary)
            strict += well_formed
            if model.d_start_id in answer:
                after_codes = answer.index(model.d_start_id) + 1 + len(codes)
                spans += len(codes) == vocabulary.num_depth_tokens and answer[after_codes:after_codes + 1] == [model.d_end_id]
    return strict / len(examples), spans / len(examples), len(examples)


def span_rate(folder: Path, shards: Path, tokenizer: Path, steps: int) -> None:
    run = folder / "run"
    # The command line of the "done when", with default options otherwise.
    command = [str(Path(sys.executable).with_name("perceptio-train")), "--shards", str(shards), "--model", "tiny",
               "--tokenizer", str(tokenizer), "--steps", str(steps), "--out", str(run), "--no-progress"]
    start = time.perf_counter()
    child = subprocess.run(command, capture_output=True, text=True)
    if child.returncode != 0:
        raise RuntimeError(f"perceptio-train failed:\n{child.stderr[-3000:]}")
    print(f"perceptio-train --model tiny --steps {steps} (CPU, defaults): {(time.perf_counter() - start) / 60:.1f} min")
    report_run(run, folder / "held-out", tokenizer)


def report_run(run: Path, held_out: Path, tokenizer: Path) -> None:
    """Loss terms early vs late in a tiny run, and its span rate against the untrained model."""
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    terms = [k for k in history[0] if k not in ("step", "lr", "grad_norm", "data_s", "step_s", "sources")]
    for term in terms:
        # Segmentation terms exist only in batches with a grounding example.
        rows = [r for r in history if not term.startswith("seg") or r["sources"].get("refcoco-unc")]
        first, last = statistics.mean(r[term] for r in rows[:20]), statistics.mean(r[term] for r in rows[-20:])
        print(f"  {term:13s} first 20 steps {first:8.4f}   last 20 steps {last:8.4f}   ratio {last / first:6.3f}")
    torch.manual_seed(0)  # as perceptio-train --seed 0 builds its starting point
    untrained = well_formed_rate(PerceptioModel.from_config(PerceptioConfig(model="tiny", tokenizer=str(tokenizer))), held_out)
    trained = well_formed_rate(PerceptioModel.from_pretrained(run / "model"), held_out)
    print(f"greedy on {trained[2]} held-out images: [D_START] + exactly n codes + [D_END]: untrained {untrained[1]:.0%}, "
          f"trained {trained[1]:.0%}; strict (nothing stray elsewhere): untrained {untrained[0]:.0%}, trained {trained[0]:.0%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--span-rate", type=int, default=0, metavar="STEPS", help="also train STEPS steps and measure spans")
    parser.add_argument("--report-run", type=Path, metavar="RUN",
                        help="only report on an existing perceptio-train --model tiny run folder (with --held-out, --tokenizer)")
    parser.add_argument("--held-out", type=Path, help="a folder of held-out shards (.tar) for --report-run")
    parser.add_argument("--logits-peak", choices=("full", "restricted"), help=argparse.SUPPRESS)  # the child process
    parser.add_argument("--tokenizer", type=Path, help="the run's depth tokenizer folder, for --report-run")
    parser.add_argument("--shards", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.report_run:
        if not (args.held_out and args.tokenizer):
            parser.error("--report-run needs --held-out and --tokenizer")
        report_run(args.report_run, args.held_out, args.tokenizer)
        return
    if args.logits_peak:
        print(*logits_peak_mb(args.logits_peak, args.tokenizer, args.shards))
        return
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary)
        shards, tokenizer = make_inputs(folder)
        with_workers = data_wait_share(shards, tokenizer, 2, folder / "w2")
        without = data_wait_share(shards, tokenizer, 0, folder / "w0")
        print(f"data wait share of step time: 2 workers {with_workers:.1%}, in-process {without:.1%}")
        print(f"perception losses step time / L_LLM alone: {loss_overhead(shards, tokenizer):.2f}x")
        full, restricted, positions = logits_memory_ratio(tokenizer, shards)
        print(f"peak memory of head + L_LLM at {WIDE_VOCABULARY:,} vocabulary ({positions}): all positions "
              f"{full:.0f} MB, supervised only {restricted:.0f} MB ({full / max(restricted, 1e-9):.1f}x less)")
        if args.span_rate:
            span_rate(folder, shards, tokenizer, args.span_rate)


if __name__ == "__main__":
    main()
