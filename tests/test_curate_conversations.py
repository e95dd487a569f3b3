"""``perceptio-curate llava|grandf``: the hand-written samples and the synthetic world's files into shards."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import sys
from pathlib import Path

import numpy as np

import pyarrow.parquet as pq
import pytest
from PIL import Image

from perceptio.curate.conversations import GRANDF, LLAVA, ConversationRequest, curate_conversations
from perceptio.errors import PerceptioError
from perceptio.inspect.folder import ShardFolder
from perceptio.inspect.validate import load_expectations, validate
from perceptio.shards import iter_members, manifest_path, iter_shard, list_shards, rle_to_mask
from perceptio.sources.synth.conversations import write_conversations

DATA = Path(__file__).parent / "data"


def _jpeg(path: Path, size: tuple[int, int] = (16, 12)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (10, 200, 90)).save(path, format="JPEG")


def _request(kind: str, json_file: Path, images: Path, out: Path, **options) -> ConversationRequest:
    return ConversationRequest(kind, json_file, images, out, progress=False, **options)


def _clean(out: Path) -> bool:
    folder = ShardFolder.open(out)
    report = validate(folder, load_expectations(folder, None))  # what dataset.json says: tokenizer, codes, tokens
    assert report.problems == []
    return report.ok


def _manifest(out: Path) -> list[dict]:
    return pq.read_table(manifest_path(out)).to_pylist()


def test_llava_sample_file_to_shards(tmp_path: Path) -> None:
    images = tmp_path / "images"
    _jpeg(images / "coco/train2017/000000033471.jpg")
    _jpeg(images / "gqa/images/2354786.jpg", (20, 14))
    (images / "textvqa/train_images").mkdir(parents=True)
    (images / "textvqa/train_images/0badc0de.jpg").write_bytes(b"\xff\xd8 broken")
    out = tmp_path / "shards" / "llava"  # the dataset's own folder (an OUT parent gets OUT/llava)
    info = curate_conversations(_request(LLAVA, DATA / "llava/llava_v1_5_mix665k_sample.json", images, out))
    assert info["splits"]["train"]["samples"] == 3
    assert info["splits"]["train"]["rejects"] == {"corrupt_image": 1, "missing_image": 1}
    assert info["rejected_by_reader"] == {"bad_record": 1, "bad_turns": 2, "empty_conversation": 2, "placeholder_mismatch": 4}
    [shard] = list_shards(out)
    members = dict(iter_members(shard.path))
    by_source = {json.loads(m["json"])["source_id"]: m for m in members.values()}
    assert set(by_source) == {"000000033471", "i6IyJda_0", "2354786"}
    text_only = by_source["i6IyJda_0"]
    assert set(text_only) == {"json"}  # no image, no depth members
    assert set(by_source["000000033471"]) == {"jpg", "json"}
    bus = json.loads(by_source["000000033471"]["json"])
    assert [turn["role"] for turn in bus["conversation"]] == ["user", "assistant", "user", "assistant"]
    assert bus["teacher"] is None and (bus["width"], bus["height"]) == (16, 12)
    assert by_source["2354786"]["jpg"] == (images / "gqa/images/2354786.jpg").read_bytes()  # verbatim
    rows = _manifest(out)
    assert len(rows) == 3 + 2 + 9
    assert {row["reason"] for row in rows if row["status"] == "rejected" and row["shard"]} == {"missing_image", "corrupt_image"}
    assert _clean(out)


def test_grandf_sample_file_to_shards_and_bad_masks_rejected(tmp_path: Path) -> None:
    images = tmp_path / "images"
    _jpeg(images / "sa_10010541.jpg")
    out = tmp_path / "shards" / "grandf-ha"
    info = curate_conversations(_request(GRANDF, DATA / "grandf/GranDf_HA_GCG_train.json", images, out))
    assert info["settings"]["dataset"] == "grandf-ha" and info["splits"]["train"]["samples"] == 1
    [sample] = list(iter_shard(list_shards(out)[0].path))
    assert sample.key == "grandf-ha_train_000000000000" and sample.depth is None
    phrases = sample.meta["grounded_caption"]["phrases"]
    assert [p["text"] for p in phrases] == ["A red box", "two blue balls"]
    box = rle_to_mask(phrases[0]["mask"])
    assert box.shape == (12, 16) and box[2:6, 1:5].all() and box.sum() == 16
    assert rle_to_mask(phrases[1]["mask"]).sum() == 30 + 15
    assert _clean(out)
    # The same annotation on an image of another size: the masks do not fit it.
    _jpeg(images / "sa_10010541.jpg", (20, 12))
    other = tmp_path / "other"
    info = curate_conversations(_request(GRANDF, DATA / "grandf/GranDf_HA_GCG_train.json", images, other))
    assert info["splits"]["train"]["samples"] == 0 and info["splits"]["train"]["rejects"] == {"invalid_mask": 1}


@pytest.fixture(scope="module")
def world(synth_world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's world with its LLaVA and GranD-f files (a copy: the shared world stays as made)."""
    root = tmp_path_factory.mktemp("conversations") / "world"
    shutil.copytree(synth_world, root)
    write_conversations(root)
    return root


def _run_curate(monkeypatch, capsys, *args) -> tuple[int, str]:
    """The ``perceptio-curate`` console script in this process: (exit code, stderr)."""
    from perceptio.curate.cli import main

    monkeypatch.setattr(sys, "argv", ["perceptio-curate", *map(str, args)])
    with pytest.raises(SystemExit) as exited:
        main()
    return exited.value.code, capsys.readouterr().err


def test_synthetic_world_conversations_curate_resume_identically(world: Path, tmp_path: Path) -> None:
    llava_out, grandf_out = tmp_path / "llava", tmp_path / "grandf-ha"
    curate_conversations(_request(LLAVA, world / "llava/synth_train.json", world, llava_out, samples_per_shard=4))
    curate_conversations(_request(GRANDF, world / "GranDf/annotations/train/GranDf_HA_GCG_train.json", world, grandf_out))
    assert _clean(llava_out) and _clean(grandf_out)
    samples = [sample for shard in list_shards(grandf_out) for sample in iter_shard(shard.path)]
    assert samples and all(len(s.meta["grounded_caption"]["phrases"]) >= 1 for s in samples)
    first = {shard.path.name: hashlib.sha256(shard.path.read_bytes()).hexdigest() for shard in list_shards(llava_out)}
    shard = list_shards(llava_out)[1]
    shard.stats_path.unlink()  # as if the run had been killed before this shard was finished
    shard.path.write_bytes(b"half")
    curate_conversations(_request(LLAVA, world / "llava/synth_train.json", world, llava_out, samples_per_shard=4))
    again = {shard.path.name: hashlib.sha256(shard.path.read_bytes()).hexdigest() for shard in list_shards(llava_out)}
    assert again == first and _clean(llava_out)


def _ground_truth_inverse_depth(world: Path, image: str) -> np.ndarray:
    """1/metres of the world's depth PNG of ``image`` (uint16 millimetres, 0 = no depth), read here by hand."""
    metres = (np.asarray(Image.open(world / "depth" / f"{Path(image).stem}.png")) / 1000.0).astype(np.float32)
    inverse = np.zeros(metres.shape, dtype=np.float32)
    inverse[metres > 0] = 1.0 / metres[metres > 0]
    return inverse


def test_llava_with_ground_truth_depth_matches_the_world(world: Path, vqvae_dir: Path, tmp_path: Path,
                                                         monkeypatch, capsys) -> None:
    from perceptio.tokenize.vqvae import DepthVQVAE

    llava_json = world / "llava/synth_train.json"
    out = tmp_path / "shards"
    command = ["llava", "--json", llava_json, "--images", world, "--out", out, "--depth-source", "gt",
               "--tokenizer", vqvae_dir, "--samples-per-shard", 8, "--batch-size", 3, "--no-progress"]
    code, err = _run_curate(monkeypatch, capsys, *command)  # --depth-dir defaults to IMAGES/depth
    assert code == 0, err
    out = out / "llava"
    tokenizer = DepthVQVAE.from_pretrained(vqvae_dir)
    records = {record["id"]: record for record in json.loads(llava_json.read_text())}
    samples = [sample for shard in list_shards(out) for sample in iter_shard(shard.path)]
    with_image = [sample for sample in samples if sample.jpg is not None]
    text_only = [sample for sample in samples if sample.jpg is None]
    assert with_image and text_only
    assert len(with_image) == sum("image" in records[sample.meta["source_id"]] for sample in samples)
    for sample in with_image:
        image = records[sample.meta["source_id"]]["image"]
        inverse = _ground_truth_inverse_depth(world, image)
        assert inverse.shape == (sample.meta["height"], sample.meta["width"])
        np.testing.assert_array_equal(sample.depth_tokens, tokenizer.encode([inverse])[0].numpy())
        np.testing.assert_array_equal(sample.depth, tokenizer.normalize([inverse])[0].numpy().astype(np.float16))
        assert sample.meta["teacher"] == f"gt-depth:{(world / 'depth').resolve()}"
        assert sample.meta["tokenizer"] == tokenizer.identity
    for sample in text_only:  # nothing to take depth from
        assert sample.depth is None and sample.depth_tokens is None and sample.meta["teacher"] is None
    info = json.loads((out / "dataset.json").read_text())
    assert info["tokenizer"]["identity"] == tokenizer.identity and info["teacher"]["source"] == "gt"
    assert _clean(out)
    # A later run with other depth settings does not mix into these shards.
    code, err = _run_curate(monkeypatch, capsys, *command[:7], "--samples-per-shard", 8, "--no-progress")
    assert code == 2 and "was curated with" in err and "--overwrite" in err and err.count("\n") == 1


def test_grandf_with_the_model_teacher_goes_through_the_cache(world: Path, vqvae_dir: Path, tiny_depth_anything: Path,
                                                               tmp_path: Path) -> None:
    from perceptio.curate.distributor import TeacherSpec
    from perceptio.tokenize.cache import DepthCache
    from perceptio.tokenize.teacher import PipelineTeacher
    from perceptio.tokenize.vqvae import DepthVQVAE

    teacher_spec = TeacherSpec(model=str(tiny_depth_anything), cache_dir=str(tmp_path / "cache"))
    out = tmp_path / "grandf-ha"
    info = curate_conversations(_request(GRANDF, world / "GranDf/annotations/train/GranDf_HA_GCG_train.json", world,
                                         out, teacher=teacher_spec, tokenizer=vqvae_dir, batch_size=1))
    teacher, tokenizer = PipelineTeacher(str(tiny_depth_anything)), DepthVQVAE.from_pretrained(vqvae_dir)
    assert info["teacher"] == {"identity": teacher.identity, "source": f"model:{tiny_depth_anything}"}
    cache = DepthCache(tmp_path / "cache")
    samples = [sample for shard in list_shards(out) for sample in iter_shard(shard.path)]
    assert len(samples) == info["splits"]["train"]["samples"] > 0
    for sample in samples:
        with Image.open(io.BytesIO(sample.jpg)) as decoded:
            image = decoded.convert("RGB")
        depth = cache.predict(teacher, [image], [sample.jpg])  # a hit: curation stored this image's depth
        np.testing.assert_allclose(depth[0], teacher.predict([image])[0], rtol=2e-3, atol=1e-3)  # float16 cache
        assert sample.depth.dtype == np.float16 and sample.depth.shape == (320, 320)
        np.testing.assert_array_equal(sample.depth_tokens, tokenizer.encode(depth)[0].numpy())
        np.testing.assert_array_equal(sample.depth, tokenizer.normalize(depth)[0].numpy().astype(np.float16))
        assert sample.meta["teacher"] == teacher.identity and sample.meta["grounded_caption"]["phrases"]
    assert cache.misses == 0
    assert _clean(out)


def test_bad_depth_options_and_unknown_kinds_are_one_line_errors(world: Path, vqvae_dir: Path, tmp_path: Path,
                                                                 monkeypatch, capsys) -> None:
    llava = ["llava", "--json", world / "llava/synth_train.json", "--images", world, "--out", tmp_path / "o", "--no-progress"]
    cases = {
        "needs --tokenizer": ["--depth-source", "gt"],
        "only used with --depth-source": ["--tokenizer", vqvae_dir],
        "must be one of none, model, gt": ["--depth-source", "lidar", "--tokenizer", vqvae_dir],
        "needs ground-truth depth PNGs": ["--depth-source", "gt", "--tokenizer", vqvae_dir, "--depth-dir", tmp_path / "no"],
        "not a model folder": ["--depth-model", tmp_path, "--depth-source", "model", "--tokenizer", vqvae_dir],
        "tokenizer folder": ["--depth-source", "gt", "--tokenizer", tmp_path / "no-tokenizer"],
        "--batch-size must be >= 1": ["--batch-size", 0],
    }
    for message, options in cases.items():
        code, err = _run_curate(monkeypatch, capsys, *llava, *options)
        assert code == 2 and message in err and err.count("\n") == 1, (options, err)
    assert not (tmp_path / "o").exists()  # nothing written before the inputs are checked
    with pytest.raises(PerceptioError, match="unknown conversation dataset"):
        curate_conversations(_request("sharegpt", DATA / "llava/llava_v1_5_mix665k_sample.json", tmp_path, tmp_path / "o"))


def test_text_holding_a_perception_token_is_rejected() -> None:
    from perceptio.curate.conversations import ConversationItem, build_sample

    item = ConversationItem("llava", "train", 7, "x", None, None,
                            turns=(("user", "Where is it?"), ("assistant", "Here [SEG] it is.")))
    built = build_sample(item)
    assert built.sample is None and built.rows[0].reason == "reserved_token" and "[SEG]" in built.rows[0].detail
    clean = build_sample(ConversationItem("llava", "train", 8, "y", None, None,
                                          turns=(("user", "Where is it?"), ("assistant", "On the left."))))
    assert clean.sample is not None and clean.sample.jpg is None and clean.rows[0].status == "kept"
