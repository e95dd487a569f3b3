"""perceptio-inspect: summaries, validation of every kind of damage, and pictures that put masks and depth
where they belong. Shards are built here with ShardWriter from small synthetic samples."""

from __future__ import annotations

import io
import json
import shutil
import os
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw
from typer.testing import CliRunner

from perceptio.inspect.cli import app
from perceptio.inspect.render import REF_COLOURS
from perceptio.shards import (
    KEPT,
    META_DIR,
    REJECTED,
    ManifestRow,
    ShardSample,
    ShardWriter,
    manifest_path,
    mask_to_rle,
    meta_folder,
    rle_to_mask,
    sample_key,
)

WIDTH, HEIGHT = 160, 120
TOKENIZER_ID = "test-vqvae@000000000000"
runner = CliRunner()


@dataclass
class Built:
    """A sample as the factory made it, with the facts the tests check the pictures against."""

    sample: ShardSample
    masks: list[np.ndarray]
    near_box: tuple[int, int, int, int]  # (x0, y0, x1, y1) in image pixels: the near object of the depth map


def _jpeg(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def make_sample(dataset: str, split: str, image_id: int, rng: np.random.Generator) -> Built:
    """A smooth grey-ish photo with random noise, two refs with rectangular masks, a depth map with
    one near box, and random tokens; ADE20k samples get seg.png, marked.jpg and a question instead."""
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
    base = 110 + 30 * np.sin(xx / 17.0)[..., None] + rng.normal(0, 4, (HEIGHT, WIDTH, 1))
    image = np.clip(np.repeat(base, 3, axis=2), 0, 255).astype(np.uint8)
    # The near box (in image pixels) sits where the first ref is; depth covers the image squashed to 320x320.
    x0, y0 = int(rng.integers(10, 60)), int(rng.integers(10, 40))
    near_box = (x0, y0, x0 + 50, y0 + 40)
    depth = np.full((320, 320), -0.8, dtype=np.float32)
    sx, sy = 320 / WIDTH, 320 / HEIGHT
    depth[round(y0 * sy) : round((y0 + 40) * sy), round(x0 * sx) : round((x0 + 50) * sx)] = 0.9
    refs, masks = [], []
    if not dataset.startswith("ade20k"):
        boxes = [near_box, (100, 70, 150, 110)]
        for number, (bx0, by0, bx1, by1) in enumerate(boxes):
            expression = f"the thing number {number} here"
            mask = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
            mask[by0:by1, bx0:bx1] = 1
            masks.append(mask)
            refs.append(
                {
                    "ref_id": image_id * 10 + number,
                    "ann_id": image_id * 100 + number,
                    "category_id": 1,
                    "category": "person",
                    "bbox": [bx0, by0, bx1 - bx0, by1 - by0],
                    "mask": mask_to_rle(mask),
                    "sentences": [{"sent_id": number, "raw": f"Thing {number}", "sent": expression}],
                    "description": f"a grey rectangle, number {number}",
                    "depth": {"median": 0.9 if number == 0 else -0.8, "rank": number},
                }
            )
    meta = {
        "dataset": dataset,
        "split": split,
        "image_id": image_id,
        "file_name": f"img_{image_id}.jpg",
        "width": WIDTH,
        "height": HEIGHT,
        "teacher": "gt:test",
        "tokenizer": TOKENIZER_ID,
        "refs": refs,
    }
    seg_png = marked_jpg = None
    if dataset.startswith("ade20k"):
        points = [[x0 + 25, y0 + 20], [130, 100]]
        marked = Image.fromarray(image)
        draw = ImageDraw.Draw(marked)
        for (px, py), label in zip(points, "AB"):
            draw.ellipse((px - 6, py - 6, px + 6, py + 6), outline=(255, 0, 0), width=2)
            draw.text((px + 8, py - 6), label, fill=(255, 0, 0))
        marked_jpg = _jpeg(np.asarray(marked))
        seg = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
        seg[y0 : y0 + 40, x0 : x0 + 50] = 5
        seg_png = _png(seg)
        meta["question"] = {
            "text": "Which point is closer to the camera? A or B?",
            "points": points,
            "labels": ["A", "B"],
            "answer": "A",
            "point_depths": [0.9, -0.8],
        }
    sample = ShardSample(
        key=sample_key(dataset, split, image_id),
        jpg=_jpeg(image),
        depth=depth.astype(np.float16),
        depth_tokens=rng.integers(0, 128, 100).astype(np.int16),
        meta=meta,
        seg_png=seg_png,
        marked_jpg=marked_jpg,
    )
    return Built(sample, masks, near_box)


def _rows(shard: str, item: Built) -> list[ManifestRow]:
    """Curation's table rows of one image: its kept refs (one row per image for ADE20k) and one rejected ref."""
    meta = item.sample.meta
    common = {"shard": shard, "key": item.sample.key, **{field: meta[field] for field in ("dataset", "split", "image_id")}}
    rows = [ManifestRow(**common, ref_id=ref["ref_id"], sentences=len(ref["sentences"]), status=KEPT) for ref in meta["refs"]]
    if not meta["refs"]:
        rows.append(ManifestRow(**common, ref_id=None, sentences=0, status=KEPT))
    rows.append(ManifestRow(**common, ref_id=meta["image_id"] * 10 + 9, sentences=1, status=REJECTED, reason="tiny_mask",
                            detail="tiny_mask: 3 px < 16"))
    return rows


def write_folder(root: Path, layout: dict[tuple[str, str], list[list[int]]], seed: int = 0) -> dict[str, Built]:
    """Shards ``{dataset}-{split}-{index:06d}.tar`` with their done markers, per-ref tables, a manifest and
    dataset.json, in curation's formats (its row schema); ``layout`` gives the image ids of each shard."""
    from perceptio.curate.writer import write_rows

    rng = np.random.default_rng(seed)
    built: dict[str, Built] = {}
    # A ref the reader rejected before sharding: in the manifest without a shard.
    manifest = [ManifestRow(dataset="refcoco-unc", split="train", status=REJECTED, reason="bad_polygon")]
    names = []
    for (dataset, split), shards in layout.items():
        for index, image_ids in enumerate(shards):
            name = f"{dataset}-{split}-{index:06d}"
            names.append(name)
            rows = []
            with ShardWriter(root / f"{name}.tar") as writer:
                for image_id in image_ids:
                    item = make_sample(dataset, split, image_id, rng)
                    writer.write(item.sample)
                    built[item.sample.key] = item
                    rows += _rows(name, item)
            write_rows(meta_folder(root) / f"{name}.parquet", rows)
            manifest += rows
            (meta_folder(root) / f"{name}_stats.json").write_text(json.dumps({"shard": name, "samples": len(image_ids)}))
    write_rows(manifest_path(root), manifest)
    info = {"tokenizer": {"identity": TOKENIZER_ID}, "shards": names}
    (root / "dataset.json").write_text(json.dumps(info))
    return built


LAYOUT = {("refcoco-unc", "train"): [[1, 2], [3]], ("refcoco-unc", "val"): [[4]], ("ade20k", "validation"): [[5, 6]]}


@pytest.fixture()
def shards(tmp_path) -> tuple[Path, dict[str, Built]]:
    root = tmp_path / "shards"
    return root, write_folder(root, LAYOUT)


def invoke(*args: str):
    return runner.invoke(app, [*map(str, args)])


def json_of(result) -> dict:
    return json.loads(result.stdout)


def rewrite_shard(path: Path, change) -> None:
    """Rewrite a tar member by member: ``change(key, members)`` returns the members to store (bypassing
    ShardWriter, which would fix the dtypes that some tests need to break)."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for info in tar:
            key, _, extension = info.name.partition(".")
            samples.setdefault(key, {})[extension] = tar.extractfile(info).read()
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for key, members in samples.items():
            for extension, data in change(key, dict(members)).items():
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def edit_json(members: dict[str, bytes], edit) -> dict[str, bytes]:
    meta = json.loads(members["json"])
    edit(meta)
    members["json"] = json.dumps(meta).encode()
    return members


def test_validate_is_clean_on_good_shards(shards):
    root, built = shards
    result = invoke("validate", root, "--json")
    assert result.exit_code == 0, result.stdout
    report = json_of(result)
    assert report["ok"] and report["problems"] == []
    assert report["shards"] == 4 and report["samples"] == len(built)
    human = invoke("validate", root)
    assert human.exit_code == 0 and "clean" in human.stdout


TRAIN0 = "refcoco-unc-train-000000"
KEY1 = sample_key("refcoco-unc", "train", 1)


def _cut(path: Path, keep: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _cut_at_member_boundary(path: Path) -> None:
    """Keep the first sample's members exactly, dropping the end-of-archive marker: tarfile reads this
    without complaint, so only the marker check can notice."""
    with tarfile.open(path) as tar:
        members = tar.getmembers()
        second = next(m for m in members if not m.name.startswith(members[0].name.partition(".")[0]))
    path.write_bytes(path.read_bytes()[: second.offset])


def _change_key1(root: Path, change) -> None:
    """Apply ``change(members) -> members`` to sample KEY1 of the first train shard."""
    rewrite_shard(root / f"{TRAIN0}.tar", lambda key, members: change(members) if key == KEY1 else members)


def _set_member(root: Path, member: str, array: np.ndarray) -> None:
    _change_key1(root, lambda members: {**members, member: npy(array)})


def _edit_key1_json(root: Path, edit) -> None:
    _change_key1(root, lambda members: edit_json(members, edit))


def _duplicate_first_shard(root: Path) -> None:
    write_folder(root / "copy", {("refcoco-unc", "train"): [[1, 2]]})
    os.replace(root / "copy" / f"{TRAIN0}.tar", root / "refcoco-unc-train-000005.tar")


HALF_HEIGHT_RLE = mask_to_rle(np.ones((HEIGHT // 2, WIDTH), np.uint8))
SHARD0 = f"{TRAIN0}.tar"
STRAY = ".refcoco-unc-train-000002.tar.tmp"
CORRUPTIONS = {
    # name: (how to damage the folder, expected kind, shard it is reported in, key it is reported for)
    "truncated tar": (lambda root: _cut(root / SHARD0, 0.6), "truncated", SHARD0, None),
    "tar cut at a member": (lambda root: _cut_at_member_boundary(root / SHARD0), "truncated", SHARD0, None),
    "token out of range": (lambda root: _set_member(root, "depth_tokens.npy", np.full(100, 128, np.int16)), "token-range", SHARD0, KEY1),
    "negative token": (lambda root: _set_member(root, "depth_tokens.npy", np.full(100, -1, np.int16)), "token-range", SHARD0, KEY1),
    "too few tokens": (lambda root: _set_member(root, "depth_tokens.npy", np.zeros(99, np.int16)), "token-length", SHARD0, KEY1),
    "depth float32": (lambda root: _set_member(root, "depth.npy", np.zeros((320, 320), np.float32)), "depth-dtype", SHARD0, KEY1),
    "depth wrong shape": (lambda root: _set_member(root, "depth.npy", np.zeros((160, 320), np.float16)), "depth-shape", SHARD0, KEY1),
    "rle size": (lambda root: _edit_key1_json(root, lambda meta: meta["refs"][1].update(mask=HALF_HEIGHT_RLE)), "rle-size", SHARD0, KEY1),
    "json field missing": (lambda root: _edit_key1_json(root, lambda meta: meta.pop("tokenizer")), "json-schema", SHARD0, KEY1),
    "member missing": (
        lambda root: _change_key1(root, lambda members: {k: v for k, v in members.items() if k != "depth.npy"}),
        "missing-member", SHARD0, KEY1,
    ),
    "ref dropped from the tar but kept in the tables": (
        lambda root: _edit_key1_json(root, lambda meta: meta["refs"].pop()), "table-mismatch", SHARD0, KEY1,
    ),
    "done marker counts other samples": (
        lambda root: (meta_folder(root) / f"{TRAIN0}_stats.json").write_text(json.dumps({"samples": 5})), "marker-mismatch", SHARD0, None,
    ),
    "damaged manifest": (lambda root: _cut(manifest_path(root), 0.5), "unreadable", "manifest.parquet", None),
    "temporary file of a killed run": (lambda root: (root / STRAY).write_bytes(b"half"), "stray-file", STRAY, None),
    "missing done marker": (lambda root: (meta_folder(root) / f"{TRAIN0}_stats.json").unlink(), "no-done-marker", SHARD0, None),
    "duplicate key across shards": (_duplicate_first_shard, "duplicate-key", "refcoco-unc-train-000005.tar", KEY1),
    "manifest lists a missing sample": (
        lambda root: rewrite_shard(root / SHARD0, lambda key, members: members if key == KEY1 else {}),
        "manifest-mismatch", SHARD0, sample_key("refcoco-unc", "train", 2),
    ),
}


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_validate_reports_each_kind_of_damage(shards, name):
    root, _ = shards
    damage, kind, shard_name, key = CORRUPTIONS[name]
    damage(root)
    result = invoke("validate", root, "--json")
    assert result.exit_code == 1
    problems = json_of(result)["problems"]
    matching = [p for p in problems if p["kind"] == kind]
    assert matching, problems
    assert any(p["shard"] == shard_name and (key is None or p["key"] == key) for p in matching), matching
    # The other shards were still read: only the damaged one is reported.
    assert {p["shard"] for p in problems} <= {shard_name, f"{TRAIN0}.tar", "manifest.parquet"}
    human = invoke("validate", root)
    assert human.exit_code == 1 and kind in human.stdout


def test_summary_counts_and_distributions(shards):
    root, built = shards
    result = invoke("summary", root, "--json")
    assert result.exit_code == 0, result.output
    splits = {(s["dataset"], s["split"]): s for s in json_of(result)["splits"]}
    assert set(splits) == set(LAYOUT)
    for (dataset, split), shard_ids in LAYOUT.items():
        items = [built[sample_key(dataset, split, i)] for ids in shard_ids for i in ids]
        summary = splits[(dataset, split)]
        assert summary["shards"] == summary["shards_done"] == len(shard_ids)
        assert summary["images"] == len(items)
        assert summary["refs"] == sum(len(item.sample.meta["refs"]) for item in items)
        assert summary["sentences"] == sum(len(r["sentences"]) for item in items for r in item.sample.meta["refs"])
        reader_rejects = {"bad_polygon": 1} if (dataset, split) == ("refcoco-unc", "train") else {}
        assert summary["rejects"] == {"tiny_mask": len(items), **reader_rejects}
        expected_histogram = np.bincount(np.concatenate([item.sample.depth_tokens for item in items]), minlength=128)
        assert summary["token_histogram"] == expected_histogram.tolist()
        assert summary["codes_used"] == int((expected_histogram > 0).sum())
        assert summary["tokens_per_sample"] == {"min": 100, "max": 100}
        names = [name for index in range(len(shard_ids)) for name in (
            f"{dataset}-{split}-{index:06d}.tar", f"{META_DIR}/{dataset}-{split}-{index:06d}.parquet",
            f"{META_DIR}/{dataset}-{split}-{index:06d}_stats.json")]
        assert summary["disk_bytes"] == sum((root / name).stat().st_size for name in names)
        areas = [mask.mean() for item in items for mask in item.masks]
        if areas:
            assert summary["mask_area"]["quantiles"]["p50"] == pytest.approx(np.median(areas))
            assert summary["expression_words"]["mean"] == pytest.approx(5.0)
    human = invoke("summary", root)
    assert human.exit_code == 0 and "refcoco-unc / train" in human.stdout
    assert "tiny_mask: 3, bad_polygon: 1" in human.stdout


def test_summary_works_from_the_tars_alone(shards):
    root, built = shards
    for path in root.iterdir():
        if path.suffix != ".tar":
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    result = invoke("summary", root, "--json")
    assert result.exit_code == 0, result.output
    splits = json_of(result)["splits"]
    assert sum(s["images"] for s in splits) == len(built)
    assert all(s["rejects"] == {} and s["shards_done"] == 0 for s in splits)


def _panel(picture: Image.Image, box) -> np.ndarray:
    return np.asarray(picture.convert("RGB").crop(tuple(box)), dtype=np.float64)


def _region(box_in_image, panel_size) -> np.ndarray:
    """Which panel pixels show the image pixels of ``box_in_image`` (pixel-centre sampling, shrunk by 3 px
    so that outlines, number tags and resampling at the edges do not count)."""
    width, height = panel_size
    x0, y0, x1, y1 = box_in_image
    u = (np.arange(width) + 0.5) * WIDTH / width
    v = (np.arange(height) + 0.5) * HEIGHT / height
    margin_x, margin_y = 3 * WIDTH / width, 3 * HEIGHT / height
    inside_x = (u >= x0 + margin_x) & (u < x1 - margin_x)
    inside_y = (v >= y0 + margin_y) & (v < y1 - margin_y)
    return inside_y[:, None] & inside_x[None, :]


def _luminance(pixels: np.ndarray) -> np.ndarray:
    return pixels @ np.array([0.299, 0.587, 0.114])


def test_show_tints_each_mask_and_puts_the_near_object_where_it_is(shards, tmp_path):
    root, built = shards
    key = sample_key("refcoco-unc", "train", 2)
    item = built[key]
    out = tmp_path / "sample.png"
    result = invoke("show", root, "--key", key, "--out", out, "--json")
    assert result.exit_code == 0, result.output
    shown = json_of(result)
    assert shown["key"] == key and shown["shard"] == f"{TRAIN0}.tar" and shown["index"] == 3
    assert shown["decoded_depth"] is False and "teacher depth only" in shown["tokenizer"]
    picture = Image.open(out)
    assert list(picture.size) == shown["size"]
    panels = shown["panels"]
    assert {"image", "teacher_depth", "colour_bar", "ref_0", "ref_1"} <= set(panels)

    # Image panel: inside each ref's mask the pixels are the photo blended half-way with the ref's colour;
    # away from every mask they are the photo itself.
    box = panels["image"]
    size = (box[2] - box[0], box[3] - box[1])
    rendered = _panel(picture, box)
    photo = Image.open(io.BytesIO(item.sample.jpg)).convert("RGB").resize(size, Image.BILINEAR)
    photo = np.asarray(photo, dtype=np.float64)
    anywhere = np.zeros(rendered.shape[:2], dtype=bool)
    for number, mask in enumerate(item.masks):
        rows, cols = np.nonzero(mask)
        region = _region((cols.min(), rows.min(), cols.max() + 1, rows.max() + 1), size)
        anywhere |= _region((cols.min() - 6, rows.min() - 6, cols.max() + 7, rows.max() + 7), size)
        tinted = 0.5 * photo + 0.5 * np.asarray(REF_COLOURS[number], dtype=np.float64)
        close = np.abs(rendered[region] - tinted[region]).max(axis=1) < 12
        assert close.mean() > 0.9, f"ref {number}: only {close.mean():.0%} of its mask is tinted with its colour"
    untouched = np.abs(rendered[~anywhere] - photo[~anywhere]).max(axis=1) < 12
    assert untouched.mean() > 0.98

    # Teacher depth panel: bright where the near object is, dark elsewhere.
    box = panels["teacher_depth"]
    luminance = _luminance(_panel(picture, box))
    near = _region(item.near_box, (box[2] - box[0], box[3] - box[1]))
    assert luminance[near].min() > 150 and np.median(luminance[~near]) < 60

    human = invoke("show", root, "--key", key, "--out", out)
    assert human.exit_code == 0 and "teacher depth only" in human.stdout
    assert f"{item.masks[0].mean():.1%}" in human.stdout  # the mask area column


def test_show_ade_sample_draws_the_marked_image_with_its_answer(shards, tmp_path):
    root, built = shards
    key = sample_key("ade20k", "validation", 6)
    out = tmp_path / "ade.png"
    result = invoke("show", root, "--key", key, "--out", out, "--json")
    assert result.exit_code == 0, result.output
    shown = json_of(result)
    assert shown["meta"]["question"]["answer"] == "A"
    picture = Image.open(out)
    box = shown["panels"]["marked"]
    marked = _panel(picture, box)
    # The red circle of point A is drawn around its point: red pixels near it, none in the far corner.
    (ax, ay), _ = built[key].sample.meta["question"]["points"]
    scale = (box[2] - box[0]) / WIDTH
    red = (marked[..., 0] > 170) & (marked[..., 1] < 90) & (marked[..., 2] < 90)
    cx, cy = round(ax * scale), round(ay * scale)
    reach = round(10 * scale)
    assert red[cy - reach : cy + reach, cx - reach : cx + reach].any()
    assert not red[: round(8 * scale), : round(8 * scale)].any()
    assert "segmentation" in shown["panels"]


def _tokenizer(directory: Path):
    from perceptio.tokenize.vqvae import DepthVQVAE, DepthVQVAEConfig

    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    tokenizer = DepthVQVAE(DepthVQVAEConfig(code_dim=8, hidden_channels=(8, 8, 8), num_res_blocks=0))
    tokenizer.save_pretrained(directory)
    return tokenizer


def _read_through_colour_bar(picture: Image.Image, panels: dict, name: str, points: np.ndarray) -> np.ndarray:
    """Read depth values off a depth panel as a person would: find each pixel's colour on the colour
    bar and take the value at that height (the bar runs from +1 at the top to -1 at the bottom)."""
    bar = _panel(picture, panels["colour_bar"])[:, 9]  # the middle column of the ramp
    values = np.linspace(1.0, -1.0, len(bar))
    pixels = _panel(picture, panels[name])[points[:, 1], points[:, 0]]
    nearest = np.abs(pixels[:, None, :] - bar[None, :, :]).sum(axis=2).argmin(axis=1)
    return values[nearest]


def test_show_decodes_the_tokens_with_the_given_or_recorded_tokenizer(shards, tmp_path):
    root, built = shards
    tokenizer = _tokenizer(tmp_path / "tok")
    key = sample_key("refcoco-unc", "val", 4)
    out = tmp_path / "decoded.png"
    result = invoke("show", root, "--key", key, "--out", out, "--tokenizer", tmp_path / "tok", "--json")
    assert result.exit_code == 0, result.output
    shown = json_of(result)
    assert shown["decoded_depth"] is True and tokenizer.identity in shown["tokenizer"]
    # The folder's tokens came from another tokenizer: the note says so.
    assert TOKENIZER_ID in shown["tokenizer"]
    picture, panels = Image.open(out), shown["panels"]
    box = panels["decoded_depth"]
    width, height = box[2] - box[0], box[3] - box[1]
    grid_x, grid_y = np.meshgrid(np.linspace(2, width - 3, 16).astype(int), np.linspace(2, height - 3, 12).astype(int))
    points = np.stack([grid_x.ravel(), grid_y.ravel()], axis=1)
    decoded = tokenizer.decode(np.asarray(shown["depth_tokens"]))[0].numpy()
    rows, cols = ((points[:, 1] + 0.5) * 320 / height).astype(int), ((points[:, 0] + 0.5) * 320 / width).astype(int)
    expected = decoded[rows, cols]
    np.testing.assert_allclose(_read_through_colour_bar(picture, panels, "decoded_depth", points), expected, atol=0.05)
    # The teacher depth read the same way: the near box at +0.9, the rest at -0.8.
    teacher = _read_through_colour_bar(picture, panels, "teacher_depth", points)
    near = _region(built[key].near_box, (width, height))[points[:, 1], points[:, 0]]
    edge = ~_region(tuple(np.add(built[key].near_box, (-4, -4, 4, 4))), (width, height))[points[:, 1], points[:, 0]]
    assert near.sum() >= 4 and (edge & ~near).sum() >= 100
    np.testing.assert_allclose(teacher[near], 0.9, atol=0.05)
    np.testing.assert_allclose(teacher[edge & ~near], -0.8, atol=0.05)

    # Validating against this tokenizer flags every sample: their tokens came from another one.
    checked = invoke("validate", root, "--tokenizer", tmp_path / "tok", "--json")
    assert checked.exit_code == 1
    assert {p["key"] for p in json_of(checked)["problems"] if p["kind"] == "tokenizer"} == set(built)

    # Without --tokenizer, the path dataset.json records is used.
    info = json.loads((root / "dataset.json").read_text())
    info["tokenizer"]["path"] = str(tmp_path / "tok")
    (root / "dataset.json").write_text(json.dumps(info))
    recorded = invoke("show", root, "--index", "0", "--out", out, "--json")
    assert recorded.exit_code == 0 and json_of(recorded)["decoded_depth"] is True


def test_grid_draws_n_distinct_random_samples(shards, tmp_path):
    root, built = shards
    out = tmp_path / "grid.png"
    result = invoke("grid", root, "--n", "4", "--columns", "2", "--seed", "3", "--out", out, "--json")
    assert result.exit_code == 0, result.output
    sheet = json_of(result)
    keys = [entry["key"] for entry in sheet["samples"]]
    assert len(set(keys)) == 4 and set(keys) <= set(built)
    picture = Image.open(out)
    assert list(picture.size) == sheet["size"]
    boxes = [sheet["panels"][f"image_{i}"] for i in range(4)]
    # Two columns and two rows of cells.
    assert len({box[0] for box in boxes}) == 2 and len({box[1] for box in boxes}) == 2
    again = invoke("grid", root, "--n", "4", "--columns", "2", "--seed", "3", "--out", tmp_path / "again.png", "--json")
    assert [entry["key"] for entry in json_of(again)["samples"]] == keys
    everything = invoke("grid", root, "--n", "50", "--out", out, "--json")
    assert len(json_of(everything)["samples"]) == len(built)
    # Each refcoco cell shows its near object brightly in the depth thumbnail.
    for index, entry in enumerate(json_of(everything)["samples"]):
        box = json_of(everything)["panels"][f"depth_{index}"]
        luminance = _luminance(_panel(Image.open(out), box))
        near = _region(built[entry["key"]].near_box, (box[2] - box[0], box[3] - box[1]))
        assert luminance[near].mean() > luminance[~near].mean() + 80


def _conversation_shards(root: Path) -> dict[str, ShardSample]:
    """LLaVA and GranD-f samples as curated with --depth-source none: a text-only conversation (json
    only), a conversation about an image and a grounded caption with two phrase masks (jpg + json)."""
    from perceptio.shards import CONVERSATION_FIELD, GROUNDED_FIELD

    photo = _jpeg(np.full((HEIGHT, WIDTH, 3), 128, dtype=np.uint8))
    common = {"teacher": None, "tokenizer": None, "refs": []}
    turns = [{"role": "user", "text": "How many cubes are there?"}, {"role": "assistant", "text": "Two."}]
    boxes = [(10, 10, 60, 50), (90, 60, 150, 110)]
    phrases = []
    for number, (x0, y0, x1, y1) in enumerate(boxes):
        mask = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
        mask[y0:y1, x0:x1] = 1
        phrases.append({"text": f"thing {number}", "start": 0, "end": 7, "mask": mask_to_rle(mask)})
    no_image = {"file_name": None, "width": None, "height": None}
    with_image = {"file_name": "a.jpg", "width": WIDTH, "height": HEIGHT}
    samples = [
        ShardSample(sample_key("llava", "train", 0), None, None, None,
                    {"dataset": "llava", "split": "train", "image_id": 0, **no_image, **common,
                     CONVERSATION_FIELD: turns, "source_id": "text-only"}),
        ShardSample(sample_key("llava", "train", 1), photo, None, None,
                    {"dataset": "llava", "split": "train", "image_id": 1, **with_image, **common,
                     CONVERSATION_FIELD: turns, "source_id": "with-image"}),
        ShardSample(sample_key("grandf-ha", "train", 0), photo, None, None,
                    {"dataset": "grandf-ha", "split": "train", "image_id": 0, **with_image, **common,
                     GROUNDED_FIELD: {"caption": "thing 0 and thing 1.", "phrases": phrases}, "source_id": "g"}),
    ]
    for dataset in ("llava", "grandf-ha"):
        with ShardWriter(root / dataset / f"{dataset}-train-000000.tar") as writer:
            for sample in samples:
                if sample.meta["dataset"] == dataset:
                    writer.write(sample)
    return {sample.key: sample for sample in samples}


def _is_placeholder(pixels: np.ndarray) -> bool:
    """A grey panel with a few lines of dark text: mostly (235, 235, 235), some ink, no colour."""
    grey = (np.abs(pixels - 235).max(axis=-1) < 3).mean()
    ink = (pixels.max(axis=-1) < 160).mean()
    return grey > 0.8 and ink > 0.001 and np.abs(pixels - pixels.mean(axis=-1, keepdims=True)).max() < 3


def test_show_and_grid_draw_samples_without_image_or_depth(tmp_path):
    root = tmp_path / "conversations"
    samples = _conversation_shards(root)
    text_only, pictured, grounded = samples
    out = tmp_path / "text.png"

    result = invoke("show", root, "--key", text_only, "--out", out, "--json")
    assert result.exit_code == 0, result.output
    shown = json_of(result)
    assert set(shown["missing"]) == {"image", "depth"} and shown["depth_tokens"] is None
    assert {"no_image", "no_depth", "dialogue"} <= set(shown["panels"]) and "image" not in shown["panels"]
    picture = Image.open(out).convert("RGB")
    for name in ("no_image", "no_depth"):
        assert _is_placeholder(_panel(picture, shown["panels"][name])), name
    assert (_panel(picture, shown["panels"]["dialogue"]).max(axis=-1) < 160).any()  # the turns are written
    human = invoke("show", root, "--key", text_only, "--out", out)
    assert human.exit_code == 0 and "text-only conversation" in human.stdout and "How many cubes" in human.stdout

    # A grounded caption on an image without depth: each phrase's mask tinted in its colour, depth a grey panel.
    result = invoke("show", root, "--key", grounded, "--out", out, "--json")
    assert result.exit_code == 0, result.output
    shown = json_of(result)
    assert set(shown["missing"]) == {"depth"} and {"image", "no_depth"} <= set(shown["panels"])
    picture = Image.open(out).convert("RGB")
    box = shown["panels"]["image"]
    rendered, size = _panel(picture, box), (box[2] - box[0], box[3] - box[1])
    for number, phrase in enumerate(samples[grounded].meta["grounded_caption"]["phrases"]):
        rows, cols = np.nonzero(rle_to_mask(phrase["mask"]))
        region = _region((cols.min(), rows.min(), cols.max() + 1, rows.max() + 1), size)
        tinted = 0.5 * 128 + 0.5 * np.asarray(REF_COLOURS[number], dtype=np.float64)
        assert (np.abs(rendered[region] - tinted).max(axis=1) < 12).mean() > 0.9, number
    assert _is_placeholder(_panel(picture, shown["panels"]["no_depth"]))

    result = invoke("grid", root, "--n", "3", "--columns", "3", "--out", tmp_path / "grid.png", "--json")
    assert result.exit_code == 0, result.output
    sheet = json_of(result)
    picture = Image.open(tmp_path / "grid.png").convert("RGB")
    cells = {entry["key"]: index for index, entry in enumerate(sheet["samples"])}
    assert set(cells) == set(samples)
    panels = sheet["panels"]
    assert _is_placeholder(_panel(picture, panels[f"no_image_{cells[text_only]}"]))
    for key in samples:
        assert _is_placeholder(_panel(picture, panels[f"no_depth_{cells[key]}"]))
    for key in (pictured, grounded):
        assert f"image_{cells[key]}" in panels and f"no_image_{cells[key]}" not in panels


def _run_main(monkeypatch, capsys, *args) -> tuple[int, str]:
    """Run the console-script entry point in this process; (exit code, stderr)."""
    from perceptio.inspect.cli import main

    monkeypatch.setattr(sys, "argv", ["perceptio-inspect", *map(str, args)])
    with pytest.raises(SystemExit) as exited:
        main()
    return exited.value.code, capsys.readouterr().err


def test_bad_input_is_one_line_with_exit_code_2(shards, tmp_path, monkeypatch, capsys):
    root, _ = shards
    out = tmp_path / "x.png"
    cases = [
        ("summary", tmp_path / "nowhere"),
        ("show", root, "--key", "refcoco-unc_train_000000000777", "--out", out),
        ("show", root, "--index", "99", "--out", out),
        ("show", root, "--index", "0", "--tokenizer", tmp_path / "no-tokenizer", "--out", out),
    ]
    for args in cases:
        code, err = _run_main(monkeypatch, capsys, *args)
        assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, (args, err)
    # A sample whose image does not decode cannot be drawn: one line, not a traceback.
    rewrite_shard(root / "refcoco-unc-val-000000.tar", lambda key, m: {**m, "jpg": b"not a jpeg"})
    code, err = _run_main(monkeypatch, capsys, "show", root, "--key", sample_key("refcoco-unc", "val", 4), "--out", out)
    assert code == 2 and "cannot draw" in err and err.count("\n") == 1
    _cut(root / f"{TRAIN0}.tar", 0.5)
    code, err = _run_main(monkeypatch, capsys, "summary", root)
    assert code == 2 and "validate" in err and err.count("\n") == 1
    assert not out.exists()


def test_a_folder_of_dataset_folders_is_inspected_as_one(tmp_path):
    """Curation writes one folder per dataset; SHARDS/ may be their parent."""
    built = write_folder(tmp_path / "all" / "refcoco", {("refcoco-unc", "train"): [[1], [2]]})
    built |= write_folder(tmp_path / "all" / "ade20k", {("ade20k", "validation"): [[3]]}, seed=1)
    parent = tmp_path / "all"
    summary = invoke("summary", parent, "--json")
    assert summary.exit_code == 0, summary.output
    assert {(s["dataset"], s["images"]) for s in json_of(summary)["splits"]} == {("refcoco-unc", 2), ("ade20k", 1)}
    report = invoke("validate", parent, "--json")
    assert report.exit_code == 0 and json_of(report)["shards"] == 3 and json_of(report)["samples"] == 3
    # Folders in name order (ade20k first), so index 1 is the first refcoco sample.
    shown = invoke("show", parent, "--index", "1", "--out", tmp_path / "one.png", "--json")
    assert shown.exit_code == 0 and json_of(shown)["key"] == sample_key("refcoco-unc", "train", 1)


def test_depth_ramp_brightens_from_far_to_near():
    from perceptio.inspect.render import colormap

    values = np.linspace(-1, 1, 200)
    luminance = _luminance(colormap(values, -1.0, 1.0).astype(np.float64))
    assert np.all(np.diff(luminance) > 0), "a person reads brighter as nearer: the ramp must brighten monotonically"
    assert luminance[0] < 10 and luminance[-1] > 240


def test_real_ade20k_images_validate_and_render(shared_data, tmp_path):
    """Real JPEGs and class maps (the ADE20k sample data) go through validate and show unchanged."""
    root = tmp_path / "real"
    with ShardWriter(root / "ade20k-validation-000000.tar") as writer:
        for image_id in (1, 2, 3):
            jpg = (shared_data / f"ade20k/images/validation/ADE_val_{image_id:08d}.jpg").read_bytes()
            seg = (shared_data / f"ade20k/annotations/validation/ADE_val_{image_id:08d}.png").read_bytes()
            width, height = Image.open(io.BytesIO(jpg)).size
            depth = np.repeat(np.linspace(-1, 1, 320, dtype=np.float16)[:, None], 320, axis=1)  # the floor nears
            meta = {
                "dataset": "ade20k", "split": "validation", "image_id": image_id, "file_name": f"ADE_val_{image_id:08d}.jpg",
                "width": width, "height": height, "teacher": "test", "tokenizer": TOKENIZER_ID, "refs": [], "question": None,
            }  # fmt: skip
            writer.write(ShardSample(sample_key("ade20k", "validation", image_id), jpg, depth, np.zeros(100, np.int16), meta, seg_png=seg))
    meta_folder(root).mkdir()
    (meta_folder(root) / "ade20k-validation-000000_stats.json").write_text(json.dumps({"samples": 3}))
    report = invoke("validate", root, "--json")
    assert report.exit_code == 0, report.stdout
    shown = invoke("show", root, "--index", "0", "--out", tmp_path / "real.png", "--json")
    assert shown.exit_code == 0, shown.output
    box = json_of(shown)["panels"]["image"]
    # 683x512 fitted into 480x320 keeps its aspect ratio.
    assert (box[2] - box[0], box[3] - box[1]) == (427, 320)
    luminance = _luminance(_panel(Image.open(tmp_path / "real.png"), json_of(shown)["panels"]["teacher_depth"]))
    assert luminance[-5:].mean() > 200 and luminance[:5].mean() < 30  # near (bottom rows) is bright
