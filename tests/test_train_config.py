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


def test_tiny_model_trains_its_encoders_and_head_at_its_own_rate():
    tiny = PerceptioConfig.for_model(model="tiny", freeze_vision=None, freeze_sam_encoder=None)
    assert not tiny.freeze_vision and not tiny.freeze_sam_encoder  # random encoders must learn to see
    assert PerceptioConfig.for_model(model="tiny", freeze_vision=True).freeze_vision
    real = PerceptioConfig.for_model(freeze_vision=None, freeze_sam_encoder=None)
    assert real.freeze_vision and real.freeze_sam_encoder  # the paper's frozen encoders
    assert TrainConfig.for_model(True, steps=3, head_lr=None).head_lr == TrainConfig.TINY_DEFAULTS["head_lr"]
    assert TrainConfig.for_model(False, steps=3, head_lr=None).head_lr is None  # the same rate as lr
