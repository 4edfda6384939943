"""Rows of an adapted tensor, formed a row range at a time, bit for bit as PEFT merges them.

PEFT's ``merge_and_unload`` (CPU, adapter upcast to float32 as ``PeftModel.from_pretrained``
does by default) computes ``delta = transpose(B @ A, fan_in_fan_out) * scaling`` over the whole
matrix in float32, then adds it: a Linear as ``weight += delta`` (the float32 delta added to the
weight in float32 and rounded once to its dtype), an Embedding as ``weight += delta.to(dtype)``
(the delta rounded first). Only the matmul is not per element: BLAS forms each element of
``B @ A`` as a chain of fused multiply-adds over the rank, but a slice of the rows can take
another BLAS path (a 1-row product is a different kernel with another rounding). So the delta's
rows are computed here as that chain, one exact float32 FMA per rank step, which is the whole
matrix's product element for element whatever the row range (checked against ``B @ A`` and
PEFT in tests/inputs/test_lora.py; MKL's sgemm sums the rank in order up to rank 128 at least).
The chain runs in a small numba loop whose multiply-add is LLVM's ``fma`` intrinsic (exact by
definition: hardware FMA, or libm's ``fmaf`` without it); it is about as fast as torch's matmul.

Reads: the model's rows ``[r0, r1)``, B's rows ``[r0, r1)`` (a Linear) or A's columns
``[r0, r1)`` (an embedding, fan_in_fan_out), and the other, small factor whole.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
from numba.core import types
from numba.extending import intrinsic

from distmerge.io.safetensors import TensorInfo, read_rows
from distmerge.lora.adapter import EMBEDDING, LINEAR, LoraTensorInfo
from distmerge.numba_cache import jit

# Elements of the delta formed at once: bounds the float32 scratch whatever the unit's size;
# rows are independent, so the result does not depend on it.
CHUNK_ELEMENTS = 1 << 20


def read_source_rows(info: TensorInfo, row_start: int, row_end: int) -> torch.Tensor:
    """Rows ``[row_start, row_end)`` of an input tensor as stored: adapted when it is a LoRA one."""
    if isinstance(info, LoraTensorInfo):
        return read_adapted_rows(info, row_start, row_end)
    return read_rows(info, row_start, row_end)


def read_adapted_rows(info: LoraTensorInfo, row_start: int, row_end: int) -> torch.Tensor:
    """The adapted rows in the weight's stored dtype: what PEFT writes into the merged model."""
    weight = read_rows(info, row_start, row_end)  # the model tensor's own rows (the info is its location)
    rank = info.lora_a.shape[0]
    if info.kind == LINEAR:  # delta rows = B[r0:r1] @ A
        lhs = read_rows(info.lora_b, row_start, row_end).float()
        rhs = read_rows(info.lora_a, 0, rank).float()
    else:  # delta rows = (B @ A[:, r0:r1]).T = A[:, r0:r1].T @ B.T
        cols = info.lora_a.shape[1]
        flat = replace(info.lora_a, shape=(rank * cols,))
        lhs = torch.stack([read_rows(flat, k * cols + row_start, k * cols + row_end) for k in range(rank)], 1).float() \
            if rank else torch.empty(row_end - row_start, 0)
        rhs = read_rows(info.lora_b, 0, info.lora_b.shape[0]).float().T
    step = max(1, CHUNK_ELEMENTS // max(1, rhs.shape[1]))
    for r0 in range(0, row_end - row_start, step):
        delta = fma_product(lhs[r0:r0 + step], rhs) * info.scale
        rows = weight[r0:r0 + step]
        if info.kind == EMBEDDING:
            rows += delta.to(weight.dtype)  # Embedding.merge: weight += delta.to(orig_dtype)
        else:
            rows += delta  # Linear.merge: weight.data += delta (float32 into the weight's dtype)
    return weight


def fma_product(lhs: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """``lhs @ rhs`` in float32 with each element the chain ``fma(l_k, r_k, acc)`` over k from
    ``acc = 0``: a BLAS sgemm's rounding, whatever the number of rows asked for."""
    out = torch.empty(lhs.shape[0], rhs.shape[1], dtype=torch.float32)
    _fma_rows(lhs.float().contiguous().numpy(), rhs.float().contiguous().numpy(), out.numpy())
    return out


@intrinsic
def _fma32(typingctx, a, b, c):  # noqa: ARG001 (numba's intrinsic signature)
    """float32 fused multiply-add, one rounding: LLVM's ``llvm.fma`` (a libm call without FMA hardware)."""
    def codegen(context, builder, signature, args):  # noqa: ARG001
        return builder.fma(*args)
    return types.float32(types.float32, types.float32, types.float32), codegen


@jit
def _fma_rows(lhs, rhs, out):  # pragma: no cover (compiled)
    for i in range(lhs.shape[0]):
        for j in range(rhs.shape[1]):
            out[i, j] = np.float32(0.0)
        for k in range(lhs.shape[1]):
            left = lhs[i, k]
            for j in range(rhs.shape[1]):
                out[i, j] = _fma32(left, rhs[k, j], out[i, j])
