"""Rooms that keep to themselves (docs/DESIGN "Layout", README "Which room holds what"), read from the
source with ``ast``; every import counts, at module level or inside a function.

- A stage module (one that calls ``register_stage``) imports concept packages and ``pipeline``, never another
  stage module or ``stages.commands``.
- Concept packages (``stages/<package>/``), the shared modules next to the stage modules and the commands
  import no stage module: what two rooms share lives in a concept package. ``stages.plugin`` is the one
  module that imports every stage module (it registers them).
- ``pipeline`` imports nothing of ``stages``.
- No import cycle between packages: ``pipeline``, each ``stages/<package>`` and each module directly in
  ``stages/``.
"""
from __future__ import annotations

import ast
import graphlib
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
REGISTRAR = "stages.plugin"


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def modules() -> dict[str, Path]:
    """Every module of ``pipeline`` and ``stages`` by dotted name."""
    return {_module_name(p): p for top in ("pipeline", "stages") for p in sorted((REPO / top).rglob("*.py"))}


def imports(name: str) -> set[str]:
    """The project modules ``name`` imports (``from a import b`` counts ``a``, and ``a.b`` when a module)."""
    path = modules()[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            found |= {module} | {f"{module}.{alias.name}" for alias in node.names}
    return {m for m in found if m in modules() and m != name}


def package_of(name: str) -> str:
    """``pipeline``, ``stages.<package>`` or the module itself when it lies directly in ``stages/``."""
    parts = name.split(".")
    if parts[0] == "pipeline":
        return "pipeline"
    return ".".join(parts[:2]) if len(parts) > 2 or (REPO / "stages" / parts[-1]).is_dir() else name


@cache
def stage_modules() -> frozenset[str]:
    """The modules of ``stages`` that call ``register_stage``."""
    def registers(name: str) -> bool:
        return any(isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None))
                   == "register_stage" for node in ast.walk(ast.parse(modules()[name].read_text())))

    return frozenset(m for m in modules() if m.startswith("stages.") and registers(m))


def test_the_stage_modules_are_found() -> None:
    assert {"stages.prepare", "stages.extract", "stages.train_head", "stages.evaluate", "stages.report"} <= stage_modules()


def test_a_stage_module_imports_no_other_stage_and_no_command() -> None:
    stage = stage_modules()
    bad = [f"{m} imports {i}" for m in sorted(stage) for i in sorted(imports(m))
           if i in stage or i == "stages.commands" or i.startswith("stages.commands.")]
    assert not bad, "move what they share to a concept package:\n" + "\n".join(bad)


def test_concept_packages_shared_modules_and_commands_import_no_stage_module() -> None:
    stage = stage_modules()
    bad = [f"{m} imports {i}" for m in sorted(modules()) if m.startswith("stages") and m not in stage
           and m != REGISTRAR for i in sorted(imports(m) & stage)]
    assert not bad, "\n".join(bad)


def test_pipeline_imports_nothing_of_stages() -> None:
    bad = [f"{m} imports {i}" for m in sorted(modules()) if m.startswith("pipeline")
           for i in sorted(imports(m)) if i.startswith("stages")]
    assert not bad, "\n".join(bad)


def test_no_import_cycle_between_packages() -> None:
    graph: dict[str, set[str]] = {}
    for m in modules():
        graph.setdefault(package_of(m), set()).update(package_of(i) for i in imports(m) if package_of(i) != package_of(m))
    try:
        tuple(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as exc:
        cycle = exc.args[1]
        pairs = set(zip(cycle, cycle[1:])) | set(zip(cycle[1:], cycle))
        edges = sorted(f"{m} imports {i}" for m in modules() for i in imports(m) if (package_of(m), package_of(i)) in pairs)
        pytest.fail("import cycle between packages " + " / ".join(cycle) + ":\n" + "\n".join(edges))
