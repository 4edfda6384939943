"""The package's shape, read from its source with ``ast`` (no module is imported).

Layering keeps a merge followable: a module may import only from its own layer or a lower one
(docs/architecture.md), so the foundation never learns about the engine and a reader can
understand a layer without the ones above it. Checked here, statically, for every module of
``distmerge/``: imports inside functions (lazy ones) and under ``if TYPE_CHECKING:`` count,
since they are dependencies all the same. Also: ``distmerge.testing`` (fixtures for the tests,
the demo and the benchmarks) is imported by no library module; every module has a docstring;
and no module is over ``MAX_LINES`` lines unless its docstring says why, in a sentence that
starts "Longer than".
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "distmerge"
PACKAGE_DIR = ROOT / PACKAGE
MAX_LINES = 300

# Module-path prefix -> layer (low -> high). The longest matching prefix wins; a prefix matches
# the module itself and everything under it. The bare package name matches only
# distmerge/__init__.py (it would otherwise swallow every unmapped module).
LAYERS: dict[str, int] = {
    # 0. foundation: every byte read and written, names and sizes
    "distmerge.io": 0,
    "distmerge.errors": 0,
    "distmerge.dtypes": 0,
    "distmerge.sizes": 0,
    "distmerge.model_config": 0,
    "distmerge.numba_cache": 0,
    "distmerge.torch_threads": 0,  # torch's process-wide thread count, set for a block and restored  # the compiled kernels' decorators and their on-disk cache's guard
    # 1. what a merge is asked to do, and a model folder
    "distmerge.config": 1,
    "distmerge.checkpoint": 1,
    "distmerge.lora": 1,
    "distmerge.slices": 1,
    "distmerge.vocab.config": 1,  # the tokenizer: block's models, for config.py to embed
    # 2. pure math
    "distmerge.methods": 2,
    "distmerge.aim": 2,
    # the merged vocabulary: tokenizer building and per-row recipes (no engine, no Ray)
    "distmerge.vocab": 2,
    # 3. the merge plan
    "distmerge.plan": 3,
    "distmerge.parameters": 3,
    "distmerge.plan_sources": 3,
    "distmerge.plan_files": 3,
    "distmerge.plan_vocabulary": 3,
    # 4. the output directory's life
    "distmerge.output": 4,
    # 5. execution: scheduling, Ray, AIM's lifecycle and its Ray pipeline
    "distmerge.engine": 5,
    "distmerge.aim.feature": 5,
    "distmerge.aim.pipeline": 5,
    "distmerge.aim.in_process": 5,
    "distmerge.aim.stage_actors": 5,
    "distmerge.aim.calibration": 5,
    "distmerge.aim.stage_worker": 5,
    # 6. entry points (and the fixtures only they, tests and benchmarks use)
    "distmerge.cli": 6,
    "distmerge.demo": 6,
    "distmerge.warm_up": 6,
    "distmerge.__main__": 6,
    "distmerge": 6,
    "distmerge.testing": 6,
}
TESTING = "distmerge.testing"
# The only library modules allowed to import distmerge.testing: the demo and the warm-up build
# their tiny models with it (and the warm-up takes every method's config from its table).
TESTING_IMPORTERS = {"distmerge.demo", "distmerge.warm_up"}
# Names of distmerge/__init__.py any layer may read: constants it defines itself. The root
# package runs before any of its modules anyway, so reading them adds no dependency; what the
# layering forbids is reaching the engine through the root's run_merge.
ROOT_CONSTANTS = {"__version__"}
LONGER_THAN = re.compile(r"(?:\A|[.!?:;]\s+|\n\s*\n\s*)Longer than\b[^.]{12,}")


@dataclass(frozen=True)
class Import:
    """One import statement's target inside the package, and where it is."""

    target: str
    line: int
    statement: str
    names: tuple[str, ...] = ()


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@cache
def modules() -> dict[str, Path]:
    """Every module of the package: dotted name -> file."""
    found = {module_name(p): p for p in sorted(PACKAGE_DIR.rglob("*.py"))
             if "__pycache__" not in p.parts}
    assert len(found) > 30, f"found only {sorted(found)} under {PACKAGE_DIR}"
    return found


@cache
def tree(name: str) -> ast.Module:
    path = modules()[name]
    return ast.parse(path.read_text(), filename=str(path))


def is_package(name: str) -> bool:
    return modules()[name].name == "__init__.py"


def layer_of(name: str) -> int | None:
    """The layer of a module (longest matching prefix of LAYERS), or None when none matches."""
    matches = [(len(prefix), layer) for prefix, layer in LAYERS.items()
               if name == prefix or (prefix != PACKAGE and name.startswith(prefix + "."))]
    return max(matches)[1] if matches else None


def resolve(importer: str, module: str | None, level: int) -> str:
    """The absolute module a (possibly relative) ``from`` import names."""
    if level == 0:
        return module or ""
    base = importer.split(".")
    if not is_package(importer):
        base.pop()
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def package_imports(importer: str, node: ast.Module) -> list[Import]:
    """Every import of a distmerge module anywhere in ``node``: top level, in functions, under
    ``if TYPE_CHECKING:``. ``from pkg import name`` targets ``pkg.name`` when that is a module."""
    found: list[Import] = []
    known = modules()
    for stmt in ast.walk(node):
        if isinstance(stmt, ast.Import):
            for alias in stmt.names:
                if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                    found.append(Import(alias.name, stmt.lineno, f"import {alias.name}"))
        elif isinstance(stmt, ast.ImportFrom):
            source = resolve(importer, stmt.module, stmt.level)
            if source != PACKAGE and not source.startswith(PACKAGE + "."):
                continue
            names_by_target: dict[str, list[str]] = {}
            for alias in stmt.names:
                sub = f"{source}.{alias.name}"
                names_by_target.setdefault(sub if sub in known else source, []).append(alias.name)
            dots = "." * stmt.level
            for target, names in names_by_target.items():
                found.append(Import(target, stmt.lineno,
                                    f"from {dots}{stmt.module or ''} import {', '.join(names)}",
                                    tuple(names)))
    return sorted(found, key=lambda imp: imp.line)


def layer_violations(importer: str, node: ast.Module) -> list[str]:
    own = layer_of(importer)
    assert own is not None, importer
    problems = []
    for imp in package_imports(importer, node):
        if imp.target == PACKAGE and imp.names and set(imp.names) <= ROOT_CONSTANTS:
            continue
        theirs = layer_of(imp.target)
        if theirs is None and imp.target in modules():
            continue  # an existing module without a layer: test_every_module_has_a_layer says so
        if theirs is None:
            problems.append(f"{importer} (layer {own}), line {imp.line}: `{imp.statement}` imports "
                            f"{imp.target}, which has no layer in LAYERS")
        elif theirs > own:
            problems.append(f"{importer} (layer {own}), line {imp.line}: `{imp.statement}` imports "
                            f"{imp.target} (layer {theirs}), a higher layer")
    return problems


def test_every_module_has_a_layer() -> None:
    unmapped = [f"{name} ({modules()[name].relative_to(ROOT)})" for name in modules()
                if layer_of(name) is None]
    assert not unmapped, ("modules with no layer (move them under a mapped package, or add their "
                          "prefix to LAYERS in tests/test_architecture.py): " + ", ".join(unmapped))


def test_no_module_imports_from_a_higher_layer() -> None:
    problems = [p for name in modules() if layer_of(name) is not None
                for p in layer_violations(name, tree(name))]
    assert not problems, "imports against the layering:\n" + "\n".join(problems)


def fixture_imports(importer: str, node: ast.Module) -> list[str]:
    """Imports of distmerge.testing by a library module (the fixtures' own modules and
    TESTING_IMPORTERS may)."""
    if importer in TESTING_IMPORTERS or importer == TESTING or importer.startswith(TESTING + "."):
        return []
    return [f"{importer}, line {imp.line}: `{imp.statement}` (test fixtures; only "
            f"{', '.join(sorted(TESTING_IMPORTERS))}, tests and benchmarks may)"
            for imp in package_imports(importer, node)
            if imp.target == TESTING or imp.target.startswith(TESTING + ".")]


def test_no_library_module_imports_the_testing_fixtures() -> None:
    problems = [p for name in modules() for p in fixture_imports(name, tree(name))]
    assert not problems, "library modules importing distmerge.testing:\n" + "\n".join(problems)


def test_every_module_has_a_docstring() -> None:
    missing = [f"{name} ({modules()[name].relative_to(ROOT)})" for name in modules()
               if not (ast.get_docstring(tree(name)) or "").strip()]
    assert not missing, "modules without a docstring: " + ", ".join(missing)


def test_long_modules_say_why() -> None:
    problems = []
    for name, path in modules().items():
        lines = len(path.read_text().splitlines())
        if lines > MAX_LINES and not LONGER_THAN.search(ast.get_docstring(tree(name)) or ""):
            problems.append(f"{name} ({path.relative_to(ROOT)}): {lines} lines")
    assert not problems, (f"modules over {MAX_LINES} lines whose docstring has no sentence "
                          "starting 'Longer than' that says why:\n" + "\n".join(problems))


# The checker itself, on made-up modules: a checker that finds nothing proves nothing.


@pytest.mark.parametrize(("importer", "source", "target"), [
    ("distmerge.plan", "from distmerge.engine.run import run_merge", "distmerge.engine.run"),
    ("distmerge.plan", "import distmerge.engine.run", "distmerge.engine.run"),
    ("distmerge.plan", "def f():\n    from distmerge.engine import run", "distmerge.engine.run"),
    ("distmerge.plan", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
     "    from distmerge.output import lock", "distmerge.output.lock"),
    ("distmerge.methods.linear", "from ..engine import run", "distmerge.engine.run"),
    ("distmerge.methods.linear", "from ..plan import MergePlan", "distmerge.plan"),
    ("distmerge.methods", "from .. import cli", "distmerge.cli"),
    ("distmerge.aim.relax", "from . import pipeline", "distmerge.aim.pipeline"),
    ("distmerge.io.files", "from distmerge import __version__, run_merge", "distmerge "),
    ("distmerge.io.files", "import distmerge", "distmerge "),
])
def test_checker_catches_upward_imports(importer: str, source: str, target: str) -> None:
    problems = layer_violations(importer, ast.parse(source))
    assert len(problems) == 1 and target in problems[0] and importer in problems[0], problems


@pytest.mark.parametrize(("importer", "source"), [
    ("distmerge.engine.run", "from distmerge.plan import MergePlan"),
    ("distmerge.aim.pipeline", "from distmerge.aim import relax"),
    ("distmerge.aim.relax", "from distmerge.methods.base import MergeMethod"),
    ("distmerge.cli", "import distmerge.engine.run"),
    ("distmerge.io.files", "from distmerge.errors import CheckpointError"),
    ("distmerge.io.files", "import os\nimport torch"),
    ("distmerge.io.files", "from distmerge import __version__"),
])
def test_checker_allows_same_or_lower_layers(importer: str, source: str) -> None:
    assert layer_violations(importer, ast.parse(source)) == []


@pytest.mark.parametrize("source", [
    "from distmerge.testing.tiny import build_family",
    "def f():\n    from distmerge.testing import tiny",
    "import distmerge.testing",
])
def test_checker_catches_testing_imports(source: str) -> None:
    assert len(fixture_imports("distmerge.engine.run", ast.parse(source))) == 1
    assert fixture_imports("distmerge.demo", ast.parse(source)) == []


def test_layer_lookup() -> None:
    assert layer_of("distmerge") == 6
    assert layer_of("distmerge.aim.relax") == 2
    assert layer_of("distmerge.aim.pipeline") == 5
    assert layer_of("distmerge.io.files") == 0
    assert layer_of("distmerge.iolike") is None  # a prefix matches whole dotted components only
    assert layer_of("distmerge.unmapped") is None  # the bare package name matches only itself
    assert LONGER_THAN.search("Why it is.\n\nLonger than 300 lines: one table per dtype, kept together.")
    assert not LONGER_THAN.search("It is longer than it should be.")
