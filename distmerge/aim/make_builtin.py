"""Regenerate ``distmerge/data/calibration_builtin.jsonl`` from CPython's own docstrings.

Run once (``python -m distmerge.aim.make_builtin``) and commit the output: the builtin set must
be identical wherever distmerge is installed, so it is never rebuilt at run time. Sources are
parsed with :mod:`ast`, never imported (importing some stdlib modules has side effects). Only
prose-like docstrings are kept: long enough, mostly letters and spaces, not doctest-heavy.
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
import sys
import sysconfig
from pathlib import Path

log = logging.getLogger(__name__)

SKIP_PARTS = {"test", "tests", "idlelib", "lib2to3", "turtledemo", "site-packages", "ensurepip",
              "pydoc_data", "__pycache__", "dist-packages", "venv"}
OUT = Path(__file__).resolve().parent.parent / "data" / "calibration_builtin.jsonl"


def prose_like(text: str) -> bool:
    """True for docstrings that read as English prose rather than code or tables."""
    if not 300 <= len(text) <= 4000 or text.count(">>>") > 1:
        return False
    letters = sum(c.isalpha() or c.isspace() for c in text)
    return letters / len(text) >= 0.85


def docstrings(stdlib: Path) -> list[dict[str, str]]:
    """Prose docstrings of modules, classes and functions, in sorted path and source order."""
    seen: set[str] = set()
    out = []
    for path in sorted(stdlib.rglob("*.py")):
        if SKIP_PARTS & set(path.relative_to(stdlib).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        module = ".".join(path.relative_to(stdlib).with_suffix("").parts)
        nodes = [(module, tree)] + [
            (f"{module}.{n.name}", n)
            for n in ast.walk(tree)
            if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        ]
        for name, node in nodes:
            text = ast.get_docstring(node, clean=True)
            if text and prose_like(text) and text not in seen:
                seen.add(text)
                out.append({"text": text, "source": f"cpython:{name}"})
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--max-bytes", type=int, default=600_000)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    docs = docstrings(Path(sysconfig.get_paths()["stdlib"]))
    lines = [json.dumps(d, ensure_ascii=False) + "\n" for d in docs]
    total = sum(len(line.encode()) for line in lines)
    step = max(1, -(-total // args.max_bytes))  # keep every step-th document: spread over the stdlib
    chosen = lines[::step]
    args.out.write_text("".join(chosen), encoding="utf-8")
    log.info("%d of %d docstrings from Python %s, %d bytes -> %s", len(chosen), len(lines),
             sys.version.split()[0], sum(len(line.encode()) for line in chosen), args.out)


if __name__ == "__main__":
    main()
