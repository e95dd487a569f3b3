"""The training configs: importable without torch, and the TINY model's own defaults applied only when unset."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from perceptio.train.config import PerceptioConfig, TrainConfig


def test_config_module_imports_no_torch():
    code = ("import sys, perceptio.train.config; "
            "print(sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.stdout.strip() == "[]"


def test_tiny_defaults_fill_only_what_is_unset():
    tiny = TrainConfig.for_model(True, steps=3, batch_size=None, lr=None)
    assert (tiny.batch_size, tiny.lr) == (TrainConfig.TINY_DEFAULTS["batch_size"], TrainConfig.TINY_DEFAULTS["lr"])
    assert TrainConfig.for_model(True, steps=3, lr=0.5).lr == 0.5  # given values win
    plain = TrainConfig.for_model(False, steps=3, batch_size=None, lr=None)
    assert (plain.batch_size, plain.lr) == (TrainConfig(steps=3).batch_size, TrainConfig(steps=3).lr)

    assert PerceptioConfig.for_model(model="tiny", train_language_model=None).train_language_model
    assert not PerceptioConfig.for_model(model="tiny", train_language_model=False).train_language_model
    assert not PerceptioConfig.for_model(train_language_model=None).train_language_model  # LoRA for real models
