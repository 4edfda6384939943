"""Generic English text that exists offline everywhere: CPython's own docstrings.

The stdlib sources are parsed with :mod:`ast` rather than imported (importing some modules has
side effects, and walking with ``pkgutil``/``inspect`` would need that import), so the corpus is
the same on any machine with the same Python. Documents are split into train, calibration and
test by a hash of their qualified name, so the split does not depend on the pipeline seed and
no test document is ever seen in pretraining or calibration.
"""

from __future__ import annotations

import ast
import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

SKIP_PARTS = {"test", "tests", "idlelib", "lib2to3", "turtledemo", "site-packages", "ensurepip",
              "pydoc_data", "__pycache__", "dist-packages", "venv"}
MIN_CHARS = 120


@dataclass(frozen=True)
class Corpus:
    """Documents of each split (ASCII-safe UTF-8 text)."""

    train: list[str]
    calibration: list[str]
    test: list[str]


def _split_of(name: str) -> str:
    """90/5/5 split by a stable hash of the document's qualified name."""
    h = int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) % 100
    return "test" if h < 5 else "calibration" if h < 10 else "train"


def load_corpus() -> Corpus:
    """Every docstring of at least MIN_CHARS characters in the stdlib, deduplicated, split by document."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    seen: set[str] = set()
    splits: dict[str, list[str]] = {"train": [], "calibration": [], "test": []}
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib)
        if SKIP_PARTS & set(rel.parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError, ValueError):
            continue
        module = ".".join(rel.with_suffix("").parts)
        nodes: list[tuple[str, ast.AST]] = [(module, tree)] + [
            (f"{module}.{n.name}", n) for n in ast.walk(tree)
            if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        ]
        for name, node in nodes:
            text = ast.get_docstring(node, clean=True)  # type: ignore[arg-type]
            if not text or len(text) < MIN_CHARS or text in seen:
                continue
            seen.add(text)
            splits[_split_of(name)].append(text)
    return Corpus(**splits)


def to_bytes(docs: list[str]) -> np.ndarray:
    """Documents joined by blank lines as one uint8 stream (byte ids equal byte values)."""
    return np.frombuffer("\n\n".join(docs).encode("utf-8"), dtype=np.uint8).copy()


def random_blocks(stream: np.ndarray, n: int, block: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` random windows of ``block`` bytes (pretraining rows)."""
    starts = torch.randint(0, len(stream) - block, (n,), generator=gen).numpy()
    return torch.from_numpy(np.stack([stream[s:s + block] for s in starts]).astype(np.int64))


def fixed_blocks(stream: np.ndarray, n: int, block: int) -> torch.Tensor:
    """The first ``n`` non-overlapping windows (held-out perplexity, calibration): deterministic."""
    n = min(n, len(stream) // block)
    return torch.from_numpy(stream[: n * block].reshape(n, block).astype(np.int64))


def write_calibration(stream: np.ndarray, n_blocks: int, block: int, out: Path) -> Path:
    """Pre-tokenized calibration blocks (``input_ids`` column) that distmerge reads as given."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    blocks = fixed_blocks(stream, n_blocks, block)
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"input_ids": [row.tolist() for row in blocks]}), out)
    return out
