"""AIM's relaxation ``base + (merged - base) * factors`` in one fused loop.

Pure array math, no I/O: :func:`distmerge.aim.relax.apply_relaxation` calls it once per block.
"""

from __future__ import annotations

import numpy as np

from distmerge.numba_cache import jit


@jit
def _relax(base, merged, factors, out):  # noqa: ANN001, ANN202
    n = factors.size
    for s in range(0, out.size, n):
        b = base[s:s + n]
        m = merged[s:s + n]
        o = out[s:s + n]
        for j in range(n):
            o[j] = b[j] + (m[j] - b[j]) * factors[j]


def relax(base: np.ndarray, merged: np.ndarray, factors: np.ndarray) -> np.ndarray:
    """``base + (merged - base) * factors`` with ``factors`` along the last dimension (rows of
    ``factors.size`` elements), each operation rounded as torch's three ops round it."""
    out = np.empty_like(merged)
    if merged.size == 0:
        return out
    if factors.size == 0 or merged.size % factors.size:
        raise ValueError(f"{factors.size} factors do not divide a block of {merged.size} elements into rows")
    _relax(base, merged, factors, out)
    return out


def warm_up() -> None:
    """Compile (or load from numba's on-disk cache) the kernel for the float32 compute of a
    bfloat16/float16/float32 merge, so that the first relaxed block of a timed merge does not
    pay for it."""
    a = np.zeros(64, dtype=np.float32)
    relax(a, a, a[:8])
