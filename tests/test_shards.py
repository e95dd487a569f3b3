"""The shard format: deterministic tars that plain webdataset reads, lossless RLE, atomic writes."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import webdataset as wds

from perceptio.shards import ShardSample, ShardWriter, iter_shard, mask_to_rle, rle_to_mask, sample_key


def _sample(image_id: int, rng: np.random.Generator) -> ShardSample:
    mask = (rng.random((37, 53)) > 0.6).astype(np.uint8)
    return ShardSample(
        key=sample_key("refcoco-unc", "train", image_id),
        jpg=rng.bytes(100),
        depth=rng.standard_normal((320, 320)).astype(np.float16),
        depth_tokens=rng.integers(0, 128, 100).astype(np.int16),
        meta={"image_id": image_id, "refs": [{"mask": mask_to_rle(mask)}]},
    )


def test_rle_round_trip_is_lossless():
    mask = (np.random.default_rng(0).random((41, 29)) > 0.5).astype(np.uint8)
    rle = mask_to_rle(mask)
    assert rle["size"] == [41, 29] and isinstance(rle["counts"], str)
    np.testing.assert_array_equal(rle_to_mask(rle), mask)


def test_key_has_no_dots():
    assert sample_key("refcoco-unc", "train", 581857) == "refcoco-unc_train_000000581857"
    with pytest.raises(ValueError):
        sample_key("refcoco.unc", "train", 1)


def test_writer_is_deterministic_and_webdataset_reads_it(tmp_path):
    digests = []
    for run in range(2):
        rng = np.random.default_rng(7)
        path = tmp_path / f"run{run}" / "refcoco-unc-train-000000.tar"
        with ShardWriter(path) as writer:
            for image_id in (3, 11):
                writer.write(_sample(image_id, rng))
        digests.append(hashlib.sha256(path.read_bytes()).hexdigest())
    assert digests[0] == digests[1]

    loaded = [ShardSample.from_webdataset(raw) for raw in wds.WebDataset(str(path), shardshuffle=False)]
    ours = list(iter_shard(path))
    assert [s.key for s in loaded] == [s.key for s in ours] == [sample_key("refcoco-unc", "train", i) for i in (3, 11)]
    rng = np.random.default_rng(7)
    expected = _sample(3, rng)
    np.testing.assert_array_equal(loaded[0].depth, expected.depth)
    np.testing.assert_array_equal(loaded[0].depth_tokens, expected.depth_tokens)
    assert loaded[0].depth_tokens.dtype == np.int16 and loaded[0].depth.dtype == np.float16
    assert loaded[0].meta == expected.meta


def test_failed_write_leaves_no_shard(tmp_path):
    path = tmp_path / "x.tar"
    with pytest.raises(RuntimeError):
        with ShardWriter(path) as writer:
            writer.write(_sample(1, np.random.default_rng(0)))
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
