"""Depth teachers (Depth Anything through the pipeline, ground truth) and the depth cache."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from perceptio.errors import PerceptioError
from perceptio.tokenize.cache import DepthCache, content_hash
from perceptio.tokenize.teacher import OracleTeacher, PipelineTeacher, read_depth_png

# Mixed aspect ratios (landscape, portrait, square) in one batch.
SIZES = [(60, 80), (100, 50), (64, 64)]


def random_images(seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)) for height, width in SIZES]


@pytest.fixture(scope="module")
def teacher(tiny_depth_anything: Path) -> PipelineTeacher:
    return PipelineTeacher(str(tiny_depth_anything), device="cpu", batch_size=8, bf16=False)


def test_pipeline_teacher_batches_mixed_aspect_ratios(teacher: PipelineTeacher) -> None:
    images = random_images(0)
    depths = teacher.predict(images)
    assert [depth.shape for depth in depths] == SIZES
    assert all(depth.dtype == np.float32 and np.isfinite(depth).all() and depth.std() > 0 for depth in depths)
    # Padding changes a ViT's context, so padded images only resemble the stock pipeline's output.
    for image, depth in zip(images, depths):
        alone = teacher.pipe(image)["predicted_depth"].numpy()
        assert np.corrcoef(depth.ravel(), alone.ravel())[0, 1] > 0.7


def test_pipeline_teacher_same_shape_batches_match_the_stock_pipeline(teacher: PipelineTeacher, monkeypatch) -> None:
    # Two landscape images of one preprocessed shape and one portrait image, two per batch: the
    # landscapes fill one batch (no padding), the portrait runs alone.
    rng = np.random.default_rng(4)
    images = [Image.fromarray(rng.integers(0, 255, size, dtype=np.uint8)) for size in [(60, 80, 3), (90, 40, 3), (120, 160, 3)]]
    monkeypatch.setattr(teacher, "batch_size", 2)
    for image, depth in zip(images, teacher.predict(images)):
        alone = teacher.pipe(image)["predicted_depth"].numpy()
        assert depth.shape == (image.height, image.width)
        np.testing.assert_allclose(depth, alone, rtol=1e-4, atol=1e-4 * np.abs(alone).max())


def test_pipeline_teacher_bf16_autocast_stays_close(tiny_depth_anything: Path, teacher: PipelineTeacher) -> None:
    fast = PipelineTeacher(str(tiny_depth_anything), device="cpu", bf16=True)
    assert fast.autocast and not teacher.autocast
    images = random_images(1)
    for reduced, full in zip(fast.predict(images), teacher.predict(images)):
        assert reduced.dtype == np.float32
        assert np.corrcoef(reduced.ravel(), full.ravel())[0, 1] > 0.95


def test_pipeline_teacher_identity_follows_the_weights(
    tiny_depth_anything: Path, teacher: PipelineTeacher, make_tiny_depth_anything, tmp_path
) -> None:
    assert teacher.identity.startswith(f"{tiny_depth_anything.name}@")
    other = PipelineTeacher(str(make_tiny_depth_anything(tmp_path / "other")), device="cpu")
    assert other.identity != teacher.identity


def test_pipeline_teacher_reports_a_missing_model(tmp_path) -> None:
    with pytest.raises(PerceptioError):
        PipelineTeacher(str(tmp_path / "absent"), device="cpu")


def write_depth_png(path: Path, millimetres: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(millimetres.astype(np.uint16)).save(path)


def test_oracle_teacher_reads_millimetres_as_inverse_metres(tmp_path) -> None:
    millimetres = np.array([[500, 1000, 0], [2000, 4000, 250]], dtype=np.uint16)
    write_depth_png(tmp_path / "depth" / "scene_7.png", millimetres)
    image_path = tmp_path / "images" / "scene_7.jpg"
    image_path.parent.mkdir()
    Image.new("RGB", (3, 2)).save(image_path)
    oracle = OracleTeacher(tmp_path / "depth")
    expected = np.array([[2.0, 1.0, 0.0], [0.5, 0.25, 4.0]], dtype=np.float32)
    np.testing.assert_allclose(oracle.predict_paths([image_path])[0], expected)
    np.testing.assert_allclose(oracle.predict_paths([image_path], sizes=[(3, 2)])[0], expected)
    with pytest.raises(PerceptioError, match="differ in size"):
        oracle.predict_paths([image_path], sizes=[(4, 2)])
    with pytest.raises(PerceptioError):
        oracle.predict_paths([tmp_path / "images" / "missing.jpg"])
    with pytest.raises(PerceptioError):
        OracleTeacher(tmp_path / "nowhere")


def test_depth_png_encodings(tmp_path) -> None:
    write_depth_png(tmp_path / "d.png", np.array([[5000, 0]]))
    np.testing.assert_allclose(read_depth_png(tmp_path / "d.png", "tum"), [[1.0, 0.0]])
    np.testing.assert_allclose(read_depth_png(tmp_path / "d.png", "mm"), [[5.0, 0.0]])
    # SUN RGB-D rotates the 16 bits: 1234 mm is stored as 1234 << 3 (no bits wrap for small values).
    write_depth_png(tmp_path / "sun.png", np.array([[1234 << 3]]))
    np.testing.assert_allclose(read_depth_png(tmp_path / "sun.png", "sun"), [[1.234]], rtol=1e-6)
    with pytest.raises(PerceptioError):
        read_depth_png(tmp_path / "d.png", "feet")


class CountingTeacher:
    """Wraps a teacher and counts the images it is asked about."""

    def __init__(self, inner: PipelineTeacher) -> None:
        self.inner = inner
        self.images_seen = 0

    @property
    def identity(self) -> str:
        return self.inner.identity

    def predict(self, images: list[Image.Image]) -> list[np.ndarray]:
        self.images_seen += len(images)
        return self.inner.predict(images)


def encoded(images: list[Image.Image]) -> list[bytes]:
    """Each image's PNG file bytes (what the cache hashes)."""
    contents = []
    for image in images:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        contents.append(buffer.getvalue())
    return contents


def test_cache_never_runs_the_teacher_twice(teacher: PipelineTeacher, tmp_path) -> None:
    images = random_images(2)
    contents = encoded(images)
    counting = CountingTeacher(teacher)
    first = DepthCache(tmp_path / "cache").predict(counting, images, contents)
    assert counting.images_seen == len(images)

    second_cache = DepthCache(tmp_path / "cache")  # a new process, the same folder
    hashes = [content_hash(data) for data in contents]
    second = second_cache.predict(counting, images[::-1], hashes[::-1])
    assert counting.images_seen == len(images)
    assert (second_cache.hits, second_cache.misses) == (3, 0)
    for fresh, cached in zip(first, second[::-1]):
        assert np.array_equal(fresh, cached)  # the first run already returns what was stored
    # Near-lossless storage: float16 keeps ~3 significant digits of the teacher's output.
    for stored, raw in zip(first, teacher.predict(images)):
        np.testing.assert_allclose(stored, raw, rtol=2e-3, atol=1e-6)


def test_cache_keys_by_teacher_and_by_content(teacher: PipelineTeacher, tmp_path) -> None:
    images = random_images(3)
    contents = encoded(images)
    cache = DepthCache(tmp_path / "cache")
    counting = CountingTeacher(teacher)
    # The same bytes twice in one call reach the teacher once.
    cache.predict(counting, [images[0], images[0]], [contents[0], contents[0]])
    assert counting.images_seen == 1
    cache.predict(counting, images, contents)
    assert counting.images_seen == 3

    class Renamed(CountingTeacher):
        identity = "another-teacher@000000000000"

    renamed = Renamed(teacher)
    cache.predict(renamed, images, contents)
    assert renamed.images_seen == 3
    with pytest.raises(PerceptioError):
        cache.predict(counting, images[:1], ["not-a-hash"])


@pytest.mark.parametrize("name, encoding", [("tum_depth.png", "tum"), ("sun_depth.png", "sun"), ("seq0_depth.png", "mm")])
def test_real_rgbd_depth_decodes_to_plausible_indoor_metres(shared_data: Path, name: str, encoding: str) -> None:
    metres = read_depth_png(shared_data / "rgbd" / name, encoding)
    valid = metres[metres > 0]
    assert metres.shape == (480, 640) and valid.size > 0.5 * metres.size
    # Indoor scenes seen by a Kinect-class sensor: most depth lies between 0.3 m and 10 m.
    assert 0.3 < np.median(valid) < 10 and np.percentile(valid, 99) < 15
