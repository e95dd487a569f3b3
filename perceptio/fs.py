"""Where data lives: local paths or filesystem URLs (``s3://``, ``gs://``, ``file://``), torch-free.

Every stage that takes a folder (``--out``, ``--data-root``, the trainer's ``--shards``) names it by
a *location*: a plain path, or a URL that fsspec understands (``s3://bucket/shards`` needs
``s3fs``, ``gs://`` needs ``gcsfs``). Local locations keep going through :mod:`perceptio.io`, so
nothing changes for them; remote ones go through fsspec.

How a write becomes visible (the commit):

- locally, a file is written under a hidden temporary name beside its target and renamed
  (:func:`perceptio.io.atomic_path`);
- on an object store there is no atomic rename (S3 "renames" by copy + delete), but one object
  upload is all-or-nothing: the object appears whole when the upload completes, or not at all. So
  a remote file is written to a local temporary file and uploaded in one ``put`` when complete.
  Several files that belong together (a shard's tar, parquet and ``_stats.json``) are committed by
  writing the marker last; readers of an object store ignore a shard without its marker.

Datasets are read through the same functions (``--data-root s3://bucket/coco``): a reader keeps its
root as a *data location*, a :class:`~pathlib.Path` for a local root (so local reading is exactly the
pathlib/os code it always was) or a URL string for a remote one, and builds every file's location
with :func:`child`; :func:`open_input`, :func:`list_dir`, :func:`is_file` and friends take either.

Object-store listings are read fresh every time (fsspec would cache them per process, while other
processes, e.g. curation's shard tasks, write to the same folder).
"""

from __future__ import annotations

import os
import posixpath
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator

from perceptio.errors import PerceptioError
from perceptio.io import atomic_path

Location = str | os.PathLike[str]
LOCAL_PROTOCOLS = ("file", "local")


def _text(location: Location) -> str:
    return os.fspath(location)


def is_remote(location: Location) -> bool:
    """True for a URL of another filesystem than the local one (``file://`` is local)."""
    protocol, separator, _ = _text(location).partition("://")
    return bool(separator) and protocol not in LOCAL_PROTOCOLS


def local_path(location: Location) -> Path:
    """The local path of a plain path or ``file://`` URL."""
    if is_remote(location):
        raise PerceptioError(f"{location} is not on the local filesystem")
    text = _text(location)
    return Path(text.partition("://")[2] if "://" in text else text)


def filesystem(location: Location) -> tuple[Any, str]:
    """The fsspec filesystem of a remote location and the location's path on it."""
    try:
        from fsspec.core import url_to_fs

        # No listing cache: other processes (shard tasks, a trainer) write to the same folders, and a
        # cached listing would hide their files even from a plain open.
        return url_to_fs(_text(location), use_listings_cache=False)
    except (ImportError, ValueError) as error:  # fsspec names the package to install for a protocol
        raise PerceptioError(f"cannot open {location}: {error}") from error


def join(location: Location, *names: str) -> str:
    """``location/name/...``, keeping a URL a URL (``Path`` would fold ``s3://`` into ``s3:/``)."""
    if is_remote(location):
        return posixpath.join(_text(location).rstrip("/"), *names)
    return str(local_path(location).joinpath(*names))


def as_location(location: Location) -> Path | str:
    """A data location: a ``Path`` for a plain path or ``file://`` URL, the URL itself for a remote one."""
    return _text(location).rstrip("/") if is_remote(location) else local_path(location)


def child(location: Location, *names: str) -> Path | str:
    """``location/name/...`` as a data location of the same kind (``Path`` stays ``Path``)."""
    if is_remote(location):
        return posixpath.join(_text(location).rstrip("/"), *names)
    return local_path(location).joinpath(*names)


def parent(location: Location) -> Path | str:
    """The folder holding ``location`` (``Path.parent`` would fold ``s3://`` into ``s3:``)."""
    return posixpath.dirname(_text(location).rstrip("/")) if is_remote(location) else local_path(location).parent


def name(location: Location) -> str:
    """The last component of a path or URL."""
    return posixpath.basename(_text(location).rstrip("/")) if is_remote(location) else local_path(location).name


def stem(location: Location) -> str:
    """The last component without its suffix, as ``Path.stem``."""
    return posixpath.splitext(name(location))[0]


def is_dir(location: Location) -> bool:
    if not is_remote(location):
        return local_path(location).is_dir()
    fs, path = filesystem(location)
    fs.invalidate_cache(path)
    return fs.isdir(path)


def is_file(location: Location) -> bool:
    if not is_remote(location):
        return local_path(location).is_file()
    fs, path = filesystem(location)
    return fs.isfile(path)


def exists(location: Location) -> bool:
    if not is_remote(location):
        return local_path(location).exists()
    fs, path = filesystem(location)
    fs.invalidate_cache(posixpath.dirname(path))
    return fs.exists(path)


def size(location: Location) -> int:
    """The size of a file in bytes."""
    if not is_remote(location):
        return local_path(location).stat().st_size
    fs, path = filesystem(location)
    return int(fs.size(path))


def list_names(folder: Location) -> list[str]:
    """The sorted names of the files directly in ``folder`` (not recursive); [] when it is missing."""
    if not is_remote(folder):
        directory = local_path(folder)
        return sorted(entry.name for entry in directory.iterdir() if entry.is_file()) if directory.is_dir() else []
    fs, path = filesystem(folder)
    fs.invalidate_cache(path)
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        return []
    return sorted(posixpath.basename(entry["name"].rstrip("/")) for entry in entries if entry["type"] == "file")


def list_dir(folder: Location) -> list[str]:
    """The names of every entry (files and folders) directly in ``folder``, unsorted, like ``os.listdir``
    (one call, not a stat per entry: an image folder may hold ~100k files)."""
    if not is_remote(folder):
        return os.listdir(local_path(folder))
    fs, path = filesystem(folder)
    fs.invalidate_cache(path)
    return [posixpath.basename(entry.rstrip("/")) for entry in fs.ls(path, detail=False)]


def find_files(folder: Location) -> list[Path | str]:
    """Every file under ``folder``, at any depth, as data locations; [] when it is missing."""
    if not is_remote(folder):
        directory = local_path(folder)
        return [path for path in directory.rglob("*") if path.is_file()] if directory.is_dir() else []
    fs, path = filesystem(folder)
    protocol = _text(folder).partition("://")[0]
    return [f"{protocol}://{found}" for found in fs.find(path)]


@contextmanager
def open_input(location: Location) -> Iterator[IO[bytes]]:
    """A binary file object to read ``location`` (seekable: object stores read by byte ranges)."""
    if not is_remote(location):
        with open(local_path(location), "rb") as handle:
            yield handle
        return
    fs, path = filesystem(location)
    with fs.open(path, "rb") as handle:
        yield handle


def read_bytes(location: Location) -> bytes:
    with open_input(location) as handle:
        return handle.read()


def read_text(location: Location) -> str:
    return read_bytes(location).decode("utf-8")


@contextmanager
def atomic_output(location: Location) -> Iterator[Path]:
    """A local file path to write; it becomes ``location`` whole when the block succeeds.

    Local: a temporary file beside the target, renamed. Remote: a temporary local file, uploaded in
    one put (an object store shows an object only once its upload completed). If the block raises,
    nothing appears at ``location``.
    """
    if not is_remote(location):
        with atomic_path(local_path(location)) as temporary:
            yield temporary
        return
    fs, path = filesystem(location)
    with tempfile.TemporaryDirectory(prefix="perceptio-upload-") as folder:
        temporary = Path(folder) / posixpath.basename(path)
        yield temporary
        fs.put_file(str(temporary), path)
    fs.invalidate_cache(posixpath.dirname(path))


def upload(local_file: Path, location: Location) -> None:
    """Copy a finished local file to ``location`` (one put on an object store, a rename-in locally)."""
    if not is_remote(location):
        with atomic_path(local_path(location)) as temporary:
            shutil.copyfile(local_file, temporary)
        return
    fs, path = filesystem(location)
    fs.put_file(str(local_file), path)
    fs.invalidate_cache(posixpath.dirname(path))


def write_bytes(location: Location, data: bytes) -> None:
    """Write ``data`` to ``location`` atomically (see :func:`atomic_output`)."""
    with atomic_output(location) as temporary:
        temporary.write_bytes(data)


def write_text(location: Location, text: str) -> None:
    write_bytes(location, text.encode("utf-8"))


def remove(location: Location) -> None:
    """Delete a file if it is there."""
    if not is_remote(location):
        local_path(location).unlink(missing_ok=True)
        return
    fs, path = filesystem(location)
    try:
        fs.rm_file(path)
    except FileNotFoundError:
        pass
    fs.invalidate_cache(posixpath.dirname(path))


def make_dirs(location: Location) -> None:
    """Create a local folder (object stores have no folders: a prefix exists once it holds a file)."""
    if not is_remote(location):
        local_path(location).mkdir(parents=True, exist_ok=True)
