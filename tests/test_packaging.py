"""Packaging: every imported package is declared, the lower bounds install together, ``python -m`` works."""

from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import subprocess
import sys
import venv
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

REPO = Path(__file__).resolve().parents[1]


def _project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def _distribution(requirement: str) -> str:
    return re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _imported_top_level_modules() -> set[str]:
    modules = set()
    for path in (REPO / "perceptio").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                modules.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    return modules - set(sys.stdlib_module_names) - {"perceptio"}


def test_every_imported_package_is_declared():
    declared = {_distribution(requirement) for requirement in _project()["dependencies"]}
    providers = importlib.metadata.packages_distributions()
    for module in sorted(_imported_top_level_modules()):
        distributions = {name.lower().replace("_", "-") for name in providers.get(module, [module])}
        assert distributions & declared, f"perceptio imports {module} ({', '.join(distributions)}) but pyproject.toml does not declare it"


def test_torch_is_a_range_and_the_exact_build_a_constraint():
    (torch,) = [requirement for requirement in _project()["dependencies"] if _distribution(requirement) == "torch"]
    assert "==" not in torch and ">=" in torch
    constraints = [line for line in (REPO / "constraints.txt").read_text().splitlines() if line and not line.startswith("#")]
    assert constraints == ["torch==2.13.0+cpu"]
    assert "-c constraints.txt" in (REPO / "Makefile").read_text()


def test_python_dash_m_perceptio_train_runs_the_command():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "perceptio.train", "--help"], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "--shards" in result.stdout


def minimum_requirements() -> list[str]:
    """Each dependency at its lower bound (``>=X`` becomes ``==X``); torch is left to the constraint."""
    pins = []
    for requirement in _project()["dependencies"]:
        if _distribution(requirement) == "torch":
            continue
        name = re.split(r"[<>=!~; ]", requirement, maxsplit=1)[0]
        floor = re.search(r">=\s*([^,; ]+)", requirement)
        assert floor, f"{requirement}: no lower bound"
        pins.append(f"{name}=={floor.group(1)}")
    return pins


# The imports and calls that the lower bounds were chosen for.
SMOKE = """
import perceptio.train.model, perceptio.train.tiny, perceptio.curate.cli, perceptio.evaluate.cli
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil
from peft import LoraConfig
LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices={"embed_tokens": [1, 2]})
print("ok")
"""


@pytest.mark.slow
def test_lower_bounds_install_together_and_import(tmp_path):
    """Install the minimum versions in a throwaway venv (torch: the exact build of constraints.txt)."""
    if os.environ.get("PERCEPTIO_SKIP_INSTALL_TESTS"):
        pytest.skip("PERCEPTIO_SKIP_INSTALL_TESTS is set")
    environment = tmp_path / "venv"
    venv.create(environment, with_pip=True)
    python = environment / "bin" / "python"
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", "-c", str(REPO / "constraints.txt")]
    if os.environ.get("TORCH_INDEX"):  # where the +cpu build lives when no local wheel provides it (the Makefile's default)
        pip += ["--extra-index-url", os.environ["TORCH_INDEX"]]
    install = subprocess.run([*pip, "torch", *minimum_requirements()], capture_output=True, text=True, timeout=900)
    if install.returncode != 0 and ("Could not find" in install.stderr or "No matching distribution" in install.stderr):
        pytest.skip(f"a package index is unreachable: {install.stderr.strip().splitlines()[-1]}")
    assert install.returncode == 0, install.stderr[-3000:]
    editable = subprocess.run([*pip, "--no-deps", "-e", str(REPO)], capture_output=True, text=True, timeout=600)
    assert editable.returncode == 0, editable.stderr[-3000:]
    check = subprocess.run([str(python), "-m", "pip", "check"], capture_output=True, text=True, timeout=300)
    assert check.returncode == 0, check.stdout
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    smoke = subprocess.run([str(python), "-c", SMOKE], capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert smoke.returncode == 0 and smoke.stdout.strip().endswith("ok"), smoke.stderr[-3000:]
