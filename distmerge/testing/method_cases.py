"""One config per merge method of the registry, for tests and benchmarks that run every method.

Why one table: the engine tests (every method gives the same bytes on each executor) and the
speed benchmarks (every method's time against linear's, and against mergekit's) must cover the
same methods with parameters that exercise each method's reduction rounds; a method added to
the registry without a case here fails ``tests/engine/test_local_executor.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

TWO = "two experts"
ONE = "one expert"

# method -> (how many experts it takes, global parameters, per-model parameters)
CASES: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    "linear": (TWO, {}, {"weight": 0.5}),
    "task_arithmetic": (TWO, {}, {"weight": 0.7}),
    "ties": (TWO, {"normalize": True}, {"weight": 0.6, "density": 0.4}),
    "dare_ties": (TWO, {"rescale": True}, {"weight": 0.6, "density": 0.5}),
    "dare_linear": (TWO, {}, {"weight": 0.6, "density": 0.5}),
    "della": (TWO, {}, {"weight": 0.6, "density": 0.5, "epsilon": 0.1}),
    "della_linear": (TWO, {}, {"weight": 0.6, "density": 0.5, "epsilon": 0.1}),
    "breadcrumbs": (TWO, {}, {"weight": 0.6, "density": 0.4, "gamma": 0.02}),
    "breadcrumbs_ties": (TWO, {}, {"weight": 0.6, "density": 0.4, "gamma": 0.02}),
    "sce": (TWO, {"select_topk": 0.5}, {}),
    "slerp": (ONE, {"t": [0.1, 0.9]}, {}),
    "nuslerp": (TWO, {}, {"weight": 0.5}),
    "multislerp": (TWO, {}, {"weight": 0.5}),
    "karcher": (TWO, {}, {}),
    "model_stock": (TWO, {}, {}),
    "nearswap": (ONE, {"t": 0.001}, {}),
    "arcee_fusion": (ONE, {}, {}),
    "ram": (TWO, {}, {}),
    "ramplus_tl": (TWO, {}, {}),
    "passthrough": (ONE, {}, {}),
}
# Methods that take no base_model: the base is not merged in (passthrough copies the base alone).
NO_BASE = frozenset({"linear", "nuslerp", "multislerp", "karcher", "passthrough"})


def method_config(method: str, base: Path, experts: list[Path], **top: Any) -> dict[str, Any]:
    """A mergekit-style config that merges ``experts`` onto ``base`` with ``method``'s case;
    ``top`` adds top-level keys (``dtype``, ``out_dtype``, ``execution``)."""
    kind, glob, per_model = CASES[method]
    models = experts[:1] if kind == ONE else experts
    data: dict[str, Any] = {
        "merge_method": method,
        "models": [{"model": str(e), **({"parameters": per_model} if per_model else {})} for e in models],
        **({"parameters": glob} if glob else {}),
        **top,
    }
    if method == "passthrough":
        data["models"] = [{"model": str(base)}]
    elif method not in NO_BASE:
        data["base_model"] = str(base)
    return data
