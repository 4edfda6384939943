"""NaN/Inf counting, defined once: for the worker's check of input rows and for ``verify``.

Why the two steps: a float sum is finite iff every element is (NaN and Inf propagate through
a sum; a sum that merely overflows is ruled out by the exact count that follows), and one sum
is several times cheaper than ``torch.isfinite`` on every element. So clean data, the common
case, costs one reduction; only data whose sum is not finite is counted element by element.
"""

from __future__ import annotations

import torch

from distmerge.dtypes import FLOAT_CODES, SAFETENSORS_TO_TORCH
from distmerge.errors import DistmergeError
from distmerge.io.safetensors import TensorInfo, read_rows
from distmerge.io.storage import Location, storage_for

# Rows a whole-tensor scan reads at once: bounded memory for any tensor size.
SCAN_BLOCK_BYTES = 64 * 1000**2


def count_nonfinite(values: torch.Tensor) -> int:
    """How many NaN/Inf values ``values`` holds (0 for a tensor that is not floating point)."""
    if not values.is_floating_point() or bool(torch.isfinite(values.sum())):
        return 0
    return int((~torch.isfinite(values)).sum())


def count_nonfinite_in_tensor(info: TensorInfo, block_bytes: int = SCAN_BLOCK_BYTES) -> int:
    """NaN/Inf values of a stored float tensor, read in row blocks of about ``block_bytes``
    and counted in float32 (0 for integer and 8-bit float tensors)."""
    if info.dtype not in FLOAT_CODES or not info.nbytes:
        return 0
    step = max(1, block_bytes // max(1, info.row_nbytes(info.dtype)))
    return sum(count_nonfinite(read_rows(info, r0, min(info.rows, r0 + step)).float())
               for r0 in range(0, info.rows, step))


def crc_and_nonfinite(location: Location, offset: int, length: int, dtype: str, what: str,
                      error: type[DistmergeError] = DistmergeError) -> tuple[int | None, int]:
    """CRC-32 of a span (None if the location holds fewer bytes) and the NaN/Inf count of the
    ``dtype`` values in it, from one read: verify reads the output once."""
    values_dtype = SAFETENSORS_TO_TORCH[dtype] if dtype in FLOAT_CODES else None
    bad = 0

    def count(chunk: memoryview) -> None:
        nonlocal bad
        if values_dtype is not None:
            bad += count_nonfinite(torch.frombuffer(chunk, dtype=values_dtype))

    crc = storage_for(location).crc32(location, offset, length, what, error, on_chunk=count)
    return crc, bad
