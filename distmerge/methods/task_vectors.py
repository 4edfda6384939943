"""The task-vector family in one pipeline: delta, sparsify, (rescale), weight, sign consensus,
normalize, lambda. ``task_arithmetic``, ``ties``, ``dare_*``, ``breadcrumbs*`` and ``della*``
are this class with three switches, as in mergekit's generalized task arithmetic:

    delta_i  = x_i - base
    kept_i   = sparsify(delta_i)            (a Sparsifier: magnitude | breadcrumbs | random | della)
    kept_i  *= ||delta_i||_1 / ||kept_i||_1 (Rescale.L1; or Rescale.INVERSE_DENSITY: / density, / p_i)
    w_i d_i  = weight_i * kept_i
    mixed    = sum_i w_i d_i * [sign(w_i d_i) == sign(sum_j w_j d_j)]   (Consensus.SUM)
    mixed   /= sum_i w_i [mask_i]           (normalize; divisor 0 -> 1)
    out      = base + lambda * mixed

Whole-tensor quantities (thresholds, L1 ratios, 1-D DELLA probabilities) come from the
sparsifier's reduction rounds (:mod:`distmerge.methods.sparsification`). Each elementwise step
is a separately rounded torch op, so merge() gives the same bits for any row block.

Longer than 300 lines because the fused-kernel merge and the torch reference it must equal bit
for bit (``merge_reference``) are kept side by side, to be read against each other.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from enum import Enum
from typing import Any, ClassVar, cast

import numpy as np
import torch

from distmerge.methods import kernels, stack_sums
from distmerge.methods.base import (
    MergeMethod,
    Params,
    ParamSpec,
    Partials,
    ShardContext,
    TensorParams,
    compute_dtype,
    rows_in_compute,
)
from distmerge.methods.sparsification import (
    BREADCRUMBS,
    DELLA,
    MAGNITUDE,
    RANDOM,
    RESCALE_MODES,
    ChunkPartials,
    KernelTerms,
    Rescale,
    Round,
    Sparsifier,
    TaskVectorReductions,
    l1_ratio,
)


class Consensus(Enum):
    """How the experts' weighted deltas are combined."""

    NONE = "none"  # a plain sum
    SUM = "sum"  # TIES: elect each element's sign from the weighted sum, keep only agreeing deltas


class TaskVectorMethod(MergeMethod):
    """Base of the task-vector family; subclasses set the switches and the defaults."""

    uses_base = True
    min_experts = 1
    reads_stored_rows = True  # every sparsifier reads rows through delta_arrays or in_compute
    consensus: ClassVar[Consensus] = Consensus.NONE
    sparsifier: ClassVar[Sparsifier | None] = None
    default_normalize: ClassVar[bool] = False
    default_rescale: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        glob = {"normalize": ParamSpec(cls.default_normalize, bool), "lambda": ParamSpec(1.0)}
        model = {"weight": ParamSpec(None)}
        if cls.sparsifier is not None:
            glob["rescale"] = ParamSpec(cls.default_rescale, bool)
            glob["rescale_mode"] = ParamSpec(Rescale.L1.value, str, choices=RESCALE_MODES)
            model |= cls.sparsifier.model_parameters()
        cls.global_parameters = glob
        cls.model_parameters = model

    # ---- reduction rounds ----------------------------------------------------------------

    def rounds(self, params: TensorParams, shape: tuple[int, ...] | None = None) -> list[Round]:
        """The reduction rounds this tensor needs, in order. Without ``shape`` the list is the
        one for every shape (the engine runs only the first ``reduction_rounds(params, shape)``
        of them), so the rounds below look their kind up without it."""
        return [] if self.sparsifier is None else self.sparsifier.rounds(params, shape)

    def reduction_rounds(self, params: TensorParams, shape: tuple[int, ...] | None = None) -> int:
        return len(self.rounds(params, shape))

    def held_scratch_bytes(self, params: TensorParams, shape: tuple[int, ...]) -> int:
        return 0 if self.sparsifier is None else self.sparsifier.held_mask_bytes(params, shape)

    def validate(self, params: TensorParams, where: str, inputs: Sequence[str] = ()) -> None:
        if self.sparsifier is not None:
            self.sparsifier.validate(params, where, inputs)

    def partial_reductions(
        self,
        base: torch.Tensor | None,
        experts: Sequence[torch.Tensor],
        params: TensorParams,
        ctx: ShardContext,
        round_: int,
        previous: TaskVectorReductions | None,
    ) -> ChunkPartials[Any]:
        assert base is not None and self.sparsifier is not None
        return self.sparsifier.partials(self.rounds(params)[round_], base, experts, params, ctx, previous)

    def reduce(
        self,
        partials: Sequence[Partials],
        params: TensorParams,
        shape: tuple[int, ...],
        round_: int,
        previous: TaskVectorReductions | None,
    ) -> TaskVectorReductions:
        assert self.sparsifier is not None
        chunks = cast(Sequence[ChunkPartials[Any]], partials)
        return self.sparsifier.reduce(self.rounds(params)[round_], chunks, params, shape, previous)

    # ---- the merge -----------------------------------------------------------------------

    def sparsified(
        self, e: int, delta: torch.Tensor, p: Params, params: TensorParams, ctx: ShardContext,
        reduced: TaskVectorReductions | None,
    ) -> torch.Tensor:
        """Expert ``e``'s delta rows after sparsification and rescaling."""
        if self.sparsifier is None or not self.sparsifier.active(p):
            return delta
        held = self._held_mask(e, params, ctx, delta.numel())
        if held is not None:
            mask, divide_by = torch.from_numpy(held).reshape(delta.shape), 1.0
        else:
            mask, divide_by = self.sparsifier.keep(e, delta, p, ctx, reduced)
        kept = delta * mask
        rescale = Rescale.of(params.global_)
        if rescale is Rescale.NONE:
            return kept
        if rescale is Rescale.L1:
            assert reduced is not None
            ratio = l1_ratio(*reduced.l1_norms[e], delta.dtype)
            return kept if ratio == 1.0 else kept * ratio
        if isinstance(divide_by, torch.Tensor):
            return kept / divide_by.to(kept.dtype)
        return kept / divide_by

    def merge(
        self,
        base: torch.Tensor | None,
        experts: Sequence[torch.Tensor],
        params: TensorParams,
        ctx: ShardContext,
        reduced: TaskVectorReductions | None = None,
    ) -> torch.Tensor:
        """The merged rows: one fused kernel pass (:mod:`kernels`) where the compute dtype
        has one, else :meth:`merge_reference`; the two agree bit for bit.

        A shard that holds the row where a tie cut falls is merged in pieces around that row:
        only the row itself needs an explicit keep-mask, the rows on either side a threshold
        (outputs do not depend on the row blocks, so the pieces give the same bytes).
        """
        assert base is not None
        dtype = compute_dtype(base, ctx)
        mode = kernels.kernel_mode(dtype)
        if mode is None or not stack_sums.loops_follow(ctx.tensor_numel, len(experts)):
            return self.merge_reference(base, experts, params, ctx, reduced)
        cuts = sorted({r for r in (self.sparsifier.cut_rows(ctx, reduced) if self.sparsifier else [])
                       if ctx.row_start <= r < ctx.row_end})
        if cuts and ctx.row_end - ctx.row_start > 1:
            edges = sorted({ctx.row_start, ctx.row_end, *cuts, *(r + 1 for r in cuts)})
            pieces = []
            for a, b in zip(edges, edges[1:], strict=False):
                i, j = a - ctx.row_start, b - ctx.row_start
                pieces.append(self.merge(base[i:j], [x[i:j] for x in experts], params,
                                         replace(ctx, row_start=a, row_end=b), reduced))
            return torch.cat(pieces)
        kd = kernels.kernel_dtype(dtype)
        base_a, *xs = kernels.value_arrays([base, *experts], kd)
        terms = [self._kernel_terms(e, x, base, p, params, ctx, reduced)
                 for e, (x, p) in enumerate(zip(experts, params.experts, strict=True))]
        weights = [p["weight"] for p in params.experts]
        g = params.global_
        total_w = torch.tensor(weights, dtype=dtype).sum()  # float32 accumulation, one rounding
        consensus = self.consensus is Consensus.SUM
        normalize = bool(g["normalize"]) and (consensus or bool(total_w.abs() >= 1e-8))
        out = kernels.task_vectors(
            base_a, xs, mode,
            low=[t.low for t in terms], high=[t.high for t in terms], masks=[t.mask for t in terms],
            streams=[t.stream for t in terms],
            rescale_kind=[t.rescale_kind for t in terms],
            rescale=np.array([kernels.scalar(t.factor, dtype) for t in terms]),
            probs=[t.probs for t in terms],
            weights=kernels.rounded(weights, dtype), consensus=consensus, normalize=normalize,
            total_weight=total_w.to(kd).numpy(), lam=kernels.scalar(g["lambda"], dtype),
            tail=stack_sums.tail_offset(ctx.tensor_numel, ctx.element_start, dtype))
        return torch.from_numpy(out).reshape(base.shape).to(dtype)

    def _held_mask(self, e: int, params: TensorParams, ctx: ShardContext, count: int) -> np.ndarray | None:
        """The keep mask the L1 round left for these rows of a held tensor, which both merge
        paths read instead of deciding again (no divisor needed: the L1 rescale multiplies)."""
        if self.sparsifier is None or Rescale.of(params.global_) is not Rescale.L1:
            return None
        return self.sparsifier.held_mask(e, ctx, count)

    def _kernel_terms(
        self, e: int, x: torch.Tensor, base: torch.Tensor, p: Params, params: TensorParams, ctx: ShardContext,
        reduced: TaskVectorReductions | None,
    ) -> KernelTerms:
        """Expert ``e``'s sparsification and rescale in the form the fused kernel takes."""
        if self.sparsifier is None or not self.sparsifier.active(p):
            return KernelTerms()
        rescale = Rescale.of(params.global_)
        held = self._held_mask(e, params, ctx, x.numel())
        if held is not None:
            terms, divide_by = KernelTerms(mask=held), 1.0
        else:
            terms, divide_by = self.sparsifier.kernel_keep(e, x, base, p, ctx, reduced)
        dtype = compute_dtype(base, ctx)
        if rescale is Rescale.L1:
            assert reduced is not None
            ratio = l1_ratio(*reduced.l1_norms[e], dtype)
            if ratio != 1.0:
                terms.rescale_kind, terms.factor = kernels.RESCALE_MULTIPLY, ratio
        elif rescale is Rescale.INVERSE_DENSITY:
            if isinstance(divide_by, torch.Tensor):
                terms.rescale_kind = kernels.RESCALE_DIVIDE_BY_PROBS
                terms.probs = kernels.as_array(divide_by.to(dtype), kernels.kernel_dtype(dtype))
            else:
                terms.rescale_kind, terms.factor = kernels.RESCALE_DIVIDE, divide_by
        return terms

    def merge_reference(
        self,
        base: torch.Tensor,
        experts: Sequence[torch.Tensor],
        params: TensorParams,
        ctx: ShardContext,
        reduced: TaskVectorReductions | None = None,
    ) -> torch.Tensor:
        """mergekit 0.1.5's pipeline as torch ops: the float16 path, and the formulation the
        kernels reproduce.

        As mergekit: each delta is weighted by its weight rounded to the compute dtype
        (``torch.tensor(weights, dtype=deltas.dtype)``); sums over the models are torch's
        ``sum(dim=0)``, which accumulates bfloat16/float16 in float32 and rounds once, in the
        order :mod:`.stack_sums` gives for the shard's place in the tensor; the sign is elected by ``total >= 0`` on the rounded total.
        """
        base, experts = rows_in_compute(base, experts, ctx)
        w = torch.tensor([p["weight"] for p in params.experts], dtype=base.dtype)
        weighted = []
        for e, (x, p) in enumerate(zip(experts, params.experts, strict=True)):
            d = self.sparsified(e, x - base, p, params, ctx, reduced)
            weighted.append(d * w[e])
        if self.consensus is Consensus.SUM:
            # Elected sign s = +1 where the rounded weighted sum is >= 0 (so also at -0.0), else -1.
            # A delta agrees iff delta * s > 0 (a zero never agrees), so relu(delta * s) is |delta|
            # where it agrees and 0 elsewhere: summing those and multiplying by s gives mergekit's
            # masked sum exactly (s = +-1 makes every product exact), with float ops only.
            total = _sum(weighted, ctx)
            sign = torch.where(total >= 0, 1.0, -1.0).to(base.dtype)
            del total
            agreeing = [wd.mul(sign).clamp_(min=0.0) for wd in weighted]
            mixed = _sum(agreeing, ctx).mul_(sign)
            divisor = _sum([torch.where(a > 0, w[i], 0.0 * w[i]) for i, a in enumerate(agreeing)], ctx)
            del sign, agreeing
            if params.global_["normalize"]:
                divisor.add_(divisor == 0)
                mixed = mixed.div_(divisor)
        else:
            mixed = _sum(weighted, ctx)
            if params.global_["normalize"]:
                total_w = w.sum()
                if bool(total_w.abs() >= 1e-8):
                    mixed = mixed.div_(total_w)
        lam = params.global_["lambda"]
        if lam != 1.0:
            mixed = mixed.mul_(lam)
        return base + mixed


def _sum(tensors: Sequence[torch.Tensor], ctx: ShardContext) -> torch.Tensor:
    """mergekit's ``torch.stack(tensors).sum(dim=0)`` over the whole tensor, for this shard
    (:func:`stack_sums.stack_sum`: from +0.0, so a sum of -0.0 terms is +0.0; bfloat16/float16
    accumulate in float32, rounded once)."""
    return stack_sums.stack_sum(tensors, ctx.element_start, ctx.tensor_numel)


class TaskArithmetic(TaskVectorMethod):
    """Task arithmetic (Ilharco et al. 2023): ``base + lambda * sum_i w_i (x_i - base)``."""

    name = "task_arithmetic"
    nonfinite_reaches_output = True  # nothing is dropped: each delta, and the base, reach the sum


class Ties(TaskVectorMethod):
    name = "ties"
    consensus = Consensus.SUM
    sparsifier = MAGNITUDE
    default_normalize = True


class DareLinear(TaskVectorMethod):
    name = "dare_linear"
    sparsifier = RANDOM
    default_rescale = True


class DareTies(TaskVectorMethod):
    name = "dare_ties"
    consensus = Consensus.SUM
    sparsifier = RANDOM
    default_rescale = True


class Breadcrumbs(TaskVectorMethod):
    name = "breadcrumbs"
    sparsifier = BREADCRUMBS


class BreadcrumbsTies(TaskVectorMethod):
    name = "breadcrumbs_ties"
    consensus = Consensus.SUM
    sparsifier = BREADCRUMBS


class Della(TaskVectorMethod):
    name = "della"
    consensus = Consensus.SUM
    sparsifier = DELLA
    default_normalize = True
    default_rescale = True


class DellaLinear(TaskVectorMethod):
    name = "della_linear"
    sparsifier = DELLA
    default_rescale = True
