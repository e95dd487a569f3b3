"""Files that let other tools read a shard folder as it is: a Hugging Face dataset card and wids indexes.

- ``README.md`` with a YAML ``configs`` block: ``datasets.load_dataset(FOLDER)`` then loads exactly
  the tars, one split per official split name (``testA`` and ``testB`` included, which the hub's
  file-name split detection would not recognise), never the side tables.
- ``__meta__/{dataset}-{split}.wids.json`` (``wids-shard-index-v1``): each split's shards and sample
  counts for ``wids.ShardListDataset`` (indexed random access); shard urls are relative to the index.
"""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Sequence

from perceptio import fs
from perceptio.shards import ShardFile

CARD_NAME = "README.md"
WIDS_SUFFIX = ".wids.json"


def write_dataset_card(folder: fs.Location, shards: Sequence[ShardFile], description: str) -> str:
    """``README.md``: a dataset card whose YAML maps every split to its tars."""
    splits = sorted({shard.split for shard in shards})
    dataset = shards[0].dataset if shards else fs.name(folder)
    lines = ["---", "configs:", "- config_name: default", "  data_files:"]
    for split in splits:
        lines += [f"  - split: {split}", f'    path: "{dataset}-{split}-*.tar"']
    lines += ["tags:", "- webdataset", "- perceptio", "---", "", f"# {dataset}", "", description, ""]
    lines += [
        "Load with `datasets.load_dataset(\"webdataset\", data_files=...)` or `datasets.load_dataset(FOLDER)` "
        "(this card lists the splits), or stream with `webdataset.WebDataset`. Side tables (per-shard parquet, "
        "`manifest.parquet`, `*_stats.json`) and wids indexes are in `__meta__/`.",
        "",
    ]
    path = fs.join(folder, CARD_NAME)
    fs.write_text(path, "\n".join(lines))
    return path


def write_wids_indexes(folder: fs.Location, meta_folder: fs.Location, shards: Sequence[ShardFile],
                       counts: dict[str, int]) -> list[str]:
    """One ``wids-shard-index-v1`` file per split; ``counts`` maps a shard name to its samples."""
    by_split: dict[tuple[str, str], list[ShardFile]] = defaultdict(list)
    for shard in shards:
        by_split[(shard.dataset, shard.split)].append(shard)
    written = []
    for (dataset, split), members in sorted(by_split.items()):
        index = {
            "__kind__": "wids-shard-index-v1",
            "wids_version": 1,
            "name": f"{dataset}-{split}",
            "shardlist": [
                {
                    "url": f"../{fs.name(shard.path)}" if fs.join(meta_folder) != fs.join(folder) else fs.name(shard.path),
                    "nsamples": counts[shard.name],
                    "filesize": fs.size(shard.path),
                }
                for shard in sorted(members, key=lambda shard: shard.index)
            ],
        }
        path = fs.join(meta_folder, f"{dataset}-{split}{WIDS_SUFFIX}")
        fs.write_text(path, json.dumps(index, indent=2) + "\n")
        written.append(path)
    return written
