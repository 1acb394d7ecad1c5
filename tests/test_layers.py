"""The layers of docs/ARCHITECTURE.md, checked on the source: every import of a project module
goes to its own layer or one below, never up, and the folders say which layer a module is in."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Lowest first. A module's layer: the first entry whose prefix its dotted name starts with
# (more specific prefixes are listed before the packages holding them).
COMMAND_LINES = tuple(
    f"croft_search.{name}" for name in ("run", "train", "prepare", "zeroshot", "pretrain", "sync")
) + ("analysis.pareto",)
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("command lines", COMMAND_LINES),
    ("search", ("croft_search.search",)),
    ("trial", ("croft_search.trial",)),
    ("analysis", ("analysis",)),
    ("methods", ("trainables",)),
    ("core", ("croft_search",)),
]  # fmt: skip
ORDER = ["core", "methods", "trial", "search", "analysis", "command lines"]


def layer_of(module: str) -> str | None:
    for layer, prefixes in LAYERS:
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return layer
    return None


def project_modules() -> dict[str, Path]:
    found = {}
    for package in ("croft_search", "trainables", "analysis"):
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def imports_of(path: Path, module: str) -> set[str]:
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                names.add(f"{base}.{node.module}" if node.module else base)
            elif node.module:
                names.add(node.module)
                names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


MODULES = project_modules()


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_go_only_downward(module):
    own = layer_of(module)
    assert own is not None, f"{module} is in no layer"
    upward = []
    for target in imports_of(MODULES[module], module):
        layer = layer_of(target)
        if layer is not None and target in MODULES and ORDER.index(layer) > ORDER.index(own):
            upward.append(f"{target} ({layer})")
    assert not upward, f"{module} ({own}) imports upward: {', '.join(sorted(upward))}"


def test_every_layer_has_its_modules():
    layers = {layer_of(module) for module in MODULES}
    assert layers == set(ORDER)
    assert layer_of("croft_search.contract") == "core"
    assert layer_of("croft_search.trial.runner") == "trial"
    assert layer_of("croft_search.search.recorder") == "search"


def test_the_methods_package_holds_methods_and_their_parts_only():
    """No trial runner, loop or settings among the method files: the registry needs no list
    of modules to skip."""
    names = {path.stem for path in (ROOT / "trainables").glob("*.py")}
    assert not names & {"trial", "loop", "evaluate", "settings"}
    assert "_INFRASTRUCTURE" not in (ROOT / "trainables" / "registry.py").read_text()


def test_a_search_worker_imports_nothing_of_the_drivers():
    # A worker process imports the modules of the functions Ray runs before its first
    # trial: MLflow, the search folder or scipy's image filters would cost it seconds.
    import subprocess
    import sys

    from croft_search.search import ray_engine

    modules = sorted({ray_engine.trial_function.__module__,
                      ray_engine.population_function.__module__})  # fmt: skip
    assert "croft_search.search.ray_engine" not in modules
    loaded = subprocess.run(
        [sys.executable, "-c",
         f"import sys, {', '.join(modules)}; print(' '.join(sorted(sys.modules)))"],
        capture_output=True, text=True, cwd=ROOT, check=True,
    ).stdout.split()  # fmt: skip
    assert set(modules) <= set(loaded)
    for driver_only in ("mlflow", "sqlalchemy", "scipy.ndimage", "croft_search.tracking",
                        "croft_search.search.folder", "croft_search.search.recorder"):  # fmt: skip
        assert driver_only not in loaded, driver_only
