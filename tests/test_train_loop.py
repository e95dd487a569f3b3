"""The training loop: schedule, exact resume, NaN stop, atomic checkpoints, two processes (gloo).

Most tests drive the loop with a toy model that has the trainer's model interface (a legitimate
stand-in: they test the loop, not the model); the resume and CLI tests use the built-in tiny model.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import shutil
from pathlib import Path
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from perceptio.errors import PerceptioError
from perceptio.train import checkpoint as checkpoint_module
from perceptio.io import atomic_directory
from perceptio.train.checkpoint import latest_checkpoint
from perceptio.train.config import StreamConfig, TrainConfig
from perceptio.train.data import parse_mix
from perceptio.train.loop import Processes, lr_factor, run_settings, train
from tests.train_factory import write_shards


@dataclass
class ToyOutput:
    """A dataclass, as the real model's output: DDP looks for the loss's graph inside it."""

    loss: torch.Tensor
    terms: dict[str, torch.Tensor]


class ToyProcessor:
    """The processor interface: a few numbers per example."""

    def encode_conversation(self, image, turns, masks, depth, span_is_context=False, hidden_cells=()):
        pixels = np.asarray(image, dtype=np.float32) / 255.0
        features = torch.tensor([*pixels.mean(axis=(0, 1)), len(turns[0].text) / 100.0])
        has_mask = float(len(masks) > 0)
        return {"features": features, "target": torch.tensor([float(depth.mean()), has_mask])}

    def collate(self, examples):
        return {name: torch.stack([e[name] for e in examples]) for name in examples[0]}


class ToyModel(torch.nn.Module):
    """The trainer's model interface on a few linear layers; ``poison_call`` makes one forward NaN."""

    def __init__(self, poison_call: int | None = None):
        super().__init__()
        torch.manual_seed(0)
        self.processor = ToyProcessor()
        self.frozen = torch.nn.Linear(4, 8).requires_grad_(False)
        self.dropout = torch.nn.Dropout(0.2)  # makes the RNG state matter for exact resume
        self.head = torch.nn.Linear(8, 2)
        self.poison_call, self.calls = poison_call, 0

    def fsdp_units(self):
        return []  # too small for blocks: FSDP shards it as one unit

    def forward(self, batch):
        self.calls += 1
        prediction = self.head(self.dropout(torch.relu(self.frozen(batch["features"]))))
        terms = {"depth": (prediction[:, 0] - batch["target"][:, 0]).pow(2).mean(),
                 "seg": torch.nn.functional.binary_cross_entropy_with_logits(prediction[:, 1], batch["target"][:, 1])}
        if self.calls == self.poison_call:
            terms["seg"] = terms["seg"] * float("nan")
        return ToyOutput(terms["depth"] + terms["seg"], terms)

    def trainable_state_dict(self):
        return {name: p.detach().clone() for name, p in self.named_parameters() if p.requires_grad}

    def load_trainable_state_dict(self, state):
        self.load_state_dict(state, strict=False)

    def save_pretrained(self, folder, merged=False):
        with atomic_directory(folder) as staging:  # atomic, as the loop expects of every model
            Path(staging, "config.json").write_text(json.dumps({"model_type": "toy", "merged": merged}))
            save_file(self.trainable_state_dict(), str(Path(staging, "model.safetensors")))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    write_shards(root, "refcoco-unc", shards=3, images_per_shard=3, first_image_id=1)
    write_shards(root, "ade20k", split="training", shards=2, images_per_shard=4, first_image_id=50, question=True)
    return root


def stream(shards, **options) -> StreamConfig:
    return StreamConfig([shards], mix=parse_mix("refcoco=1,ade20k=1"), shuffle_buffer=8, shuffle_initial=4, **options)


def run(shards, out, steps, model=None, **options):
    config = TrainConfig(out=out, steps=steps, batch_size=2, workers=0, progress=False, lr=1e-2, **options)
    return train(model or ToyModel(), stream(shards), config)


def losses(result):
    return [(r["step"], r["loss"], r["depth"], r["seg"]) for r in result.history]


def test_schedule_warms_up_then_decays_to_zero():
    factors = [lr_factor(step, 100, 0.05) for step in range(100)]
    assert factors[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert all(a >= b for a, b in zip(factors[4:], factors[5:]))  # non-increasing after warm-up
    assert factors[52] == pytest.approx(0.5 * (1 + np.cos(np.pi * (52 - 5) / 95)))  # 5 warm-up steps, 95 of cosine
    assert lr_factor(100, 100, 0.05) == pytest.approx(0.0)


def test_resume_gives_the_same_losses_as_an_uninterrupted_run(shards, tmp_path):
    straight = run(shards, tmp_path / "straight", 8, grad_accum=2)
    # A crash in step 5 (forward call 9 with 2 micro-batches per step) after the checkpoint of
    # step 4; the resumed run starts from that checkpoint in a fresh model.
    with pytest.raises(PerceptioError, match="non-finite loss at step 5"):
        run(shards, tmp_path / "split", 8, grad_accum=2, save_every=4, model=ToyModel(poison_call=9))
    assert latest_checkpoint(tmp_path / "split" / "checkpoints").name == "step-000004"
    resumed = run(shards, tmp_path / "split", 8, grad_accum=2, save_every=4, resume=True)
    assert losses(resumed) == losses(straight)[4:]
    lines = [json.loads(line) for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == list(range(1, 9))
    assert [line["loss"] for line in lines] == [line["loss"] for line in straight.history]
    with pytest.raises(PerceptioError, match="settings changed"):
        run(shards, tmp_path / "split", 9, grad_accum=2, resume=True)


def test_resume_matches_local_folders_however_they_are_written(shards, tmp_path, monkeypatch):
    # Started with a relative path, resumed with the absolute one.
    monkeypatch.chdir(shards.parent)
    relative = Path(shards.name)
    with pytest.raises(PerceptioError, match="non-finite loss at step 3"):
        train(ToyModel(poison_call=3), stream(relative), TrainConfig(out=tmp_path, steps=4, batch_size=2, workers=0,
                                                                    progress=False, lr=1e-2, save_every=2))
    resumed = run(shards.resolve(), tmp_path, 4, save_every=2, resume=True)
    assert [r["step"] for r in resumed.history] == [3, 4]
    state_file = tmp_path / "checkpoints" / "step-000004" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    assert state["settings"]["shards"] == [str(shards.resolve())]
    # Without reading questions, where their points would fall is no setting of the run.
    assert state["settings"]["reading_questions"] == 0 and state["settings"]["reading_spread"] is None
    with_reading = run_settings(TrainConfig(out=tmp_path, steps=4),
                                stream(shards, reading_questions=5, reading_spread=0.5, reading_swaps=0.25),
                                Processes(0, 1, torch.device("cpu")))
    assert (with_reading["reading_questions"], with_reading["reading_spread"], with_reading["reading_swaps"]) == (5, 0.5, 0.25)
    # A checkpoint written before settings held absolute paths (relative, as typed) and before
    # --reading-questions, --reading-spread, --reading-swaps and --mark-readouts existed (it ran without
    # them) still resumes.
    state["settings"]["shards"] = [shards.name]
    del state["settings"]["reading_questions"], state["settings"]["reading_spread"], state["settings"]["reading_swaps"]
    for later in ("mark_readouts", "readout_cells", "reading_in_text", "reading_short_spans"):
        del state["settings"][later]
    state_file.write_text(json.dumps(state))
    assert run(shards.resolve(), tmp_path, 4, save_every=2, resume=True).history == []
    with pytest.raises(PerceptioError, match="reading_questions: 0 -> 5, reading_spread: None -> 1.0"):
        train(ToyModel(), stream(shards.resolve(), reading_questions=5),
              TrainConfig(out=tmp_path, steps=4, batch_size=2, workers=0, progress=False, lr=1e-2, save_every=2, resume=True))
    # Another folder is another run.
    other = tmp_path / "other-shards"
    shutil.copytree(shards, other)
    with pytest.raises(PerceptioError, match="settings changed"):
        run(other, tmp_path, 4, save_every=2, resume=True)


def test_a_checkpoint_from_before_a_model_setting_existed_resumes_as_its_default(tmp_path):
    # A model's settings written before PerceptioConfig.mark_readouts, answer_weight, new_token_init,
    # cell_embeddings and eye_depth: it ran without them and with transformers' mean resizing.
    old = {"steps": 4, "model": {"model": "tiny", "lora_rank": 8}}
    checkpoint_module.save_checkpoint(tmp_path / "step-000004", {"w": torch.zeros(1)}, {}, {},
                                      checkpoint_module.Checkpoint(4, old, [{}], [{}]))
    now = {**checkpoint_module.LATER_SETTINGS, **old, "model": {**old["model"], "mark_readouts": False, "answer_weight": 1.0,
                                                                           "new_token_init": "mean", "cell_embeddings": False,
                                                                           "eye_depth": 0.0}}
    assert checkpoint_module.load_checkpoint(tmp_path / "step-000004", now).checkpoint.step == 4
    for changed in ({"mark_readouts": True}, {"answer_weight": 4.0}, {"new_token_init": "spread"},
                    {"cell_embeddings": True}, {"eye_depth": 1.0}):
        with pytest.raises(PerceptioError, match="settings changed"):
            checkpoint_module.load_checkpoint(tmp_path / "step-000004", {**now, "model": {**now["model"], **changed}})


def test_nan_stops_the_run_naming_step_and_keys_and_saves_nothing(shards, tmp_path):
    with pytest.raises(PerceptioError) as error:
        run(shards, tmp_path, 6, save_every=2, model=ToyModel(poison_call=3))
    message = str(error.value)
    assert "non-finite loss at step 3" in message and "seg=nan" in message
    assert "refcoco-unc_train_" in message or "ade20k_training_" in message
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000002"]  # no partial, no hidden
    assert not (tmp_path / "model").exists()
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2


def test_checkpoint_folder_appears_whole_or_not_at_all(shards, tmp_path, monkeypatch):
    result = run(shards, tmp_path, 2, save_every=1)
    assert result.checkpoint.name == "step-000002" and (tmp_path / "model" / "config.json").is_file()
    names = {p.name for p in result.checkpoint.iterdir()}
    assert names == {"trainable.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "trainer_state.json"}
    # Resume from step 1 and fail while saving step 2 again: nothing of the new step-000002 appears.
    import shutil

    shutil.rmtree(result.checkpoint)
    first = tmp_path / "checkpoints" / "step-000001"
    before = {p.name: p.read_bytes() for p in first.iterdir()}

    def failing_save(obj, path, *args, **kwargs):
        if str(path).endswith("scheduler.pt"):
            raise OSError("disk full")
        return torch.save.__wrapped__(obj, path, *args, **kwargs)

    failing_save.__wrapped__ = torch.save
    monkeypatch.setattr(checkpoint_module.torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        run(shards, tmp_path, 2, save_every=1, resume=True)
    monkeypatch.undo()
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-000001"]
    assert {p.name: p.read_bytes() for p in first.iterdir()} == before

    with pytest.raises(RuntimeError):
        with atomic_directory(tmp_path / "fresh") as folder:
            (folder / "half").write_text("x")
            raise RuntimeError("killed")
    assert not any(p.name.startswith(".fresh") or p.name == "fresh" for p in tmp_path.iterdir())


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _two_process_worker(rank: int, shards: str, out: str, port: int) -> None:
    """DDP, then FSDP: 7 steps (checkpoints after 4 and 7), then a resume from step 4 in fresh models."""
    import shutil

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    data = StreamConfig([Path(shards)], mix={"refcoco": 1.0}, shuffle_buffer=4, shuffle_initial=2)
    for parallel in ("ddp", "fsdp"):
        run_dir = Path(out, parallel)
        config = TrainConfig(out=run_dir, steps=7, batch_size=2, workers=0, progress=False, lr=1e-2, save_every=4,
                             parallel=parallel)
        model = ToyModel()
        history = train(model, data, config).history
        weights = {name: p.tolist() for name, p in model.trainable_state_dict().items()} if parallel == "ddp" else None
        if rank == 0:
            shutil.rmtree(run_dir / "checkpoints" / "step-000007")
        torch.distributed.barrier()
        resumed = train(ToyModel(), data, dataclasses.replace(config, resume=True)).history
        Path(out, f"{parallel}-rank{rank}.json").write_text(json.dumps({"weights": weights, "history": history, "resumed": resumed}))
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_processes_with_uneven_shards_stay_in_step_and_resume(shards, tmp_path):
    # 3 refcoco shards (12 examples each) over 2 ranks: rank 0 reads two, rank 1 one; in 7 steps of
    # 2 examples rank 1 goes round its shard more than once, and both ranks make every step.
    torch.multiprocessing.spawn(_two_process_worker, args=(str(shards), str(tmp_path), _free_port()), nprocs=2)
    ddp = [json.loads((tmp_path / f"ddp-rank{rank}.json").read_text()) for rank in range(2)]
    assert ddp[0]["weights"] == ddp[1]["weights"]  # DDP averaged the gradients
    assert ddp[0]["weights"] != {name: p.tolist() for name, p in ToyModel().trainable_state_dict().items()}  # and they moved
    assert [r["step"] for r in ddp[1]["history"]] == [1, 2, 3, 4, 5, 6, 7]
    assert [r["loss"] for r in ddp[0]["history"]] == [r["loss"] for r in ddp[1]["history"]]  # averaged over ranks
    assert len((tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()) == 7  # written by rank 0 only
    state = json.loads((tmp_path / "ddp" / "checkpoints" / "step-000007" / "trainer_state.json").read_text())
    # Reader r is rank r's only worker (ReaderLayout: reader = rank + world size x worker).
    epochs = [rank_state["readers"][str(rank)]["streams"]["refcoco"]["epoch"]
              for rank, rank_state in enumerate(state["loader_states"])]
    assert epochs == [0, 1]
    for parallel in ("ddp", "fsdp"):
        for rank in range(2):
            record = json.loads((tmp_path / f"{parallel}-rank{rank}.json").read_text())
            assert [r["loss"] for r in record["resumed"]] == [r["loss"] for r in record["history"][4:]], (parallel, rank)
    fsdp = json.loads((tmp_path / "fsdp-rank0.json").read_text())
    assert [r["loss"] for r in fsdp["history"]] == pytest.approx([r["loss"] for r in ddp[0]["history"]], rel=1e-5)  # sharded


# --------------------------------------------------------------------- the CLI on the tiny model
def perceptio_train(monkeypatch, *args: str) -> int:
    from perceptio.train.cli import main

    monkeypatch.setattr("sys.argv", ["perceptio-train", *args])
    with pytest.raises(SystemExit) as done:
        main()
        raise SystemExit(0)
    return done.value.code


def test_cli_reports_bad_input_in_one_line(monkeypatch, capsys, shards, tmp_path):
    code = perceptio_train(monkeypatch, "--shards", str(shards), "--model", "tiny", "--steps", "1", "--mix", "refclef=1",
                           "--out", str(tmp_path))
    assert code == 2 and capsys.readouterr().err.strip() == (
        "error: --mix names 'refclef' but no shard matches it; datasets found: ade20k, refcoco-unc")
    code = perceptio_train(monkeypatch, "--shards", str(shards), "--model", "tiny", "--steps", "1", "--out", str(tmp_path))
    assert code == 2 and capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: a depth tokenizer folder (--tokenizer) is needed for the depth tokens and L_DepthRecon")
    code = perceptio_train(monkeypatch, "--shards", str(tmp_path / "none"), "--steps", "1", "--out", str(tmp_path))
    assert code == 2 and "does not exist" in capsys.readouterr().err
    code = perceptio_train(monkeypatch, "--shards", str(shards), "--steps", "1", "--parallel", "zero3", "--out", str(tmp_path))
    assert code == 2 and capsys.readouterr().err.strip() == "error: --parallel must be one of ddp, fsdp, not 'zero3'"
    code = perceptio_train(monkeypatch, "--shards", str(shards), "--steps", "1", "--reading-short-spans", "16,all",
                           "--out", str(tmp_path))
    assert code == 2 and capsys.readouterr().err.strip() == (
        "error: --reading-short-spans takes comma-separated cell counts (16,36), not '16,all'")
    code = perceptio_train(monkeypatch, "--shards", str(shards), "--steps", "1", "--cell-embeddings", "--crop-to-patches",
                           "--out", str(tmp_path))
    assert code == 2 and capsys.readouterr().err.strip() == (
        "error: --cell-embeddings needs one whole-picture tile per image: it goes without --crop-to-patches")


@pytest.mark.slow
def test_cli_tiny_run_resumes_exactly(monkeypatch, capsys, shards, vqvae_dir, tmp_path):
    from perceptio.train.model import TERMS, PerceptioModel

    args = ["--shards", str(shards), "--model", "tiny", "--tokenizer", str(vqvae_dir), "--lora-rank", "4", "--lora-alpha", "8",
            "--steps", "4", "--save-every", "2", "--workers", "0", "--lr", "1e-3", "--out", str(tmp_path), "--no-progress"]
    assert perceptio_train(monkeypatch, *args) == 0
    straight = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in straight] == [1, 2, 3, 4]
    assert set(TERMS) <= set(json.loads(straight[0]))
    reloaded = PerceptioModel.from_pretrained(tmp_path / "model")
    assert reloaded.config.is_tiny and reloaded.config.lora_rank == 4
    # The tiny model's defaults: every language-model weight trained, batches of the tiny batch size.
    from perceptio.train.config import TrainConfig

    assert reloaded.config.train_language_model
    assert sum(json.loads(straight[0])["sources"].values()) == TrainConfig.TINY_DEFAULTS["batch_size"]

    # The same command again without --resume refuses in one line instead of rewriting metrics.jsonl.
    capsys.readouterr()
    assert perceptio_train(monkeypatch, *args) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: {tmp_path} already holds a run (metrics.jsonl, checkpoints, model): pass --resume to continue it, "
        "or choose another --out")
    assert (tmp_path / "metrics.jsonl").read_text().splitlines() == straight

    # Take away the last checkpoint: --resume goes on from step 2 and must repeat steps 3 and 4 exactly.
    import shutil

    shutil.rmtree(tmp_path / "checkpoints" / "step-000004")
    assert perceptio_train(monkeypatch, *args, "--resume") == 0
    resumed = (tmp_path / "metrics.jsonl").read_text().splitlines()

    def losses(lines):
        return [{k: v for k, v in json.loads(line).items() if k not in ("data_s", "step_s")} for line in lines]

    assert losses(resumed) == losses(straight)


def test_init_from_starts_a_second_stage_from_an_exported_models_weights(monkeypatch, capsys, shards, vqvae_dir, tmp_path):
    from perceptio.train.model import PerceptioModel

    common = ["--shards", str(shards), "--model", "tiny", "--tokenizer", str(vqvae_dir), "--steps", "1", "--workers", "0",
              "--no-progress", "--batch-size", "2"]
    assert perceptio_train(monkeypatch, *common, "--out", str(tmp_path / "first")) == 0
    first = PerceptioModel.from_pretrained(tmp_path / "first" / "model").trainable_state_dict()
    # At learning rate 0 the second stage exports exactly the weights it started from: the first stage's.
    assert perceptio_train(monkeypatch, *common, "--lr", "0", "--head-lr", "0", "--init-from", str(tmp_path / "first" / "model"),
                           "--out", str(tmp_path / "second")) == 0
    second = PerceptioModel.from_pretrained(tmp_path / "second" / "model").trainable_state_dict()
    assert second.keys() == first.keys() and all(torch.equal(second[name], first[name]) for name in first)
    state = json.loads(next((tmp_path / "second" / "checkpoints").glob("*/trainer_state.json")).read_text())
    assert state["settings"]["init_from"] == str((tmp_path / "first" / "model").resolve())  # a resume must say it again

    capsys.readouterr()
    assert perceptio_train(monkeypatch, *common, "--init-from", str(tmp_path), "--out", str(tmp_path / "third")) == 2
    assert capsys.readouterr().err.strip() == f"error: --init-from {tmp_path} is not an exported model (no perceptio.json)"
    # Other trainable parts (LoRA instead of the whole language model) do not take these weights.
    assert perceptio_train(monkeypatch, *common, "--lora", "--init-from", str(tmp_path / "first" / "model"),
                           "--out", str(tmp_path / "fourth")) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: trainable weights do not match this model")
    record_file = tmp_path / "first" / "model" / "perceptio.json"
    record = json.loads(record_file.read_text())
    record["config"]["sam_model"] = "facebook/sam2.1-hiera-large"
    record_file.write_text(json.dumps(record))
    assert perceptio_train(monkeypatch, *common, "--init-from", str(tmp_path / "first" / "model"),
                           "--out", str(tmp_path / "fifth")) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith("was trained on --sam-model facebook/sam2.1-hiera-large, not "
                                                                     + PerceptioModel.from_pretrained(tmp_path / "second" / "model").config.sam_model)


def test_a_log_that_is_not_a_terminal_gets_plain_progress_lines(shards, tmp_path, capsys):
    train(ToyModel(), stream(shards), TrainConfig(out=tmp_path / "run", steps=3, batch_size=2, workers=0, lr=1e-2))
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("train: ")]
    assert lines, "no plain progress line"
    last = lines[-1]
    assert last.startswith("train: 3/3 steps (100%) | loss ") and " examples/s | ETA 0:00:00" in last
