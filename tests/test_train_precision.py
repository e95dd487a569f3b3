"""GPU precision defaults, checked on the CPU: frozen base weights in bf16, trainable ones in fp32."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from perceptio.errors import PerceptioError
from perceptio.tokens import SEG, depth_span
from perceptio.train.config import PerceptioConfig
from perceptio.train.model import PerceptioModel, frozen_weight_dtype


def test_auto_means_bf16_frozen_weights_on_a_gpu_and_fp32_on_the_cpu():
    assert PerceptioConfig().dtype == "auto"
    assert frozen_weight_dtype("auto", cuda_available=True) == torch.bfloat16
    assert frozen_weight_dtype("auto", cuda_available=False) == torch.float32
    assert frozen_weight_dtype("float32", cuda_available=True) == torch.float32
    with pytest.raises(PerceptioError, match="auto, float32 or bfloat16"):
        frozen_weight_dtype("float16", cuda_available=True)


def test_bf16_frozen_weights_keep_fp32_master_weights_and_train_under_autocast(vqvae_dir):
    torch.manual_seed(0)
    model = PerceptioModel.from_config(PerceptioConfig(model="tiny", tokenizer=str(vqvae_dir), dtype="bfloat16",
                                                       train_language_model=False, lora_rank=8, lora_alpha=16))
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    frozen_base = [p for module in (model.vlm, model.segmenter.sam) for p in module.parameters() if not p.requires_grad]
    kinds = {kind for kind in ("lora_", "trainable_tokens", "mask_decoder", "projector") if any(kind in n for n in trainable)}
    assert kinds == {"lora_", "trainable_tokens", "mask_decoder", "projector"}
    assert all(p.dtype == torch.float32 for p in trainable.values())
    assert frozen_base and all(p.dtype == torch.bfloat16 for p in frozen_base if p.is_floating_point())

    rng = np.random.default_rng(0)
    mask = np.zeros((80, 120), dtype=np.uint8)
    mask[10:50, 20:70] = 1
    example = model.processor.encode_example(
        Image.fromarray(rng.integers(0, 256, (80, 120, 3), dtype=np.uint8)), "Please segment the box.",
        f"{SEG} {depth_span(rng.integers(0, 128, 100))} a box", mask, rng.uniform(-1, 1, (320, 320)).astype(np.float32))
    batch = model.processor.collate([example])
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-3)
    before = {name: p.detach().clone() for name, p in trainable.items()}
    frozen_before = frozen_base[0].detach().clone()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = model(batch)
    output.loss.backward()
    optimizer.step()
    assert torch.isfinite(output.loss)
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in trainable.values())
    changed = [name for name, p in trainable.items() if not torch.equal(before[name], p.detach())]
    assert any("lora_" in name for name in changed) and any("mask_decoder" in name for name in changed)
    assert torch.equal(frozen_before, frozen_base[0].detach())
