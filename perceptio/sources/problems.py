"""Bad input found by the dataset readers, and the one way they open an image.

The readers never stop on a single broken record: they describe it as a :class:`Problem` (what kind,
which id, why) and go on where that is safe. Images are checked lazily, because decoding every
image of a real dataset up front would take longer than curating it: :func:`decode_image` opens
one image completely (a truncated JPEG fails here, not later in a worker) and raises
:class:`BadImage`, which carries the :class:`Problem` so that a caller can record it and skip.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from perceptio import fs
from perceptio.errors import PerceptioError


@dataclass(frozen=True)
class Problem:
    """One bad input: ``kind`` (e.g. ``"missing_image"``), the offending ``id``, and why."""

    kind: str
    id: int | str
    reason: str
    split: str | None = None  # the split of the dropped ref, when the input said it

    def __str__(self) -> str:
        return f"{self.kind} {self.id}: {self.reason}"


class BadImage(PerceptioError):
    """An image (or label map) that cannot be decoded; ``problem`` says which and why."""

    def __init__(self, problem: Problem):
        super().__init__(str(problem))
        self.problem = problem


def percent_text(part: int, whole: int) -> str:
    """``part`` as a share of ``whole`` for a warning: "11%", never "0%" or "100%" unless exact."""
    share = 100.0 * part / whole
    if 0 < share < 1:
        return "<1%"
    if 99 < share < 100:
        return ">99%"
    return f"{share:.0f}%"


def read_image_bytes(path: Path | str, item_id: int | str) -> bytes:
    """The bytes of an image file (local or on an object store); :class:`BadImage` when it is missing."""
    try:
        return fs.read_bytes(path)
    except (FileNotFoundError, IsADirectoryError) as error:
        raise BadImage(Problem("missing_image", item_id, f"{path} does not exist")) from error


def decode_image(
    path: Path | str, item_id: int | str, expected_size: tuple[int, int] | None = None, data: bytes | None = None
) -> Image.Image:
    """Open and fully decode ``path``; raise :class:`BadImage` naming ``item_id`` when it is unusable.

    ``expected_size`` is ``(width, height)`` as the annotations state it: masks are drawn at that
    size, so an image of another size would pair every mask with the wrong pixels. ``data``, when
    given, are the file's bytes already read (:func:`read_image_bytes`), so that a remote file is
    fetched once.
    """
    if data is None and fs.is_remote(path):
        data = read_image_bytes(path, item_id)  # one GET instead of many small range reads
    if data is None and not fs.local_path(path).is_file():
        raise BadImage(Problem("missing_image", item_id, f"{path} does not exist"))
    try:
        with Image.open(io.BytesIO(data) if data is not None else fs.local_path(path)) as image:
            # load() decodes every byte; Image.open alone reads only the header, and a truncated
            # file would otherwise fail much later, wherever the pixels are first touched.
            image.load()
            decoded = image.copy()
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as error:
        raise BadImage(Problem("corrupt_image", item_id, f"{path} cannot be decoded: {error}")) from error
    if expected_size is not None and decoded.size != tuple(expected_size):
        width, height = expected_size
        raise BadImage(
            Problem(
                "size_mismatch",
                item_id,
                f"{path} is {decoded.width}x{decoded.height}, the annotations say {width}x{height}",
            )
        )
    return decoded
