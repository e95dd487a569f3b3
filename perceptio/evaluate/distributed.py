"""Evaluation across processes (torchrun): split the samples, gather per-sample records exactly once.

Samples are dealt round-robin by index, so every sample belongs to exactly one rank whatever the
world size, with no padding (padding would duplicate samples and bias the scores). Each rank
returns one JSON-able record per sample with a unique ``id``; :func:`gather_records` collects them
on every rank, checks that no id arrived twice and restores the dataset order.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence, TypeVar

import torch.distributed as dist

from perceptio.errors import PerceptioError

Item = TypeVar("Item")


@dataclass(frozen=True)
class ProcessGroup:
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def take(self, items: Sequence[Item]) -> list[Item]:
        """This rank's share of ``items``: every ``world_size``-th item starting at ``rank``."""
        return list(items[self.rank :: self.world_size])


def init_process_group() -> ProcessGroup:
    """Join the torchrun group when launched by torchrun (WORLD_SIZE > 1), else run alone."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return ProcessGroup()
    if not dist.is_initialized():
        # gloo works everywhere; evaluation exchanges only small Python records, never tensors.
        dist.init_process_group(backend="gloo")
    return ProcessGroup(rank=dist.get_rank(), world_size=dist.get_world_size())


def gather_records(records: list[dict[str, Any]], group: ProcessGroup, order: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Every rank's records on every rank, each sample once, in ``order`` (ids) when given."""
    if group.world_size > 1:
        parts: list[list[dict[str, Any]] | None] = [None] * group.world_size
        dist.all_gather_object(parts, records)
        gathered = [record for part in parts for record in part or []]
    else:
        gathered = list(records)
    by_id: dict[str, dict[str, Any]] = {}
    for record in gathered:
        if record["id"] in by_id:
            raise PerceptioError(f"sample {record['id']!r} was evaluated twice (duplicate sample ids in the data?)")
        by_id[record["id"]] = record
    if order is None:
        return sorted(by_id.values(), key=lambda record: record["id"])
    missing = [sample_id for sample_id in order if sample_id not in by_id]
    if missing:
        raise PerceptioError(f"{len(missing)} samples were not evaluated by any process, e.g. {missing[0]!r}")
    return [by_id[sample_id] for sample_id in order]
