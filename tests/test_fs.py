"""perceptio.fs: one set of file operations for local paths and object-store URLs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from perceptio import fs
from perceptio.errors import PerceptioError


def test_locations_keep_urls_urls(tmp_path):
    assert fs.join("s3://bucket/shards/", "a.tar") == "s3://bucket/shards/a.tar"
    assert fs.join(tmp_path, "a.tar") == str(tmp_path / "a.tar")
    assert fs.join(f"file://{tmp_path}", "a.tar") == str(tmp_path / "a.tar")
    assert fs.is_remote("gs://b/x") and fs.is_remote("s3://b") and not fs.is_remote(f"file://{tmp_path}")
    assert fs.name("s3://bucket/shards/") == "shards" and fs.name(tmp_path / "x.tar") == "x.tar"
    with pytest.raises(PerceptioError, match="not on the local"):
        fs.local_path("s3://bucket/x")
    with pytest.raises(PerceptioError, match="cannot open"):
        fs.filesystem("nosuchprotocol://bucket/x")


@pytest.mark.parametrize("remote", [False, True], ids=["local", "s3"])
def test_write_list_read_remove(remote, tmp_path, request):
    root = fs.join(request.getfixturevalue("s3_bucket"), "run") if remote else str(tmp_path / "run")
    assert fs.list_names(root) == [] and not fs.exists(fs.join(root, "a.json"))
    fs.make_dirs(root)
    fs.write_text(fs.join(root, "b.json"), "{}")
    fs.write_bytes(fs.join(root, "a.tar"), b"\x00" * 10)
    assert fs.list_names(root) == ["a.tar", "b.json"] and fs.is_dir(root)
    assert fs.read_text(fs.join(root, "b.json")) == "{}" and fs.read_bytes(fs.join(root, "a.tar")) == b"\x00" * 10
    with fs.open_input(fs.join(root, "a.tar")) as handle:
        handle.seek(8)
        assert handle.read() == b"\x00\x00"
    staged = tmp_path / "staged.bin"
    staged.write_bytes(b"uploaded")
    fs.upload(staged, fs.join(root, "c.bin"))
    assert fs.read_bytes(fs.join(root, "c.bin")) == b"uploaded"
    fs.remove(fs.join(root, "c.bin"))
    fs.remove(fs.join(root, "a.tar"))
    fs.remove(fs.join(root, "missing.tar"))
    assert fs.list_names(root) == ["b.json"]


@pytest.mark.parametrize("remote", [False, True], ids=["local", "s3"])
def test_failed_write_leaves_nothing(remote, tmp_path, request):
    root = fs.join(request.getfixturevalue("s3_bucket"), "run") if remote else str(tmp_path / "run")
    fs.make_dirs(root)
    with pytest.raises(RuntimeError):
        with fs.atomic_output(fs.join(root, "half.tar")) as temporary:
            temporary.write_bytes(b"half")
            raise RuntimeError("killed while writing")
    assert fs.list_names(root) == []
    # Another process's writes are seen at once, by a listing and by a plain read (no stale listing).
    fs.write_text(fs.join(root, "first.json"), "0")
    assert fs.list_names(root) == ["first.json"]
    other = fs.join(root, "other.json")
    script = f"from perceptio import fs; fs.write_text({other!r}, '1')"
    subprocess.run([sys.executable, "-c", script], check=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert fs.read_text(other) == "1" and fs.list_names(root) == ["first.json", "other.json"]
