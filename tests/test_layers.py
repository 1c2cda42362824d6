"""The package's layering, checked by walking every module's imports (no module is executed).

core (Ray-free) <- harness (the Ray layer stages share) <- stages (one module per job) <- jobs (thin CLIs).
No core module imports ray; no module imports from a layer above its own; the library never parses argv
or starts Ray.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "ray_wsss"
LAYERS = {"core": 0, "harness": 1, "stages": 2}


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def _layer(path: Path) -> str:
    parts = path.relative_to(PACKAGE).parts
    return parts[0] if len(parts) > 1 else "top"


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, dotted module) of every import in the file, at any depth (function-level ones too)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return found


def test_every_module_lives_in_a_layer():
    stray = [str(p.relative_to(REPO)) for p in _modules() if _layer(p) == "top" and p.name != "__init__.py"]
    assert not stray, f"modules outside core/harness/stages: {stray}"


@pytest.mark.parametrize("path", [p for p in _modules() if _layer(p) == "core"],
                         ids=lambda p: str(p.relative_to(PACKAGE)))
def test_core_is_ray_free(path):
    offending = [(line, name) for line, name in _imports(path) if name == "ray" or name.startswith("ray.")]
    assert not offending, f"{path.relative_to(REPO)} imports Ray: {offending}"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_imports_from_a_layer_above(path):
    own = LAYERS.get(_layer(path))
    if own is None:
        return
    upward = []
    for line, name in _imports(path):
        parts = name.split(".")
        if parts[0] == "ray_wsss" and len(parts) > 1 and LAYERS.get(parts[1], -1) > own:
            upward.append((line, name))
    assert not upward, f"{path.relative_to(REPO)} ({_layer(path)}) imports from a higher layer: {upward}"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_library_never_parses_argv_or_starts_ray(path):
    source = path.read_text()
    tree = ast.parse(source)
    calls = {ast.unparse(node.func) for node in ast.walk(tree) if isinstance(node, ast.Call)}
    assert "ray.init" not in calls, f"{path.relative_to(REPO)} calls ray.init: only jobs/ start Ray"
    banned = {name for _, name in _imports(path)} & {"argparse", "sys.argv"}
    assert not banned and "sys.argv" not in source, f"{path.relative_to(REPO)} parses argv: only jobs/ do"


def test_jobs_are_thin():
    """A job parses its flags, starts Ray and calls one stage's run(): no library logic of its own."""
    for job in sorted((REPO / "jobs").glob("*.py")):
        if job.name.startswith("_"):
            continue
        tree = ast.parse(job.read_text())
        defs = [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
        assert not defs, f"{job.name} defines {defs}: put them in ray_wsss/stages"
        assert len(job.read_text().splitlines()) <= 40, f"{job.name} is longer than a thin CLI"
