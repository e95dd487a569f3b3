"""Evaluation across 2 gloo processes: every sample evaluated by one rank, gathered exactly once."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from perceptio.errors import PerceptioError
from perceptio.evaluate.distributed import ProcessGroup, gather_records, init_process_group
from perceptio.evaluate.metrics import refseg_scores_by_group

SAMPLE_IDS = [f"refcoco-unc_val_{index:012d}/ref{index}/sent0" for index in range(7)]  # odd: uneven split


def record_for(sample_id: str, rank: int) -> dict:
    index = int(sample_id.split("/ref")[1].split("/")[0])
    return {"id": sample_id, "dataset": "refcoco-unc", "split": "val", "intersection": index, "union": 10, "rank": rank}


def _free_port() -> int:
    with socket.socket() as handle:
        handle.bind(("127.0.0.1", 0))
        return handle.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    group = init_process_group()
    try:
        mine = group.take(SAMPLE_IDS)
        gathered = gather_records([record_for(sample_id, group.rank) for sample_id in mine], group, order=SAMPLE_IDS)
        Path(out, f"rank{rank}.json").write_text(json.dumps({"mine": mine, "gathered": gathered}))
    finally:
        dist.destroy_process_group()


def test_two_processes_gather_every_sample_exactly_once(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    # The two shares are disjoint and together cover the data, however unevenly it divides.
    assert set(results[0]["mine"]).isdisjoint(results[1]["mine"])
    assert sorted(results[0]["mine"] + results[1]["mine"]) == sorted(SAMPLE_IDS)
    assert len(results[0]["mine"]) == 4 and len(results[1]["mine"]) == 3
    for result in results:  # every rank ends with the same full list, in dataset order, once each
        assert [record["id"] for record in result["gathered"]] == SAMPLE_IDS
        assert {record["rank"] for record in result["gathered"]} == {0, 1}
    # Scores from the gathered records equal those of a single-process run.
    single = refseg_scores_by_group([record_for(sample_id, 0) for sample_id in SAMPLE_IDS])
    assert refseg_scores_by_group(results[0]["gathered"]) == single


def test_duplicates_and_gaps_are_reported():
    alone = ProcessGroup()
    record = record_for(SAMPLE_IDS[0], 0)
    with pytest.raises(PerceptioError, match="twice"):
        gather_records([record, dict(record)], alone)
    with pytest.raises(PerceptioError, match="not evaluated"):
        gather_records([record], alone, order=SAMPLE_IDS[:2])
