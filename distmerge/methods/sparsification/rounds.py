"""The task-vector family's reduction rounds, typed: round kinds, per-chunk partials, results.

A round reads the tensor once in canonical chunks. Each chunk's partials hold one entry per
sparsified expert (exact integer histograms, float64 sums, or the chunk's raw deltas and
draws); :class:`TaskVectorReductions` is what the reduce of every round so far produced, and
what ``merge`` finally gets.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Generic, TypeVar

import torch

from distmerge.methods.base import Partials, Reductions, sums_prove_finite
from distmerge.methods.selection import Speculation, WindowCount


class Round(Enum):
    """What one reduction round computes."""

    SPECULATE = "speculate"  # the threshold from each chunk's expected window and the count above it
    SELECT_HIGH = "select_high"  # radix selection round 0: high 16 bits of the keys (+ speculative low bits)
    SELECT_LOW = "select_low"  # radix selection round 1: low 16 bits inside the located bucket
    TIES = "ties"  # per-row counts of the elements tied at a threshold (only where they must be split)
    L1 = "l1"  # float64 L1 norms of each delta before and after sparsification
    DELLA = "della"  # 1-D tensors: keep probabilities ranked over the whole vector; else as L1


class Bound(Enum):
    """Which side of the kept magnitudes a threshold bounds (breadcrumbs uses both)."""

    LOW = "low"  # keep keys >= the threshold
    HIGH = "high"  # keep keys < the threshold


@dataclass
class SpeculativePartial:
    """The speculative round of one expert on one chunk: the chunk's rows, and per bound its
    window, its count of keys above the window and the low bits of the keys inside."""

    rows: tuple[int, int]
    windows: dict[Bound, WindowCount]
    # a chunk that is the whole tensor: per bound whose ties must be split, its tie rows (as
    # in :class:`TiePartial`)
    ties: dict[Bound, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    # keys of NaN/Inf deltas in the chunk, counted in the same pass (-1: not counted)
    nonfinite: int = -1

    @property
    def finite(self) -> bool:
        """Every delta of the chunk is finite, so are the expert's and the base's rows."""
        return self.nonfinite == 0


@dataclass
class HighPartial:
    """Round 0 of one expert on one chunk: the high-bits histogram, and per bound the low bits
    of the keys in the buckets where the chunk expects the threshold."""

    histogram: torch.Tensor
    speculated: dict[Bound, Speculation]


@dataclass
class LowPartial:
    """Round 1 of one expert on one chunk, per bound: the distinct low 16 bits of the keys in
    the located bucket, and how often each occurs; and, for bounds whose threshold round 0
    already resolved and whose ties must be split, the tie rows (as :class:`TiePartial`)."""

    low: dict[Bound, tuple[torch.Tensor, torch.Tensor]]
    ties: dict[Bound, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


@dataclass
class TiePartial:
    """One expert on one chunk, per bound that splits its ties: the absolute rows holding
    elements tied at the threshold key, and how many each holds (int64, rows ascending)."""

    rows: dict[Bound, tuple[torch.Tensor, torch.Tensor]]


@dataclass
class L1Partial:
    """float64 L1 norms of one expert's delta rows of one chunk, before and after sparsification."""

    before: float
    after: float

    @property
    def finite(self) -> bool:
        """Every delta of the chunk is finite (``before`` sums all their magnitudes), so are the
        expert's and the base's rows (:func:`~distmerge.methods.base.sums_prove_finite`)."""
        return sums_prove_finite([self.before])


@dataclass
class VectorPartial:
    """A 1-D DELLA chunk of one expert: its deltas and uniform draws (ranked in the reduce)."""

    delta: torch.Tensor
    draws: torch.Tensor

    @property
    def finite(self) -> bool:
        """Every delta ``x - base`` of the chunk is finite, so are the expert's and the base's
        rows (one pass over the deltas instead of one over each source)."""
        return bool(torch.isfinite(self.delta).all())


P = TypeVar("P", SpeculativePartial, HighPartial, LowPartial, TiePartial, L1Partial, VectorPartial)


@dataclass
class ChunkPartials(Partials, Generic[P]):
    """One chunk's partials of one round: expert index -> that expert's partial (sparsified
    experts only)."""

    experts: dict[int, P] = field(default_factory=dict)


@dataclass(kw_only=True)
class TaskVectorReductions(Reductions):
    """One tensor's reduced values after the rounds so far, keyed by expert index."""

    # bound -> (bucket of the high 16 bits, rank left inside it), after round 0 of a selection
    buckets: dict[int, dict[Bound, tuple[int, int]]] = field(default_factory=dict)
    # bound -> exact selection key of the threshold (float32 bit pattern of the magnitude)
    thresholds: dict[int, dict[Bound, int]] = field(default_factory=dict)
    # bound -> how many elements tied at the threshold rank inside the bound's top r, where
    # that is fewer than all of them (absent: every tie is inside)
    tie_need: dict[int, dict[Bound, int]] = field(default_factory=dict)
    # True: the speculative round gave every threshold (the radix rounds are skipped)
    speculated: bool = False
    # bound -> (first row, end row, ties inside in it): the canonical chunk where a cut falls,
    # when the thresholds came from the speculative round (its tie round reads that chunk only)
    tie_chunks: dict[int, dict[Bound, tuple[int, int, int]]] = field(default_factory=dict)
    # bound -> (row, count): the ties inside are those in rows before ``row`` and the first
    # ``count`` (by position) in ``row`` (after the TIES round)
    tie_cuts: dict[int, dict[Bound, tuple[int, int]]] = field(default_factory=dict)
    # float64 L1 norms of each delta before and after sparsification (mergekit's rescale divides
    # them in the compute dtype: sparsification.base.l1_ratio)
    l1_norms: dict[int, tuple[float, float]] = field(default_factory=dict)
    # 1-D DELLA: keep probabilities of the whole vector
    probs: dict[int, torch.Tensor] = field(default_factory=dict)
