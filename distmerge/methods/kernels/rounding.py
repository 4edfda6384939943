"""Rounding to the compute dtype, and how kernels take their arrays: shared by every loop.

Dtypes: float32 and float64 compute run natively. bfloat16 compute runs on float32 values
with each operation rounded to bfloat16 (round to nearest even), which is what torch's CPU
bfloat16 ops do (compute in float32, round the result). float16 compute has no kernel:
:func:`kernel_mode` returns None and callers use the torch formulation.

Arrays: the loops read rows through ``_value``, so bfloat16 rows come as their bits (``uint16``,
:func:`stored_array`, :func:`value_arrays`) and are widened as they are read, with no cast pass,
under bfloat16 compute and under float32 compute of bfloat16 checkpoints alike.

The scalar helpers here (``_r``, ``_key``, ``_value``) are inlined into the loops of the sibling modules.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic, overload

from distmerge.numba_cache import inline, jit

NATIVE = 0  # float32 / float64: no rounding beyond the dtype's own
BFLOAT16 = 1  # float32 arrays, every result rounded to bfloat16
# The bit pattern of float32 +Inf: a magnitude's key (its bits, sign cleared) is at least this
# exactly where the magnitude is Inf or NaN.
INF_KEY = 0x7F800000

_jit = jit  # distmerge.numba_cache's: its guard drops a cache older than any compiled file
_inline = inline


def kernel_mode(dtype: torch.dtype) -> int | None:
    """How the kernels compute in ``dtype``, or None when they cannot (use torch ops)."""
    if dtype in (torch.float32, torch.float64):
        return NATIVE
    if dtype == torch.bfloat16:
        return BFLOAT16
    return None


def kernel_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernels compute in (and write results in) for compute dtype ``dtype``."""
    return torch.float32 if dtype == torch.bfloat16 else dtype


def as_array(t: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    """A flat, contiguous numpy view (or copy, when a cast is needed) of ``t`` in ``dtype``."""
    return t.detach().to(dtype).reshape(-1).contiguous().numpy()


def stored_array(t: torch.Tensor) -> np.ndarray:
    """Rows as the loops read them through :func:`_value`, flat and without a copy where
    possible: float32/float64 as they are, bfloat16 as its bits (``uint16``), float16 cast to
    float32 (exact)."""
    flat = t.detach().reshape(-1).contiguous()
    if flat.dtype == torch.bfloat16:
        return flat.view(torch.int16).numpy().view(np.uint16)
    if flat.dtype == torch.float16:
        return flat.to(torch.float32).numpy()
    return flat.numpy()


def value_arrays(tensors: Sequence[torch.Tensor], dtype: torch.dtype) -> list[np.ndarray]:
    """Arrays whose elements, read through :func:`_value`, are those of ``tensors`` in ``dtype``
    (float32 or float64): bfloat16 tensors as their bits when ``dtype`` is float32 (widening is
    exact, so the loop widens each element as it reads it, with no cast pass and half the
    bytes), anything else cast. All bits or all cast: mixed array types would compile once more."""
    if dtype == torch.float32 and all(t.dtype == torch.bfloat16 for t in tensors):
        return [stored_array(t) for t in tensors]
    return [as_array(t, dtype) for t in tensors]


def delta_arrays(base: torch.Tensor, x: torch.Tensor, compute: torch.dtype | None = None,
                 ) -> tuple[np.ndarray, np.ndarray, int]:
    """``(base, x, mode)`` for a kernel that computes ``x - base`` in ``compute`` (default:
    ``x``'s dtype), reading both through :func:`_value` (:func:`value_arrays`).

    float16 has no kernel mode: torch computes that delta (rounded to float16, as the torch
    formulation does) and the kernel gets it in float32 against a zero base (``d - 0 == d``).
    """
    compute = compute or x.dtype
    mode = kernel_mode(compute)
    if mode is None:
        delta = as_array(x.to(compute) - base.to(compute), torch.float32)
        return np.zeros_like(delta), delta, NATIVE
    b, d = value_arrays((base, x), kernel_dtype(compute))
    return b, d, mode

def scalar(value: float, dtype: torch.dtype) -> np.ndarray:
    """A Python number as torch uses it beside a ``dtype`` tensor: cast to the op's math type.

    torch computes bfloat16 ops in float32, so a Python scalar is cast to float32 (not to
    bfloat16); beside float32/float64 tensors it is cast to that dtype.
    """
    return np.asarray(value, dtype=np.float64 if dtype == torch.float64 else np.float32)


def rounded(values: Sequence[float], dtype: torch.dtype) -> np.ndarray:
    """Values stored in a ``dtype`` tensor (rounded to it), in the kernels' array dtype."""
    return torch.tensor(list(values), dtype=dtype).to(kernel_dtype(dtype)).numpy()


# ---- scalar helpers (inlined into the loops) --------------------------------------------------

@_inline
def _bits32(v):  # noqa: ANN001, ANN202 - numba infers the types
    return np.float32(v).view(np.int32)


@_jit
def _bf16(v):  # noqa: ANN001, ANN202
    """Round a float32 to the nearest bfloat16 (ties to even), as c10::BFloat16 does."""
    u = np.int64(_bits32(v)) & 0xFFFFFFFF
    r = np.uint32((u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000).view(np.float32)
    return v if v != v else r  # branch-free, so loops stay vectorizable


def _r(v, mode):  # noqa: ANN001, ANN202
    """``v`` rounded to the compute dtype (see :func:`_r_typed`)."""
    raise NotImplementedError("only callable from jitted code")


@overload(_r, inline="always")
def _r_typed(v, mode):  # noqa: ANN001, ANN202
    # The mode is a compile-time choice: BFLOAT16 arrives as an integer, NATIVE as a float
    # (see :func:`mode_tag`), so each loop is compiled without a per-element branch.
    # Inlined by numba, not left to LLVM: a loop with several calls of it stayed a loop of
    # calls, unvectorized (measured 3-4x slower).
    if isinstance(mode, types.Integer):
        return lambda v, mode: _bf16(v)
    return lambda v, mode: v


def _value(a, i):  # noqa: ANN001, ANN202
    """Element ``i`` of ``a`` as a float: bfloat16 bits (uint16) widened to float32."""
    raise NotImplementedError("only callable from jitted code")


@overload(_value, inline="always")  # inlined by numba: left to LLVM, loops stayed unvectorized
def _value_typed(a, i):  # noqa: ANN001, ANN202
    if a.dtype == types.uint16:
        return lambda a, i: np.uint32(np.uint32(a[i]) << np.uint32(16)).view(np.float32)
    return lambda a, i: a[i]


@intrinsic
def _fma(typingctx, a, b, c):  # noqa: ANN001, ANN202 - numba typing signature
    """``a * b + c`` with one rounding (LLVM's ``llvm.fma``; all three of one float type)."""
    if not (a == b == c and isinstance(a, types.Float)):
        return None

    def codegen(context, builder, signature, args):  # noqa: ANN001, ANN202
        ty = args[0].type
        name = "llvm.fma.f64" if ty == ir.DoubleType() else "llvm.fma.f32"
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ty, [ty, ty, ty]), name)
        return builder.call(fn, args)

    return a(a, b, c), codegen


@_jit
def _round_array(x, mode, out):  # noqa: ANN001, ANN202
    for i in range(x.size):
        out[i] = _r(x[i], mode)


def round_array(x: np.ndarray, mode: int) -> np.ndarray:
    """``x`` (float32) with each element rounded as the kernels round in ``mode``."""
    out = np.empty_like(x)
    _round_array(x, mode_tag(mode), out)
    return out


def mode_tag(mode: int) -> np.generic:
    """The value kernels take as ``mode``; its numba type selects the rounding at compile time."""
    return np.int64(1) if mode == BFLOAT16 else np.float64(0.0)


@_inline
def _key(d):  # noqa: ANN001, ANN202
    """Selection key of a delta: the float32 bit pattern of ``|d|`` (orders like |d|)."""
    return _bits32(abs(d))


MAX_KEY = 0x7FFFFFFF  # the largest key (int32): a magnitude's sign bit is clear


def key_bounds(lo: int, hi: int) -> tuple[np.int32, np.int32]:
    """The keys in ``[lo, hi)`` as int32 bounds ``(first, last)``, both inclusive (``(1, 0)``
    where no key is inside), for a loop to test ``(first <= k) & (k <= last)``.

    Why: keys are int32, while the thresholds are Python ints whose "no bound" values lie
    outside int32; a key compared with an int64 bound is widened first, and each 64-bit vector
    compare covers half the lanes of a 32-bit one. On a 2-core AMD EPYC (AVX2), int32 bounds
    took the thresholded task-vector sum from 1.4-2.1 to 1.1-1.3 ns per element and the TIES
    merge from 2.6-3.0 to 2.3-2.6 (2^22 elements, alternated three times)."""
    first, last = max(lo, 0), min(hi - 1, MAX_KEY)
    return (np.int32(first), np.int32(last)) if first <= last else (np.int32(1), np.int32(0))
