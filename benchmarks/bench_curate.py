"""Curation speed and memory, measured side by side in one run on the synthetic RefCOCO.

Prints three ratios (issue 4):

1. end-to-end curation images/s vs the bare teacher forward on the same images and batch size
   (target >= 0.9: reading, masks, tokenizer, descriptions and writing hide behind the teacher);
2. end-to-end vs the naive loop a user would write (the stock transformers depth pipeline called
   once per expression, results written to a tar; target >= 5x);
3. peak memory (PSS of the driver and every Ray process) curating 1x vs 4x the images (target ~1).

The teacher is a Depth Anything V2 *Small*-shaped network with random weights (the hub is not
reached): its cost is the real one at ``--input-size 518``; smaller sizes scale the teacher down
for slow machines. Ray runs embedded with ``--num-cpus`` CPUs and is started before timing.
"""

from __future__ import annotations

import argparse
import io
import json
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import torch
from PIL import Image


def save_small_depth_anything(folder: Path, input_size: int) -> Path:
    """Depth Anything V2 Small's architecture (24.8M parameters), random weights."""
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config
    from perceptio.train.shapes import depth_anything_processor

    backbone = Dinov2Config(
        image_size=518, patch_size=14, hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
        intermediate_size=1536, out_features=["stage3", "stage6", "stage9", "stage12"], reshape_hidden_states=False,
    )
    config = DepthAnythingConfig(backbone_config=backbone, reassemble_hidden_size=384, neck_hidden_sizes=[48, 96, 192, 384],
                                 fusion_hidden_size=64, head_hidden_size=32)
    torch.manual_seed(0)
    DepthAnythingForDepthEstimation(config).save_pretrained(folder)
    depth_anything_processor(input_size).save_pretrained(folder)
    return folder


class PeakMemory:
    """Samples the PSS of this process and all its descendants (Ray's raylet and workers) in a thread."""

    def __init__(self, interval_s: float = 0.25):
        self.interval_s = interval_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for process in [me, *me.children(recursive=True)]:
                try:
                    total += process.memory_full_info().pss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
            self.peak = max(self.peak, total)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def curate_once(world: Path, out: Path, tokenizer: Path, teacher_dir: Path, batch_size: int, num_cpus: int, split: str):
    from perceptio.curate.commands import CurationRequest, curate
    from perceptio.curate.distributor import RayConfig, TeacherSpec

    request = CurationRequest(
        dataset="refcoco", data_root=world, out=out, tokenizer=tokenizer,
        teacher=TeacherSpec(model=str(teacher_dir), cache_dir=str(out.parent / f"{out.name}-cache")),
        splits=[split], samples_per_shard=64, batch_size=batch_size, ray=RayConfig(num_cpus=num_cpus), progress=False,
    )
    return curate(request)


def naive_loop(reader, image_ids: list[int], teacher_dir: Path, tokenizer, out: Path) -> float:
    """What a user would write first: one stock-pipeline call per expression, straight into a tar."""
    from transformers import pipeline

    from perceptio.shards import mask_to_rle

    depth_pipe = pipeline("depth-estimation", model=str(teacher_dir), device="cpu")
    wanted = set(image_ids)
    started = time.perf_counter()
    with tarfile.open(out, "w") as tar:
        for ref in reader.refs:
            if ref.image_id not in wanted:
                continue
            image = Image.open(reader.image_path(ref.image_id)).convert("RGB")
            for sentence in ref.sentences:
                depth = depth_pipe(image)["predicted_depth"]
                tokens = tokenizer.encode(depth.squeeze().numpy())[0].numpy()
                record = {"sentence": sentence.sent, "mask": mask_to_rle(reader.ann_mask(ref.ann_id)), "tokens": tokens.tolist()}
                for name, data in ((f"{sentence.sent_id}.json", json.dumps(record).encode()),
                                   (f"{sentence.sent_id}.npy", _npy(depth.squeeze().numpy()))):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return time.perf_counter() - started


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array.astype(np.float16))
    return buffer.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=32, help="world images for the speed runs (3/4 are COCO)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--input-size", type=int, default=518, help="teacher input side (518 = Depth Anything V2)")
    parser.add_argument("--naive-images", type=int, default=4, help="images the (slow) naive loop is timed on")
    parser.add_argument("--memory-images", type=int, default=32, help="world images of the 1x memory run (4x: 4 times)")
    parser.add_argument("--num-cpus", type=int, default=2)
    args = parser.parse_args()

    import ray

    from perceptio.sources.refer import ReferDataset
    from perceptio.sources.synth import generate_world
    from perceptio.tokenize.teacher import PipelineTeacher
    from perceptio.tokenize.vqvae import DepthVQVAE

    root = Path(tempfile.mkdtemp(prefix="bench_curate_"))
    print(f"work folder {root}")
    teacher_dir = save_small_depth_anything(root / "teacher", args.input_size)
    tokenizer_dir = root / "tokenizer"
    DepthVQVAE().save_pretrained(tokenizer_dir)  # the default (paper-shaped) tokenizer, random weights
    tokenizer = DepthVQVAE.from_pretrained(tokenizer_dir)
    world = root / "world"
    generate_world(world, images=args.images, seed=0)
    reader = ReferDataset(world, "refcoco", "unc")
    split = "train"
    image_ids = sorted({ref.image_id for ref in reader.refs_in_split(split)})
    expressions = sum(len(ref.sentences) for ref in reader.refs_in_split(split))
    print(f"{len(image_ids)} images, {expressions} expressions ({expressions / len(image_ids):.1f} per image), "
          f"batch {args.batch_size}, teacher input {args.input_size}")

    # 1. The bare teacher forward (model already loaded, images decoded beforehand), measured before
    #    and after the end-to-end run so that a change in machine load shows as a spread.
    teacher = PipelineTeacher(str(teacher_dir), batch_size=args.batch_size)
    images = [reader.load_image(image_id) for image_id in image_ids]
    teacher.predict(images[: args.batch_size])  # warm-up

    def bare_rate() -> float:
        started = time.perf_counter()
        teacher.predict(images)
        return len(images) / (time.perf_counter() - started)

    bare_rates = [bare_rate()]

    # 2. End to end (Ray started beforehand, as a long run amortises it).
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    summary = curate_once(world, root / "shards", tokenizer_dir, teacher_dir, args.batch_size, args.num_cpus, split)
    e2e_rate = summary.images / summary.seconds
    bare_rates.append(bare_rate())
    bare = sum(bare_rates) / len(bare_rates)
    del teacher

    # 3. The naive loop, on a few images.
    naive_seconds = naive_loop(reader, image_ids[: args.naive_images], teacher_dir, tokenizer, root / "naive.tar")
    naive_rate = args.naive_images / naive_seconds

    # 4. Peak memory, 1x vs 4x images (the tiny tokenizer-sized cost is the same; the teacher is shared).
    peaks = []
    for scale in (1, 4):
        scaled_world = root / f"world{scale}x"
        generate_world(scaled_world, images=args.memory_images * scale, seed=1)
        with PeakMemory() as memory:
            run = curate_once(scaled_world, root / f"mem{scale}x", tokenizer_dir, teacher_dir, args.batch_size, args.num_cpus, split)
        peaks.append((run.images, memory.peak))
    ray.shutdown()

    print(f"bare teacher forward     {bare:7.3f} images/s  (before / after: {bare_rates[0]:.3f} / {bare_rates[1]:.3f})")
    print(f"curation end to end      {e2e_rate:7.3f} images/s  ratio {e2e_rate / bare:.2f} (target >= 0.9; "
          f"actor start-up and model loading included)")
    print(f"naive per-expression     {naive_rate:7.3f} images/s  curation is {e2e_rate / naive_rate:.1f}x faster (target >= 5)")
    (small_images, small_peak), (large_images, large_peak) = peaks
    print(f"peak memory              {small_peak / 2**20:7.0f} MiB for {small_images} images, {large_peak / 2**20:.0f} MiB for "
          f"{large_images} images  ratio {large_peak / small_peak:.2f} (flat = 1)")


if __name__ == "__main__":
    main()
