"""The task-vector family in one pipeline: delta, sparsify, (rescale), weight, sign consensus,
normalize, lambda. ``task_arithmetic``, ``ties``, ``dare_*``, ``breadcrumbs*`` and ``della*``
are this class with four switches, as in mergekit's generalized task arithmetic:

    delta_i  = x_i - base
    kept_i   = sparsify(delta_i)            (magnitude | breadcrumbs | random | della)
    kept_i  *= ||delta_i||_1 / ||kept_i||_1 (rescale, mode l1; or / density, / p_i)
    w_i d_i  = weight_i * kept_i
    mixed    = sum_i w_i d_i * [sign(w_i d_i) == sign(sum_j w_j d_j)]   (consensus)
    mixed   /= sum_i w_i [mask_i]           (normalize; divisor 0 -> 1)
    out      = base + lambda * mixed

Whole-tensor quantities are statistics rounds, named stages computed per tensor:
``select_high``/``select_low`` (radix selection of magnitude thresholds), ``l1`` (float64
L1 sums of each delta before and after sparsification), ``della`` (1-D tensors: keep
probabilities ranked over the whole vector; L1 sums). Each elementwise step is a separately
rounded torch op, so merge() gives the same bits for any row block.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from distmerge.errors import ConfigError
from distmerge.methods import kernels, reductions, selection
from distmerge.methods.base import (
    STATISTICS_COMPLETE,
    MergeMethod,
    Params,
    ParamSpec,
    ShardContext,
    TensorParams,
    unit_interval,
)
from distmerge.methods.random_stream import uniforms
from distmerge.methods.sparsify import (
    TrimRanks,
    breadcrumbs_ranks,
    dare_mask,
    della_mask,
    della_probabilities,
    magnitude_mask,
    magnitude_ranks,
)

RESCALE_EPS = 1e-7  # mergekit: no rescale when either L1 norm is below this
_density_check, _density_allowed = unit_interval()


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


class TaskVectorMethod(MergeMethod):
    """Base of the task-vector family; subclasses set the switches and the defaults."""

    uses_base = True
    min_experts = 1
    consensus: ClassVar[bool] = False
    sparsifier: ClassVar[str | None] = None  # "magnitude" | "breadcrumbs" | "random" | "della"
    default_normalize: ClassVar[bool] = False
    default_rescale: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        glob = {"normalize": ParamSpec(cls.default_normalize, bool), "lambda": ParamSpec(1.0)}
        model = {"weight": ParamSpec(None)}
        if cls.sparsifier is not None:
            glob["rescale"] = ParamSpec(cls.default_rescale, bool)
            glob["rescale_mode"] = ParamSpec("l1", str, choices=("l1", "inverse_density"))
            model["density"] = ParamSpec(1.0, float, _density_check, _density_allowed)
        if cls.sparsifier == "breadcrumbs":
            model["gamma"] = ParamSpec(0.01, float, lambda v: 0.0 <= v <= 1.0, "0 <= gamma <= 1")
        if cls.sparsifier == "della":
            model["epsilon"] = ParamSpec(0.15, float, lambda v: v >= 0.0, "epsilon >= 0")
        cls.global_parameters = glob
        cls.model_parameters = model

    # ---- what a tensor needs -------------------------------------------------------------

    def _sparse(self, p: Params) -> bool:
        return self.sparsifier is not None and p["density"] < 1.0

    def _l1(self, params: TensorParams) -> bool:
        g = params.global_
        return self.sparsifier is not None and g["rescale"] and g["rescale_mode"] == "l1"

    def stages(self, params: TensorParams, shape: tuple[int, ...] | None = None) -> list[str]:
        """Names of the statistics rounds this tensor needs, in order."""
        if not any(self._sparse(p) for p in params.experts):
            return []
        l1 = self._l1(params)
        if self.sparsifier in ("magnitude", "breadcrumbs"):
            return ["select_high", "select_low"] + (["l1"] if l1 else [])
        if self.sparsifier == "random":
            return ["l1"] if l1 else []
        # della: shard-local for >= 2-D tensors unless the L1 rescale needs whole-tensor sums
        return [] if (shape is not None and len(shape) >= 2 and not l1) else ["della"]

    def statistics_rounds(self, params: TensorParams, shape: tuple[int, ...] | None = None) -> int:
        return len(self.stages(params, shape))

    def validate(self, params: TensorParams, where: str) -> None:
        if self.sparsifier != "della":
            return
        for i, p in enumerate(params.experts):
            d, eps = p["density"], p["epsilon"]
            if d < 1.0 and not (d - eps > 0.0 and d + eps < 1.0):
                raise ConfigError(
                    f"{where}: model {i + 1} besides the base: density {d} and epsilon {eps} give keep "
                    f"probabilities in [{d - eps:g}, {d + eps:g}]; density - epsilon and density + epsilon "
                    "must both lie strictly between 0 and 1 (lower epsilon)"
                )

    def _trim(self, p: Params, numel: int) -> TrimRanks:
        if self.sparsifier == "magnitude":
            return magnitude_ranks(p["density"], numel)
        return breadcrumbs_ranks(p["density"], p["gamma"], numel)

    # ---- statistics ----------------------------------------------------------------------

    def statistics(
        self,
        base: torch.Tensor | None,
        experts: Sequence[torch.Tensor],
        params: TensorParams,
        ctx: ShardContext,
        round_: int,
        previous: dict[str, Any] | None,
    ) -> dict[str, torch.Tensor]:
        assert base is not None
        stage = self.stages(params)[round_]
        numel = _numel(ctx.shape)
        out: dict[str, torch.Tensor] = {}
        for e, (x, p) in enumerate(zip(experts, params.experts, strict=True)):
            if not self._sparse(p):
                continue
            if stage in ("select_high", "select_low"):
                ranks = self._trim(p, numel).ranks
                if not ranks:
                    continue
                keys = selection.DeltaKeys(base, x)
                if stage == "select_high":
                    out[f"high{e}"], speculated = keys.round_zero(ranks, numel)
                    for name, (window, values, counts) in speculated.items():
                        first, count = window or (0, 0)
                        out[f"spec{e}_{name}_window"] = torch.tensor([first, count if window else -1])
                        out[f"spec{e}_{name}_values"], out[f"spec{e}_{name}_counts"] = values, counts
                    continue
                assert previous is not None
                for name, (bucket, _) in previous["buckets"][e].items():
                    values, counts = keys.low_histogram(bucket)
                    out[f"low{e}_{name}_values"], out[f"low{e}_{name}_counts"] = values, counts
                continue
            if stage == "della" and len(ctx.shape) < 2:
                # 1-D: the only "row" is the whole vector; ship the chunk's deltas and draws
                delta = x - base
                out[f"delta{e}"] = delta.reshape(-1).clone()
                out[f"u{e}"] = della_mask_draws(ctx, e, delta.numel())
            else:  # "l1", or "della" on >= 2-D with the L1 rescale
                out[f"l1_{e}"] = torch.tensor(self._l1_norms(e, x, base, p, params, ctx, previous), dtype=torch.float64)
        return out

    def reduce(
        self,
        partials: Sequence[dict[str, torch.Tensor]],
        params: TensorParams,
        shape: tuple[int, ...],
        round_: int,
        previous: dict[str, Any] | None,
    ) -> dict[str, Any]:
        stage = self.stages(params)[round_]
        out: dict[str, Any] = dict(previous or {})
        numel = _numel(shape)
        if stage == "select_high":
            buckets: dict[int, dict[str, tuple[int, int]]] = {}
            for e, p in enumerate(params.experts):
                if not self._sparse(p) or not self._trim(p, numel).ranks:
                    continue
                hist = selection.sum_histograms([c[f"high{e}"] for c in partials])
                buckets[e] = {n: selection.locate(hist, r) for n, r in self._trim(p, numel).ranks.items()}
            out["buckets"] = buckets
            # Round 0 also shipped the low bits around each chunk's local estimate: when every
            # chunk's range holds the global bucket, the thresholds are exact already.
            resolved: dict[int, dict[str, int]] = {}
            for e, named in buckets.items():
                resolved[e] = {}
                for name, (bucket, residual) in named.items():
                    parts = [(None if int(c[f"spec{e}_{name}_window"][1]) < 0 else
                              (int(c[f"spec{e}_{name}_window"][0]), int(c[f"spec{e}_{name}_window"][1])),
                              c[f"spec{e}_{name}_values"], c[f"spec{e}_{name}_counts"]) for c in partials]
                    low = selection.resolve_speculative(parts, bucket, residual)
                    if low is not None:
                        resolved[e][name] = (bucket << 16) | low
            if all(len(resolved[e]) == len(buckets[e]) for e in buckets) and len(self.stages(params, shape)) == 2:
                out["thresholds"] = resolved
                out[STATISTICS_COMPLETE] = True
        elif stage == "select_low":
            thresholds: dict[int, dict[str, int]] = {}
            for e, named in out["buckets"].items():
                thresholds[e] = {}
                for name, (bucket, residual) in named.items():
                    low = selection.dense_low([(c[f"low{e}_{name}_values"], c[f"low{e}_{name}_counts"])
                                               for c in partials])
                    thresholds[e][name] = (bucket << 16) | selection.locate(low, residual)[0]
            out["thresholds"] = thresholds
        elif stage == "della" and len(shape) < 2:
            probs: dict[int, torch.Tensor] = {}
            ratios: dict[int, float] = {}
            for e, p in enumerate(params.experts):
                if not self._sparse(p):
                    continue
                delta = torch.cat([c[f"delta{e}"] for c in partials])
                u = torch.cat([c[f"u{e}"] for c in partials])
                probs[e] = della_probabilities(delta, p["density"], p["epsilon"])
                kept = delta * (u < probs[e].to(torch.float64))
                ratios[e] = _ratio(reductions.sum_abs(delta), reductions.sum_abs(kept))
            out["probs"] = probs
            if self._l1(params):
                out["ratio"] = ratios
        else:  # "l1", or "della" on >= 2-D
            out["ratio"] = {}
            for e, p in enumerate(params.experts):
                if self._sparse(p):
                    before = reductions.ordered_sum([float(c[f"l1_{e}"][0]) for c in partials])
                    after = reductions.ordered_sum([float(c[f"l1_{e}"][1]) for c in partials])
                    out["ratio"][e] = _ratio(before, after)
        return out

    # ---- the merge -----------------------------------------------------------------------

    def _keep(
        self, e: int, delta: torch.Tensor, p: Params, params: TensorParams, ctx: ShardContext,
        stats: dict[str, Any] | None,
    ) -> tuple[torch.Tensor, torch.Tensor | float]:
        """Keep-mask of expert ``e``'s delta rows and what inverse_density divides by."""
        if self.sparsifier in ("magnitude", "breadcrumbs"):
            ranks = self._trim(p, _numel(ctx.shape))
            assert stats is not None or not ranks.ranks
            thresholds = stats["thresholds"].get(e, {}) if stats is not None else {}
            return magnitude_mask(delta, ranks, thresholds), p["density"]
        model = ctx.expert_ids[e] if ctx.expert_ids else e
        if self.sparsifier == "random":
            return dare_mask(delta, p["density"], ctx.seed, ctx.tensor, model, ctx.element_start), p["density"]
        if len(ctx.shape) < 2:
            assert stats is not None and "probs" in stats, "1-D DELLA needs its statistics round"
            lo = ctx.element_start
            probs = stats["probs"][e][lo:lo + delta.numel()].reshape(delta.shape)
        else:
            probs = della_probabilities(delta, p["density"], p["epsilon"])
        return della_mask(probs, ctx.seed, ctx.tensor, model, ctx.element_start), probs

    def sparsified(
        self, e: int, delta: torch.Tensor, p: Params, params: TensorParams, ctx: ShardContext,
        stats: dict[str, Any] | None,
    ) -> torch.Tensor:
        """Expert ``e``'s delta rows after sparsification and rescaling."""
        if not self._sparse(p):
            return delta
        mask, divide_by = self._keep(e, delta, p, params, ctx, stats)
        kept = delta * mask
        if not params.global_["rescale"]:
            return kept
        if params.global_["rescale_mode"] == "l1":
            assert stats is not None
            ratio = stats["ratio"][e]
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
        stats: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        """The merged rows: one fused kernel pass (:mod:`kernels`) where the compute dtype
        has one, else :meth:`merge_reference`; the two agree bit for bit."""
        assert base is not None
        mode = kernels.kernel_mode(base.dtype)
        if mode is None:
            return self.merge_reference(base, experts, params, ctx, stats)
        kd = kernels.kernel_dtype(base.dtype)
        base_a = kernels.as_array(base, kd)
        xs = [kernels.as_array(x, kd) for x in experts]
        terms = [self._kernel_terms(e, x, base, p, params, ctx, stats)
                 for e, (x, p) in enumerate(zip(experts, params.experts, strict=True))]
        weights = [p["weight"] for p in params.experts]
        g = params.global_
        total_w = _sum(list(torch.tensor(weights, dtype=base.dtype)))
        normalize = bool(g["normalize"]) and (self.consensus or bool(total_w.abs() >= 1e-8))
        out = kernels.task_vectors(
            base_a, xs, mode,
            low=[t.low for t in terms], high=[t.high for t in terms], masks=[t.mask for t in terms],
            rescale_kind=[t.rescale_kind for t in terms],
            rescale=np.array([kernels.scalar(t.factor, base.dtype) for t in terms]),
            probs=[t.probs for t in terms],
            weights=np.array([kernels.scalar(w, base.dtype) for w in weights]),
            weights_stored=kernels.rounded(weights, base.dtype), consensus=self.consensus, normalize=normalize,
            total_weight=total_w.to(kd).numpy(), lam=kernels.scalar(g["lambda"], base.dtype))
        return torch.from_numpy(out).reshape(base.shape).to(base.dtype)

    def _l1_norms(
        self, e: int, x: torch.Tensor, base: torch.Tensor, p: Params, params: TensorParams, ctx: ShardContext,
        stats: dict[str, Any] | None,
    ) -> tuple[float, float]:
        """float64 L1 norms of expert ``e``'s delta rows before and after sparsification."""
        terms = self._kernel_terms(e, x, base, p, params, ctx, stats, rescale=False)
        return kernels.abs_sums(*kernels.delta_arrays(base, x), terms.low, terms.high, terms.mask)

    def _kernel_terms(
        self, e: int, x: torch.Tensor, base: torch.Tensor, p: Params, params: TensorParams, ctx: ShardContext,
        stats: dict[str, Any] | None, rescale: bool = True,
    ) -> KernelTerms:
        """Expert ``e``'s sparsification (and, if ``rescale``, its rescale) in the form the
        fused kernels take."""
        if not self._sparse(p):
            return KernelTerms()
        kd = kernels.kernel_dtype(base.dtype)
        terms = KernelTerms()
        divide_by: torch.Tensor | float = p["density"]
        if self.sparsifier in ("magnitude", "breadcrumbs"):
            ranks = self._trim(p, _numel(ctx.shape))
            thresholds = stats["thresholds"].get(e, {}) if stats is not None else {}
            if ranks.nothing:
                terms.low = kernels.KEEP_NOTHING
            else:
                terms.low = thresholds["low"] if ranks.low is not None else kernels.NO_LOW
                terms.high = thresholds["high"] if ranks.high is not None else kernels.NO_HIGH
        else:
            mask, divide_by = self._keep(e, x - base if self.sparsifier == "della" else x, p, params, ctx, stats)
            terms.mask = mask.reshape(-1).numpy()
        g = params.global_
        if rescale and g["rescale"]:
            if g["rescale_mode"] == "l1":
                assert stats is not None
                if stats["ratio"][e] != 1.0:
                    terms.rescale_kind, terms.factor = kernels.RESCALE_MULTIPLY, stats["ratio"][e]
            elif isinstance(divide_by, torch.Tensor):
                terms.rescale_kind = kernels.RESCALE_DIVIDE_BY_PROBS
                terms.probs = kernels.as_array(divide_by.to(base.dtype), kd)
            else:
                terms.rescale_kind, terms.factor = kernels.RESCALE_DIVIDE, divide_by
        return terms

    def merge_reference(
        self,
        base: torch.Tensor,
        experts: Sequence[torch.Tensor],
        params: TensorParams,
        ctx: ShardContext,
        stats: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        """The pipeline as torch ops, each separately rounded: the float16 path, and the
        formulation the kernels reproduce."""
        weights = [p["weight"] for p in params.experts]
        weighted = []
        for e, (x, p) in enumerate(zip(experts, params.experts, strict=True)):
            d = self.sparsified(e, x - base, p, params, ctx, stats)
            weighted.append(d * p["weight"])
        w = torch.tensor(weights, dtype=base.dtype)  # weights in the compute dtype, as mergekit
        if self.consensus:
            # Elected sign s = +1 where the weighted sum is >= 0, else -1. A delta agrees iff
            # delta * s > 0 (a zero never agrees), so relu(delta * s) is |delta| where it agrees
            # and 0 elsewhere: summing those and multiplying by s gives mergekit's masked sum
            # exactly (s = +-1 makes every product exact), with float ops only, which vectorize
            # far better than boolean masks. A total of -0.0 only arises when every delta is
            # zero, where no delta agrees whichever sign is elected.
            total = _sum(weighted)
            sign = torch.signbit(total).to(base.dtype).mul_(-2.0).add_(1.0)
            del total
            mixed: torch.Tensor | None = None
            divisor: torch.Tensor | None = None
            for i, wd in enumerate(weighted):
                agreeing = wd.mul_(sign).clamp_(min=0.0)
                wpart = torch.sign(agreeing).mul_(w[i])
                mixed = agreeing if mixed is None else mixed.add_(agreeing)
                divisor = wpart if divisor is None else divisor.add_(wpart)
            assert mixed is not None and divisor is not None
            mixed.mul_(sign)
            del sign
            if params.global_["normalize"]:
                divisor.add_(divisor == 0)
                mixed = mixed.div_(divisor)
        else:
            mixed = _sum(weighted)
            if params.global_["normalize"]:
                total_w = _sum(list(w))
                if bool(total_w.abs() >= 1e-8):
                    mixed = mixed.div_(total_w)
        lam = params.global_["lambda"]
        if lam != 1.0:
            mixed = mixed.mul_(lam)
        return base + mixed


@dataclass
class KernelTerms:
    """One expert's keep rule and rescale for :func:`kernels.task_vectors` (default: keep all)."""

    low: int = kernels.NO_LOW
    high: int = kernels.NO_HIGH
    mask: np.ndarray | None = None
    rescale_kind: int = kernels.RESCALE_NONE
    factor: float = 1.0
    probs: np.ndarray | None = None


def della_mask_draws(ctx: ShardContext, e: int, count: int) -> torch.Tensor:
    """The uniform draws of a 1-D DELLA chunk (shipped to the reduce, which ranks the vector)."""
    model = ctx.expert_ids[e] if ctx.expert_ids else e
    return torch.from_numpy(uniforms(ctx.seed, ctx.tensor, model, ctx.element_start, count))


def _ratio(before: float, after: float) -> float:
    """mergekit's L1 rescale factor; 1 (no rescale) when either norm is below 1e-7."""
    if before < RESCALE_EPS or after < RESCALE_EPS:
        return 1.0
    return before / after


def _sum(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Left-to-right sum into a fresh buffer (the order mergekit's stacked sum uses)."""
    out = tensors[0].clone()
    for t in tensors[1:]:
        out.add_(t)
    return out


class TaskArithmetic(TaskVectorMethod):
    name = "task_arithmetic"


class Ties(TaskVectorMethod):
    name = "ties"
    consensus = True
    sparsifier = "magnitude"
    default_normalize = True


class DareLinear(TaskVectorMethod):
    name = "dare_linear"
    sparsifier = "random"
    default_rescale = True


class DareTies(TaskVectorMethod):
    name = "dare_ties"
    consensus = True
    sparsifier = "random"
    default_rescale = True


class Breadcrumbs(TaskVectorMethod):
    name = "breadcrumbs"
    sparsifier = "breadcrumbs"


class BreadcrumbsTies(TaskVectorMethod):
    name = "breadcrumbs_ties"
    consensus = True
    sparsifier = "breadcrumbs"


class Della(TaskVectorMethod):
    name = "della"
    consensus = True
    sparsifier = "della"
    default_normalize = True
    default_rescale = True


class DellaLinear(TaskVectorMethod):
    name = "della_linear"
    sparsifier = "della"
    default_rescale = True
