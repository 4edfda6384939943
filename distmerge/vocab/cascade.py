"""A streaming sum over rows that adds in the order of torch's CPU ``sum(dim=0)``.

torch (``aten/src/ATen/native/cpu/SumKernel.cpp``, ``multi_row_sum``) sums a column of ``n``
values with four accumulator levels: ``level_step = 2 ** max(4, ceil_log2(n) // 4)`` values go
one by one into level 0; after each such group level 0 is added into level 1 and cleared, and
whenever the count of values so far is a multiple of ``level_step ** j`` level j is carried up
into level j + 1 the same way; values after the last full group go into level 0, and at the end
level 0 += level 1, += level 2, += level 3. Accumulators are float32 for float32, bfloat16 and
float16 inputs and float64 for float64; ``mean`` then divides the sum by ``n`` in that type and
rounds to the input dtype. That is the order of the columns torch sums in its main loop,
groups of 4 SIMD vectors of accumulators (here 32 columns for float32, bfloat16 and float16, 16
for float64: every column of a real hidden size); the columns past the last full group are
summed by ``row_sum``: rows i = k (mod 4) into four such cascades over n // 4 rows, the last
n % 4 rows into the first, then first += second, += third, += fourth. The group width is
measured once per process and dtype (:func:`group_width`). Rows narrower than 32 values (a
bias) are not streamed: their n values are few, and ``torch.mean`` is called on all of them.
"""

from __future__ import annotations

import numpy as np
import torch

LEVELS = 4


def ceil_log2(n: int) -> int:
    """``at::native::utils::CeilLog2``: 1 for n <= 2."""
    return 1 if n <= 2 else (n - 1).bit_length()


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class CascadeSum:
    """Sum of ``n`` rows (known in advance), fed in order in chunks of any size."""

    def __init__(self, n: int, row_shape: tuple[int, ...], dtype: torch.dtype) -> None:
        self.n = n
        self.dtype = dtype
        self.acc_dtype = accumulator_dtype(dtype)
        self.power = max(4, ceil_log2(n) // LEVELS)
        self.step = 1 << self.power
        self.mask = self.step - 1
        self.acc = [torch.zeros(row_shape, dtype=self.acc_dtype) for _ in range(LEVELS)]
        self.seen = 0
        self.full_end = (n // self.step) * self.step  # rows before this go through the levels

    def add(self, rows: torch.Tensor) -> None:
        """Add the next ``len(rows)`` rows (in order). Level 0 takes a group's rows with
        ``numpy.add.accumulate`` (one IEEE addition after another, like torch's loop)."""
        if self.seen + rows.shape[0] > self.n:
            raise ValueError(f"more than the {self.n} rows announced")
        x = rows.to(self.acc_dtype).numpy()
        acc, level0 = self.acc, self.acc[0].numpy()
        i, k = 0, x.shape[0]
        while i < k:
            take = min(self.step - self.seen % self.step, k - i) if self.seen < self.full_end else k - i
            chain = np.concatenate([level0[None], x[i:i + take]])
            np.add.accumulate(chain, axis=0, out=chain)
            level0[...] = chain[-1]
            i += take
            self.seen += take
            if self.seen <= self.full_end and self.seen % self.step == 0:
                for j in range(1, LEVELS):
                    acc[j] += acc[j - 1]
                    acc[j - 1].zero_()
                    if self.seen & (self.mask << (j * self.power)):
                        break

    def total(self) -> torch.Tensor:
        if self.seen != self.n:
            raise ValueError(f"{self.seen} of {self.n} rows added")
        out = self.acc[0].clone()
        for j in range(1, LEVELS):
            out += self.acc[j]
        return out

    def mean(self) -> torch.Tensor:
        """``torch.mean(rows, dim=0)`` of all the rows, in the input dtype."""
        return self.total().div_(self.n).to(self.dtype)


class RowSum:
    """torch's ``row_sum``: four interleaved cascades over n // 4 rows, then the tail."""

    def __init__(self, n: int, row_shape: tuple[int, ...], dtype: torch.dtype) -> None:
        self.n, self.quarter = n, n // 4
        self.parts = [CascadeSum(self.quarter, row_shape, dtype) for _ in range(4)]
        self.tail: torch.Tensor | None = None if self.quarter else torch.zeros(row_shape, dtype=accumulator_dtype(dtype))
        self.seen = 0

    def add(self, rows: torch.Tensor) -> None:
        rows = rows.to(self.parts[0].acc_dtype)
        split = max(0, min(rows.shape[0], 4 * self.quarter - self.seen))
        for r in range(4):  # rows of global index = r (mod 4), before the tail
            first = (r - self.seen) % 4
            if first < split:
                self.parts[r].add(rows[first:split:4])
        if split < rows.shape[0]:
            if self.tail is None:
                self.tail = self.parts[0].total()
            for row in rows[split:]:
                self.tail += row
        self.seen += rows.shape[0]

    def total(self) -> torch.Tensor:
        out = self.tail if self.tail is not None else self.parts[0].total()
        for part in self.parts[1:]:
            out = out + part.total() if self.quarter else out + part.acc[0]
        return out


def _probe(width: int, dtype: torch.dtype) -> bool:
    g = torch.Generator().manual_seed(width)
    for h in (width + width // 2 + 3, 3 * width - 1, 2 * width + 9):
        x = spread_values((301, h), g).to(dtype)
        if not torch.equal(torch.sum(x, dim=0, dtype=accumulator_dtype(dtype)), _split_total(x, width)):
            return False
    return True


def _split_total(x: torch.Tensor, width: int) -> torch.Tensor:
    n, h = x.shape
    main = (h // width) * width
    a, b = CascadeSum(n, (main,), x.dtype), RowSum(n, (h - main,), x.dtype)
    a.add(x[:, :main])
    b.add(x[:, main:])
    return torch.cat([a.total(), b.total()])


def spread_values(shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    """float64 values of exponents spread over 2**-12..2**12: their sums round in every dtype,
    so a different order of additions shows."""
    return torch.randn(shape, generator=g, dtype=torch.float64) * torch.exp2(
        torch.randint(-12, 13, shape, generator=g).double())


_WIDTHS: dict[torch.dtype, int | None] = {}


def group_width(dtype: torch.dtype) -> int | None:
    """Columns per main-loop group of torch's dim-0 sum of ``dtype`` on this machine (4 SIMD
    vectors), found by trying the candidates on a probe; None when none reproduces torch
    (then every column is summed as one plain cascade, and may differ in the last bits)."""
    if dtype not in _WIDTHS:
        _WIDTHS[dtype] = next((w for w in (8, 16, 32, 64, 128) if _probe(w, dtype)), None)
    return _WIDTHS[dtype]


class StreamingMean:
    """``torch.mean(rows, dim=0)`` of ``n`` rows of ``row_shape`` fed in order, in chunks."""

    MIN_STREAMED = 32

    def __init__(self, n: int, row_shape: tuple[int, ...], dtype: torch.dtype) -> None:
        self.n, self.row_shape, self.dtype = n, row_shape, dtype
        numel = 1
        for d in row_shape:
            numel *= d
        self.numel = numel
        self.kept: list[torch.Tensor] | None = [] if numel < self.MIN_STREAMED else None
        width = group_width(dtype) if self.kept is None else None
        self.main = (numel // width) * width if width else numel
        self.cascade = CascadeSum(n, (self.main,), dtype)
        self.rowsum = RowSum(n, (numel - self.main,), dtype) if self.main < numel else None

    def add(self, rows: torch.Tensor) -> None:
        flat = rows.reshape(rows.shape[0], self.numel)
        if self.kept is not None:
            self.kept.append(flat.to(self.dtype).clone())
            return
        self.cascade.add(flat[:, :self.main])
        if self.rowsum is not None:
            self.rowsum.add(flat[:, self.main:])

    def mean(self) -> torch.Tensor:
        if self.kept is not None:
            whole = torch.cat(self.kept) if self.kept else torch.zeros((0, self.numel), dtype=self.dtype)
            return torch.mean(whole.reshape(self.n, *self.row_shape), dim=0)
        total = self.cascade.total()
        if self.rowsum is not None:
            total = torch.cat([total, self.rowsum.total()])
        return total.div_(self.n).to(self.dtype).reshape(self.row_shape)
