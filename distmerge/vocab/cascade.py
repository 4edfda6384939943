"""``torch.mean(rows, dim=0)`` of many rows fed in chunks, in torch's summation order.

The padding rows of a resized vocabulary are the mean of a model's embedding rows, and a 70B
model's embedding does not fit in one process. The rows stream through torch's two orders
of a dim-0 sum (:mod:`distmerge.methods.stack_sums`): the columns in whole groups of vectors
by :class:`~distmerge.methods.stack_sums.CascadeSum`, the rest by
:class:`~distmerge.methods.stack_sums.RowSum`; ``mean`` then divides the sum by ``n`` in the
accumulator type and rounds to the input dtype. Rows narrower than 32 values (a bias) are not
streamed: their n values are few, and ``torch.mean`` is called on all of them.
"""

from __future__ import annotations

import torch

from distmerge.methods.stack_sums import CascadeSum, RowSum, group_width


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
