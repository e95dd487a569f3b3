"""Preemption and crashes: SIGTERM/SIGINT stop at a step boundary with a checkpoint, crashes keep
the last finished step, resume refuses changed settings, --keep-last prunes, and a run resumes on
another number of processes (elastic; the data side is tested in test_train_data.py)."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from perceptio.errors import PerceptioError
from perceptio.train.checkpoint import latest_checkpoint
from perceptio.train.config import TrainConfig
from perceptio.train.loop import train
from tests.test_train_loop import ToyModel, run, shards, stream  # noqa: F401 (shards: a fixture)


class SignalledModel(ToyModel):
    """Sends a real signal to its own process during forward call ``at`` (mid-step)."""

    def __init__(self, at: int, signal_number: int = signal.SIGTERM):
        super().__init__()
        self.at, self.signal_number = at, signal_number

    def forward(self, batch):
        output = super().forward(batch)
        if self.calls == self.at:
            os.kill(os.getpid(), self.signal_number)
        return output


class CrashingModel(ToyModel):
    """Raises in forward call ``at``, as an out-of-memory error or a bug would."""

    def __init__(self, at: int):
        super().__init__()
        self.at = at

    def forward(self, batch):
        if self.calls + 1 == self.at:
            raise RuntimeError("CUDA out of memory (simulated)")
        return super().forward(batch)


def losses(history):
    return [(r["step"], r["loss"]) for r in history]


@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_finishes_the_step_saves_and_resumes_exactly(shards, tmp_path, signal_number):
    straight = run(shards, tmp_path / "straight", 8, grad_accum=2)
    handlers = {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGINT)}
    # Call 7 is the first micro-batch of step 4: the step is finished, then the run stops.
    stopped = run(shards, tmp_path / "split", 8, grad_accum=2, model=SignalledModel(7, signal_number))
    assert stopped.steps == 4 and stopped.model is None and not (tmp_path / "split" / "model").exists()
    name = signal.Signals(signal_number).name
    assert stopped.stopped.startswith(f"stopped by {name} after step 4 of 8; checkpoint ") and "--resume" in stopped.stopped
    assert latest_checkpoint(tmp_path / "split" / "checkpoints").name == "step-000004"
    assert {number: signal.getsignal(number) for number in handlers} == handlers  # the process's own again
    resumed = run(shards, tmp_path / "split", 8, grad_accum=2, resume=True)
    assert losses(stopped.history) + losses(resumed.history) == losses(straight.history)


def test_a_crash_saves_the_last_finished_step_and_resume_redoes_the_failed_one(shards, tmp_path):
    straight = run(shards, tmp_path / "straight", 6, grad_accum=2)
    with pytest.raises(RuntimeError, match="out of memory"):
        run(shards, tmp_path / "crash", 6, grad_accum=2, model=CrashingModel(8))  # in step 4
    assert latest_checkpoint(tmp_path / "crash" / "checkpoints").name == "step-000003"
    resumed = run(shards, tmp_path / "crash", 6, grad_accum=2, resume=True)
    assert losses(resumed.history) == losses(straight.history)[3:]
    # A crash in the first step has nothing to keep.
    with pytest.raises(RuntimeError):
        run(shards, tmp_path / "early", 6, model=CrashingModel(1))
    assert latest_checkpoint(tmp_path / "early" / "checkpoints") is None


def test_resume_refuses_changed_data_and_precision_settings(shards, tmp_path):
    run(shards, tmp_path, 2)
    config = TrainConfig(out=tmp_path, steps=2, batch_size=2, workers=0, progress=False, lr=1e-2, resume=True)
    with pytest.raises(PerceptioError, match=r"settings changed \(shuffle_buffer: 8 -> 9\)"):
        train(ToyModel(), dataclasses.replace(stream(shards), shuffle_buffer=9), config)
    with pytest.raises(PerceptioError, match=r"settings changed \(precision: 'fp32' -> 'bf16'\)"):
        train(ToyModel(), stream(shards), dataclasses.replace(config, precision="bf16"))


def test_keep_last_keeps_the_newest_checkpoints(shards, tmp_path):
    run(shards, tmp_path, 5, save_every=1, keep_last=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000004", "step-000005"]


@pytest.mark.slow
def test_sigterm_to_a_real_trainer_exits_0_with_a_checkpoint_and_resumes(shards, vqvae_dir, tmp_path):
    """perceptio-train in its own process, with a DataLoader worker, killed politely twice."""
    out = tmp_path / "run"
    args = [sys.executable, "-c", "from perceptio.train.cli import main; main()", "--shards", str(shards),
            "--model", "tiny", "--tokenizer", str(vqvae_dir), "--lora-rank", "4", "--lora-alpha", "8",
            "--batch-size", "2", "--steps", "500", "--workers", "1", "--out", str(out), "--no-progress"]
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}

    def run_until_steps(extra: list[str], steps: int, signal_number: int) -> tuple[int, str]:
        log = (tmp_path / f"log-{steps}").open("w+")
        process = subprocess.Popen(args + extra, stdout=log, stderr=subprocess.STDOUT, env=environment)
        metrics = out / "metrics.jsonl"
        deadline = time.monotonic() + 600
        while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= steps):
            assert process.poll() is None and time.monotonic() < deadline, Path(log.name).read_text()
            time.sleep(0.5)
        process.send_signal(signal_number)
        code = process.wait(timeout=300)
        log.seek(0)
        return code, log.read()

    code, log = run_until_steps([], 2, signal.SIGTERM)
    assert code == 0 and "Traceback" not in log, log
    line = next(line for line in log.splitlines() if line.startswith("stopped by SIGTERM"))
    done = int(line.split("after step ")[1].split()[0])
    assert latest_checkpoint(out / "checkpoints").name == f"step-{done:06d}"
    assert "--resume" in line and not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
    code, log = run_until_steps(["--resume"], done + 1, signal.SIGINT)
    assert code == 0 and "Traceback" not in log and "stopped by SIGINT" in log, log
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) > done
    assert latest_checkpoint(out / "checkpoints").name == f"step-{len(steps):06d}"


def _elastic_worker(rank: int, world_size: int, shards: str, out: str, port: int, workers: int, resume: bool) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    config = TrainConfig(out=Path(out), steps=6, batch_size=2, workers=workers, progress=False, lr=1e-2, save_every=3,
                         resume=resume)
    history = train(ToyModel(), stream(Path(shards)), config).history
    Path(out, f"history-{world_size}-{rank}.json").write_text(json.dumps(history))
    torch.distributed.destroy_process_group()


def _run_on(world_size: int, shards: Path, out: Path, workers: int, resume: bool) -> list[dict]:
    from tests.test_train_loop import _free_port

    if world_size == 1:
        return train(ToyModel(), stream(shards), TrainConfig(out=out, steps=6, batch_size=2, workers=workers, progress=False,
                                                             lr=1e-2, save_every=3, resume=resume)).history
    torch.multiprocessing.spawn(_elastic_worker, args=(world_size, str(shards), str(out), _free_port(), workers, resume),
                                nprocs=world_size)
    return json.loads((out / f"history-{world_size}-0.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("before, after", [((2, 0), (1, 0)), ((1, 2), (2, 0))], ids=["2->1", "1->2"])
def test_elastic_resume_with_gloo_processes(shards, tmp_path, before, after):
    """A checkpoint of 2 processes resumed by 1, and of 1 process (2 loader workers) resumed by 2."""
    import shutil

    out = tmp_path / "run"
    _run_on(before[0], shards, out, before[1], resume=False)
    shutil.rmtree(out / "checkpoints" / "step-000006")
    resumed = _run_on(after[0], shards, out, after[1], resume=True)
    assert [record["step"] for record in resumed] == [4, 5, 6]
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    state = json.loads((out / "checkpoints" / "step-000006" / "trainer_state.json").read_text())
    assert len(state["loader_states"]) == after[0] and state["loader_states"][0]["layout"] == [before[0], max(before[1], 1)]
