"""``perceptio-tokenize`` end to end on a tiny world, resumable training, and the error contract."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from perceptio.errors import PerceptioError
from perceptio.tokenize.cli import app, main, parse_codes
from perceptio.tokenize.data import list_images, split_held_out
from perceptio.tokenize.fit import CHECKPOINT_NAME, FitConfig, train
from perceptio.tokenize.vqvae import DepthVQVAE, DepthVQVAEConfig

IMAGES = 8
SMALL_FIT = ["--steps", "3", "--batch-size", "4", "--num-codes", "16", "--code-dim", "8"]


def scene_millimetres(index: int, height: int = 48, width: int = 64) -> np.ndarray:
    """A floor receding to a wall, one box in front, and sky (0 = invalid) at the top."""
    rows = np.arange(height)[:, None].repeat(width, axis=1)
    depth = np.where(rows > height // 3, 12000 * (height // 3) / np.maximum(rows, 1), 12000.0)
    depth[: height // 6] = 0
    left = 5 + 6 * index
    depth[20:40, left : left + 15] = 2500 + 100 * index
    return depth.astype(np.uint16)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("world")
    image_dir = root / "images" / "mscoco" / "images" / "train2014"
    image_dir.mkdir(parents=True)
    (root / "depth").mkdir()
    for index in range(IMAGES):
        stem = f"COCO_train2014_{index + 1:012d}"
        millimetres = scene_millimetres(index)
        shade = (255 * (1 - millimetres / 13000.0)).astype(np.uint8)
        Image.fromarray(np.stack([shade] * 3, axis=-1)).save(image_dir / f"{stem}.jpg")
        Image.fromarray(millimetres).save(root / "depth" / f"{stem}.png")
    return root


def run(*args: str) -> str:
    result = CliRunner().invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout  # progress bars go to stderr


@pytest.fixture(scope="module")
def fitted(world: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    run("fit", "--data-root", str(world), "--dataset", "synth", "--depth-source", "gt", "--out", str(out), "--held-out", "0.25", *SMALL_FIT)
    return out


def test_fit_writes_a_loadable_tokenizer_and_its_report(fitted: Path, world: Path) -> None:
    for name in ("config.json", "model.safetensors", "fit.json", "metrics.json", CHECKPOINT_NAME):
        assert (fitted / name).is_file(), name
    model = DepthVQVAE.from_pretrained(fitted)
    assert model.config.num_codes == 16 and model.config.code_dim == 8
    record = json.loads((fitted / "fit.json").read_text())
    _, held_out = split_held_out(list_images(world, "synth"), 0.25)
    assert record["held_out_images"] == [path.name for path in held_out] and held_out
    assert record["train_images"] == IMAGES - len(held_out)
    metrics = json.loads((fitted / "metrics.json").read_text())
    assert metrics["identity"] == model.identity
    assert metrics["held-out"]["images"] == len(held_out)
    assert 0 <= metrics["held-out"]["delta1"] <= 1 and metrics["held-out"]["abs_rel"] >= 0
    assert 0 < metrics["train codebook"]["usage"] <= 1


def test_fit_again_resumes_from_its_checkpoint_and_changes_nothing(fitted: Path, world: Path) -> None:
    before = DepthVQVAE.from_pretrained(fitted).identity
    run("fit", "--data-root", str(world), "--dataset", "synth", "--depth-source", "gt", "--out", str(fitted), "--held-out", "0.25", *SMALL_FIT)
    assert DepthVQVAE.from_pretrained(fitted).identity == before


def test_an_interrupted_fit_resumes_to_the_same_weights(tmp_path) -> None:
    rng = np.random.default_rng(0)
    maps = torch.tensor(rng.uniform(-1, 1, (6, 10, 10)), dtype=torch.float16)  # pooled 20x20 maps
    config = DepthVQVAEConfig(image_size=20, grid_size=5, input_pool=2, hidden_channels=(8,), num_codes=8, code_dim=4, num_res_blocks=1)
    fit = FitConfig(steps=4, batch_size=3, checkpoint_every=2, warmup_steps=1)
    straight = train(maps, config, fit, tmp_path / "straight")

    def crash_after_two(step: int, losses: dict[str, float]) -> None:
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(maps, config, fit, tmp_path / "resumed", on_step=crash_after_two)
    assert torch.load(tmp_path / "resumed" / CHECKPOINT_NAME, weights_only=True)["step"] == 2
    resumed = train(maps, config, fit, tmp_path / "resumed")
    assert resumed.identity == straight.identity


def test_eval_encode_and_decode_commands(fitted: Path, world: Path, tmp_path) -> None:
    scores = json.loads(run("eval", str(fitted), "--data-root", str(world), "--depth-source", "gt", "--split", "all", "--json"))
    assert scores["synth all"]["images"] == IMAGES

    depth_png = world / "depth" / "COCO_train2014_000000000001.png"
    codes = [int(code) for code in run("encode", str(depth_png), "--tokenizer", str(fitted)).split()]
    assert len(codes) == 100 and all(0 <= code < 16 for code in codes)
    span = run("encode", str(depth_png), "--tokenizer", str(fitted), "--span").strip()
    assert parse_codes(span) == codes

    out = tmp_path / "depth.png"
    run("decode", " ".join(map(str, codes)), "--tokenizer", str(fitted), "--out", str(out))
    decoded = np.array(Image.open(out))
    assert decoded.shape == (320, 320) and decoded.dtype == np.uint16
    expected = DepthVQVAE.from_pretrained(fitted).decode(torch.tensor(codes))[0].numpy()
    np.testing.assert_allclose(decoded / 65535 * 2 - 1, expected, atol=1e-4)


def run_main(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["perceptio-tokenize", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    return int(exit_info.value.code), capsys.readouterr().err


def test_bad_input_is_one_line_and_exit_code_2(fitted: Path, tmp_path, monkeypatch, capsys) -> None:
    code, err = run_main(monkeypatch, capsys, "fit", "--data-root", str(tmp_path / "absent"), "--depth-source", "gt", "--out", str(tmp_path / "t"))
    assert code == 2 and "no such data root" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    code, err = run_main(monkeypatch, capsys, "decode", "1 2 3", "--tokenizer", str(fitted), "--out", str(tmp_path / "d.png"))
    assert code == 2 and "need 100 depth codes, got 3" in err
    code, err = run_main(monkeypatch, capsys, "eval", str(tmp_path), "--split", "all")
    assert code == 2 and "not a depth tokenizer" in err
    code, _ = run_main(monkeypatch, capsys, "fit", "--dataset", "coco-stuff", "--data-root", str(tmp_path), "--out", str(tmp_path))
    assert code == 2


def test_parse_codes_reads_numbers_and_tokens() -> None:
    assert parse_codes("[D_START][D_001][D_127][D_END]") == [1, 127]
    assert parse_codes("3, 4 5\n6") == [3, 4, 5, 6]
    with pytest.raises(PerceptioError):
        parse_codes("3 four")


def test_fit_with_a_depth_model_goes_through_the_cache(world: Path, tiny_depth_anything: Path, tmp_path, monkeypatch) -> None:
    from perceptio.tokenize.teacher import PipelineTeacher

    model_dir = tiny_depth_anything
    images_seen: list[int] = []
    original_predict = PipelineTeacher.predict

    def counting_predict(self: PipelineTeacher, images: list[Image.Image]) -> list[np.ndarray]:
        images_seen.append(len(images))
        return original_predict(self, images)

    monkeypatch.setattr(PipelineTeacher, "predict", counting_predict)
    common = ["--data-root", str(world), "--dataset", "synth", "--depth-model", str(model_dir), "--cache-dir", str(tmp_path / "cache"), "--device", "cpu"]
    run("fit", *common, "--out", str(tmp_path / "first"), *SMALL_FIT)
    assert sum(images_seen) == IMAGES  # train and held-out images, each once
    assert len(list((tmp_path / "cache").rglob("*.npy"))) == IMAGES
    run("fit", *common, "--out", str(tmp_path / "second"), *SMALL_FIT)
    assert sum(images_seen) == IMAGES  # the second fit read every map from the cache
    first, second = (json.loads((tmp_path / name / "fit.json").read_text()) for name in ("first", "second"))
    assert first["teacher"] == second["teacher"] and first["teacher"].startswith("depth-anything@")


def test_fit_on_several_datasets_uses_the_union_of_their_images(synth_world: Path, tmp_path: Path) -> None:
    out = tmp_path / "tok"
    run("fit", "--data-root", str(synth_world), "--dataset", "refcoco", "--dataset", "ade20k", "--dataset", "refcoco",
        "--depth-source", "gt", "--out", str(out), "--held-out", "0.25", *SMALL_FIT)
    record = json.loads((out / "fit.json").read_text())
    assert record["datasets"] == ["refcoco", "ade20k"] and record["dataset"] == "refcoco+ade20k"
    union = sorted(set(list_images(synth_world, "refcoco")) | set(list_images(synth_world, "ade20k")))
    _, held_out = split_held_out(union, 0.25)
    assert record["train_images"] + len(record["held_out_images"]) == len(union)
    assert record["held_out_images"] == [path.name for path in held_out]
    assert any(name.startswith("ADE_") for name in record["held_out_images"] + [p.name for p in union])


def test_fit_from_an_object_store_gives_the_same_tokenizer(fitted: Path, world: Path, synth_world: Path, s3_copy,
                                                           tmp_path: Path) -> None:
    """--data-root s3://... (a local S3 server): the same images in the same order, the same weights."""
    remote = s3_copy(world, "world")
    out = tmp_path / "remote"
    run("fit", "--data-root", remote, "--dataset", "synth", "--depth-source", "gt", "--out", str(out), "--held-out", "0.25", *SMALL_FIT)
    assert (out / "model.safetensors").read_bytes() == (fitted / "model.safetensors").read_bytes()
    assert (out / "metrics.json").read_text() == (fitted / "metrics.json").read_text()
    record, local = (json.loads((folder / "fit.json").read_text()) for folder in (out, fitted))
    assert record.pop("data_root") == remote and record.pop("teacher") == f"gt-depth:{remote}/depth"
    assert {key: value for key, value in local.items() if key not in ("data_root", "teacher")} == record
    # The REFER and ADE20k readers behind it, on the session's world: the same image list as locally.
    remote_world = s3_copy(synth_world, "synth")
    for dataset in ("refcoco", "ade20k"):
        remote_names = [str(path).removeprefix(remote_world) for path in list_images(remote_world, dataset)]
        assert remote_names == [str(path).removeprefix(str(synth_world)) for path in list_images(synth_world, dataset)]
