"""Fused elementwise kernels for the hot loops: magnitude selection and the task-vector merge.

The task-vector pipeline written as torch ops makes some thirty passes over memory per
element (delta, abs, compare, mask, weight, sign, clamp, sums ...), and the magnitude
histogram needs several more; on a CPU core that made TIES cost six times a linear merge.
Compiled with numba, each is one pass over cache-sized blocks of the rows (per core, a TIES
merge of three 0.5 GB models went from 13.4 s to 5.1 s and linear from 2.7 s to 1.5 s; see
benchmarks/RESULTS.md).

Exactness is the point, not an afterthought. Every loop performs the same IEEE operations
in the same order as the torch formulation (``TaskVectorMethod.merge_reference``), each
rounded separately (numba does not contract a multiply and an add into an FMA unless asked
to), so the kernels reproduce it bit for bit; the tests check that on random data for every
method and dtype. Elementwise loops have no notion of a shard, so shard invariance holds by
construction.

How a loop stays vectorized (each rule cost a kernel 2-6x when broken, measured): read a
block through slices (``xs = x[s:s + m]``, then ``xs[i]``), never ``x[s + i]`` (numba cannot
prove the index non-negative, and the wraparound check keeps the loop scalar); no division or
modulo per element (loop over the last-dim vectors and hoist the per-vector value instead of
``kl[j // cols]``); helpers inlined into a hot loop take scalars, not arrays; a branch that does
not change inside the loop goes outside it (one loop per case); accumulators that must follow
numpy's order or the lane order are scalars or small fixed arrays, as :mod:`.sum_orders` writes them
(numpy's eight accumulators as one ``<8 x double>``, emitted as LLVM IR: LLVM left them scalar);
and a block's scratch rows together fit a 32 KB L1 cache (the task-vector and RAM loops ran
1.5x slower at 2048-element blocks than at 512).
``tests/methods/test_kernel_vectorization.py`` checks the loops that broke these rules once.

One module per idea: :mod:`.rounding` (compute-dtype rounding and array helpers, shared by
every loop), :mod:`.histograms` (the selection's key counts), :mod:`.task_vector_loop` (the
task-vector merge and its L1 norms), :mod:`.linear_loop` (the weighted sum), :mod:`.ranks`
(stable magnitude ranks along dim 1, and DELLA's keep rule), :mod:`.radix_ranks` (the radix
sort they rank by, one row or two side by side), :mod:`.variance`
(the variance across models, SCE's selection statistic), :mod:`.dots` (numpy's float64 dot,
fused). This package
gathers their public names, so callers write ``kernels.task_vectors(...)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from distmerge.methods.kernels.dots import float64_dot
from distmerge.methods.kernels.histograms import (
    KEY_BUCKETS,
    above_and_windows,
    delta_keys,
    histogram_and_windows,
    key_histogram,
    row_key_counts,
)
from distmerge.methods.kernels.linear_loop import weighted_sum
from distmerge.methods.kernels.ranks import block_dims, della_keep, magnitude_ranks, rank_values
from distmerge.methods.kernels.rounding import (
    BFLOAT16,
    NATIVE,
    as_array,
    delta_arrays,
    kernel_dtype,
    kernel_mode,
    mode_tag,
    round_array,
    rounded,
    scalar,
    stored_array,
    value_arrays,
)
from distmerge.methods.kernels.task_vector_loop import (
    BLOCK,
    KEEP_NOTHING,
    NO_HIGH,
    NO_LOW,
    RESCALE_DIVIDE,
    RESCALE_DIVIDE_BY_PROBS,
    RESCALE_MULTIPLY,
    RESCALE_NONE,
    abs_sums,
    task_vectors,
)
from distmerge.methods.kernels.topk_select import PackedMagnitudes
from distmerge.methods.kernels.variance import variance_across

__all__ = [
    "BFLOAT16", "BLOCK", "KEEP_NOTHING", "KEY_BUCKETS", "NATIVE", "NO_HIGH", "NO_LOW", "PackedMagnitudes", "RESCALE_DIVIDE",
    "RESCALE_DIVIDE_BY_PROBS", "RESCALE_MULTIPLY", "RESCALE_NONE", "above_and_windows", "abs_sums", "as_array", "block_dims", "della_keep",
    "delta_arrays", "delta_keys", "float64_dot", "histogram_and_windows", "kernel_dtype", "kernel_mode", "key_histogram", "magnitude_ranks",
    "mode_tag", "rank_values", "round_array", "rounded", "row_key_counts", "scalar", "stored_array", "task_vectors", "value_arrays", "variance_across", "warm_up",
    "weighted_sum",
]


def warm_up(experts: Sequence[int] = (2, 3), dtypes: Sequence[torch.dtype] = (torch.float32, torch.bfloat16)) -> None:
    """Compile (or load from numba's on-disk cache) the kernels a merge of ``experts`` models
    in ``dtypes`` uses, so that the first block of a timed merge does not pay for it: for each
    compute dtype, the arrays its rows come in (float32 compute: float32 rows, and bfloat16
    rows as stored; bfloat16 compute: bfloat16 rows).

    AIM's relaxation kernel lives with AIM: :func:`distmerge.aim.relax_kernel.warm_up`.
    """
    for dtype in dtypes:
        mode = kernel_mode(dtype)
        if mode is None:
            continue
        stored = (torch.bfloat16,) if dtype == torch.bfloat16 else (dtype, torch.bfloat16)
        for rows in stored:
            a = value_arrays([torch.zeros(64, dtype=rows)], kernel_dtype(dtype))[0]
            _warm_kernels(a, mode, kernel_dtype(dtype), experts)
    rank_values(np.ones(8, dtype=np.float32), (8,), np.ones(8, dtype=np.float32))
    for dtype in (torch.float32, torch.float64):
        variance_across(torch.zeros(2, 8, dtype=dtype))
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        float64_dot(torch.zeros(8, dtype=dtype), torch.zeros(8, dtype=dtype))


def _warm_kernels(a: np.ndarray, mode: int, kd: torch.dtype, experts: Sequence[int]) -> None:
    """Every row kernel once on rows ``a`` (as :func:`value_arrays` gives them) in ``mode``."""
    key_histogram(a, a, mode)
    histogram_and_windows(a, a, mode, [(0, 1)])
    above_and_windows(a, a, mode, [(0, 1)])
    row_key_counts(a, a, mode, 8, 0)
    delta_keys(a, a, mode)
    ones = np.ones(max(experts), dtype=np.float64 if kd == torch.float64 else np.float32)
    for n in experts:
        for consensus in (False, True):
            task_vectors(a, [a] * n, mode, low=[NO_LOW] * n, high=[NO_HIGH] * n, masks=[None] * n,
                         rescale_kind=[RESCALE_NONE] * n, rescale=ones[:n], probs=[None] * n, weights=ones[:n],
                         consensus=consensus, normalize=True, total_weight=ones[0], lam=ones[0])
        if mode == NATIVE:
            weighted_sum([a] * n, ones[:n], ones[0])
    della_keep(a, a, mode, (8, 8), np.ones(8, dtype=np.float32), np.zeros(2, dtype=np.uint64), 0)
    abs_sums(a, a, mode, NO_LOW, NO_HIGH, None)
