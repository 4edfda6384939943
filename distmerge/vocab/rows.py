"""Per-row recipes of the vocabulary-aligned input tensors (mergekit 0.1.5's
``PermutedVocabulary``), as data: any row range of any model's aligned tensor is built from the
input rows it needs, never from the whole matrix.

Output row t < len(vocab) of model m is, in mergekit's precedence:

1. model m's own row ``perm[m][t]`` when it has the token and the token is not ``force``d;
2. else the token's default row, the same for every model: for a configured token its
   ``source`` (``zero``, a model's row of the same token, or a ``model_token`` row of a model's
   original vocabulary); for an unconfigured one held by a single model, that model's row; by
   none, zero; by the base model (among this tensor's models), the base's row; else the mean of
   the rows of the models that have it, added in model order onto zeros, then ``/= count``;
3. else zero (mergekit logs an error; no configuration reaches it).

Rows t >= len(vocab) (``pad_to_multiple_of``) are the mean of model m's first len(vocab)
aligned rows, in torch's summation order (:mod:`distmerge.vocab.cascade`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from distmerge.vocab.cascade import StreamingMean

ReadRows = Callable[[int, np.ndarray], torch.Tensor]

NONE, MEAN, COPY, ZERO = 0, 1, 2, 3  # recipe kinds of a default row
MEAN_CHUNK_BYTES = 1000**2  # aligned rows assembled at a time for a padding mean (~5x that at peak)


@dataclass(frozen=True, eq=False)
class VocabularyRows:
    """Recipes of the aligned rows of one vocabulary tensor, for models ``0..len(own)-1`` in
    the order the merge passes them (the tensor's model order)."""

    vocab_len: int  # len(vocab): rows with a recipe
    out_rows: int  # rows of each aligned tensor (vocab_len rounded up by pad_to_multiple_of)
    row_shape: tuple[int, ...]
    dtype: torch.dtype  # of the aligned tensors: the inputs' dtypes promoted
    own: tuple[np.ndarray, ...]  # per model, per token: its own input row, or -1 (default row)
    present: tuple[np.ndarray, ...]  # per model, per token: its row of the token, or -1
    kind: np.ndarray  # per token: NONE, MEAN, COPY or ZERO (its default row)
    copy_model: np.ndarray  # COPY: which model's
    copy_row: np.ndarray  # COPY: which input row

    @property
    def num_models(self) -> int:
        return len(self.own)

    def _check(self, m: int, r0: int, r1: int) -> None:
        if not 0 <= m < self.num_models:
            raise IndexError(f"model {m} of {self.num_models}")
        if not 0 <= r0 <= r1 <= self.out_rows:
            raise IndexError(f"rows [{r0}, {r1}) of {self.out_rows}")

    def needed_rows(self, m: int, r0: int, r1: int) -> np.ndarray:
        """The input rows of model ``m`` (sorted, unique) that aligning rows [r0, r1) of every
        model needs. Rows at or past ``vocab_len`` need the padding means instead."""
        self._check(m, r0, r1)
        hi = min(r1, self.vocab_len)
        if r0 >= hi:
            return np.zeros(0, dtype=np.int64)
        kind = self.kind[r0:hi]
        parts = [self.own[m][r0:hi]]
        parts.append(np.where(kind == MEAN, self.present[m][r0:hi], -1))
        parts.append(np.where((kind == COPY) & (self.copy_model[r0:hi] == m), self.copy_row[r0:hi], -1))
        rows = np.unique(np.concatenate(parts))
        return rows[rows >= 0]

    def padded(self, r0: int, r1: int) -> bool:
        """Whether rows [r0, r1) include padding rows (which need ``padding_mean``)."""
        return r1 > self.vocab_len and r1 > r0

    def assemble(self, m: int, r0: int, r1: int, read_rows: ReadRows,
                 pad_mean: torch.Tensor | None = None) -> torch.Tensor:
        """Rows [r0, r1) of model ``m``'s aligned tensor, ``[r1 - r0, *row_shape]``.

        ``read_rows(model, rows)`` returns those input rows of that model. Padding rows take
        ``pad_mean`` (from :meth:`padding_mean`), computed here when not given.
        """
        self._check(m, r0, r1)
        out = torch.zeros((r1 - r0, *self.row_shape), dtype=self.dtype)
        hi = min(r1, self.vocab_len)
        if r0 < hi:
            self._fill(m, r0, hi, read_rows, out)
        if self.padded(r0, r1):
            if pad_mean is None:
                pad_mean = self.padding_mean(m, read_rows)
            out[max(r0, self.vocab_len) - r0:] = pad_mean
        return out

    def _fill(self, m: int, r0: int, hi: int, read_rows: ReadRows, out: torch.Tensor) -> None:
        own = self.own[m][r0:hi]
        mine = np.nonzero(own >= 0)[0]
        if mine.size:
            out[torch.from_numpy(mine)] = read_rows(m, own[mine]).to(self.dtype)
        rest = np.nonzero(own < 0)[0]
        kind = self.kind[r0:hi][rest]
        for src in np.unique(self.copy_model[r0:hi][rest[kind == COPY]]):
            at = rest[(kind == COPY) & (self.copy_model[r0:hi][rest] == src)]
            out[torch.from_numpy(at)] = read_rows(int(src), self.copy_row[r0:hi][at]).to(self.dtype)
        at = rest[kind == MEAN]
        if at.size:
            out[torch.from_numpy(at)] = self._means(r0 + at, read_rows)

    def _means(self, tokens: np.ndarray, read_rows: ReadRows) -> torch.Tensor:
        """Mean rows as mergekit: zeros, + each model's row in model order, then /= count."""
        acc = torch.zeros((tokens.size, *self.row_shape), dtype=self.dtype)
        count = np.zeros(tokens.size, dtype=np.int64)
        for j in range(self.num_models):
            rows = self.present[j][tokens]
            has = np.nonzero(rows >= 0)[0]
            if has.size:
                at = torch.from_numpy(has)
                acc[at] = acc[at] + read_rows(j, rows[has]).to(self.dtype)
                count[has] += 1
        for c in np.unique(count):
            at = torch.from_numpy(np.nonzero(count == c)[0])
            part = acc[at]
            part /= int(c)
            acc[at] = part
        return acc

    def padding_mean(self, m: int, read_rows: ReadRows, chunk_rows: int | None = None) -> torch.Tensor:
        """Mean of model ``m``'s first ``vocab_len`` aligned rows, streamed ``chunk_rows`` at a
        time (default: about ``MEAN_CHUNK_BYTES``, so memory stays flat at any width) in
        torch's ``mean(dim=0)`` order (a padding row's value); the chunking does not change it."""
        if chunk_rows is None:
            row_bytes = max(1, int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize)
            chunk_rows = max(1, MEAN_CHUNK_BYTES // row_bytes)
        acc = StreamingMean(self.vocab_len, self.row_shape, self.dtype)
        for c0 in range(0, self.vocab_len, chunk_rows):
            c1 = min(c0 + chunk_rows, self.vocab_len)
            acc.add(self.assemble(m, c0, c1, read_rows))
        return acc.mean()


def promoted_dtype(dtypes: Sequence[torch.dtype]) -> torch.dtype:
    """The aligned tensors' dtype: the models' dtypes promoted in order, as mergekit."""
    out = dtypes[0]
    for d in dtypes[1:]:
        out = torch.promote_types(out, d)
    return out


def frozen(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a

