"""perceptio.hub: hub ids resolve through the standard cache (offline here), folders push as one commit."""

from __future__ import annotations

from pathlib import Path

import pytest

from perceptio.errors import PerceptioError
from perceptio.hub import looks_like_repo_id, push_folder, resolve_folder

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fake_hub_cache(cache: Path, repo_id: str, files: dict[str, bytes], commit: str = COMMIT) -> Path:
    """The layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<commit>/...}."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, data in files.items():
        (snapshot / name).write_bytes(data)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def test_hub_id_resolves_from_the_cache_offline(tmp_path):
    snapshot = fake_hub_cache(tmp_path / "cache", "perceptio/depth-tok", {"config.json": b"{}"})
    assert resolve_folder("perceptio/depth-tok", cache_dir=tmp_path / "cache") == snapshot
    assert resolve_folder(snapshot) == snapshot  # a folder is itself
    with pytest.raises(PerceptioError, match="could not be fetched from the hub"):
        resolve_folder("perceptio/not-cached", cache_dir=tmp_path / "cache")
    with pytest.raises(PerceptioError, match="neither a folder nor a hub id"):
        resolve_folder(tmp_path / "no" / "such" / "folder")


def test_repo_id_syntax():
    assert looks_like_repo_id("org/name") and looks_like_repo_id("name")
    assert not looks_like_repo_id("a/b/c") and not looks_like_repo_id("../x") and not looks_like_repo_id("/abs")


def test_push_folder_creates_the_repo_and_uploads_one_commit(tmp_path, monkeypatch):
    import huggingface_hub

    calls: list[tuple[str, dict]] = []

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("init", {"token": token}))

        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))

        def upload_folder(self, **kwargs):
            calls.append(("upload_folder", kwargs))
            return type("Commit", (), {"commit_url": f"https://huggingface.co/{kwargs['repo_id']}/commit/{COMMIT}"})()

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    (tmp_path / "config.json").write_text("{}")
    url = push_folder(tmp_path, "org/tok", commit_message="depth tokenizer", private=True, token="t")
    assert url.endswith(COMMIT)
    assert [name for name, _ in calls] == ["init", "create_repo", "upload_folder"]
    assert calls[1][1]["private"] is True and calls[1][1]["exist_ok"] is True
    assert calls[2][1]["folder_path"] == str(tmp_path) and calls[2][1]["repo_id"] == "org/tok"


def test_depth_tokenizer_loads_from_a_hub_id_and_pushes(tmp_path, monkeypatch):
    import json

    import huggingface_hub
    import torch

    from perceptio.tokenize.config import MODEL_TYPE
    from perceptio.tokenize.vqvae import DepthVQVAE, DepthVQVAEConfig

    torch.manual_seed(0)
    tokenizer = DepthVQVAE(DepthVQVAEConfig())
    saved = tmp_path / "saved"
    tokenizer.save_pretrained(saved)
    assert json.loads((saved / "config.json").read_text())["model_type"] == MODEL_TYPE
    files = {name: (saved / name).read_bytes() for name in ("config.json", "model.safetensors")}
    cache = tmp_path / "hub-cache"
    fake_hub_cache(cache, "perceptio/depth-tokenizer", files)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    loaded = DepthVQVAE.from_pretrained("perceptio/depth-tokenizer")
    assert loaded.identity == tokenizer.identity  # model_type does not enter the identity

    uploaded: dict[str, object] = {}

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, **kwargs):
            uploaded["repo"] = repo_id

        def upload_folder(self, **kwargs):
            folder = Path(kwargs["folder_path"])
            uploaded["files"] = sorted(path.name for path in folder.iterdir())
            uploaded["card"] = (folder / "README.md").read_text()
            return type("Commit", (), {"commit_url": "https://huggingface.co/org/tok/commit/1"})()

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    assert tokenizer.push_to_hub("org/tok").endswith("/commit/1")
    assert uploaded["repo"] == "org/tok" and uploaded["files"] == ["README.md", "config.json", "model.safetensors"]
    assert tokenizer.identity in str(uploaded["card"])

    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (other / "model.safetensors").write_bytes(files["model.safetensors"])
    with pytest.raises(PerceptioError, match="not a depth tokenizer"):
        DepthVQVAE.from_pretrained(other)
