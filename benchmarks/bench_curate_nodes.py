"""Curation images/s on 1 vs 2 simulated Ray nodes (``ray.cluster_utils.Cluster``, this machine).

Each node gets ``--cpus-per-node`` CPUs and runs that many shard tasks at once (one teacher +
tokenizer each); the head runs none. On one machine the nodes share its cores, so the ratio says
how well the shard tasks spread over nodes and what Ray's per-node overhead costs, not what a real
cluster of separate machines gives. Each run is a fresh process with a fresh cluster and the same
world, teacher (a Depth Anything V2 Small-shaped network with random weights, ``--input-size``) and
tokenizer; the time includes the nodes' model loading, as a real run's would.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=48, help="world images (3/4 are COCO)")
    parser.add_argument("--samples-per-shard", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--input-size", type=int, default=224, help="teacher input side (518 = Depth Anything V2)")
    parser.add_argument("--cpus-per-node", type=int, default=1)
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_curate import save_small_depth_anything

    from perceptio.sources.synth import generate_world
    from perceptio.tokenize.vqvae import DepthVQVAE

    root = Path(tempfile.mkdtemp(prefix="bench_curate_nodes_"))
    teacher = save_small_depth_anything(root / "teacher", args.input_size)
    DepthVQVAE().save_pretrained(root / "tokenizer")
    generate_world(root / "world", images=args.images, seed=0)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("RAY_ADDRESS", None)
    rates = {}
    for nodes in (1, 2):
        config = {"world": str(root / "world"), "out": str(root / f"shards-{nodes}"), "tokenizer": str(root / "tokenizer"),
                  "teacher": str(teacher), "nodes": nodes, "cpus_per_node": args.cpus_per_node,
                  "samples_per_shard": args.samples_per_shard, "batch_size": args.batch_size}
        done = subprocess.run([sys.executable, str(ROOT / "tests" / "cluster_curate.py"), json.dumps(config)],
                              env=env, capture_output=True, text=True, check=True)
        result = json.loads(done.stdout.strip().splitlines()[-1])
        rates[nodes] = result["images"] / result["seconds"]
        print(f"{nodes} node(s) x {args.cpus_per_node} CPU: {result['images']} images in {result['seconds']:.1f} s = "
              f"{rates[nodes]:.2f} images/s ({result['shards']} shards)")
    # --out names the parent: the shards are in OUT/refcoco-unc, their parquet tables in its __meta__/.
    one, two = root / "shards-1" / "refcoco-unc", root / "shards-2" / "refcoco-unc"
    compared = [path.relative_to(two) for path in sorted([*two.glob("*.tar"), *two.glob("__meta__/*.parquet")])]
    same = bool(compared) and all((one / name).read_bytes() == (two / name).read_bytes() for name in compared)
    print(f"2 nodes / 1 node: {rates[2] / rates[1]:.2f}x; identical tars and parquets: {same}")


if __name__ == "__main__":
    main()
