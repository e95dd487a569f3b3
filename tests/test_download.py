"""``perceptio-curate download`` against a loopback HTTP server serving archives of the synthetic world.

The server (127.0.0.1, one thread per request, shut down by the fixture) serves byte ranges, logs
every request, and can be told to drop the connection half-way through a file.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import threading
import zipfile
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from perceptio.sources.ade20k import ADE20kDataset
from perceptio.sources.refer import ReferDataset
from perceptio.sources.synth.world import generate_world
from perceptio.errors import PerceptioError
from perceptio.sources.archives import extract
from perceptio.sources.download import LOCK_FILE, Downloader, DownloadOptions

FAST = DownloadOptions(retries=2, backoff_seconds=0.01, timeout_seconds=10)


@dataclass
class Served:
    """What the loopback server serves and what it saw."""

    files: dict[str, bytes] = field(default_factory=dict)
    drop_first_get_after: dict[str, int] = field(default_factory=dict)  # path -> bytes sent before dropping
    requests: list[tuple[str, str | None]] = field(default_factory=list)  # (path, Range header)


def _handler(served: Served) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:  # keep pytest output clean
            pass

        def do_GET(self) -> None:  # noqa: N802  (http.server's name)
            served.requests.append((self.path, self.headers.get("Range")))
            body = served.files.get(self.path)
            if body is None:
                self.send_error(404)
                return
            start = 0
            header = self.headers.get("Range")
            if header:
                start = int(header.split("=")[1].split("-")[0])
                if start >= len(body):
                    self.send_error(416)
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            else:
                self.send_response(200)
            self.send_header("Content-Length", str(len(body) - start))
            self.end_headers()
            cut = served.drop_first_get_after.pop(self.path, None)
            if cut is not None:
                self.wfile.write(body[start : start + cut])
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)  # the client sees a short body
                return
            self.wfile.write(body[start:])

    return Handler


@pytest.fixture
def server():
    served = Served()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(served))
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        yield base, served
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("world") / "w"
    generate_world(root, images=20, seed=3, workers=1)
    return root


def _zip_folder(folder: Path, arc_root: str) -> bytes:
    """A zip whose members are ``arc_root/<path below folder>``, like the distributed archives."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                archive.write(path, f"{arc_root}/{path.relative_to(folder).as_posix()}")
    return buffer.getvalue()


def _dead_url() -> str:
    """An address where nothing listens (a port just released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/gone.zip"


def _manifest(folder: Path, dataset: str, files: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{dataset}.json").write_text(json.dumps({"dataset": dataset, "files": files}))


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _serve_world(world: Path, base: str, served: Served, manifests: Path, publish_refcoco: bool = False) -> None:
    """Serve refcoco.zip, train2014.zip, the ADE zip and its class table; write their manifests."""
    refcoco = _zip_folder(world / "refcoco", "refcoco")
    coco = _zip_folder(world / "images/mscoco/images/train2014", "train2014")
    ade_folder = world / "ADEChallengeData2016"
    ade_buffer = io.BytesIO()
    with zipfile.ZipFile(ade_buffer, "w") as archive:  # the real zip has no objectInfo150.csv
        for path in sorted(ade_folder.rglob("*")):
            if path.is_file() and path.name != "objectInfo150.csv":
                archive.write(path, f"ADEChallengeData2016/{path.relative_to(ade_folder).as_posix()}")
    ade = ade_buffer.getvalue()
    table = (ade_folder / "objectInfo150.csv").read_bytes()
    served.files.update({"/refcoco.zip": refcoco, "/train2014.zip": coco, "/ade.zip": ade, "/objectInfo150.csv": table})
    big = 1 << 30
    _manifest(manifests, "refcoco", [{
        "name": "refcoco.zip", "urls": [f"{base}/refcoco.zip"],
        "size": len(refcoco) if publish_refcoco else None, "sha256": _sha256(refcoco) if publish_refcoco else None,
        "extract": {"to": ".", "provides": ["refcoco"], "max_unpacked_bytes": big},
    }])
    _manifest(manifests, "coco2014", [{
        "name": "train2014.zip", "urls": [f"{base}/train2014.zip"], "size": len(coco), "sha256": _sha256(coco),
        "extract": {"to": "images/mscoco/images", "provides": ["train2014"], "max_unpacked_bytes": big},
    }])
    git_sha1 = hashlib.sha1(f"blob {len(table)}\0".encode() + table).hexdigest()
    _manifest(manifests, "ade20k", [
        {"name": "ADEChallengeData2016.zip", "urls": [f"{base}/ade.zip"], "size": len(ade), "sha256": _sha256(ade),
         "extract": {"to": ".", "provides": ["ADEChallengeData2016"], "max_unpacked_bytes": big}},
        {"name": "objectInfo150.csv", "urls": [f"{base}/objectInfo150.csv"], "size": len(table), "git_sha1": git_sha1,
         "place": "ADEChallengeData2016/objectInfo150.csv"},
    ])


def test_download_builds_the_readers_layout_and_a_rerun_is_a_noop(world, server, tmp_path):
    base, served = server
    manifests, root = tmp_path / "manifests", tmp_path / "data"
    _serve_world(world, base, served, manifests)
    reports = Downloader(root, FAST, manifests, log=lambda line: None).run(["refcoco", "coco2014", "ade20k"])
    assert [report.installed for report in reports] == [1, 1, 2]
    assert reports[0].recorded == ["refcoco.zip"]  # no published checksum: the first download is recorded

    refer = ReferDataset(root, "refcoco", "unc")
    expected = ReferDataset(world, "refcoco", "unc")
    assert refer.counts() == expected.counts()
    ref = refer.refs_in_split(refer.splits[0])[0]
    assert refer.load_image(ref.image_id).size == expected.load_image(ref.image_id).size
    ade = ADE20kDataset(root)
    assert len(ade.classes) == len(ADE20kDataset(world).classes)
    assert [s.name for s in ade.samples("training")] == [s.name for s in ADE20kDataset(world).samples("training")]
    lock = json.loads((root / LOCK_FILE).read_text())["files"]
    assert lock["refcoco/refcoco.zip"]["sha256"] == _sha256(served.files["/refcoco.zip"])
    assert not any((root / ".downloads").iterdir())  # archives are deleted once unpacked

    seen = len(served.requests)
    again = Downloader(root, FAST, manifests, log=lambda line: None).run(["refcoco", "coco2014", "ade20k"])
    assert len(served.requests) == seen  # not one request
    assert [(r.installed, r.skipped) for r in again] == [(0, 1), (0, 1), (0, 2)]


def test_interrupted_download_resumes_with_range(world, server, tmp_path):
    base, served = server
    manifests, root = tmp_path / "manifests", tmp_path / "data"
    _serve_world(world, base, served, manifests, publish_refcoco=True)
    size = len(served.files["/refcoco.zip"])
    served.drop_first_get_after["/refcoco.zip"] = size // 2
    logged: list[str] = []
    Downloader(root, FAST, manifests, log=logged.append).run(["refcoco"])
    assert served.requests == [("/refcoco.zip", None), ("/refcoco.zip", f"bytes={size // 2}-")]
    assert any("resuming" in line for line in logged)
    assert (root / "refcoco" / "refs(unc).p").is_file()


def test_corrupted_archive_is_refused_in_one_line_and_nothing_is_extracted(world, server, tmp_path):
    base, served = server
    manifests, root = tmp_path / "manifests", tmp_path / "data"
    _serve_world(world, base, served, manifests, publish_refcoco=True)
    body = bytearray(served.files["/refcoco.zip"])
    body[len(body) // 3] ^= 0xFF
    served.files["/refcoco.zip"] = bytes(body)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    result = subprocess.run(
        [sys.executable, "-c", "from perceptio.curate.cli import main; main()", "download", "refcoco",
         "--root", str(root), "--manifest-dir", str(manifests), "--retries", "1"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "sha256" in errors[0] and "Traceback" not in result.stderr
    assert not (root / "refcoco").exists()
    assert not (root / LOCK_FILE).exists()


def test_damaged_archive_without_a_published_checksum_is_not_recorded(world, server, tmp_path):
    base, served = server
    manifests, root = tmp_path / "manifests", tmp_path / "data"
    _serve_world(world, base, served, manifests)  # refcoco has no published checksum
    archive = zipfile.ZipFile(io.BytesIO(served.files["/refcoco.zip"]))
    first = archive.infolist()[0]
    body = bytearray(served.files["/refcoco.zip"])
    body[first.header_offset + 30 + len(first.filename) + 5] ^= 0xFF  # inside the first member's data
    served.files["/refcoco.zip"] = bytes(body)
    with pytest.raises(PerceptioError, match="damaged archive|not a readable archive"):
        Downloader(root, FAST, manifests, log=lambda line: None).run(["refcoco"])
    assert not (root / "refcoco").exists() and not (root / LOCK_FILE).exists()


def test_later_download_must_match_the_recorded_checksum(world, server, tmp_path):
    base, served = server
    manifests, root = tmp_path / "manifests", tmp_path / "data"
    _serve_world(world, base, served, manifests)
    Downloader(root, FAST, manifests, log=lambda line: None).run(["refcoco"])
    shutil.rmtree(root / "refcoco")  # the install is gone: the next run fetches again
    served.files["/refcoco.zip"] = _zip_folder(world / "refcocog", "refcoco")  # the mirror now serves other bytes
    with pytest.raises(PerceptioError, match="first verified download"):
        Downloader(root, FAST, manifests, log=lambda line: None).run(["refcoco"])


def test_dead_first_mirror_falls_back_to_the_second(world, server, tmp_path):
    base, served = server
    manifests, root = tmp_path / "manifests", tmp_path / "data"
    _serve_world(world, base, served, manifests, publish_refcoco=True)
    spec = json.loads((manifests / "refcoco.json").read_text())
    spec["files"][0]["urls"] = [_dead_url(), f"{base}/missing.zip", f"{base}/refcoco.zip"]
    (manifests / "refcoco.json").write_text(json.dumps(spec))
    logged: list[str] = []
    Downloader(root, FAST, manifests, log=logged.append).run(["refcoco"])
    assert (root / "refcoco" / "instances.json").is_file()
    assert [path for path, _ in served.requests] == ["/missing.zip", "/refcoco.zip"]
    assert sum("trying the next mirror" in line for line in logged) == 2


def test_from_archives_verifies_and_makes_no_request(world, server, tmp_path):
    base, served = server
    manifests, root, archives = tmp_path / "manifests", tmp_path / "data", tmp_path / "zips"
    _serve_world(world, base, served, manifests, publish_refcoco=True)
    archives.mkdir()
    body = bytearray(served.files["/refcoco.zip"])
    body[-40] ^= 0xFF
    (archives / "refcoco.zip").write_bytes(bytes(body))
    with pytest.raises(PerceptioError, match="sha256"):
        Downloader(root, FAST, manifests, from_archives=archives, log=lambda line: None).run(["refcoco"])
    assert not (root / "refcoco").exists()
    (archives / "refcoco.zip").write_bytes(served.files["/refcoco.zip"])
    Downloader(root, FAST, manifests, from_archives=archives, log=lambda line: None).run(["refcoco"])
    assert served.requests == []
    assert (archives / "refcoco.zip").is_file()  # the user's archive is left alone
    with pytest.raises(PerceptioError, match="missing train2014.zip"):
        Downloader(root, FAST, manifests, from_archives=archives, log=lambda line: None).run(["coco2014"])


def test_images_dir_is_recorded_and_used_by_the_reader(world, server, tmp_path):
    base, served = server
    manifests, root = tmp_path / "manifests", tmp_path / "data"
    _serve_world(world, base, served, manifests)
    elsewhere = world / "images/mscoco/images/train2014"
    Downloader(root, FAST, manifests, log=lambda line: None).run(["refcoco", "coco2014"], images_dir=elsewhere)
    assert [path for path, _ in served.requests] == ["/refcoco.zip"]  # coco2014 skipped
    refer = ReferDataset(root, "refcoco", "unc")
    assert refer.image_dir == elsewhere.resolve()
    assert not (root / "images").exists()
    ref = refer.refs[0]
    assert refer.check_image(ref.image_id) is None


# -- unsafe archives ---------------------------------------------------------------------------------


def _zip_with(members: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
        for name, target in (links or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (0o120777 << 16)  # a symlink, as Info-ZIP stores it
            archive.writestr(info, target)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "members, links, reason",
    [
        ({"refcoco/ok.txt": b"x", "refcoco/../../evil.txt": b"x"}, None, "climbs out"),
        ({"/etc/evil.txt": b"x"}, None, "absolute path"),
        ({"refcoco/ok.txt": b"x"}, {"refcoco/link": "../../outside"}, "outside the target"),
        ({"refcoco/ok.txt": b"x"}, {"refcoco/link": "/etc/passwd"}, "absolute path"),
    ],
)
def test_unsafe_zip_members_are_refused_before_anything_is_written(tmp_path, members, links, reason):
    archive = tmp_path / "crafted.zip"
    archive.write_bytes(_zip_with(members, links))
    target = tmp_path / "data"
    target.mkdir()
    with pytest.raises(PerceptioError, match=reason):
        extract(archive, target, max_unpacked_bytes=1 << 20)
    assert list(target.iterdir()) == [] and not (tmp_path / "evil.txt").exists()


def test_tar_symlink_out_and_oversize_archives_are_refused(tmp_path):
    archive = tmp_path / "crafted.tar"
    with tarfile.open(archive, "w") as handle:
        info = tarfile.TarInfo("refcoco/link")
        info.type, info.linkname = tarfile.SYMTYPE, "../../../home"
        handle.addfile(info)
    target = tmp_path / "data"
    target.mkdir()
    with pytest.raises(PerceptioError, match="outside the target"):
        extract(archive, target, max_unpacked_bytes=1 << 20)
    big = tmp_path / "big.zip"
    big.write_bytes(_zip_with({"refcoco/zeros.bin": bytes(4096)}))
    with pytest.raises(PerceptioError, match="more than the manifest allows"):
        extract(big, target, max_unpacked_bytes=1000)
    assert list(target.iterdir()) == []


def test_crafted_archive_served_over_http_is_refused(server, tmp_path):
    base, served = server
    manifests, root = tmp_path / "manifests", tmp_path / "data"
    served.files["/refcoco.zip"] = _zip_with({"refcoco/instances.json": b"{}", "../escape.txt": b"x"})
    _manifest(manifests, "refcoco", [{"name": "refcoco.zip", "urls": [f"{base}/refcoco.zip"],
                                      "extract": {"to": ".", "provides": ["refcoco"], "max_unpacked_bytes": 1 << 20}}])
    with pytest.raises(PerceptioError, match="climbs out"):
        Downloader(root, FAST, manifests, log=lambda line: None).run(["refcoco"])
    assert not (tmp_path / "escape.txt").exists() and not (root / "refcoco").exists()


def test_safe_archive_with_an_inside_link_extracts(tmp_path):
    archive = tmp_path / "ok.zip"
    archive.write_bytes(_zip_with({"refcoco/a.txt": b"hello", "top.txt": b"t"}, {"refcoco/b.txt": "a.txt"}))
    target = tmp_path / "data"
    assert extract(archive, target, max_unpacked_bytes=1 << 20) == ["refcoco", "top.txt"]
    assert (target / "refcoco" / "b.txt").read_text() == "hello" and (target / "top.txt").read_text() == "t"


def test_shipped_manifests_name_mirrors_sources_and_limits():
    from perceptio.sources.download import available_datasets, load_manifest
    from perceptio.recipes import manifests_dir

    assert available_datasets() == ["ade20k", "coco2014", "hardblink", "refcoco", "refcoco+", "refcocog"]
    for dataset in available_datasets():
        raw = json.loads((manifests_dir() / "downloads" / f"{dataset}.json").read_text())
        assert raw["sources"]["urls"] and raw["sources"]["checksums"]  # where each came from
        for spec in load_manifest(dataset):
            assert len(spec.urls) >= 2 and all(url.startswith(("http://", "https://")) for url in spec.urls)
            assert (spec.place is None) != (spec.extract_to is None)
            if spec.extract_to is not None:
                assert spec.provides and spec.max_unpacked_bytes >= (spec.size or 0)
    hardblink = load_manifest("hardblink")
    assert len(hardblink) == 3 * 124 + 6 and all(spec.git_sha1 and spec.size for spec in hardblink)


def test_plain_progress_lines_report_bytes_per_second():
    from rich.console import Console

    from perceptio.curate.download_command import TransferDisplay

    buffer = io.StringIO()
    with TransferDisplay(Console(file=buffer, force_terminal=False), interval=0.0) as display:
        advance = display.start("refcoco", 4_000_000)
        advance(1_000_000)
        advance(1_000_000)
    lines = buffer.getvalue().splitlines()
    assert lines[-1].startswith("refcoco: 2.0 MB of 4.0 MB (50%), ") and lines[-1].endswith(" MB/s")


def test_a_part_left_by_a_killed_run_is_resumed(world, server, tmp_path):
    base, served = server
    manifests, root = tmp_path / "manifests", tmp_path / "data"
    _serve_world(world, base, served, manifests, publish_refcoco=True)
    body = served.files["/refcoco.zip"]
    (root / ".downloads").mkdir(parents=True)
    (root / ".downloads" / "refcoco.zip.part").write_bytes(body[:1000])
    Downloader(root, FAST, manifests, log=lambda line: None).run(["refcoco"])
    assert served.requests == [("/refcoco.zip", "bytes=1000-")]
    assert (root / "refcoco" / "instances.json").is_file()
