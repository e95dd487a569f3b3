"""Folders that may also be Hugging Face Hub repositories: resolve an id to a local snapshot, push one.

``resolve_folder("org/name")`` goes through ``huggingface_hub.snapshot_download``, so files land in
the standard cache (``HF_HUB_CACHE``, ``HF_HOME``) and ``HF_HUB_OFFLINE=1`` serves them from there;
an existing local folder is returned as it is. Torch-free: every stage may use it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from perceptio.errors import PerceptioError


def looks_like_repo_id(name: str) -> bool:
    """``name`` or ``org/name`` with no path syntax (what the hub accepts as a model id)."""
    parts = name.split("/")
    return 1 <= len(parts) <= 2 and all(part and part not in (".", "..") for part in parts) and not name.startswith("~")


def resolve_folder(
    name_or_path: str | os.PathLike[str],
    revision: str | None = None,
    allow_patterns: Sequence[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """A local folder for ``name_or_path``: itself when it is a folder, else a hub snapshot of that id."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    name = str(name_or_path)
    if not looks_like_repo_id(name):
        raise PerceptioError(f"{name} is neither a folder nor a hub id (org/name)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

    try:
        return Path(
            snapshot_download(
                name, revision=revision, allow_patterns=list(allow_patterns) if allow_patterns else None, cache_dir=cache_dir
            )
        )
    except (HfHubHTTPError, HFValidationError, LocalEntryNotFoundError, OSError, ValueError) as error:
        offline = " (HF_HUB_OFFLINE is set: only the local cache was searched)" if os.environ.get("HF_HUB_OFFLINE") == "1" else ""
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise PerceptioError(f"{name} is not a local folder and could not be fetched from the hub{offline}: {first_line}") from error


def resolved_commit(name_or_path: str, revision: str | None = None, filename: str = "config.json") -> str:
    """The commit a hub id (at ``revision``) resolves to, from its cached ``filename``; "" for a local folder."""
    if Path(name_or_path).is_dir() or not looks_like_repo_id(name_or_path):
        return ""
    from huggingface_hub import hf_hub_download

    # The cache keeps files under snapshots/<commit>/: the folder's name is the commit.
    return Path(hf_hub_download(name_or_path, filename, revision=revision)).parent.name


def push_folder(
    folder: str | os.PathLike[str],
    repo_id: str,
    *,
    commit_message: str,
    private: bool | None = None,
    token: str | None = None,
    revision: str | None = None,
) -> str:
    """Create ``repo_id`` if needed and upload ``folder`` as one commit; return the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    commit = api.upload_folder(
        repo_id=repo_id, folder_path=str(folder), commit_message=commit_message, revision=revision, repo_type="model"
    )
    return str(getattr(commit, "commit_url", commit))
