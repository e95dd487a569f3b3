"""The depth stage's models as a curation run checks and records them, before any shard is made.

Every dataset command that writes depth members (the perception datasets, and LLaVA / GranD-f with a
``--depth-source``) resolves its ``--tokenizer`` here and records the tokenizer's identity in
``dataset.json`` the same way; the teacher itself is :class:`perceptio.curate.distributor.TeacherSpec`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from perceptio.errors import PerceptioError
from perceptio.hub import looks_like_repo_id, resolve_folder
from perceptio.tokenize.config import TOKENIZER_FILES


def resolve_tokenizer(tokenizer: Path) -> Path:
    """The tokenizer's local folder: ``tokenizer`` itself, or a hub id's cached snapshot."""
    if not tokenizer.is_dir() and not looks_like_repo_id(str(tokenizer)):
        raise PerceptioError(f"tokenizer folder {tokenizer} not found (train one with perceptio-tokenize)")
    return resolve_folder(tokenizer, allow_patterns=TOKENIZER_FILES)


def tokenizer_identity(tokenizer_dir: Path) -> dict[str, Any]:
    """Identity, weights checksum and normalisation of the tokenizer, for dataset.json and resume checks."""
    from perceptio.tokenize.vqvae import WEIGHTS_NAME, DepthVQVAE

    tokenizer = DepthVQVAE.from_pretrained(tokenizer_dir)
    digest = hashlib.sha256((tokenizer_dir / WEIGHTS_NAME).read_bytes()).hexdigest()
    config = tokenizer.config.to_dict()
    return {
        "identity": tokenizer.identity,
        "path": str(tokenizer_dir.resolve()),
        "sha256": digest,
        "normalization": {key: value for key, value in config.items() if "normal" in key or "percentile" in key},
        "num_codes": tokenizer.config.num_codes,
        "num_tokens": tokenizer.num_tokens,
    }
