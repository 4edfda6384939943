"""The merge-method interface: pure tensor math on row shards, no I/O, no Ray.

A method sees one row shard at a time: the base rows (if the method uses a base model) and the
same rows of each expert, already cast to the compute dtype, plus a :class:`ShardContext` that
says which tensor and rows these are. A method that declares :attr:`MergeMethod.reads_stored_rows`
may get bfloat16 rows as stored when it computes in float32 (``ShardContext.compute`` says so):
its fused loops widen each element as they read it, and anything else it computes with torch
ops takes :func:`in_compute` of the rows first. Methods whose math needs a whole-tensor quantity (a
magnitude threshold, a norm, a dot product) declare how many passes it takes
(:meth:`MergeMethod.reduction_rounds`) and compute it through
:meth:`MergeMethod.partial_reductions` and :meth:`MergeMethod.reduce`: the engine runs
``partial_reductions`` over canonical row chunks that do not depend on the shard size, reduces
the partials in chunk order and hands the reduced values (a :class:`Reductions`) to every
shard's :meth:`MergeMethod.merge`, so outputs are identical under any sharding.

Longer than 300 lines because it is the whole contract between the engine and the methods in
one place: the method class, what its rounds return (partials, reductions) and the row
helpers that every method's torch paths share.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from distmerge.errors import ConfigError, shown
from distmerge.methods.lax_scalars import lax_scalar

FLOAT32_MAX = float(torch.finfo(torch.float32).max)

Params = dict[str, Any]


@dataclass(frozen=True)
class ParamSpec:
    """One parameter: its default (``None`` = required), kind and the allowed range.

    ``kind=str`` parameters take one of ``choices`` (e.g. ``rescale_mode: l1 | inverse_density``).
    """

    default: Any
    kind: type = float
    check: Callable[[Any], bool] | None = None
    allowed: str = ""
    choices: tuple[str, ...] = ()

    def read(self, value: Any, where: str) -> Any:
        """One scalar as mergekit reads it for this kind (:mod:`distmerge.methods.lax_scalars`):
        ``"0.5"`` is 0.5 for a number, ``"yes"`` true for a switch."""
        try:
            return lax_scalar(self.kind, value)
        except ValueError:
            expected = {str: f"one of {', '.join(self.choices)}" if self.choices else "a string",
                        bool: "true or false", int: "a whole number"}.get(self.kind, "a number")
            raise ConfigError(f"{where}: expected {expected}, got {shown(value)}") from None

    def validate(self, value: Any, where: str) -> Any:
        """``value`` read (:meth:`read`), then checked: finite, in range, one of the choices."""
        value = self.read(value, where)
        if self.kind is str:
            if self.choices and value not in self.choices:
                raise ConfigError(f"{where}: expected one of {', '.join(self.choices)}, got {shown(value)}")
            return value
        if self.kind is bool:
            return value
        try:
            as_float = float(value)
        except OverflowError:
            as_float = math.inf
        if not math.isfinite(as_float) or abs(as_float) > FLOAT32_MAX:
            raise ConfigError(f"{where}: {shown(value)} is not a finite number a float32 can hold; "
                              "a NaN or infinite parameter would poison every merged weight")
        if self.check is not None and not self.check(value):
            raise ConfigError(f"{where}: {shown(value)} is out of range; allowed: {self.allowed}")
        return value


@dataclass(frozen=True)
class ShardContext:
    """Which rows of which tensor a call works on; enough to key random streams by position."""

    tensor: str
    shape: tuple[int, ...]
    row_start: int
    row_end: int
    seed: int = 0
    expert_ids: tuple[int, ...] = ()
    # The dtype the method computes in when the rows are not in it (bfloat16 rows as stored,
    # float32 compute: see ``MergeMethod.reads_stored_rows``); None: the rows' own dtype.
    compute: torch.dtype | None = None
    # Per-tensor scratch that lives while the engine holds the tensor's rows of every source in
    # one process for its rounds and its merge (a read-once batch): what a round computed per
    # element, kept for the merge of the same rows. None where the rounds run in their own tasks.
    held: dict[Any, Any] | None = field(default=None, compare=False, repr=False)

    @property
    def row_numel(self) -> int:
        n = 1
        for d in self.shape[1:]:
            n *= d
        return n

    @property
    def tensor_numel(self) -> int:
        """Elements in the whole tensor (not the shard)."""
        return self.row_numel * self.shape[0] if self.shape else 1

    @property
    def element_start(self) -> int:
        """Flat index of the first element of this shard within the whole tensor."""
        return self.row_start * self.row_numel if self.shape else 0


@dataclass(frozen=True)
class TensorParams:
    """Resolved parameters for one tensor: global ones and one dict per expert."""

    global_: Params = field(default_factory=dict)
    experts: tuple[Params, ...] = ()


@dataclass(kw_only=True)
class Reductions:
    """Base of what :meth:`MergeMethod.reduce` returns: one tensor's reduced whole-tensor values.

    Each method subclasses it with typed fields. ``complete`` tells the engine that this tensor
    needs no further reduction rounds (e.g. a radix selection resolved in round 0), so it skips
    those rounds' reads for the tensor. ``round_rows`` narrows a later round to the canonical
    chunks that overlap some of its row ranges (``()``: the round reads nothing and is skipped;
    a round not named reads every chunk): a TIES tie cut needs the one chunk where it falls.
    """

    complete: bool = False
    round_rows: dict[int, tuple[tuple[int, int], ...]] | None = None
    # What merge blocks compute from these values alone, once per tensor (:meth:`derive`).
    derived: dict[Any, Any] = field(default_factory=dict, repr=False, compare=False)

    def derive(self, key: Any, make: Callable[[], Any]) -> Any:
        """``make()`` once per ``key`` (model stock's t, RAM+'s lambdas, nuslerp's coefficients:
        a dozen small torch ops, 0.2-0.4 ms, that each of a tensor's ~230 merge blocks repeated
        in a 0.5 GB merge). Threads that race compute the same value twice."""
        if key not in self.derived:
            self.derived[key] = make()
        return self.derived[key]

    def reads(self, round_: int, row_start: int, row_end: int) -> bool:
        """Whether round ``round_`` reads the canonical chunk of rows ``[row_start, row_end)``."""
        if self.complete:
            return False
        rows = (self.round_rows or {}).get(round_)
        return rows is None or any(a < row_end and row_start < b for a, b in rows)


def chunk_read(previous: Reductions | None, round_: int, row_start: int, row_end: int) -> bool:
    """Whether round ``round_`` reads a chunk, given what the tensor's earlier rounds reduced to."""
    return previous is None or previous.reads(round_, row_start, row_end)


@dataclass
class Partials:
    """Base of what :meth:`MergeMethod.partial_reductions` returns for one canonical chunk.

    Partials travel from the workers to the driver, so they hold exact integers, float64 sums
    or tensors, never anything that depends on the worker or the shard size.

    ``inputs_finite``: the round proved that every element of every source's rows in the chunk
    (the compute-dtype rows the method got) is finite, from sums it computes anyway (see
    :func:`sums_prove_finite`). The engine reads it in round 0, where it checks the inputs, and
    then skips its NaN/Inf scan of those rows, a pass over every source; False (unknown)
    leaves the scan to run.
    """

    inputs_finite: bool = field(default=False, kw_only=True)


def sums_prove_finite(sums: Sequence[float | torch.Tensor]) -> bool:
    """Whether float sums prove their terms finite: a NaN or Inf term makes a sum NaN or Inf,
    so finite sums mean finite terms. The caller's sums must have a term from every element of
    every source (``x * x`` or ``|x - base|``, non-finite wherever an input is). A sum that
    overflows on finite terms proves nothing and only costs the scan: float64 sums of float32
    values' squares or magnitudes do not overflow; in float64 compute they can."""
    return all(bool(torch.isfinite(s).all()) if isinstance(s, torch.Tensor) else math.isfinite(s) for s in sums)


class MergeMethod:
    """Base class of all methods; subclasses are registered by name in ``methods.registry``."""

    name: ClassVar[str]
    uses_base: ClassVar[bool] = True
    # True: the base rows are passed when a base_model is configured (None otherwise), like
    # mergekit's optional-base methods (nuslerp, multislerp, karcher's base-as-input).
    base_optional: ClassVar[bool] = False
    min_experts: ClassVar[int] = 1
    max_experts: ClassVar[int | None] = None
    # True: the engine may pass bfloat16 rows as stored with ``ctx.compute`` float32 instead of
    # casting them first (widening is exact). A cast is a pass over every element that writes
    # twice the bytes it reads, then read again: for a fused loop that widens as it reads it
    # cost more than the loop (measured 1.2-1.8 ns against 0.26 ns per element of a linear
    # merge of three models). Results must be bit for bit those of the cast rows (tested).
    reads_stored_rows: ClassVar[bool] = False
    # True: every NaN/Inf of any input row reaches the output element it is merged into, for
    # every parameter value (no element is dropped, masked or selected away, and no operation
    # turns a NaN/Inf finite: 0 * Inf is NaN). The engine then scans the output only and scans
    # the inputs just where the output is not clean (``engine.worker.output_scan_suffices``).
    nonfinite_reaches_output: ClassVar[bool] = False
    global_parameters: ClassVar[dict[str, ParamSpec]] = {}
    model_parameters: ClassVar[dict[str, ParamSpec]] = {}

    def held_scratch_bytes(self, params: TensorParams, shape: tuple[int, ...]) -> int:
        """Bytes a tensor's rounds leave in ``ShardContext.held`` for its merge while its rows
        are held (the plan's memory estimate adds them); 0 by default."""
        return 0

    def reduction_rounds(self, params: TensorParams, shape: tuple[int, ...] | None = None) -> int:
        """How many whole-tensor reduction rounds this tensor's merge needs first (0: none).

        Each round reads the tensor once in canonical chunks; round ``r`` sees the reduced
        result of round ``r - 1`` (a radix selection narrows a threshold round by round).
        ``shape`` lets a method skip a round that only some shapes need (e.g. a per-row
        quantity is shard-local except for 1-D tensors, whose only "row" is the whole
        vector); without it the count must be safe for every shape.
        """
        return 0

    def partial_reductions(
        self,
        base: torch.Tensor | None,
        experts: Sequence[torch.Tensor],
        params: TensorParams,
        ctx: ShardContext,
        round_: int,
        previous: Reductions | None,
    ) -> Partials:
        """Round ``round_``'s partials of one canonical chunk (exact integers or float64 sums);
        ``previous`` is what the previous round reduced to (None in round 0)."""
        raise NotImplementedError

    def reduce(
        self,
        partials: Sequence[Partials],
        params: TensorParams,
        shape: tuple[int, ...],
        round_: int,
        previous: Reductions | None,
    ) -> Reductions:
        """Combine one round's chunk partials, given in chunk order, into what the next round
        (or, after the last round, ``merge``) needs; carry forward what is still needed."""
        raise NotImplementedError

    def result_dtype(self, compute: torch.dtype) -> torch.dtype:
        """The dtype :meth:`merge` returns when it computes in ``compute``.

        A tensor without ``out_dtype`` is written in this dtype: mergekit writes whatever its
        method returns, and a method whose torch expressions promote (a float32 mask or
        coefficient tensor times compute-dtype rows) returns the promoted dtype. So a method
        declares it here, and the plan, not the engine, decides the written dtype from it.
        """
        return compute

    def merge(
        self,
        base: torch.Tensor | None,
        experts: Sequence[torch.Tensor],
        params: TensorParams,
        ctx: ShardContext,
        reduced: Reductions | None = None,
    ) -> torch.Tensor:
        """Merged rows of this shard, in :meth:`result_dtype` of the compute dtype; ``reduced``
        is the last round's :meth:`reduce` result (None when the tensor needs no rounds). Where
        the rows came as stored (``ctx.compute`` set), a method may return stored rows whose
        values the compute dtype holds exactly and whose cast to it keeps every bit (finite:
        passthrough's copy): the engine casts to the output dtype either way."""
        raise NotImplementedError

    def validate(self, params: TensorParams, where: str, inputs: Sequence[str] = ()) -> None:
        """Cross-parameter checks that a single ParamSpec cannot express (raise ConfigError).
        ``inputs``: where each expert is configured (``models[2]``, ``base_model``), for messages."""


def compute_dtype(rows: torch.Tensor, ctx: ShardContext) -> torch.dtype:
    """The dtype a method computes ``rows`` in: ``ctx.compute``, else the rows' own."""
    return ctx.compute or rows.dtype


def in_compute(rows: torch.Tensor, ctx: ShardContext) -> torch.Tensor:
    """``rows`` in the compute dtype, for torch ops (a no-op unless they came as stored)."""
    return rows if ctx.compute is None else rows.to(ctx.compute)


def delta_in_compute(x: torch.Tensor, base: torch.Tensor, ctx: ShardContext) -> torch.Tensor:
    """``x - base`` in the compute dtype, as torch computes it (for a torch path)."""
    return in_compute(x, ctx) - in_compute(base, ctx)


def rows_in_compute(base: torch.Tensor | None, experts: Sequence[torch.Tensor], ctx: ShardContext,
                    ) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
    """A shard's base (or None) and expert rows by :func:`in_compute`: for a torch path."""
    return (None if base is None else in_compute(base, ctx)), [in_compute(x, ctx) for x in experts]


def promoted_to_float32(compute: torch.dtype) -> torch.dtype:
    """The dtype of compute-dtype rows times a float32 tensor (torch's promotion): float32 for
    bf16/fp16/fp32 compute, float64 for float64."""
    return torch.promote_types(compute, torch.float32)


def unit_interval(allow_zero: bool = False) -> tuple[Callable[[float], bool], str]:
    if allow_zero:
        return (lambda v: 0.0 <= v <= 1.0), "0 <= value <= 1"
    return (lambda v: 0.0 < v <= 1.0), "0 < value <= 1"
