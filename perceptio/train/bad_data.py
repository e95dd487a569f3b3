"""Bad training data is skipped and counted, never fatal on its own (torch-free).

One bad file among thousands of shards must not cost a run. What cannot be read is skipped with one
warning line naming the file and the sample key, and counted:

- a shard that cannot be opened (it vanished, or is not readable) or whose tar is damaged or cut
  short: the shard from the damage on (counted once; the samples before it are used);
- a sample whose members do not decode (the JPEGs, the npy arrays, the json), lacks a member, or
  whose json lacks what the examples are built from: that sample.

The checks run where the example sequence is built, before shuffling, so a skip is part of the pure
function of the seed that exact resume replays: a resumed run skips the same samples at the same
places (quietly: the original run reported them) and reproduces the same batches. Images are
checked with a reduced-size JPEG decode (libjpeg's DCT scaling), which reads every byte of the
entropy-coded data, so truncated or garbled images are caught without paying for a full decode.

``--max-bad-samples`` (:class:`perceptio.train.config.BadSampleLimit`) bounds the damage: a count,
or a fraction of the samples read so far.
"""

from __future__ import annotations

import io
import json
import logging
import tarfile
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

from perceptio import fs
from perceptio.errors import PerceptioError
from perceptio.shards import ShardSample, iter_members, required_members

log = logging.getLogger(__name__)

IMAGE_MEMBERS = ("jpg", "marked.jpg")
DRAFT_SCALE = 8  # decode JPEGs at 1/8 size: every coefficient is still read, an eighth of the pixels made


@dataclass
class SkipCounter:
    """Samples read and skipped by one example stream; ``quiet`` while a resumed run replays."""

    read: int = 0  # samples taken from the tars, good or bad (a damaged tail counts as one)
    skipped: int = 0
    quiet: bool = False

    def skip(self, url: str, key: str, reason: str) -> None:
        self.skipped += 1
        if not self.quiet:
            log.warning("perceptio-train: skipped %s in %s: %s", key, url, reason)


def _shard_items(url: str) -> Iterator[tuple[str | None, dict[str, bytes] | Exception]]:
    """(key, members) of each sample of one tar in order; a damaged or unreadable rest comes last as
    (the last good key, the error)."""
    last_key = None
    try:
        with fs.open_input(url) as handle:
            for last_key, members in iter_members(handle):
                yield last_key, members
    except (tarfile.TarError, EOFError, OSError, PerceptioError) as error:
        yield last_key, error


def _counted(url: str, key: str | None, item: dict[str, bytes] | Exception, counter: SkipCounter) -> dict[str, Any] | None:
    """One item of :func:`_shard_items`, counted: the sample dict, or None for a damaged rest."""
    counter.read += 1
    if isinstance(item, Exception):
        where = f"the samples after {key}" if key else "the whole shard"
        counter.skip(url, where, f"unreadable tar ({type(item).__name__}: {item})")
        return None
    return {"__key__": key, "__url__": url, **item}


def read_shards(urls: Sequence[str], counter: SkipCounter, share: tuple[int, int] = (1, 0)) -> Iterator[dict[str, Any]]:
    """The samples of ``urls`` in order, as webdataset dicts of member bytes, past unreadable tars.

    ``share`` = (readers, reader): keep only the samples at positions ``reader`` mod ``readers`` (the
    sample-level split of a stream with fewer shards than readers). A sample, or an unreadable rest
    of a tar, is counted only by the reader whose position it falls on, so counts add up across readers.
    """
    readers, reader = share
    position = 0
    for url in urls:
        for key, item in _shard_items(url):
            position += 1
            if (position - 1) % readers == reader and (sample := _counted(url, key, item, counter)) is not None:
                yield sample


def read_shard(url: str, counter: SkipCounter, start: int = 0) -> Iterator[tuple[int, dict[str, Any]]]:
    """(index in the tar, sample) of one shard from sample ``start`` on. The samples before ``start``
    are passed over unchecked and uncounted (a resumed reader took them before it stopped); only the
    tar headers and bytes are read through, nothing is decoded."""
    for index, (key, item) in enumerate(_shard_items(url)):
        if index >= start and (sample := _counted(url, key, item, counter)) is not None:
            yield index, sample


def _check_image(data: bytes) -> None:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        image.draft("RGB", (max(1, image.width // DRAFT_SCALE), max(1, image.height // DRAFT_SCALE)))
        image.load()


class BadMember(ValueError):
    """A member is missing or its image does not decode (the message says which)."""


def check_members(raw: dict[str, Any]) -> None:
    """Raise :class:`BadMember` (or what the npy/json decoders raise) when a member is unusable."""
    if "json" not in raw:
        raise BadMember("no json member")
    # What a sample must hold depends on what it is (a text-only conversation has no jpg, a sample
    # curated without a depth teacher no depth members): the shard contract says, from its json.
    missing = [name for name in required_members(json.loads(raw["json"])) if name not in raw]
    if missing:
        raise BadMember(f"no {', '.join(missing)} member")
    members = {name: data for name, data in raw.items() if not name.startswith("__")}
    ShardSample.from_members(raw["__key__"], members)  # parses the npy arrays and the json
    for name in IMAGE_MEMBERS:
        if name in raw:
            try:
                _check_image(raw[name])
            except Exception as error:  # PIL raises many types for broken image data
                from PIL import UnidentifiedImageError

                detail = "not an image" if isinstance(error, UnidentifiedImageError) else f"{type(error).__name__}: {error}"
                raise BadMember(f"{name} does not decode ({detail})") from error


def guarded(expand: Callable[[dict[str, Any]], list[Any]], raw: dict[str, Any], counter: SkipCounter) -> list[Any]:
    """``expand(raw)`` after checking the members; [] (and a count) when the sample is bad.

    Anything raised while turning one sample's bytes into examples is that sample's fault: the
    warning says what, and ``--max-bad-samples`` stops a run where every sample fails.
    """
    try:
        check_members(raw)
        return expand(raw)
    except Exception as error:
        reason = str(error) if isinstance(error, BadMember) else f"{type(error).__name__}: {error}"
        counter.skip(raw.get("__url__", "?"), raw.get("__key__", "?"), reason)
        return []
