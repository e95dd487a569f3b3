"""One training step and one curation batch at the real shapes, on the CPU (slow: minutes).

InternVL3-1B-shaped VLM (InternViT-300M + Qwen2.5-0.5B, published config, untied head, 151674
rows, <IMG_CONTEXT> = 151667) + SAM2.1-hiera-large-shaped [SEG] decoder at 1024, LoRA r256, the four
depth losses, one 448 tile; and one curation batch through the Depth Anything V2 Large-shaped
teacher and the paper-shaped depth VQ-VAE. Random weights: this checks shapes and wiring (processor
layout, chat template, special-token resizing of an untied head, the [SEG] prompt path), not quality.
Time and peak memory are printed (``pytest -s``), never asserted.
"""

from __future__ import annotations

import resource
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_gpu  # noqa: E402

from perceptio.train import memory_plan  # noqa: E402
from perceptio.train.model import TERMS  # noqa: E402

pytestmark = pytest.mark.slow


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_one_training_step_of_the_1b_shape_with_sam2_large(tmp_path):
    sizes = bench_gpu.DEVICE_SIZES
    started = time.perf_counter()
    model = bench_gpu.build_model(sizes, tmp_path)
    built = time.perf_counter() - started

    tokenizer = model.tokenizer
    embedding_rows = model.vlm.get_input_embeddings().weight.shape[0]
    assert embedding_rows == len(tokenizer) > 151674  # the perception tokens grew the embedding
    assert model.adapter.output_head().weight.shape[0] == embedding_rows  # and the untied head with it
    assert model.seg_token_id >= 151674 and model.adapter.model.config.image_token_id == 151667
    counts = memory_plan.count_parameters(sizes.vlm, sizes.sam, 256)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == counts.trainable  # --plan counts what the model really trains
    vqvae = sum(p.numel() for p in model.depth_vqvae.parameters())  # frozen, outside the plan's count
    assert sum(p.numel() for p in model.parameters()) - vqvae == counts.total

    batch = bench_gpu.example_batch(model, 1)
    tokens = batch["input_ids"][0].tolist()
    assert tokens.count(151667) == 256  # one 448 tile = 256 image tokens
    assert batch["pixel_values"].shape == (1, 3, 448, 448)
    assert batch["sam_pixel_values"].shape == (1, 3, 1024, 1024)
    assert batch["gt_masks"].shape == (1, 1, 256, 256)  # (examples, masks per example, M, M)

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    step_started = time.perf_counter()
    output = model(batch)
    output.loss.backward()
    lora = next(p for name, p in model.named_parameters() if "lora_B" in name)
    decoder = next(p for p in model.segmenter.sam.mask_decoder.parameters() if p.requires_grad)
    assert decoder.grad is not None and decoder.grad.abs().sum() > 0  # [SEG] reached SAM2's decoder
    assert lora.grad is not None
    before = decoder.detach().clone()
    optimizer.step()
    step = time.perf_counter() - step_started
    assert not torch.equal(before, decoder.detach())
    assert torch.isfinite(output.loss)
    assert set(output.terms) == set(TERMS) and all(float(output.terms[name]) > 0 for name in TERMS
                                                  if name not in ("seg_text", "eye_depth"))  # both off
    assert float(output.terms["seg_text"]) == float(output.terms["eye_depth"]) == 0.0  # off unless weighted (not in the paper)
    print(f"\n1B shape + SAM2.1-large shape: built in {built:.0f} s, one step {step:.0f} s, "
          f"{len(tokens)} tokens, peak RSS {_peak_rss_mib():.0f} MiB")


def test_one_curation_batch_with_the_large_teacher(tmp_path):
    from perceptio.curate.distributor import DepthWorker, TeacherSpec, _captioner, _prepare_batch
    from perceptio.curate.sample_builder import BuildConfig, assemble
    from perceptio.tokenize.vqvae import DepthVQVAE

    sizes = bench_gpu.Sizes(**{**bench_gpu.SMOKE_SIZES.__dict__, "world_images": 4,
                               "image_sizes": ((384, 288), (288, 384)), "unit_images": 4})
    batch = bench_gpu.mixed_size_shard(tmp_path, sizes).batches(sizes.unit_images)[0]
    DepthVQVAE().save_pretrained(tmp_path / "vqvae")
    teacher = bench_gpu.save_teacher("depth-anything-v2-large", tmp_path / "teacher", 518)
    started = time.perf_counter()
    worker = DepthWorker(TeacherSpec(model=str(teacher)), str(tmp_path / "vqvae"), torch_threads=0, model_workers=1)
    build = BuildConfig()
    prepared = _prepare_batch(batch, build)
    depths, _, _ = worker.depths(prepared)
    built_images = [assemble(one, depth, build, _captioner(build.captioner)) for one, depth in zip(prepared, depths)]
    seconds = time.perf_counter() - started
    sizes_seen = {(built.sample.meta["width"], built.sample.meta["height"]) for built in built_images if built.sample}
    assert sizes_seen == {(384, 288), (288, 384)}  # one batch of mixed sizes
    for built in built_images:
        if built.sample is not None:
            assert built.sample.depth_tokens.shape == (100,) and built.sample.depth.shape == (320, 320)
    print(f"\nDepth Anything V2 Large shape: one batch of {len(built_images)} images in {seconds:.0f} s "
          f"(model load included), peak RSS {_peak_rss_mib():.0f} MiB")
