"""Fetch the datasets' files from mirror lists, verify them, and install them in the readers' layout.

``manifests/downloads/<dataset>.json`` lists each file a dataset needs: its mirrors (original URL
first, archived copies and public mirrors after), its size and a published checksum where one
exists (``sha256``, or ``git_sha1`` for files served from a git repository), and either where an
archive unpacks (``extract``) or where a single file goes (``place``). Where nothing is published,
the first verified download records its sha256 and size in ``DATA_ROOT/downloads.lock.json``; a
later download (on this machine, or a teammate's with the same lock file) must match it.

Per file: skip it if the lock says it is installed and its paths exist (no request at all);
otherwise download into ``DATA_ROOT/.downloads/`` with HTTP Range resume and retries with
exponential backoff, falling back to the next mirror; verify (size, checksum, archive CRCs);
unpack with :mod:`perceptio.sources.archives` (checked members, atomic); record the lock entry.
Standard library only (urllib), so that it runs before anything heavy is installed.
"""

from __future__ import annotations

import hashlib
import http.client
import importlib.metadata
import json
import os
import shutil
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence
from urllib.parse import quote

from perceptio.errors import PerceptioError
from perceptio.io import atomic_path, write_text_atomic
from perceptio.recipes import manifests_dir
from perceptio.sources.archives import check_integrity, extract, list_members
from perceptio.sources.data_root import record_coco_image_dir

MANIFEST_FOLDER = "downloads"
LOCK_FILE = "downloads.lock.json"
STAGING_FOLDER = ".downloads"
COCO_IMAGES_DATASET = "coco2014"
CHUNK = 1 << 20
HASH_CHUNK = 8 << 20


@dataclass(frozen=True)
class FileSpec:
    """One file of a dataset's manifest."""

    dataset: str
    name: str
    urls: tuple[str, ...]
    size: int | None = None
    sha256: str | None = None
    git_sha1: str | None = None
    extract_to: str | None = None  # archives: folder under DATA_ROOT that receives the top-level entries
    provides: tuple[str, ...] = ()  # archives: the top-level entries it must yield
    max_unpacked_bytes: int = 0
    place: str | None = None  # single files: path under DATA_ROOT

    @property
    def key(self) -> str:
        return f"{self.dataset}/{self.name}"

    @property
    def basename(self) -> str:
        return self.name.rsplit("/", 1)[-1]

    def installed_paths(self, root: Path) -> list[Path]:
        if self.place is not None:
            return [root / self.place]
        return [root / (self.extract_to or ".") / entry for entry in self.provides]


@dataclass(frozen=True)
class DownloadOptions:
    retries: int = 5  # failed attempts in a row per mirror before the next one
    backoff_seconds: float = 2.0  # first wait; doubles after each failure, capped at 60 s
    timeout_seconds: float = 60.0  # socket timeout per read
    keep_archives: bool = False  # keep verified archives in DATA_ROOT/.downloads after unpacking


@dataclass
class DatasetReport:
    dataset: str
    installed: int = 0
    skipped: int = 0
    downloaded_bytes: int = 0
    recorded: list[str] = field(default_factory=list)  # files whose checksum was first recorded now


# -- manifests -------------------------------------------------------------------------------------


def available_datasets(manifest_dir: Path | None = None) -> list[str]:
    folder = manifest_dir or manifests_dir() / MANIFEST_FOLDER
    return sorted(path.stem for path in folder.glob("*.json"))


def load_manifest(dataset: str, manifest_dir: Path | None = None) -> list[FileSpec]:
    """The files of ``dataset`` from ``<manifest_dir>/<dataset>.json`` (default manifests/downloads)."""
    folder = manifest_dir or manifests_dir() / MANIFEST_FOLDER
    path = folder / f"{dataset}.json"
    if not path.is_file():
        known = ", ".join(available_datasets(folder)) or "none"
        raise PerceptioError(f"no download manifest for {dataset!r} in {folder} (known: {known})")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        return [_file_spec(dataset, manifest, entry) for entry in manifest["files"]]
    except (ValueError, KeyError, TypeError) as error:
        raise PerceptioError(f"{path}: malformed download manifest ({type(error).__name__}: {error})") from error


def _file_spec(dataset: str, manifest: dict[str, Any], entry: dict[str, Any]) -> FileSpec:
    name = entry["name"]
    urls = entry.get("urls") or [mirror.format(name=quote(name)) for mirror in manifest.get("mirrors", [])]
    if not urls:
        raise KeyError(f"{name}: no urls and no mirrors")
    unpack = entry.get("extract")
    place = entry.get("place") or (None if unpack else manifest["place"].format(name=name))
    return FileSpec(
        dataset=dataset,
        name=name,
        urls=tuple(urls),
        size=entry.get("size"),
        sha256=entry.get("sha256"),
        git_sha1=entry.get("git_sha1"),
        extract_to=unpack["to"] if unpack else None,
        provides=tuple(unpack["provides"]) if unpack else (),
        max_unpacked_bytes=int(unpack["max_unpacked_bytes"]) if unpack else 0,
        place=place,
    )


# -- the lock file ---------------------------------------------------------------------------------


class Lock:
    """``DATA_ROOT/downloads.lock.json``: per file, the verified size and sha256 and what it installed."""

    def __init__(self, root: Path):
        self.path = root / LOCK_FILE
        self.entries: dict[str, dict[str, Any]] = {}
        if self.path.is_file():
            try:
                self.entries = json.loads(self.path.read_text(encoding="utf-8"))["files"]
            except (OSError, ValueError, KeyError, TypeError) as error:
                raise PerceptioError(f"{self.path} is not a readable lock file: {error}") from error

    def get(self, spec: FileSpec) -> dict[str, Any] | None:
        return self.entries.get(spec.key)

    def record(self, spec: FileSpec, sha256: str, size: int, source: str) -> None:
        self.entries[spec.key] = {
            "sha256": sha256,
            "size": size,
            "source": source,
            "published_checksum": bool(spec.sha256 or spec.git_sha1),
            "verified_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        document = {"format": "perceptio-download-lock", "version": 1, "files": dict(sorted(self.entries.items()))}
        write_text_atomic(self.path, json.dumps(document, indent=2) + "\n")


def is_installed(spec: FileSpec, root: Path, lock: Lock) -> bool:
    """Installed: locked with the manifest's checksum (when published) and every installed path present."""
    entry = lock.get(spec)
    if entry is None or (spec.sha256 and entry.get("sha256") != spec.sha256):
        return False
    if spec.size is not None and entry.get("size") != spec.size:
        return False
    return all(path.exists() for path in spec.installed_paths(root))


# -- verification ----------------------------------------------------------------------------------


def file_digests(path: Path) -> tuple[str, str]:
    """(sha256, git blob sha1) of a file in one pass."""
    size = path.stat().st_size
    sha256, git_sha1 = hashlib.sha256(), hashlib.sha1()
    git_sha1.update(f"blob {size}\0".encode())
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            sha256.update(chunk)
            git_sha1.update(chunk)
    return sha256.hexdigest(), git_sha1.hexdigest()


def verify(spec: FileSpec, path: Path, lock: Lock) -> str:
    """Check ``path`` against the published size/checksum, else the lock; return its sha256.

    Archives are also listed (unsafe members refuse them) and, when no checksum vouches for the
    bytes, read through once so that a damaged archive is caught before its first lock entry.
    """
    size = path.stat().st_size
    locked = lock.get(spec)
    if spec.size is not None and size != spec.size:
        raise PerceptioError(f"{spec.name}: {size:,} bytes, the manifest says {spec.size:,}")
    if spec.size is None and locked and size != locked.get("size"):
        raise PerceptioError(
            f"{spec.name}: {size:,} bytes, the first verified download recorded in {lock.path} had {locked.get('size'):,}"
        )
    sha256, git_sha1 = file_digests(path)
    if spec.sha256 and sha256 != spec.sha256:
        raise PerceptioError(f"{spec.name}: sha256 {sha256[:16]}... does not match the published {spec.sha256[:16]}...")
    if spec.git_sha1 and git_sha1 != spec.git_sha1:
        raise PerceptioError(f"{spec.name}: git blob id {git_sha1[:12]} does not match the published {spec.git_sha1[:12]}")
    if not (spec.sha256 or spec.git_sha1) and locked and sha256 != locked.get("sha256"):
        raise PerceptioError(
            f"{spec.name}: sha256 {sha256[:16]}... differs from the first verified download recorded in {lock.path} "
            f"({str(locked.get('sha256'))[:16]}...)"
        )
    if spec.extract_to is not None:
        list_members(path)
        if not (spec.sha256 or spec.git_sha1 or locked):
            check_integrity(path)
    return sha256


# -- HTTP with resume, retries and mirrors ---------------------------------------------------------


class _Interrupted(Exception):
    """A transfer that stopped early (connection dropped, timeout, short body): resume it."""


class _MirrorFailed(Exception):
    """This mirror cannot serve the file (404, refused, ...): try the next one."""


def _user_agent() -> str:
    try:
        return f"perceptio/{importlib.metadata.version('perceptio')}"
    except importlib.metadata.PackageNotFoundError:  # a checkout on PYTHONPATH, not installed
        return "perceptio"


def _fetch_once(url: str, part: Path, options: DownloadOptions, progress: Callable[[int], None]) -> None:
    """One request: continue ``part`` from its current size with a Range request when it has bytes."""
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": _user_agent(), "Accept-Encoding": "identity"})
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        response = urllib.request.urlopen(request, timeout=options.timeout_seconds)
    except urllib.error.HTTPError as error:
        if error.code == 416 and have:
            return  # nothing left to send: the part is complete (verification decides)
        if error.code in (408, 425, 429) or error.code >= 500:
            raise _Interrupted(f"HTTP {error.code}") from error
        raise _MirrorFailed(f"HTTP {error.code}") from error
    except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
        raise _Interrupted(str(getattr(error, "reason", error))) from error
    with response:
        if have and response.status != 206:
            have = 0  # the server ignored Range: start over
        elif have:
            start = response.headers.get("Content-Range", "").split(" ")[-1].split("-")[0]
            if start != str(have):
                raise _MirrorFailed(f"Content-Range {response.headers.get('Content-Range')!r} does not continue byte {have}")
        length = response.headers.get("Content-Length")
        expected_end = have + int(length) if length is not None else None
        with open(part, "ab" if have else "wb") as sink:
            received = have
            try:
                while chunk := response.read(CHUNK):
                    sink.write(chunk)
                    received += len(chunk)
                    progress(len(chunk))
            except (OSError, http.client.HTTPException) as error:
                raise _Interrupted(f"connection dropped at byte {received:,} ({type(error).__name__})") from error
        if expected_end is not None and received < expected_end:
            raise _Interrupted(f"connection closed at byte {received:,} of {expected_end:,}")


def fetch(
    spec: FileSpec,
    part: Path,
    options: DownloadOptions,
    progress: Callable[[int], None],
    log: Callable[[str], None],
    accept: Callable[[Path, str], None],
) -> str:
    """Download ``spec`` into ``part`` from its mirrors in order; return the URL that served it.

    ``accept(part, url)`` verifies a complete download and raises PerceptioError to reject it; a
    rejected download is deleted and the next mirror tried.
    """
    failures = []
    for url in spec.urls:
        attempts, delay = 0, options.backoff_seconds
        while True:
            before = part.stat().st_size if part.exists() else 0
            try:
                _fetch_once(url, part, options, progress)
                accept(part, url)
                return url
            except _MirrorFailed as error:
                failures.append(f"{url}: {error}")
                break
            except PerceptioError as error:
                failures.append(f"{url}: {error}")
                part.unlink(missing_ok=True)
                break
            except _Interrupted as error:
                progressed = part.exists() and part.stat().st_size > before
                attempts = 0 if progressed else attempts + 1
                if attempts >= options.retries:
                    failures.append(f"{url}: {error} ({options.retries} attempts)")
                    break
                log(f"{spec.name}: {error}; retrying in {delay:.0f} s" + (" (resuming)" if part.exists() else ""))
                time.sleep(delay)
                delay = min(delay * 2, 60.0)
        log(f"{spec.name}: {failures[-1]}; trying the next mirror" if url != spec.urls[-1] else failures[-1])
    raise PerceptioError(f"{spec.name}: no mirror served a verified copy ({'; '.join(failures)})")


# -- installing ------------------------------------------------------------------------------------


def install(spec: FileSpec, source: Path, root: Path, keep_source: bool) -> None:
    """Unpack an archive (checked, atomic) or move a single file into place."""
    if spec.place is None:
        tops = extract(source, root / (spec.extract_to or "."), spec.max_unpacked_bytes)
        missing = sorted(set(spec.provides) - set(tops))
        if missing:
            raise PerceptioError(f"{spec.name}: unpacked, but it holds no {', '.join(missing)} (the manifest promises it)")
    else:
        with atomic_path(root / spec.place) as temporary:
            shutil.copyfile(source, temporary)
    if not keep_source:
        source.unlink(missing_ok=True)


@dataclass
class Downloader:
    """Downloads, verifies and installs the files of several datasets under one DATA_ROOT."""

    root: Path
    options: DownloadOptions = field(default_factory=DownloadOptions)
    manifest_dir: Path | None = None
    from_archives: Path | None = None
    log: Callable[[str], None] = print
    # Called with the total bytes to fetch (None when unknown) and returns a per-chunk callback.
    start_progress: Callable[[str, int | None], Callable[[int], None]] = lambda label, total: (lambda n: None)

    def run(self, datasets: Sequence[str], images_dir: Path | None = None) -> list[DatasetReport]:
        specs = {dataset: load_manifest(dataset, self.manifest_dir) for dataset in dict.fromkeys(datasets)}
        self.root.mkdir(parents=True, exist_ok=True)
        if images_dir is not None:
            folder = record_coco_image_dir(self.root, images_dir)
            self.log(f"COCO train2014 images: {folder} (recorded in {self.root / 'perceptio-data.json'})")
            if specs.pop(COCO_IMAGES_DATASET, None) is not None:
                self.log(f"{COCO_IMAGES_DATASET}: skipped, --images-dir gives the images")
        lock = Lock(self.root)
        return [self._run_dataset(dataset, files, lock) for dataset, files in specs.items()]

    def _run_dataset(self, dataset: str, files: list[FileSpec], lock: Lock) -> DatasetReport:
        report = DatasetReport(dataset)
        todo = [spec for spec in files if not is_installed(spec, self.root, lock)]
        report.skipped = len(files) - len(todo)
        if not todo:
            self.log(f"{dataset}: all {len(files)} file(s) already installed and verified")
            return report
        if self.from_archives is not None:
            self._check_archives_present(todo)
        sizes = [spec.size for spec in todo]
        total = None if self.from_archives is not None or None in sizes else sum(sizes)  # type: ignore[arg-type]
        advance = self.start_progress(dataset, total)

        def counted(n: int) -> None:
            report.downloaded_bytes += n
            advance(n)

        for spec in todo:
            sha256 = self._obtain_and_install(spec, lock, counted)
            report.installed += 1
            if not (spec.sha256 or spec.git_sha1) and sha256 is not None:
                report.recorded.append(spec.name)
        return report

    def _check_archives_present(self, todo: list[FileSpec]) -> None:
        assert self.from_archives is not None
        missing = [spec.basename for spec in todo if not (self.from_archives / spec.basename).is_file()]
        if missing:
            raise PerceptioError(f"--from-archives {self.from_archives}: missing {', '.join(missing)}")

    def _obtain_and_install(self, spec: FileSpec, lock: Lock, progress: Callable[[int], None]) -> str | None:
        """Get a verified copy of ``spec``, install it, lock it; return the sha256 when newly recorded."""
        first_record = lock.get(spec) is None
        if self.from_archives is not None:
            source = self.from_archives / spec.basename
            sha256 = verify(spec, source, lock)
            install(spec, source, self.root, keep_source=True)
            lock.record(spec, sha256, source.stat().st_size, f"file://{source.resolve()}")
            return sha256 if first_record else None

        staging = self.root / STAGING_FOLDER
        staging.mkdir(exist_ok=True)
        complete = staging / spec.basename
        verified: dict[str, str] = {}

        def accept(path: Path, url: str) -> None:
            verified["sha256"] = verify(spec, path, lock)
            verified["url"] = url

        if complete.is_file():
            try:  # an earlier run downloaded it but stopped before unpacking
                accept(complete, f"file://{complete.resolve()}")
            except PerceptioError:
                complete.unlink()
        if not verified:
            part = staging / f"{spec.basename}.part"
            if part.is_file():  # left by an interrupted run
                self.log(f"{spec.name}: resuming after {part.stat().st_size:,} bytes from an earlier run")
            fetch(spec, part, self.options, progress, self.log, accept)
            os.replace(part, complete)
        size = complete.stat().st_size
        install(spec, complete, self.root, keep_source=self.options.keep_archives)
        lock.record(spec, verified["sha256"], size, verified["url"])
        return verified["sha256"] if first_record else None
