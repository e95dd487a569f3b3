"""Unpack a downloaded zip or tar safely and atomically (standard library only).

Archives come from the internet, so every member is checked before anything is written: a member
whose path is absolute or climbs with ``..``, a link that points outside the target folder, a
device or fifo, or a total unpacked size above the caller's allowance refuses the whole archive
with one :class:`~perceptio.errors.PerceptioError` line and writes nothing. Accepted archives are
unpacked into hidden folders beside the target and each top-level entry is renamed into place only
when all members are out (:func:`perceptio.io.atomic_directory`), so an interrupted extraction
leaves the previous state, never half a folder.
"""

from __future__ import annotations

import os
import posixpath
import stat
import tarfile
import zipfile
import zlib
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from perceptio.errors import PerceptioError
from perceptio.io import atomic_directory, atomic_path

COPY_CHUNK = 1 << 20
# What a damaged zip or tar raises while it is read.
_READ_ERRORS = (zipfile.BadZipFile, tarfile.TarError, zlib.error, OSError, EOFError)


@dataclass(frozen=True)
class Member:
    """One archive entry, as needed to check and place it."""

    name: str  # normalised relative POSIX path
    size: int
    kind: str  # "file", "dir" or "link"
    link_target: str = ""  # for links: the target as stored


def _normalised(archive: Path, raw_name: str) -> str:
    name = raw_name.replace("\\", "/")
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise PerceptioError(f"{archive.name}: refused: member {raw_name!r} has an absolute path")
    parts = [part for part in PurePosixPath(name).parts if part not in ("", ".")]
    if ".." in parts:
        raise PerceptioError(f"{archive.name}: refused: member {raw_name!r} climbs out of the target folder ('..')")
    if not parts:
        raise PerceptioError(f"{archive.name}: refused: member {raw_name!r} has an empty path")
    return "/".join(parts)


def _check_link(archive: Path, member: str, target: str) -> None:
    """A symlink must resolve inside the target folder (relative to the link's own folder)."""
    if target.startswith("/") or (len(target) > 1 and target[1] == ":"):
        raise PerceptioError(f"{archive.name}: refused: link {member!r} points to the absolute path {target!r}")
    resolved = posixpath.normpath(posixpath.join(posixpath.dirname(member), target))
    if resolved == ".." or resolved.startswith("../"):
        raise PerceptioError(f"{archive.name}: refused: link {member!r} points outside the target folder ({target!r})")


def _zip_members(archive: Path, handle: zipfile.ZipFile) -> list[Member]:
    members = []
    for info in handle.infolist():
        name = _normalised(archive, info.filename)
        mode = info.external_attr >> 16
        if stat.S_ISLNK(mode):
            target = handle.read(info).decode("utf-8", "replace")
            _check_link(archive, name, target)
            members.append(Member(name, 0, "link", target))
        elif info.is_dir():
            members.append(Member(name, 0, "dir"))
        else:
            members.append(Member(name, info.file_size, "file"))
    return members


def _tar_members(archive: Path, handle: tarfile.TarFile) -> list[Member]:
    members = []
    for info in handle.getmembers():
        name = _normalised(archive, info.name)
        if info.islnk():
            raise PerceptioError(f"{archive.name}: refused: member {info.name!r} is a hard link (not supported)")
        if info.issym():
            _check_link(archive, name, info.linkname)
            members.append(Member(name, 0, "link", info.linkname))
        elif info.isdir():
            members.append(Member(name, 0, "dir"))
        elif info.isfile():
            members.append(Member(name, info.size, "file"))
        else:
            raise PerceptioError(f"{archive.name}: refused: member {info.name!r} is a device or fifo, not a file")
    return members


def list_members(archive: Path) -> list[Member]:
    """Every member of a zip or tar, checked; raises PerceptioError on the first unsafe one."""
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as handle:
                members = _zip_members(archive, handle)
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive) as handle:
                members = _tar_members(archive, handle)
        else:
            raise PerceptioError(f"{archive.name}: not a zip or tar archive")
    except _READ_ERRORS as error:
        raise PerceptioError(f"{archive.name}: not a readable archive ({error})") from error
    names = {member.name for member in members if member.kind != "link"}
    for member in members:
        # A link inside the folder must name another member: a dangling one could be re-pointed later.
        if member.kind == "link":
            resolved = posixpath.normpath(posixpath.join(posixpath.dirname(member.name), member.link_target))
            if resolved not in names:
                raise PerceptioError(f"{archive.name}: refused: link {member.name!r} names no member of the archive")
    return members


def check_integrity(archive: Path) -> None:
    """Read every member once (zip CRCs, tar headers and lengths); a damaged archive raises."""
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as handle:
                broken = handle.testzip()
            if broken is not None:
                raise PerceptioError(f"{archive.name}: damaged archive (CRC error in {broken!r})")
            return
        with tarfile.open(archive) as handle:
            for info in handle:
                if info.isfile():
                    stream = handle.extractfile(info)
                    while stream is not None and stream.read(COPY_CHUNK):
                        pass
    except _READ_ERRORS as error:
        raise PerceptioError(f"{archive.name}: damaged archive ({error})") from error


def top_level_entries(members: list[Member]) -> list[str]:
    return sorted({member.name.split("/", 1)[0] for member in members})


def extract(archive: str | os.PathLike[str], target: str | os.PathLike[str], max_unpacked_bytes: int) -> list[str]:
    """Unpack ``archive`` into ``target`` after checking every member; return the top-level names.

    Each top-level entry replaces its namesake under ``target`` atomically (a folder by
    :func:`atomic_directory`, a file by :func:`atomic_path`).
    """
    archive, target = Path(archive), Path(target)
    members = list_members(archive)
    unpacked = sum(member.size for member in members)
    if unpacked > max_unpacked_bytes:
        raise PerceptioError(
            f"{archive.name}: refused: unpacks to {unpacked:,} bytes, more than the manifest allows ({max_unpacked_bytes:,})"
        )
    tops = top_level_entries(members)
    folders = {member.name.split("/", 1)[0] for member in members if "/" in member.name or member.kind == "dir"}
    with ExitStack() as stack:
        staged: dict[str, Path] = {}
        for top in tops:
            if top in folders:
                staged[top] = stack.enter_context(atomic_directory(target / top))
            else:
                staged[top] = stack.enter_context(atomic_path(target / top))
        try:
            _write_members(archive, members, staged)
        except _READ_ERRORS as error:  # the staged folders are removed: nothing half-written stays
            raise PerceptioError(f"{archive.name}: damaged archive ({error})") from error
    return tops


def _destination(staged: dict[str, Path], name: str) -> Path:
    top, _, rest = name.partition("/")
    return staged[top] / rest if rest else staged[top]


def _write_members(archive: Path, members: list[Member], staged: dict[str, Path]) -> None:
    by_name = {member.name: member for member in members}
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as handle:
            for info in handle.infolist():
                member = by_name[_normalised(archive, info.filename)]
                _place(member, staged, lambda info=info: handle.open(info))
    else:
        with tarfile.open(archive) as handle:
            for info in handle.getmembers():
                member = by_name[_normalised(archive, info.name)]
                _place(member, staged, lambda info=info: handle.extractfile(info))


def _place(member: Member, staged: dict[str, Path], open_member) -> None:
    destination = _destination(staged, member.name)
    if member.kind == "dir":
        destination.mkdir(parents=True, exist_ok=True)
        return
    destination.parent.mkdir(parents=True, exist_ok=True)
    if member.kind == "link":
        # Checked to stay inside by _check_link; a relative symlink keeps meaning after the rename.
        destination.unlink(missing_ok=True)
        os.symlink(member.link_target, destination)
        return
    with open_member() as source, open(destination, "wb") as sink:
        # Never write more than the header declared: the allowance check relied on it.
        copied = 0
        while chunk := source.read(COPY_CHUNK):
            copied += len(chunk)
            if copied > member.size:
                raise PerceptioError(f"member {member.name!r} holds more bytes than its header declares")
            sink.write(chunk)
