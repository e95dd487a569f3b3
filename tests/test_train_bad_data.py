"""The trainer skips bad data: one warning naming file and key, a count, a bound, exact resume."""

from __future__ import annotations

import io
import json
import logging
import tarfile
from itertools import islice
from pathlib import Path

import pytest

from perceptio.errors import PerceptioError
from perceptio.train.bad_data import SkipCounter, read_shards
from perceptio.train.config import BadSampleLimit
from perceptio.train.config import StreamConfig
from perceptio.train.data import ExampleReader, ReaderSlot, ResumableLoader, find_shards, plan_mix
from tests.train_factory import make_sample, write_shards

EXAMPLES_PER_IMAGE = 4  # make_sample's default: 2 refs x 2 sentences


def write_raw_shard(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    """A tar of arbitrary members (what a broken writer or a bit flip could leave)."""
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for key, members in samples:
            for name, data in members.items():
                info = tarfile.TarInfo(f"{key}.{name}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def good(image_id: int) -> tuple[str, dict[str, bytes]]:
    sample = make_sample("refcoco-unc", "train", image_id)
    return sample.key, sample.to_members()


def reader(root, state=None, **options) -> ExampleReader:
    config = StreamConfig([root], shuffle_buffer=options.pop("shuffle_buffer", 1), shuffle_initial=1, **options)
    return ExampleReader(plan_mix(find_shards(config.shards), None), ReaderSlot(), config, state)


def one_epoch(root, images: int, **options) -> tuple[ExampleReader, list[str]]:
    """The keys of the first epoch (every image of the stream read once), and the reader."""
    examples = reader(root, **options)
    taken = []
    while examples.state()["streams"]["refcoco-unc"]["epoch"] == 0:
        taken.append(next(examples).key)
    return examples, taken[:-1]  # the last one already came from epoch 1


def skip_lines(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if "skipped" in record.getMessage()]


def counts(examples: ExampleReader) -> tuple[int, int]:
    position = examples.state()["streams"]["refcoco-unc"]
    return position["skipped"], position["read"]


def test_truncated_shard_keeps_its_head_and_warns_once(tmp_path, caplog):
    paths = write_shards(tmp_path, "refcoco-unc", shards=3, images_per_shard=4)
    cut = paths[1]
    data = cut.read_bytes()
    cut.write_bytes(data[: len(data) // 2])  # in the middle of a member
    examples, keys = one_epoch(tmp_path, 12)
    images = {key.split("/")[0] for key in keys}
    # The other shards whole, the cut one up to its damage (at least its first image), nothing after.
    assert 9 <= len(images) < 12 and all(len([k for k in keys if k.startswith(i)]) == EXAMPLES_PER_IMAGE for i in images)
    (line,) = skip_lines(caplog)
    assert cut.name in line and "unreadable tar" in line and "after refcoco-unc_train_" in line
    assert counts(examples)[0] == 1


def test_a_stream_shared_sample_by_sample_counts_each_sample_and_skip_once(tmp_path, caplog):
    """Fewer shards than readers: each reader reads every tar and keeps its own samples; the reads
    and the skip of a cut tar add up across the readers to what one reader alone counts."""
    paths = write_shards(tmp_path, "refcoco-unc", shards=2, images_per_shard=4)
    data = paths[1].read_bytes()
    paths[1].write_bytes(data[: len(data) // 2])
    urls = [str(path) for path in paths]
    alone = SkipCounter()
    everything = [sample["__key__"] for sample in read_shards(urls, alone)]
    shared = [SkipCounter() for _ in range(3)]
    parts = [[sample["__key__"] for sample in read_shards(urls, counter, share=(3, reader))]
             for reader, counter in enumerate(shared)]
    assert sorted(key for part in parts for key in part) == sorted(everything) and 4 < len(everything) < 8
    assert all(part == everything[reader::3] for reader, part in enumerate(parts))
    assert sum(counter.read for counter in shared) == alone.read and sum(counter.skipped for counter in shared) == alone.skipped == 1
    assert len(skip_lines(caplog)) == 2  # alone's and the one shared reader's


def test_tar_cut_between_members_is_noticed(tmp_path, caplog):
    path = write_raw_shard(tmp_path / "refcoco-unc-train-000000.tar", [good(1), good(2)])
    with tarfile.open(path) as tar:
        last_header = tar.getmembers()[-1].offset
    path.write_bytes(path.read_bytes()[:last_header])  # cut exactly before the last member (the json)
    with tarfile.open(path) as tar:  # the standard library reads it as a complete archive
        assert tar.getnames()[-1].endswith(".depth_tokens.npy")
    examples, keys = one_epoch(tmp_path, 2)
    assert {key.split("/")[0] for key in keys} == {"refcoco-unc_train_000000000001"}
    lines = skip_lines(caplog)
    assert any("refcoco-unc_train_000000000002" in line and "no json member" in line for line in lines)
    assert any("no end-of-archive marker" in line for line in lines)


@pytest.mark.parametrize("member, damage, reason", [
    ("jpg", lambda data: data[: len(data) // 2], "jpg does not decode (OSError: Truncated File Read)"),
    ("jpg", lambda data: b"not a jpeg at all", "jpg does not decode (not an image)"),
    ("depth.npy", lambda data: data[:40], "ValueError"),
    ("json", lambda data: data[:-5], "JSONDecodeError"),
    ("json", lambda data: json.dumps({"dataset": "refcoco-unc", "refs": [{"ref_id": 1}]}).encode(), "KeyError: 'sentences'"),
    ("depth_tokens.npy", None, "no depth_tokens.npy member"),
], ids=["jpg-truncated", "jpg-garbage", "npy", "json-cut", "json-fields", "missing-member"])
def test_a_sample_that_does_not_decode_is_skipped_with_one_line(tmp_path, caplog, member, damage, reason):
    key, members = good(2)
    if damage is None:
        del members[member]
    else:
        members[member] = damage(members[member])
    path = write_raw_shard(tmp_path / "refcoco-unc-train-000000.tar", [good(1), (key, members), good(3)])
    examples, keys = one_epoch(tmp_path, 3)
    assert {k.split("/")[0] for k in keys} == {good(1)[0], good(3)[0]} and len(keys) == 2 * EXAMPLES_PER_IMAGE
    (line,) = skip_lines(caplog)  # one line for the sample, not one per example
    assert key in line and path.name in line and reason in line
    assert counts(examples) == (1, 4)  # the 3 of epoch 0 and the first of epoch 1


def test_a_shard_that_vanishes_mid_epoch_is_skipped(tmp_path, caplog):
    paths = write_shards(tmp_path, "refcoco-unc", shards=4, images_per_shard=2)
    examples = reader(tmp_path)
    first = next(examples).key.split("/")[0]
    image_id = int(first.rsplit("_", 1)[1])
    opened = paths[(image_id - 1) // 2]
    gone = next(path for path in paths if path != opened)
    gone.unlink()  # after the epoch's shard list was made and the first shard opened
    seen = {first}
    while examples.state()["streams"]["refcoco-unc"]["epoch"] == 0:
        seen.add(next(examples).key.split("/")[0])
    (line,) = skip_lines(caplog)
    assert gone.name in line and "the whole shard" in line and "FileNotFoundError" in line
    lost = {f"refcoco-unc_train_{paths.index(gone) * 2 + offset:012d}" for offset in (1, 2)}
    assert seen == {f"refcoco-unc_train_{image_id:012d}" for image_id in range(1, 9)} - lost  # the other three shards


def test_skipping_is_deterministic_and_resume_replays_it_quietly(tmp_path, caplog):
    write_shards(tmp_path, "refcoco-unc", shards=3, images_per_shard=3)
    key, members = good(11)  # write_shards took ids 1..9
    members["jpg"] = b"garbage"
    write_raw_shard(tmp_path / "refcoco-unc-train-000003.tar", [good(10), (key, members), good(12)])
    config = StreamConfig([tmp_path], seed=3, shuffle_buffer=5, shuffle_initial=2)

    def loader(state=None):
        return ResumableLoader(config, TargetsOnly(), batch_size=3, states=[state] if state else None)

    straight = [batch.keys for batch in islice(loader(), 20)]  # two epochs: the bad sample twice
    straight_counts = loader_counts(loader(), 20)
    assert straight_counts[0] == 2 and len(skip_lines(caplog)) == 4  # two loaders, two epochs
    first = loader()
    head = [batch.keys for batch in islice(first, 13)]
    state = json.loads(json.dumps(first.state_dict()))
    caplog.clear()
    resumed = loader(state)
    assert [batch.keys for batch in islice(resumed, 7)] == straight[13:]
    assert head == straight[:13] and resumed.bad_samples() == straight_counts
    assert len(skip_lines(caplog)) == 1  # the second epoch's skip is new; the first one's was replayed quietly
    assert not any(example.startswith(key) for keys in straight for example in keys)


class TargetsOnly:
    """A processor that keeps each example's target (what the data layer decides)."""

    def encode_conversation(self, image, turns, masks, depth, span_is_context=False, hidden_cells=()):
        return {"target": turns[-1].text}

    def collate(self, encoded):
        return encoded


def loader_counts(loader: ResumableLoader, batches: int) -> tuple[int, int]:
    for _ in islice(loader, batches):
        pass
    return loader.bad_samples()


def test_bad_sample_limit_parses_counts_and_shares():
    assert BadSampleLimit.parse("0").exceeded(1, 1000)
    assert not BadSampleLimit.parse("3").exceeded(3, 3) and BadSampleLimit.parse("3").exceeded(4, 10**6)
    share = BadSampleLimit.parse("1%")
    assert share == BadSampleLimit.parse("0.01")
    assert not share.exceeded(1, 5)  # one is always allowed
    assert not share.exceeded(10, 1000) and share.exceeded(11, 1000)
    for bad in ("-1", "1.5", "x", "", "200%"):
        with pytest.raises(PerceptioError, match="--max-bad-samples"):
            BadSampleLimit.parse(bad)


def test_the_run_stops_past_the_bound_after_a_checkpoint_and_resumes(tmp_path):
    from perceptio.train.checkpoint import latest_checkpoint
    from perceptio.train.config import TrainConfig
    from perceptio.train.loop import train
    from tests.test_train_loop import ToyModel

    shards = tmp_path / "shards"
    shards.mkdir()
    write_shards(shards, "refcoco-unc", shards=2, images_per_shard=3)
    key, members = good(7)
    del members["depth.npy"]
    write_raw_shard(shards / "refcoco-unc-train-000002.tar", [(key, members), good(8)])
    data = StreamConfig([shards], shuffle_buffer=4, shuffle_initial=2)

    def run(limit: str, resume: bool = False):
        config = TrainConfig(out=tmp_path / "run", steps=12, batch_size=2, workers=0, progress=False,
                             max_bad_samples=limit, resume=resume)
        return train(ToyModel(), data, config)

    with pytest.raises(PerceptioError, match=r"1 of \d+ samples read were bad, more than --max-bad-samples 0 allows; "
                                             r"stopped after step (\d+) with checkpoint .*step-0*\1 "):
        run("0")
    stopped = latest_checkpoint(tmp_path / "run" / "checkpoints")
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["skipped_samples"] == 1 and lines[-1]["step"] == int(stopped.name.split("-")[1])
    result = run("3", resume=True)  # a raised limit goes on from the checkpoint
    assert result.history[-1]["step"] == 12 and result.history[-1]["skipped_samples"] >= 1


def test_shards_on_an_object_store_are_read_once_committed(s3_bucket, tmp_path, caplog):
    """--shards s3://...: a tar without its marker (an upload under way) is not read."""
    from perceptio import fs

    local = tmp_path / "local"
    paths = write_shards(local, "refcoco-unc", shards=3, images_per_shard=2)
    remote = fs.join(s3_bucket, "shards")
    for path in paths[:2]:
        fs.upload(path, fs.join(remote, path.name))
        fs.write_text(fs.join(remote, "__meta__", path.name.replace(".tar", "_stats.json")), "{}")  # the marker
    fs.upload(paths[2], fs.join(remote, paths[2].name))  # no marker yet
    assert [shard.path for shard in find_shards([remote])] == [fs.join(remote, path.name) for path in paths[:2]]
    examples, keys = one_epoch(remote, 4)
    assert {key.split("/")[0] for key in keys} == {f"refcoco-unc_train_{image_id:012d}" for image_id in range(1, 5)}
    assert skip_lines(caplog) == []
    with pytest.raises(PerceptioError, match="does not exist"):
        find_shards([fs.join(s3_bucket, "nothing-here")])
