"""Resuming a loader reader deep into an epoch: seeking vs replaying the epoch, side by side.

Writes ``--shards`` RefCOCO-style shards (tests/train_factory.py: small JPEGs, 2 refs x 2 sentences
per image, 4 examples an image), takes one reader (one rank, one worker, the default shuffle
buffer) to ``--fraction`` of its first epoch, saves its position as a checkpoint would (JSON), then
rebuilds the reader from it twice: with the seek position, and without it (the replay that older
checkpoints and sample-shared streams get). Reports the time to the first example and the tars
opened; both must give the same next examples.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from itertools import islice
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=40)
    parser.add_argument("--images-per-shard", type=int, default=25)
    parser.add_argument("--fraction", type=float, default=0.9, help="where in the epoch the position is")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from perceptio import fs
    from perceptio.train.config import StreamConfig
    from perceptio.train.data import ExampleReader, ReaderSlot, find_shards, plan_mix
    from tests.train_factory import write_shards

    root = Path(tempfile.mkdtemp(prefix="bench_resume_"))
    write_shards(root, "refcoco-unc", shards=args.shards, images_per_shard=args.images_per_shard)
    config = StreamConfig([root], seed=0)
    streams = plan_mix(find_shards(config.shards), None)
    position = int(args.fraction * args.shards * args.images_per_shard * 4)
    reader = ExampleReader(streams, ReaderSlot(), config)
    for _ in islice(reader, position):
        pass
    state = json.loads(json.dumps(reader.state()))
    replay_state = json.loads(json.dumps(state))
    replay_state["streams"]["refcoco-unc"].pop("seek")

    opened: list[str] = []
    original_open = fs.open_input
    fs.open_input = lambda url: opened.append(str(url)) or original_open(url)
    results = {}
    for name, saved in (("seek", state), ("replay", replay_state)):
        opened.clear()
        started = time.perf_counter()
        rebuilt = ExampleReader(streams, ReaderSlot(), config, saved)
        following = [example.key for example in islice(rebuilt, 20)]
        results[name] = (time.perf_counter() - started, len(set(opened)), following)
        print(f"{name}: {results[name][0]:.3f} s to rebuild at example {position} and take 20; "
              f"{results[name][1]} of {args.shards} tars opened")
    print(f"replay / seek: {results['replay'][0] / results['seek'][0]:.1f}x; "
          f"same next examples: {results['seek'][2] == results['replay'][2]}")


if __name__ == "__main__":
    main()
