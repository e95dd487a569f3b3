"""Depth teachers: Depth Anything V2 through the transformers pipeline, or ground-truth depth.

Both produce the same quantity: a float32 (H, W) map of *inverse* depth (near = large) at each
image's own size. Depth Anything's ``predicted_depth`` is relative inverse depth (unknown scale and
shift); the oracle's is metric, 1/metres. The tokenizer's normalisation removes the scale.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable, Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from perceptio import fs
from perceptio.errors import PerceptioError
from perceptio.tokenize.config import DEFAULT_DEPTH_MODEL


class DepthTeacher(Protocol):
    """Anything that turns images into inverse-depth maps; ``identity`` keys the depth cache."""

    @property
    def identity(self) -> str: ...

    def predict(self, images: list[Image.Image]) -> list[np.ndarray]: ...


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def bf16_supported(device: torch.device) -> bool:
    """bf16 autocast helps on CUDA GPUs that have it and on CPUs (faster than fp32 for ViTs there)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu"


class PipelineTeacher:
    """Depth Anything (V2) loaded with ``transformers.pipeline("depth-estimation", model=...)``.

    The stock pipeline resizes each image keeping its aspect ratio and then concatenates the
    tensors, so images of different shapes cannot share a batch. Here each image is preprocessed
    on its own by the pipeline's image processor; images of one preprocessed shape fill batches
    together, and the remainders of all shapes share batches that are zero-padded (bottom / right)
    to their largest height and width. Each prediction is cropped back to its own unpadded area
    and resized (bicubic, as the pipeline's post-processing does) to the image's size. A batch of one shape gives exactly the
    stock pipeline's ``predicted_depth``; padding changes what the ViT sees, so a padded image's
    depth differs somewhat from the stock one (a border effect, the price of batching).
    """

    def __init__(
        self,
        model: str = DEFAULT_DEPTH_MODEL,
        device: str | None = None,
        batch_size: int = 8,
        bf16: bool = True,
    ) -> None:
        from transformers import pipeline

        self.model_name = model
        self.device = torch.device(device or default_device())
        self.batch_size = batch_size
        self.autocast = bf16 and bf16_supported(self.device)
        try:
            self.pipe = pipeline("depth-estimation", model=model, device=self.device)
        except (OSError, ValueError) as error:
            raise PerceptioError(f"cannot load depth model {model!r}: {str(error).splitlines()[0]}") from error
        self.pipe.model.eval()
        self._identity = f"{Path(model).name if Path(model).is_dir() else model}@{_model_fingerprint(model, self.pipe.model)}"

    @property
    def identity(self) -> str:
        return self._identity

    def predict(self, images: list[Image.Image]) -> list[np.ndarray]:
        processor = self.pipe.image_processor
        pixels = [processor(images=image.convert("RGB"), return_tensors="pt")["pixel_values"][0] for image in images]
        depths: list[np.ndarray | None] = [None] * len(images)
        for chunk in _shape_batches([tuple(one.shape[-2:]) for one in pixels], self.batch_size):
            predictions = self._predict_batch([pixels[index] for index in chunk], [images[index].size for index in chunk])
            for index, depth in zip(chunk, predictions):
                depths[index] = depth
        return depths  # type: ignore[return-value]  # every slot was filled above

    @torch.inference_mode()
    def _predict_batch(self, pixels: Sequence[torch.Tensor], sizes: Sequence[tuple[int, int]]) -> list[np.ndarray]:
        """One forward over preprocessed images (C, h, w), zero-padded bottom / right to a common shape."""
        height = max(one.shape[-2] for one in pixels)
        width = max(one.shape[-1] for one in pixels)
        batch = torch.stack([F.pad(one, (0, width - one.shape[-1], 0, height - one.shape[-2])) for one in pixels])
        batch = batch.to(self.device, self.pipe.model.dtype)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            predicted = self.pipe.model(pixel_values=batch).predicted_depth.float()
        if predicted.shape[-2:] != batch.shape[-2:]:
            # Heads that predict at another resolution than their input: bring it to the input grid
            # first so that the crop below lines up with the padding.
            predicted = F.interpolate(predicted[:, None], size=batch.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        depths = []
        for prediction, one, (image_width, image_height) in zip(predicted, pixels, sizes):
            cropped = prediction[: one.shape[-2], : one.shape[-1]]
            resized = F.interpolate(cropped[None, None], size=(image_height, image_width), mode="bicubic", align_corners=False)
            depths.append(resized[0, 0].cpu().numpy().astype(np.float32))
        return depths


def _shape_batches(shapes: Sequence[tuple[int, ...]], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches: full batches of one shape first (no padding), then the
    remainders of every shape, sorted by shape, in batches that will be padded."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for index, shape in enumerate(shapes):
        groups.setdefault(shape, []).append(index)
    batches: list[list[int]] = []
    remainders: list[int] = []
    for shape in sorted(groups):
        members = groups[shape]
        full = len(members) - len(members) % batch_size
        batches += [members[start : start + batch_size] for start in range(0, full, batch_size)]
        remainders += members[full:]
    batches += [remainders[start : start + batch_size] for start in range(0, len(remainders), batch_size)]
    return batches


def _model_fingerprint(model: str, network: torch.nn.Module) -> str:
    """Short hash that changes when the weights do: file contents for a local folder, else the hub revision."""
    folder = Path(model)
    digest = hashlib.sha256()
    if folder.is_dir():
        for weights in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")):
            digest.update(weights.name.encode())
            with open(weights, "rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(chunk)
    else:
        digest.update(str(getattr(network.config, "_commit_hash", None) or model).encode())
    return digest.hexdigest()[:12]


def _sun_millimetres(value: np.ndarray) -> np.ndarray:
    # SUN RGB-D stores millimetres rotated left by 3 bits within 16.
    value = value.astype(np.uint32)
    return ((value >> 3) | (value << 13)) & 0xFFFF


# How a uint16 depth PNG stores metres; 0 is "invalid" in all of them.
DEFAULT_DEPTH_ENCODING = "mm"  # what the synthetic world writes
DEPTH_ENCODINGS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "mm": lambda value: value / 1000.0,
    "tum": lambda value: value / 5000.0,
    "sun": lambda value: _sun_millimetres(value) / 1000.0,
}


def read_depth_png(path: str | os.PathLike[str], encoding: str = DEFAULT_DEPTH_ENCODING) -> np.ndarray:
    """A single-channel uint16 depth PNG as float32 metres (0 where invalid)."""
    if encoding not in DEPTH_ENCODINGS:
        raise PerceptioError(f"unknown depth encoding {encoding!r}; known: {', '.join(DEPTH_ENCODINGS)}")
    try:
        with fs.open_input(path) as handle, Image.open(handle) as image:
            value = np.array(image)
    except (OSError, ValueError) as error:
        raise PerceptioError(f"{path}: unreadable depth PNG ({error})") from error
    if value.ndim != 2 or not np.issubdtype(value.dtype, np.integer):
        raise PerceptioError(f"{path}: not a single-channel integer depth PNG (shape {value.shape}, {value.dtype})")
    return DEPTH_ENCODINGS[encoding](value).astype(np.float32)


def inverse_depth_from_metres(metres: np.ndarray) -> np.ndarray:
    """1/metres where depth is valid (> 0, finite); 0 elsewhere ("no depth", as far as it goes)."""
    valid = np.isfinite(metres) & (metres > 0)
    inverse = np.zeros(metres.shape, dtype=np.float32)
    inverse[valid] = 1.0 / metres[valid]
    return inverse


class OracleTeacher:
    """Ground truth as a teacher: ``depth_dir/{stem}.png`` (uint16 mm, 0 invalid) -> 1/metres.

    Invalid pixels come out as 0, which the tokenizer treats as "no depth" (farthest) and the
    metrics leave out. ``depth_dir`` may be an object-store URL (:mod:`perceptio.fs`).
    """

    def __init__(self, depth_dir: str | os.PathLike[str]) -> None:
        self.depth_dir = fs.as_location(depth_dir)
        if not fs.is_dir(self.depth_dir):
            raise PerceptioError(f"{self.depth_dir}: no ground-truth depth folder")

    @property
    def identity(self) -> str:
        where = self.depth_dir if fs.is_remote(self.depth_dir) else Path(self.depth_dir).resolve()
        return f"gt-depth:{where}"

    def depth_path(self, image_path: str | os.PathLike[str]) -> Path | str:
        return fs.child(self.depth_dir, f"{fs.stem(image_path)}.png")

    def predict_paths(
        self, paths: Sequence[str | os.PathLike[str]], sizes: Sequence[tuple[int, int]] | None = None
    ) -> list[np.ndarray]:
        """Inverse depth of the images at ``paths``; ``sizes`` ((width, height) per image), when given,
        must match the depth maps'. It finds depth by the image's file name, so it takes paths, not pixels."""
        depths = []
        for index, path in enumerate(paths):
            depth_path = self.depth_path(path)
            if not fs.is_file(depth_path):
                raise PerceptioError(f"{path}: no ground-truth depth at {depth_path}")
            depth = inverse_depth_from_metres(read_depth_png(depth_path))
            if sizes is not None and depth.shape != (sizes[index][1], sizes[index][0]):
                raise PerceptioError(f"{path}: depth {depth.shape[::-1]} and image {tuple(sizes[index])} differ in size")
            depths.append(depth)
        return depths
