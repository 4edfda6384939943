"""The sparsifier interface: which delta elements survive, and the rounds that decides it.

A :class:`Sparsifier` is one kind of sparsification (magnitude trimming, breadcrumbs, DARE's
random drop, DELLA's rank-dependent sampling). It owns everything that differs between the
kinds: its parameters (``density`` and what else the kind needs), the reduction rounds a tensor
needs first, each round's partials and reduce, the keep rule in both forms the merge uses
(a torch mask for the reference formulation, :class:`KernelTerms` for the fused kernel) and
what ``rescale_mode: inverse_density`` divides by. The L1 rescale round is shared here: every
kind measures its delta's L1 norm before and after its own keep rule.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from enum import Enum
from typing import Any, ClassVar

import numpy as np
import torch

from distmerge.methods import kernels, reductions
from distmerge.methods.base import Params, ParamSpec, ShardContext, TensorParams, unit_interval
from distmerge.methods.philox import KeepStream
from distmerge.methods.random_stream import keep_flags
from distmerge.methods.sparsification.rounds import (
    ChunkPartials,
    L1Partial,
    Round,
    TaskVectorReductions,
)

RESCALE_EPS = 1e-7  # mergekit: no rescale when either L1 norm is below this
_density_check, _density_allowed = unit_interval()

# What ``rescale_mode: inverse_density`` divides the kept delta by: the density, or DELLA's
# per-element keep probabilities.
Divisor = float | torch.Tensor


class Rescale(Enum):
    """How kept deltas are scaled back up (``rescale`` and ``rescale_mode`` together)."""

    NONE = "none"
    L1 = "l1"  # by ||delta||_1 / ||kept||_1 over the whole tensor (a reduction round)
    INVERSE_DENSITY = "inverse_density"  # by 1 / density, or 1 / p per element (DELLA)

    @classmethod
    def of(cls, global_: Params) -> Rescale:
        if not global_.get("rescale", False):
            return cls.NONE
        return cls(global_["rescale_mode"])


RESCALE_MODES = (Rescale.L1.value, Rescale.INVERSE_DENSITY.value)  # the values of rescale_mode
HELD_MASK = "keep_mask"  # ShardContext.held key: (HELD_MASK, expert, first element) -> the chunk's mask


@dataclass
class KernelTerms:
    """One expert's keep rule and rescale for :func:`kernels.task_vectors` (default: keep all).
    ``stream``: a keep-mask the kernels draw block by block (DARE) instead of ``mask``."""

    low: int = kernels.NO_LOW
    high: int = kernels.NO_HIGH
    mask: np.ndarray | None = None
    stream: KeepStream | None = None
    rescale_kind: int = kernels.RESCALE_NONE
    factor: float = 1.0
    probs: np.ndarray | None = None


def stream_model(ctx: ShardContext, e: int) -> int:
    """The model index that keys expert ``e``'s random stream."""
    return ctx.expert_ids[e] if ctx.expert_ids else e


def l1_ratio(before: float, after: float, dtype: torch.dtype = torch.float64) -> float:
    """mergekit's L1 rescale factor in the compute dtype ``dtype``; 1 (no rescale) when either
    norm is below 1e-7.

    mergekit sums ``|delta|`` and ``|kept|`` into compute-dtype scalars and divides those
    (``masked * (before_scale / after_scale)``), so both norms are rounded to ``dtype``, compared
    with 1e-7 there, and divided in ``dtype`` (here from float64 sums, which the rounding to
    ``dtype`` makes equal to mergekit's except near a rounding boundary).
    """
    b = torch.tensor(before, dtype=torch.float64).to(dtype)
    a = torch.tensor(after, dtype=torch.float64).to(dtype)
    if bool(b < RESCALE_EPS) or bool(a < RESCALE_EPS):
        return 1.0
    return float(b / a)


def numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


class Sparsifier:
    """Base of the sparsification kinds; one stateless instance per kind."""

    name: ClassVar[str]
    # True: the keep rule costs more than reading a mask (random draws, per-row ranks). Where the
    # engine holds a tensor's rows for its rounds and its merge (``ShardContext.held``), the L1
    # round keeps each chunk's masks there and the merge reads them instead of deciding again.
    holds_masks: ClassVar[bool] = False

    def model_parameters(self) -> dict[str, ParamSpec]:
        """Per-model parameters this kind reads (after ``weight``), in the order users see them."""
        return {"density": ParamSpec(1.0, float, _density_check, _density_allowed)}

    def active(self, p: Params) -> bool:
        """Whether this expert's delta is sparsified at all (density 1 keeps everything)."""
        return p["density"] < 1.0

    def rounds(self, params: TensorParams, shape: tuple[int, ...] | None = None) -> list[Round]:
        """The reduction rounds this tensor needs, in order (see ``MergeMethod.reduction_rounds``)."""
        if not any(self.active(p) for p in params.experts):
            return []
        return self.kind_rounds(Rescale.of(params.global_) is Rescale.L1, shape)

    def kind_rounds(self, l1: bool, shape: tuple[int, ...] | None) -> list[Round]:
        """This kind's rounds when some expert is sparsified; ``l1``: the L1 rescale is on."""
        return [Round.L1] if l1 else []

    def validate(self, params: TensorParams, where: str, inputs: Sequence[str] = ()) -> None:
        """Cross-parameter checks of this kind (raise ConfigError)."""

    # ---- reduction rounds -----------------------------------------------------------------

    def partials(
        self, round_: Round, base: torch.Tensor, experts: Sequence[torch.Tensor], params: TensorParams,
        ctx: ShardContext, previous: TaskVectorReductions | None,
    ) -> ChunkPartials[Any]:
        """One chunk's partials of ``round_``: one entry per sparsified expert that needs one."""
        out: ChunkPartials[Any] = ChunkPartials()
        for e, (x, p) in enumerate(zip(experts, params.experts, strict=True)):
            if self.active(p):
                part = self.partial(round_, e, base, x, p, ctx, previous)
                if part is not None:
                    out.experts[e] = part
        # Each expert's partial that read every delta (x - base) may prove its rows finite.
        out.inputs_finite = len(out.experts) == len(experts) and all(
            getattr(part, "finite", False) for part in out.experts.values())
        return out

    def partial(
        self, round_: Round, e: int, base: torch.Tensor, x: torch.Tensor, p: Params, ctx: ShardContext,
        previous: TaskVectorReductions | None,
    ) -> Any:
        """Expert ``e``'s partial of ``round_`` on one chunk (None: nothing to ship)."""
        assert round_ is Round.L1, round_
        return self.l1_partial(e, base, x, p, ctx, previous)

    def reduce(
        self, round_: Round, partials: Sequence[ChunkPartials[Any]], params: TensorParams,
        shape: tuple[int, ...], previous: TaskVectorReductions | None,
    ) -> TaskVectorReductions:
        """The reduced values after ``round_``: ``previous`` carried forward, this round's added."""
        out = replace(previous) if previous is not None else TaskVectorReductions()
        self.reduce_into(out, round_, partials, params, shape)
        return out

    def reduce_into(
        self, out: TaskVectorReductions, round_: Round, partials: Sequence[ChunkPartials[Any]],
        params: TensorParams, shape: tuple[int, ...],
    ) -> None:
        """Add ``round_``'s reduced values (chunk partials in chunk order) to ``out``."""
        assert round_ is Round.L1, round_
        self.reduce_l1(out, partials, params)

    def l1_partial(
        self, e: int, base: torch.Tensor, x: torch.Tensor, p: Params, ctx: ShardContext,
        reduced: TaskVectorReductions | None,
    ) -> L1Partial:
        """float64 L1 norms of expert ``e``'s delta rows before and after the keep rule."""
        terms, _ = self.kernel_keep(e, x, base, p, ctx, reduced)
        if self.holds_masks and ctx.held is not None:
            terms = KernelTerms(mask=terms.mask if terms.stream is None else keep_flags(terms.stream, x.numel()))
            ctx.held[(HELD_MASK, e, ctx.element_start)] = terms.mask
        return L1Partial(*kernels.abs_sums(*kernels.delta_arrays(base, x, ctx.compute), terms.low, terms.high, terms.mask,
                                           terms.stream))

    def reduce_l1(self, out: TaskVectorReductions, partials: Sequence[ChunkPartials[Any]],
                  params: TensorParams) -> None:
        """Each sparsified expert's L1 rescale factor from the chunks' norms, summed in chunk order."""
        out.l1_norms = {}
        for e, p in enumerate(params.experts):
            if self.active(p):
                before = reductions.ordered_sum([c.experts[e].before for c in partials])
                after = reductions.ordered_sum([c.experts[e].after for c in partials])
                out.l1_norms[e] = (before, after)

    def held_mask_bytes(self, params: TensorParams, shape: tuple[int, ...]) -> int:
        """What the L1 round of a held tensor of ``shape`` keeps for its merge: one byte per
        element of each sparsified expert (:attr:`holds_masks`), else nothing."""
        if not self.holds_masks or Rescale.of(params.global_) is not Rescale.L1 or not self.rounds(params, shape):
            return 0
        return numel(shape) * sum(self.active(p) for p in params.experts)

    def held_mask(self, e: int, ctx: ShardContext, count: int) -> np.ndarray | None:
        """Expert ``e``'s keep mask of the ``count`` elements from ``ctx.element_start``, as the L1
        round left it in ``ctx.held`` (a merge block lies within one canonical chunk); None where
        no round kept one."""
        if not self.holds_masks or ctx.held is None:
            return None
        s = ctx.element_start
        for (kind, expert, start), mask in ctx.held.items():
            if kind == HELD_MASK and expert == e and start <= s and s + count <= start + mask.size:
                return mask[s - start:s - start + count]
        return None

    # ---- the keep rule --------------------------------------------------------------------

    def cut_rows(self, ctx: ShardContext, reduced: TaskVectorReductions | None) -> list[int]:
        """Rows whose keep rule is an explicit mask rather than a threshold (a tie cut's row):
        the merge computes them apart from their neighbours. None by default."""
        return []

    def keep(
        self, e: int, delta: torch.Tensor, p: Params, ctx: ShardContext, reduced: TaskVectorReductions | None,
    ) -> tuple[torch.Tensor, Divisor]:
        """Keep-mask of expert ``e``'s delta rows (the torch formulation) and what
        ``inverse_density`` divides by."""
        raise NotImplementedError

    def kernel_keep(
        self, e: int, x: torch.Tensor, base: torch.Tensor, p: Params, ctx: ShardContext,
        reduced: TaskVectorReductions | None,
    ) -> tuple[KernelTerms, Divisor]:
        """The same keep rule as the fused kernel takes it (key thresholds or an explicit mask;
        no rescale yet), and what ``inverse_density`` divides by."""
        raise NotImplementedError
