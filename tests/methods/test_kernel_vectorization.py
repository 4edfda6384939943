"""The hot loops that once compiled to scalar code compile to vector code now.

Each of these loops broke a rule of :mod:`distmerge.methods.kernels` (``x[s + i]`` instead of a
slice; ``kl[j // cols]``, a division per element) and ran 3-6x slower for it, with the same
results: no exactness test could notice. These read the optimized LLVM IR of a freshly compiled
copy (the cached dispatchers keep none) and fail if the loop goes back to scalar code.
"""

from __future__ import annotations

import re

import numba
import numpy as np
import pytest

from distmerge.methods.kernels import dots, fusion_loops

BF16_BITS = np.arange(4096, dtype=np.uint16)
FLOATS = np.linspace(0.0, 1.0, 4096).astype(np.float32)


def fresh_ir(dispatcher: numba.core.registry.CPUDispatcher, *args: object) -> str:
    """The optimized LLVM IR of ``dispatcher``'s function compiled anew for ``args``."""
    fresh = numba.njit(dispatcher.py_func)
    fresh(*args)
    return fresh.inspect_llvm(fresh.signatures[0])


def vector_ops(ir: str, op: str, element: str) -> int:
    """How many ``op`` instructions on vectors of ``element`` the IR holds."""
    return len(re.findall(rf"= {op}(?: [a-z]+)* <\d+ x {element}>", ir))


@pytest.mark.parametrize("operands", [BF16_BITS, FLOATS], ids=["bfloat16-bits", "float32"])
def test_the_dot_multiplies_contiguous_vectors(operands: np.ndarray):
    ir = fresh_ir(dots._dot, operands, operands)
    assert vector_ops(ir, "fmul", "double") > 0
    # Indexing a[s + i] made LLVM compute a vector of 64-bit indices (the wraparound check for
    # a negative index) and load lane by lane: 1.5 against 0.47 ns per element.
    assert not re.search(r"<\d+ x i64>", ir)
    # numpy's eight pairwise accumulators as one <8 x double> (sum_orders._eight_accumulators):
    # as eight scalar chains they stayed scalar, 0.30 against 0.21 ns per element in cache
    assert re.search(r"= fadd(?: [a-z]+)* <8 x double>", ir)


def test_arcee_fusions_merge_is_vectorized():
    ir = fresh_ir(fusion_loops._merge, BF16_BITS, BF16_BITS, FLOATS[:64], 64, np.float32(0.5),
                  np.empty(BF16_BITS.size, dtype=np.float32))
    for op in ("fsub", "fmul", "fadd"):
        assert vector_ops(ir, op, "float") > 0, op  # kl[j // cols] kept it scalar: 2.1 against 0.57 ns


@pytest.mark.parametrize("operands", [BF16_BITS, FLOATS], ids=["bfloat16-bits", "float32"])
def test_model_stocks_gram_sums_are_vectorized(operands: np.ndarray):
    """A loop from a run-time start (``range(lo, hi, LANES)``) stayed scalar: 1.56 against
    0.40 ns per element; so did one loop over every model at once."""
    from distmerge.methods.kernels import blend_loops, rounding

    ir = fresh_ir(blend_loops._pair_sums, operands, operands, operands, rounding.mode_tag(rounding.NATIVE),
                  5, operands.size, np.empty(3))
    assert vector_ops(ir, "fadd", "double") > 0 and vector_ops(ir, "fmul", "double") > 0
    # the slow loop had these too, but gathered its rows lane by lane through vectors of indices
    assert not re.search(r"<\d+ x i64>", ir)


def test_philox4x32_rounds_stay_in_registers():
    """The keep stream's ten rounds run inside the vectorized loop over lanes: the words of a
    block are stored once, at the end. With the rounds outside the lane loop every word was
    stored and loaded again every round (160 vector loads): 0.88 against 0.45 ns per flag."""
    from distmerge.methods import philox

    state = philox.philox_scratch()
    ir = fresh_ir(philox._batch32, np.uint64(1), np.uint64(2), np.uint64(3), state.view(np.uint32))
    assert vector_ops(ir, "mul", "i64") >= 10  # two multiplies a round, unrolled, on vectors of lanes
    assert not re.search(r"= load <\d+ x i32>", ir)
    assert len(re.findall(r"store <\d+ x i32>", ir)) <= 4
    keep = np.empty(4 * philox.LANES, dtype=np.bool_)
    ir = fresh_ir(philox._keep_batch, np.uint64(1), np.uint64(2), np.uint64(3), np.uint64(5), keep)
    assert vector_ops(ir, "mul", "i64") >= 10
    assert not re.search(r"= load <\d+ x i(32|64)>", ir)
