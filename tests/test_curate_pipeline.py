"""Ray curation end to end on a small synthetic world, on a 2-CPU Ray shared by every test here.

One world (with one deliberately truncated COCO image), one tiny random Depth Anything, one tiny
random tokenizer and one RefCOCO run are shared; each check compares the shards with what the
readers, the teacher and the tokenizer say on their own.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import webdataset as wds
from PIL import Image

from perceptio.curate.commands import CurationRequest, curate
from perceptio.curate.distributor import RayConfig, TeacherSpec
from perceptio.curate.marked_points import MarkedPointsConfig
from perceptio.errors import PerceptioError
from perceptio.shards import ShardSample, manifest_path, meta_folder, rle_to_mask, sample_key
from perceptio.sources.ade20k import ADE20kDataset
from perceptio.sources.refer import ReferDataset
from perceptio.tokenize.cache import DepthCache
from perceptio.tokenize.teacher import OracleTeacher, PipelineTeacher
from perceptio.tokenize.vqvae import DepthVQVAE, DepthVQVAEConfig

CORRUPT_IMAGE_ID = 3


@pytest.fixture(scope="session")
def ray_two_cpus():
    ray = pytest.importorskip("ray")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def world(synth_world: Path, tmp_path_factory) -> Path:
    """The session's world, copied so that one of its images can be broken."""
    root = tmp_path_factory.mktemp("curate") / "world"
    shutil.copytree(synth_world, root)
    image = root / "images/mscoco/images/train2014" / f"COCO_train2014_{CORRUPT_IMAGE_ID:012d}.jpg"
    image.write_bytes(image.read_bytes()[:2000])  # a truncated JPEG, as a broken download leaves it
    return root


@pytest.fixture(scope="session")
def models(tmp_path_factory, tiny_depth_anything: Path) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    DepthVQVAE(DepthVQVAEConfig(code_dim=16, hidden_channels=(8, 16, 16), num_res_blocks=1)).save_pretrained(folder / "tok")
    return {"tokenizer": folder / "tok", "teacher": tiny_depth_anything}


def _request(world: Path, models: dict[str, Path], out: Path, dataset: str = "refcoco", **changes) -> CurationRequest:
    teacher = changes.pop("teacher", TeacherSpec(model=str(models["teacher"]), cache_dir=str(out.parent / f"{out.name}-cache")))
    settings = {"samples_per_shard": 4, "batch_size": 2, "ray": RayConfig(num_cpus=2), "progress": False, **changes}
    return CurationRequest(dataset=dataset, data_root=world, out=out, tokenizer=models["tokenizer"], teacher=teacher, **settings)


@pytest.fixture(scope="session")
def refcoco_run(ray_two_cpus, world, models, tmp_path_factory):
    out = tmp_path_factory.mktemp("refcoco") / "shards"
    return curate(_request(world, models, out))


def _samples(out: Path) -> list[ShardSample]:
    tars = sorted(str(path) for path in out.glob("*.tar"))
    return [ShardSample.from_webdataset(raw) for raw in wds.WebDataset(tars, shardshuffle=False)]


def test_shards_match_the_reader_teacher_and_tokenizer(refcoco_run, world, models):
    out = refcoco_run.out
    reader = ReferDataset(world, "refcoco", "unc")
    tokenizer = DepthVQVAE.from_pretrained(models["tokenizer"])
    teacher = PipelineTeacher(str(models["teacher"]))
    cache = DepthCache(out.parent.parent / f"{out.parent.name}-cache")  # the request named the parent
    samples = _samples(out)
    assert samples and all(sample.key == sample_key("refcoco-unc", sample.meta["split"], sample.meta["image_id"]) for sample in samples)
    for sample in samples:
        image_id = sample.meta["image_id"]
        assert sample.jpg == reader.image_path(image_id).read_bytes()  # verbatim, not re-encoded
        assert sample.meta["refs"], "a sample without a kept ref must not be written"
        by_ref = {ref.ref_id: ref for ref in reader.refs_in_split(sample.meta["split"]) if ref.image_id == image_id}
        for ref in sample.meta["refs"]:
            np.testing.assert_array_equal(rle_to_mask(ref["mask"]), reader.ann_mask(ref["ann_id"]))
            assert [s["sent"] for s in ref["sentences"]] == [s.sent for s in by_ref[ref["ref_id"]].sentences]
            assert ref["description"].endswith(".") and ref["category"] in ref["description"]
        # The run went through the cache (every image is a hit now), the cached map is the teacher's
        # depth of this very image (not of a batch neighbour), and the tokens encode it.
        image = reader.load_image(image_id)
        depth = cache.predict(teacher, [image], [sample.jpg])
        # Equal up to the cache's float16 rounding; another image's depth correlates at ~0.1.
        np.testing.assert_allclose(depth[0], teacher.predict([image])[0], rtol=2e-3, atol=1e-3)
        assert sample.depth.dtype == np.float16 and sample.depth.shape == (320, 320)
        assert sample.depth_tokens.dtype == np.int16 and sample.depth_tokens.shape == (100,)
        np.testing.assert_array_equal(sample.depth_tokens, tokenizer.encode(depth)[0].numpy())
        np.testing.assert_array_equal(sample.depth, tokenizer.normalize(depth)[0].numpy().astype(np.float16))
        assert sample.meta["teacher"] == teacher.identity and sample.meta["tokenizer"] == tokenizer.identity
    assert cache.misses == 0

    # Every ref of every split is accounted for exactly once: kept in a shard or rejected with a reason.
    manifest = pq.read_table(manifest_path(out)).to_pylist()
    rows = {row["ref_id"]: row for row in manifest if row["shard"]}
    assert len(rows) == sum(row["shard"] is not None for row in manifest) == len(reader.refs)
    kept_in_shards = {ref["ref_id"] for sample in samples for ref in sample.meta["refs"]}
    assert kept_in_shards == {ref_id for ref_id, row in rows.items() if row["status"] == "kept"}
    assert all(row["reason"] for row in rows.values() if row["status"] == "rejected")


def test_rejections_are_the_worlds_ambiguous_duplicate_and_corrupt_refs(refcoco_run, world):
    reader = ReferDataset(world, "refcoco", "unc")
    marked = json.loads((world / "world.json").read_text())["refs"]["refcoco"]
    on_corrupt = {ref.ref_id for ref in reader.refs if ref.image_id == CORRUPT_IMAGE_ID}
    manifest = pq.read_table(manifest_path(refcoco_run.out)).to_pylist()
    rejected = {}
    for row in manifest:
        if row["status"] == "rejected":
            rejected.setdefault(row["reason"], set()).add(row["ref_id"])
    assert on_corrupt and rejected.pop("corrupt_image") == on_corrupt
    assert rejected.pop("ambiguous_expression") == set(marked["ambiguous"]) - on_corrupt
    assert rejected.pop("near_duplicate") == {pair["ref_id"] for pair in marked["duplicates"]} - on_corrupt
    assert rejected == {}
    info = json.loads((refcoco_run.out / "dataset.json").read_text())
    rejected_rows = sum(row["status"] == "rejected" and row["shard"] is not None for row in manifest)
    assert sum(split["refs_rejected"] for split in info["splits"].values()) == rejected_rows
    assert info["tokenizer"]["normalization"]["normalization"] == "robust-minmax-inverse-depth"
    assert len(info["tokenizer"]["sha256"]) == 64 and info["teacher"]["identity"]


def _digests(out: Path) -> dict[str, str]:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted([*out.iterdir(), *meta_folder(out).iterdir()]) if path.suffix in (".tar", ".parquet")}


def test_resume_redoes_only_unfinished_shards_byte_identically(refcoco_run, world, models, tmp_path):
    original = _digests(refcoco_run.out)
    out = tmp_path / "shards"
    shutil.copytree(refcoco_run.out, out)
    names = refcoco_run.shards
    # Shard 0 killed after its tar, before its marker; shard 2 killed mid-tar (a temporary file only).
    (meta_folder(out) / f"{names[0]}_stats.json").unlink()
    (out / f"{names[2]}.tar").unlink()
    for suffix in (".parquet", "_stats.json"):
        (meta_folder(out) / f"{names[2]}{suffix}").unlink()
    (out / f".{names[2]}.tar.tmp").write_bytes(b"half a tar")
    untouched = (out / f"{names[1]}.tar").stat().st_mtime_ns
    # A fresh cache: the redone shards are computed by the teacher again, not read back.
    summary = curate(_request(world, models, out))
    assert summary.redone == [names[0], names[2]]
    assert _digests(out) == original
    assert (out / f"{names[1]}.tar").stat().st_mtime_ns == untouched
    assert not list(out.glob(".*")) and not list(meta_folder(out).glob(".*"))
    with pytest.raises(PerceptioError, match="samples_per_shard"):
        curate(_request(world, models, out, samples_per_shard=3))


def _processes_in_session(session_id: int) -> list[str]:
    """``ps`` lines of the live processes of one session (Ray's raylet and workers inherit it)."""
    listing = subprocess.run(["ps", "-eww", "-o", "sid=,pid=,stat=,args="], capture_output=True, text=True, check=True).stdout
    return [line for line in listing.splitlines()
            if int(line.split()[0]) == session_id and not line.split()[2].startswith("Z")]


@pytest.mark.slow
def test_a_killed_command_resumes_byte_identically(ray_two_cpus, world, models, tmp_path):
    # One image per shard, so that the run is killed with some shards finished and others not.
    reference = curate(_request(world, models, tmp_path / "reference", samples_per_shard=1, batch_size=1,
                                teacher=TeacherSpec(source="gt", depth_dir=str(world / "depth"))))
    out = tmp_path / "shards" / "refcoco-unc"  # --out names the parent: the dataset gets its folder
    command = [str(Path(sys.executable).parent / "perceptio-curate"), "refcoco", "--data-root", str(world),
               "--out", str(out.parent), "--tokenizer", str(models["tokenizer"]), "--depth-source", "gt",
               "--samples-per-shard", "1", "--batch-size", "1", "--num-cpus", "2", "--no-progress"]
    # Its own embedded Ray, not the one of this test process.
    env = {name: value for name, value in os.environ.items() if name != "RAY_ADDRESS"}
    run = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    running: list[str] = []
    try:
        # Generous: the loop ends at the first marker; a loaded machine needs long to start Ray.
        deadline = time.monotonic() + 600
        while not list(meta_folder(out).glob("*_stats.json")) and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.001)  # the markers of 12 one-image shards land within ~0.1-0.3 s
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGSTOP)  # freeze the run where it is, to see what it had started
            running = _processes_in_session(run.pid)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(run.pid, signal.SIGKILL)  # the driver and the embedded Ray it started, at once
        run.communicate()
    assert any("raylet" in line for line in running)  # so that the check below looks at Ray's processes
    # Nothing of the killed run survives it: its raylet takes the workers down with it. (A shard
    # task, which writes its own shard, may finish the shard it was writing in that moment.)
    deadline = time.monotonic() + 30
    while _processes_in_session(run.pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _processes_in_session(run.pid) == []
    finished = {path: (path.stat().st_ino, path.stat().st_mtime_ns) for path in meta_folder(out).glob("*_stats.json")}
    assert running and 0 < len(finished) < len(reference.shards), (
        f"no kill window: {len(finished)} of {len(reference.shards)} shards were finished when the run was killed")

    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    written = re.search(r"(\d+) shards in .* \((\d+) written by this run\)", rerun.stdout)
    assert written and (int(written[1]), int(written[2])) == (len(reference.shards), len(reference.shards) - len(finished))
    assert {path: (path.stat().st_ino, path.stat().st_mtime_ns) for path in finished} == finished
    assert _digests(out) == _digests(reference.out)
    assert not list(out.glob(".*")) and not list(meta_folder(out).glob(".*"))


def test_ade20k_with_ground_truth_depth(ray_two_cpus, world, models, tmp_path):
    out = tmp_path / "ade"
    teacher = TeacherSpec(source="gt", depth_dir=str(world / "depth"))
    summary = curate(_request(world, models, out, dataset="ade20k", teacher=teacher))
    reader = ADE20kDataset(world)
    tokenizer = DepthVQVAE.from_pretrained(models["tokenizer"])
    oracle = OracleTeacher(world / "depth")
    expected = {(sample.split, sample.image_id): sample for split in reader.splits for sample in reader.samples(split)}
    assert summary.out == out / "ade20k"
    samples = _samples(summary.out)
    assert len(samples) == len(expected) == sum(split["samples"] for split in summary.info["splits"].values())
    assert set(summary.info["splits"]) == {"training", "validation"}
    for sample in samples:
        source = expected[(sample.meta["split"], sample.meta["image_id"])]
        assert sample.seg_png == source.annotation_path.read_bytes()
        depth = oracle.predict_paths([source.image_path])
        np.testing.assert_array_equal(sample.depth_tokens, tokenizer.encode(depth)[0].numpy())
        assert sample.meta["teacher"] == oracle.identity
        questions = sample.meta["questions"]
        assert questions and len(questions) <= MarkedPointsConfig().questions_per_image
        assert sample.meta["question"] == questions[0]
        instances = np.asarray(Image.open(world / "instances" / f"{source.image_path.stem}.png"))
        inverse = depth[0]
        for question in questions:
            assert 2 <= len(question["points"]) <= 5 and question["text"].endswith("closest to the camera?")
            # Points sit on distinct objects (never floor, wall or sky), one per object.
            hit = [int(instances[y, x]) for x, y in question["points"]]
            assert 0 not in hit and len(set(hit)) == len(hit)
            # The answer is the point whose ground-truth depth is nearest (largest inverse depth).
            nearest = max(range(len(question["points"])), key=lambda i: inverse[question["points"][i][1], question["points"][i][0]])
            assert question["labels"][nearest] == question["answer"]
        assert sample.marked_jpg is not None and sample.marked_jpg[:2] == b"\xff\xd8"


def test_command_line_contract(models, tmp_path):
    command = [str(Path(sys.executable).parent / "perceptio-curate"), "refcoco", "--data-root", str(tmp_path / "missing"),
               "--out", str(tmp_path / "out"), "--tokenizer", str(models["tokenizer"]), "--depth-source", "gt"]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "missing" in result.stderr
    result = subprocess.run([command[0], "refcocog", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--split-by" in result.stdout and "umd" in result.stdout


# ------------------------------------------------------------------ the shard folder for other tools


def test_out_names_the_parent_and_side_tables_sit_in_meta(refcoco_run):
    out = refcoco_run.out
    assert out.name == "refcoco-unc" and [child.name for child in out.parent.iterdir() if child.is_dir()] == ["refcoco-unc"]
    top = {path.suffix for path in out.iterdir() if path.is_file()}
    assert top == {".tar", ".json", ".md"}  # tars, dataset.json, the dataset card; no parquet beside the tars
    assert manifest_path(out).is_file() and len(list(meta_folder(out).glob("*_stats.json"))) == len(refcoco_run.shards)


def test_hugging_face_datasets_and_webdataset_read_the_shards(refcoco_run, tmp_path):
    datasets = pytest.importorskip("datasets")
    out = refcoco_run.out
    expected = {split: counts["samples"] for split, counts in refcoco_run.info["splits"].items()}
    assert {"testA", "testB"} <= set(expected)
    files = {split: sorted(str(path) for path in out.glob(f"refcoco-unc-{split}-*.tar")) for split in expected}
    explicit = datasets.load_dataset("webdataset", data_files=files, cache_dir=str(tmp_path / "hf-explicit"))
    whole_folder = datasets.load_dataset(str(out), cache_dir=str(tmp_path / "hf-folder"))  # via the dataset card
    for loaded in (explicit, whole_folder):
        assert {split: loaded[split].num_rows for split in loaded} == expected
        row = loaded["testA"][0]
        assert set(row) >= {"jpg", "depth.npy", "depth_tokens.npy", "json"} and row["json"]["split"] == "testA"
    plain = [sample["__key__"] for sample in wds.WebDataset(files["testB"], shardshuffle=False)]
    assert len(plain) == expected["testB"] and all(key.startswith("refcoco-unc_testB_") for key in plain)


def test_wids_indexes_list_every_shard_with_its_count(refcoco_run):
    out = refcoco_run.out
    for split, counts in refcoco_run.info["splits"].items():
        index_path = meta_folder(out) / f"refcoco-unc-{split}.wids.json"
        index = json.loads(index_path.read_text())
        assert index["__kind__"] == "wids-shard-index-v1" and index["wids_version"] == 1
        assert sum(shard["nsamples"] for shard in index["shardlist"]) == counts["samples"]
        for shard in index["shardlist"]:  # wids resolves urls against the index's folder
            tar = (index_path.parent / shard["url"]).resolve()
            assert tar.is_file() and tar.stat().st_size == shard["filesize"]
            assert len({raw["__key__"] for raw in wds.tarfile_samples([{"url": str(tar)}])}) == shard["nsamples"]


def test_manifest_rows_carry_what_users_query(refcoco_run):
    table = pq.read_table(manifest_path(refcoco_run.out))
    metadata = json.loads(table.schema.metadata[b"perceptio"])
    assert metadata["tokenizer"] == refcoco_run.info["tokenizer"]["identity"]
    assert metadata["teacher"] == refcoco_run.info["teacher"]["identity"] and metadata["perceptio_version"]
    kept = [row for row in table.to_pylist() if row["status"] == "kept"]
    assert kept and all(row["width"] and row["height"] and len(row["bbox"]) == 4 and row["sentence_texts"] for row in kept)
    assert all(len(row["sentence_texts"]) == row["sentences"] for row in kept)


# ------------------------------------------------------------------ object stores and clusters
def _remote_digests(out: str) -> dict[str, str]:
    from perceptio import fs

    return {name: hashlib.sha256(fs.read_bytes(fs.join(folder, name))).hexdigest()
            for folder in (out, fs.join(out, "__meta__")) for name in fs.list_names(folder)
            if name.endswith((".tar", ".parquet"))}


@pytest.mark.slow
def test_curate_to_s3_killed_and_resumed_then_train_from_it(refcoco_run, world, models, s3_bucket, tmp_path):
    """--out s3://... against a local S3 server: SIGKILL mid-run, re-run, the same bytes; then the
    trainer reads the bucket, is stopped by SIGTERM and resumes."""
    from perceptio import fs

    out = f"{s3_bucket}/shards/refcoco-unc"  # --out names the parent: the dataset gets its folder
    markers = f"{out}/__meta__"
    bin_dir = Path(sys.executable).parent
    command = [str(bin_dir / "perceptio-curate"), "refcoco", "--data-root", str(world), "--out", out,
               "--tokenizer", str(models["tokenizer"]), "--depth-model", str(models["teacher"]),
               "--cache-dir", str(tmp_path / "cache"), "--samples-per-shard", "4", "--batch-size", "2",
               "--num-cpus", "2", "--no-progress"]
    command[command.index(out)] = f"{s3_bucket}/shards"
    env = {name: value for name, value in os.environ.items() if name != "RAY_ADDRESS"}
    run = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while (not any(name.endswith("_stats.json") for name in fs.list_names(markers)) and run.poll() is None
               and time.monotonic() < deadline):
            time.sleep(0.1)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(run.pid, signal.SIGKILL)
        run.communicate()
    # A shard task of the killed run may still finish the shard it was writing: count once all are gone.
    deadline = time.monotonic() + 30
    while _processes_in_session(run.pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    finished = [name for name in fs.list_names(markers) if name.endswith("_stats.json")]
    assert 0 < len(finished) < len(refcoco_run.shards), "no kill window"
    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert f"({len(refcoco_run.shards) - len(finished)} written by this run)" in rerun.stdout
    assert _remote_digests(out) == _digests(refcoco_run.out)

    train_out = tmp_path / "run"
    train = [str(bin_dir / "perceptio-train"), "--shards", out, "--model", "tiny", "--tokenizer", str(models["tokenizer"]),
             "--lora-rank", "4", "--lora-alpha", "8", "--batch-size", "2", "--steps", "30", "--workers", "1",
             "--out", str(train_out), "--no-progress"]
    trainer = subprocess.Popen(train, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = train_out / "metrics.jsonl"
    deadline = time.monotonic() + 600
    # SIGTERM right after the first step is logged; enough steps that the run cannot finish first
    # (6 tiny steps once did, on an idle machine, between two polls).
    while not (metrics.is_file() and metrics.read_text().strip()) and trainer.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    trainer.send_signal(signal.SIGTERM)
    output = trainer.communicate(timeout=300)[0]
    assert trainer.returncode == 0 and "stopped by SIGTERM" in output, output
    resumed = subprocess.run([*train, "--resume"], env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == list(range(1, 31)) and (train_out / "model").is_dir()


@pytest.mark.slow
def test_curate_from_a_data_root_on_s3_writes_the_same_shards(refcoco_run, world, models, s3_copy, tmp_path):
    """--data-root s3://... (the world uploaded to a local S3 server): the shard tasks read the images
    from the bucket and write the very bytes of the run that read the local copy."""
    data_root = s3_copy(world, "coco")
    common = ["--tokenizer", str(models["tokenizer"]), "--depth-model", str(models["teacher"]),
              "--cache-dir", str(tmp_path / "cache"), "--samples-per-shard", "4", "--batch-size", "2",
              "--num-cpus", "2", "--no-progress"]
    curate_command = str(Path(sys.executable).parent / "perceptio-curate")
    env = {name: value for name, value in os.environ.items() if name != "RAY_ADDRESS"}
    done = subprocess.run([curate_command, "refcoco", "--data-root", data_root, "--out", str(tmp_path / "shards"), *common],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    remote_out = tmp_path / "shards" / "refcoco-unc"
    digests, local_digests = _digests(remote_out), _digests(refcoco_run.out)
    tars = sorted(name for name in local_digests if name.endswith(".tar"))
    assert tars and {name: digests[name] for name in tars} == {name: local_digests[name] for name in tars}
    # The parquets hold the same rows; a rejected image's detail names where it was read from.
    parquets = sorted(set(digests) - set(tars))
    assert parquets == sorted(set(local_digests) - set(tars))
    for name in parquets:
        rows, local_rows = (pq.read_table(next(path for path in (out / name, meta_folder(out) / name) if path.is_file()))
                            .to_pylist() for out in (remote_out, refcoco_run.out))
        for row in rows:
            row["detail"] = row["detail"] and row["detail"].replace(data_root, str(world))
        assert rows == local_rows, name
    assert any(data_root in (row["detail"] or "") for row in pq.read_table(manifest_path(remote_out)).to_pylist())
    # A prefix that holds neither ADE20k's layout nor its folder: one line, exit 2, no traceback.
    wrong = subprocess.run([curate_command, "ade20k", "--data-root", f"{data_root}/images", "--out", str(tmp_path / "ade"),
                            *common], env=env, capture_output=True, text=True, timeout=300)
    assert wrong.returncode == 2 and wrong.stderr.count("\n") == 1, wrong.stderr
    assert "give --data-root as the dataset folder itself" in wrong.stderr


def _cluster_curate(world: Path, models: dict[str, Path], out: Path, **options) -> dict:
    """tests/cluster_curate.py in its own process (a Ray cluster cannot share this one's Ray)."""
    config = {"world": str(world), "out": str(out), "tokenizer": str(models["tokenizer"]),
              "teacher": str(models["teacher"]), **options}
    env = {name: value for name, value in os.environ.items() if name != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1]), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, str(Path(__file__).with_name("cluster_curate.py")), json.dumps(config)],
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_two_simulated_nodes_write_the_same_shards_also_when_one_is_removed(refcoco_run, world, models, tmp_path):
    both = _cluster_curate(world, models, tmp_path / "two-nodes" / "refcoco-unc", nodes=2)
    assert both["written"] == both["shards"] == len(refcoco_run.shards)
    assert _digests(tmp_path / "two-nodes" / "refcoco-unc") == _digests(refcoco_run.out)
    removed_out = tmp_path / "node-removed" / "refcoco-unc"
    removed = _cluster_curate(world, models, removed_out, nodes=2, remove_after_shards=1)
    assert 1 <= removed["removed_after_shards"] < removed["shards"]  # removed mid-run, with shards left to do
    assert _digests(removed_out) == _digests(refcoco_run.out)
    assert not list(removed_out.glob(".*")) and not list(meta_folder(removed_out).glob(".*"))
