"""Curate on a Ray cluster of simulated nodes on this machine (``ray.cluster_utils.Cluster``).

Each node is a raylet with its own workers, as on a real cluster, on this one machine. Used by
tests/test_curate_pipeline.py and benchmarks/bench_curate_nodes.py, each run in a process of its
own (a cluster cannot share a process with another Ray):

    python tests/cluster_curate.py '{"world": ..., "out": ..., "nodes": 2, ...}'

prints one JSON line: seconds, images, shards written, and whether a node was removed mid-run.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path
from typing import Any


def run(world: str, out: str, tokenizer: str, teacher: str, nodes: int, cpus_per_node: int = 1,
        samples_per_shard: int = 4, batch_size: int = 2, remove_after_shards: int | None = None) -> dict[str, Any]:
    """Curate RefCOCO of ``world`` on ``nodes`` worker nodes (the head runs no task).

    With ``remove_after_shards``, the last node is removed (its raylet and workers killed) as soon
    as that many shards are finished: its running shard tasks die with it and Ray runs them again
    on the nodes left.
    """
    import ray
    from ray.cluster_utils import Cluster

    from perceptio.curate.commands import CurationRequest, curate
    from perceptio.curate.output import dataset_out
    from perceptio.curate.distributor import RayConfig, TeacherSpec
    from perceptio.shards import meta_folder

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    workers = [cluster.add_node(num_cpus=cpus_per_node) for _ in range(nodes)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    removed: dict[str, Any] = {}

    def remove_when_ready() -> None:
        while not done.is_set():
            finished = len(list(meta_folder(dataset_out(Path(out), "refcoco-unc")).glob("*_stats.json")))
            if finished >= (remove_after_shards or 0):
                removed["after_shards"] = finished
                cluster.remove_node(workers[-1], allow_graceful=False)
                return
            time.sleep(0.05)

    done = threading.Event()
    watcher = threading.Thread(target=remove_when_ready, daemon=True)
    request = CurationRequest(
        dataset="refcoco", data_root=Path(world), out=out, tokenizer=Path(tokenizer),
        # A depth cache, as the command always has: it rounds the teacher's maps to float16, which
        # the reference runs' bytes depend on.
        teacher=TeacherSpec(model=teacher, cache_dir=f"{out}-cache"), samples_per_shard=samples_per_shard, batch_size=batch_size,
        ray=RayConfig(address=cluster.address, model_workers=nodes * cpus_per_node, cpus_per_model_worker=1),
        progress=False)
    try:
        if remove_after_shards is not None:
            watcher.start()
        started = time.perf_counter()
        summary = curate(request)
        seconds = time.perf_counter() - started
    finally:
        done.set()
        ray.shutdown()
        cluster.shutdown()
    return {"seconds": seconds, "images": summary.images, "shards": len(summary.shards),
            "written": len(summary.redone), "removed_after_shards": removed.get("after_shards")}


if __name__ == "__main__":
    print(json.dumps(run(**json.loads(sys.argv[1]))))
