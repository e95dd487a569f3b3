"""The package's layers as docs/architecture.md draws them, checked on the source.

Stages import only stages below them: sources -> shards.py -> tokenize -> curate -> (inspect, train)
-> evaluate, over a foundation (errors, io, fs, progress, recipes, tokens) that everyone may import. inspect and
train sit side by side and import neither each other. Function-level (lazy) imports count too: they
are dependencies all the same.
"""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "perceptio"
# Layer of each top-level module or package of perceptio; a higher number may import a lower one.
LAYERS = {
    "__init__": 0,
    "errors": 0,
    "hub": 0,
    "io": 0,
    "progress": 0,
    "fs": 0,
    "recipes": 0,
    "tokens": 0,
    "sources": 1,
    "shards": 2,
    "tokenize": 3,
    "curate": 4,
    "inspect": 5,
    "train": 5,
    "evaluate": 6,
}
# Modules that must import neither torch nor transformers; one not yet written is skipped.
TORCH_FREE = [
    "perceptio.errors",
    "perceptio.hub",
    "perceptio.io",
    "perceptio.progress",
    "perceptio.fs",
    "perceptio.recipes",
    "perceptio.tokens",
    "perceptio.shards",
    "perceptio.sources.refer",
    "perceptio.sources.ade20k",
    "perceptio.sources.synth",
    "perceptio.sources.download",
    "perceptio.sources.archives",
    "perceptio.tokenize",
    "perceptio.tokenize.config",
    "perceptio.tokenize.cache",
    "perceptio.curate.cli",
    "perceptio.train.config",
    "perceptio.train.bad_data",
]
HEAVY = ("torch", "transformers")


def _part(module: str) -> str:
    """``perceptio.curate.writer`` -> ``curate``; ``perceptio`` itself -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every perceptio import in ``path``, at any depth of the code."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.split(".")[0] == "perceptio"]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "perceptio":  # from perceptio import curate
                found += [(node.lineno, f"perceptio.{alias.name}") for alias in node.names]
            elif node.module.split(".")[0] == "perceptio":
                found.append((node.lineno, node.module))
    return found


def test_every_module_has_a_layer() -> None:
    parts = {path.stem if path.parent == PACKAGE else path.relative_to(PACKAGE).parts[0] for path in PACKAGE.rglob("*.py")}
    assert parts <= set(LAYERS), f"give these a layer (and a place in docs/architecture.md): {sorted(parts - set(LAYERS))}"


def test_no_stage_imports_a_stage_above_it() -> None:
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE)
        importer = relative.stem if len(relative.parts) == 1 else relative.parts[0]
        for line, module in _imports(path):
            imported = _part(module)
            above = LAYERS[imported] > LAYERS[importer]
            beside = LAYERS[imported] == LAYERS[importer] and imported != importer and LAYERS[importer] > 0
            if above or beside:
                wrong.append(f"perceptio/{relative}:{line} ({importer}) imports {module} ({imported})")
    assert not wrong, "\n".join(wrong)


def test_the_layer_check_sees_lazy_and_package_imports(tmp_path: Path) -> None:
    # The walker must not miss an import hidden in a function or spelled as `from perceptio import x`.
    source = tmp_path / "probe.py"
    source.write_text("def f():\n    from perceptio.train.model import X\nfrom perceptio import curate\nimport perceptio.io\n")
    assert sorted(module for _, module in _imports(source)) == ["perceptio.curate", "perceptio.io", "perceptio.train.model"]


def test_torch_free_modules_import_no_torch() -> None:
    modules = [module for module in TORCH_FREE if importlib.util.find_spec(module) is not None]
    assert "perceptio.shards" in modules and "perceptio.io" in modules
    # A fresh interpreter: this test process has long imported torch. Each module is imported in
    # turn, so the first one that pulls torch in is the one named.
    script = (
        "import importlib, sys\n"
        f"for module in {modules!r}:\n"
        "    importlib.import_module(module)\n"
        f"    heavy = [name for name in {HEAVY!r} if name in sys.modules]\n"
        "    if heavy:\n"
        "        print(module, 'imports', ', '.join(heavy)); sys.exit(1)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=PACKAGE.parent)
    assert result.returncode == 0, result.stdout + result.stderr
