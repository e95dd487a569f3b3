"""Depth tokenizer encode cost vs the depth teacher's forward, measured side by side in one run.

Issue 3's target: encoding a depth map into its 100 codes costs under 5% of computing that map with
the teacher. Both run on the same batch of 640x480 images (COCO's most common size): the teacher is
a Depth Anything V2 *Small*-shaped network (DINOv2-small backbone, ~24.8M parameters, the
transformers defaults of ``DepthAnythingConfig``) with random weights, since the hub is not
reached, loaded through ``PipelineTeacher`` exactly as users load the real one (bf16 autocast where
supported). The tokenizer is the default ``DepthVQVAEConfig`` (random weights: its cost does not
depend on them), encoding the teacher's raw output maps, normalisation included.

    .venv/bin/python benchmarks/bench_tokenizer.py [--batch 4] [--repeats 3] [--device cpu] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from perceptio.tokenize.teacher import PipelineTeacher
from perceptio.tokenize.vqvae import DepthVQVAE


def save_small_shaped_teacher(folder: Path) -> int:
    """Write a random-weight Depth Anything V2 Small (and its real preprocessing); return its size."""
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation
    from perceptio.train.shapes import depth_anything_processor

    model = DepthAnythingForDepthEstimation(DepthAnythingConfig())
    model.save_pretrained(folder)
    depth_anything_processor(518).save_pretrained(folder)
    return sum(parameter.numel() for parameter in model.parameters())


def seconds(work: Callable[[], object]) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4, help="images per batch (default 4)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions, median reported (default 3)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads for both (default: torch's own)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)) for _ in range(args.batch)]
    with tempfile.TemporaryDirectory() as folder:
        parameters = save_small_shaped_teacher(Path(folder))
        teacher = PipelineTeacher(folder, device=args.device, batch_size=args.batch)
        depths = teacher.predict(images)
        tokenizer = DepthVQVAE().to(teacher.device).eval()

        def encode() -> torch.Tensor:
            with torch.inference_mode():
                return tokenizer.encode(depths)

        encode()  # warm-up (the teacher's was the predict above)
        # Interleaved, so that a change in the machine's load hits both measurements alike.
        teacher_times, tokenizer_times = [], []
        for _ in range(args.repeats):
            teacher_times.append(seconds(lambda: teacher.predict(images)))
            tokenizer_times.append(seconds(encode))
    teacher_seconds, tokenizer_seconds = statistics.median(teacher_times), statistics.median(tokenizer_times)
    ratio = tokenizer_seconds / teacher_seconds
    print(f"device {teacher.device}, {torch.get_num_threads()} threads, bf16 autocast {teacher.autocast}, batch {args.batch} x 640x480")
    print(f"teacher (Depth Anything V2 Small shape, {parameters / 1e6:.1f}M params): {teacher_seconds:.3f} s/batch, "
          f"{args.batch / teacher_seconds:.2f} maps/s")
    print(f"tokenizer encode ({sum(p.numel() for p in tokenizer.parameters()) / 1e6:.2f}M params, normalisation included): "
          f"{tokenizer_seconds:.4f} s/batch, {args.batch / tokenizer_seconds:.1f} maps/s")
    print(f"tokenizer / teacher time: {ratio:.2%} (target < 5%): {'PASS' if ratio < 0.05 else 'FAIL'}")


if __name__ == "__main__":
    main()
