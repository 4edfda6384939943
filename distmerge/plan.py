"""The merge plan: headers in, work units and output files out. No tensor data is read.

Planning opens every input's safetensors headers, checks that the models agree (names,
shapes), resolves every parameter for every tensor, lays out the output files (their
headers are fully determined by names, shapes and dtypes) and cuts each tensor into row-range
work units sized by a memory budget. The same config gives the same plan, byte for byte.
"""

from __future__ import annotations

import logging
from collections.abc import Container, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from distmerge.checkpoint import Checkpoint
from distmerge.config import MergeConfig
from distmerge.dtypes import ITEMSIZE
from distmerge.io.locations import OBJECT_STORE_SCHEMES, url_scheme
from distmerge.io.safetensors import RowShape, TensorInfo, tensor_nbytes
from distmerge.lora import LoraTensorInfo
from distmerge.methods import get_method
from distmerge.methods.base import MergeMethod, TensorParams
from distmerge.plan_files import OutputFile, layout_files
from distmerge.plan_sources import plan_sources
from distmerge.plan_vocabulary import PlannedVocabulary
from distmerge.sizes import format_size
from distmerge.vocab import VocabularyRows, resolve_chat_template

log = logging.getLogger(__name__)

# Rows per reduction chunk are derived from this element count and the tensor shape only, so
# whole-tensor reductions never depend on the shard size (shard invariance).
REDUCTION_CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class TensorPlan(RowShape):
    """One output tensor: its sources (template/base first when the method uses one)."""

    name: str
    shape: tuple[int, ...]
    out_dtype: str
    base: TensorInfo | None
    experts: tuple[TensorInfo, ...]
    params: TensorParams | None  # None: copied unchanged from the template
    file_index: int
    out_offset: int
    reduction_rounds: int = 0
    # Safetensors code of the dtype this tensor is merged in ("" for a copied tensor): the
    # config's ``dtype``, else (as mergekit 0.1.5) its inputs' stored dtypes promoted.
    compute_dtype: str = ""
    # A token-indexed tensor of a merged vocabulary: its sources' rows are assembled per row
    # range by these recipes (distmerge.vocab) instead of read in place; ``vocabulary_models``
    # gives each source's (base first) model in them.
    vocabulary: VocabularyRows | None = None
    vocabulary_models: tuple[int, ...] = ()

    @property
    def out_nbytes(self) -> int:
        return tensor_nbytes(self.out_dtype, self.shape)

    def out_span(self, row_start: int, row_end: int) -> tuple[int, int]:
        """``(offset, length)`` in its output file of rows ``[row_start, row_end)``."""
        return self.rows_span(self.out_dtype, self.out_offset, row_start, row_end)

    @property
    def sources(self) -> tuple[TensorInfo, ...]:
        return ((self.base,) if self.base is not None else ()) + self.experts


@dataclass(frozen=True)
class WorkUnit:
    """Rows ``[row_start, row_end)`` of tensor ``tensor`` (an index into ``MergePlan.tensors``)."""

    tensor: int
    row_start: int
    row_end: int
    read_bytes: int
    write_bytes: int
    working_bytes: int


@dataclass
class MergePlan:
    config: MergeConfig
    method: MergeMethod
    template: Checkpoint
    base: Checkpoint | None
    experts: list[Checkpoint]
    tensors: list[TensorPlan]
    files: list[OutputFile]
    units: list[WorkUnit]
    shard_size: int
    compute_dtype: str
    model_config: dict[str, Any] = field(default_factory=dict)  # the output's config.json
    vocabulary: PlannedVocabulary | None = None  # the output tokenizer, when the config builds one
    chat_template: str | None = None  # the template text ``chat_template`` names, resolved at plan time

    def with_shard_size(self, shard_size: int) -> MergePlan:
        """The same plan cut into units for another shard size (no header is read again)."""
        units = [u for i, t in enumerate(self.tensors)
                 for u in units_for_tensor(i, t, shard_size, ITEMSIZE[t.compute_dtype or self.compute_dtype])]
        return replace(self, units=units, shard_size=shard_size)

    def pinned_versions(self) -> tuple[tuple[str, str], ...]:
        """(location, version) of every object-store weight file (S3: ETag; Cloud Storage: generation) the inputs read, as planned: the workers read
        exactly those versions (a Hub file's location is pinned to its commit already)."""
        pins = []
        for ckpt in self.inputs:
            source = ckpt.source
            for name, location in ((source.weights or {}).items() if source is not None else ()):
                version = source.versions.get(name, (0, ""))[1]  # type: ignore[union-attr]
                if url_scheme(location) in OBJECT_STORE_SCHEMES and version:
                    pins.append((location, version))
        return tuple(sorted(pins))

    @property
    def read_bytes(self) -> int:
        return sum(u.read_bytes for u in self.units)

    @property
    def write_bytes(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def peak_worker_bytes(self) -> int:
        """A unit's working memory, and a read-once tensor's rows held beside it; or a reduction
        task's canonical chunk, whose size follows from the tensor's shape and not from the shard
        size (at a small shard size it is the larger)."""
        held = self.read_once_tensors
        merging = max((u.working_bytes + (held_bytes(self.tensors[u.tensor], self.method) if u.tensor in held else 0)
                       for u in self.units), default=0)
        return max([merging, *(c.working_bytes for c in self.reduction_units(0) if c.tensor not in held)])

    @property
    def reduction_rounds(self) -> int:
        return max((t.reduction_rounds for t in self.tensors), default=0)

    def reduction_units(self, round_: int = 0) -> list[WorkUnit]:
        """Canonical row chunks of the tensors whose merge needs reduction round ``round_``."""
        return [u for i, t in enumerate(self.tensors) if t.reduction_rounds > round_ for u in reduction_chunks(i, t)]

    def read_once(self, index: int) -> bool:
        """Whether tensor ``index`` is read once: its reduction rounds and its merge run in one
        task, on its rows of every source held in memory, instead of a read for the rounds and
        another for the merge. Those rows, and what the rounds keep for the merge, must fit the
        shard size (a unit's budget): held whole, they come on top of a block's working memory."""
        t = self.tensors[index]
        return bool(t.reduction_rounds and t.numel) and held_bytes(t, self.method) <= self.shard_size

    @property
    def read_once_tensors(self) -> frozenset[int]:
        return frozenset(i for i in range(len(self.tensors)) if self.read_once(i))

    @property
    def inputs(self) -> list[Checkpoint]:
        return ([self.base] if self.base is not None else []) + self.experts

    def summary(self) -> str:
        """Human-readable plan: inputs, tensors, bytes, units, files and memory estimate."""
        lines = [f"merge method: {self.method.name}    compute dtype: {self.compute_dtype}"]
        if self.base is not None:
            lines.append(f"base model:   {self.base.label}  ({format_size(self.base.total_bytes)})")
        for i, e in enumerate(self.experts):
            lines.append(f"model {i + 1}:      {e.label}  ({format_size(e.total_bytes)})")
        offset = 0
        for i, out_slice in enumerate(self.config.slices or ()):
            start, end = out_slice.sources[0].layer_range
            taken = ", ".join(f"{Path(src.model).name}[{src.layer_range[0]}:{src.layer_range[1]}]" for src in out_slice.sources)
            lines.append(f"slice {i + 1}:      output layers {offset}-{offset + end - start - 1} from {taken}")
            offset += end - start
        if self.vocabulary is not None:
            settings = self.vocabulary.settings
            lines.append(f"vocabulary:   {settings.source} -> {len(self.vocabulary.info.vocab)} tokens, "
                         f"{self.vocabulary.out_rows} rows in {', '.join(sorted(self.vocabulary.names))}")
        merged = sum(1 for t in self.tensors if t.params is not None)
        lines += [
            f"tensors:      {len(self.tensors)} ({merged} merged, {len(self.tensors) - merged} copied)",
            f"bytes read:   {format_size(self.read_bytes)}    bytes written: {format_size(self.write_bytes)}",
            f"work units:   {len(self.units)} (shard size {format_size(self.shard_size)})",
            f"output files: {len(self.files)} (max {format_size(self.config.execution.max_file_size)} each)",
            f"peak memory per worker (estimate): {format_size(self.peak_worker_bytes)} of tensor buffers "
            f"+ ~0.5 GB process overhead",
        ]
        reducing = sum(1 for t in self.tensors if t.reduction_rounds)
        if reducing:
            once = len(self.read_once_tensors)
            lines.append(f"whole-tensor reductions: {reducing} tensors, {self.reduction_rounds} round(s) of "
                         f"{len(self.reduction_units())} canonical chunks; {once} of them read once "
                         "(rounds and merge from one read: their rows fit the shard size)")
        return "\n".join(lines)


def tensor_read_bytes(t: TensorPlan) -> int:
    """Bytes of a tensor's rows from every source, as read."""
    return t.rows * sum(t.row_nbytes(s.dtype) for s in t.sources)


def held_bytes(t: TensorPlan, method: MergeMethod | None = None) -> int:
    """Bytes of a tensor's rows from every source in memory: as read, or, for a tensor of a
    merged vocabulary, as its rows are assembled (in the vocabulary's dtype); with ``method``,
    plus what its rounds keep for its merge (``MergeMethod.held_scratch_bytes``)."""
    rows = tensor_read_bytes(t) if t.vocabulary is None else (
        t.rows * t.row_numel * t.vocabulary.dtype.itemsize * len(t.sources))
    return rows + (method.held_scratch_bytes(t.params, t.shape) if method is not None and t.params is not None else 0)


def reduction_chunks(index: int, t: TensorPlan) -> list[WorkUnit]:
    """The canonical row chunks of tensor ``index``'s reduction rounds: their rows follow from
    its shape alone, never from the shard size, so the reductions (reduced in chunk order) are
    the same under any sharding."""
    if not t.numel:
        return []
    step = max(1, REDUCTION_CHUNK_ELEMENTS // max(1, t.row_numel))
    units = []
    for r0 in range(0, t.rows, step):
        r1 = min(t.rows, r0 + step)
        read = sum((r1 - r0) * t.row_nbytes(s.dtype) for s in t.sources)
        # Working set: raw rows, their compute-dtype copies and room for kernel scratch
        # (the round-0 window counts, a DARE mask, DELLA's per-row ranks) per source.
        working = read + (r1 - r0) * t.row_numel * 4 * (3 * len(t.sources))
        units.append(WorkUnit(index, r0, r1, read, 0, working))
    return units


def units_for_tensor(index: int, t: TensorPlan, shard_size: int, compute_itemsize: int) -> list[WorkUnit]:
    """Cut a tensor into row ranges whose working memory fits the shard budget (>= 1 row)."""
    out_row = t.row_nbytes(t.out_dtype)
    # A LoRA source forms its float32 delta rows next to its raw rows (distmerge.lora.rows).
    lora_row = t.row_numel * 4 * sum(isinstance(s, LoraTensorInfo) for s in t.sources[:1 if t.params is None else None])
    if t.params is None:  # copied: the template's rows in, the same rows out
        in_row = t.row_nbytes(t.sources[0].dtype)
        row_working = max(1, in_row + lora_row + out_row)
    else:  # raw rows of every source, their compute-dtype copies and the method's scratch, the output
        in_row = sum(t.row_nbytes(s.dtype) for s in t.sources)
        row_working = max(1, in_row + lora_row + t.row_numel * compute_itemsize * (2 * len(t.sources) + 2) + out_row)
    step = max(1, shard_size // row_working) if t.numel else max(1, t.rows)  # an empty tensor is one unit
    units = []
    for r0 in range(0, t.rows, step):
        r1 = min(t.rows, r0 + step)
        units.append(WorkUnit(index, r0, r1, (r1 - r0) * in_row, (r1 - r0) * out_row, (r1 - r0) * row_working))
    return units


def build_plan(config: MergeConfig, shard_size: int | None = None, *, needs_base: bool = False) -> MergePlan:
    """Open all inputs' headers, validate them against each other and cut the work.

    ``shard_size`` defaults to the config's; ``needs_base`` gives every merged tensor the base
    rows as its first source even when the method does not use them (a feature such as AIM
    relaxes towards them). Which input tensors make each output tensor is
    :mod:`distmerge.plan_sources`' (mergekit's slices).
    """
    method = get_method(config.merge_method)
    shard_size = shard_size or config.execution.shard_size
    sourced = plan_sources(config, method, needs_base=needs_base)
    entries = [(s.name, s.out_dtype, s.shape) for s in sourced.tensors]
    files, where = layout_files(entries, config.execution.max_file_size)
    tensors: list[TensorPlan] = []
    for s in sourced.tensors:
        file_index, offset = where[s.name]
        tensors.append(TensorPlan(
            s.name, s.shape, s.out_dtype, s.base, s.experts, s.params, file_index, offset,
            reduction_rounds=method.reduction_rounds(s.params, s.shape) if s.params is not None else 0,
            compute_dtype=s.compute_dtype, vocabulary=s.vocabulary, vocabulary_models=s.vocabulary_models,
        ))
    compute = config.compute_dtype
    used = {t.compute_dtype for t in tensors if t.compute_dtype}
    if not config.dtype and used:  # reported (and the workers' fallback): the widest one used
        compute = max(sorted(used), key=lambda code: ITEMSIZE[code])
    units = [u for i, t in enumerate(tensors)
             for u in units_for_tensor(i, t, shard_size, ITEMSIZE[t.compute_dtype or compute])]
    return MergePlan(config, method, sourced.template, sourced.base, sourced.experts, tensors, files, units,
                     shard_size, compute, sourced.model_config, sourced.vocabulary,
                     resolve_chat_template(config.chat_template, config.referenced_models()))


MAX_UNITS_PER_BATCH = 256


def batches(units: Iterable[WorkUnit], budget: int, whole: Container[int] = frozenset()) -> Iterator[list[WorkUnit]]:
    """Group consecutive units into batches of at most ``budget`` working bytes (>= 1 unit).

    The units of a tensor in ``whole`` (read once, :meth:`MergePlan.read_once`) stay in one
    batch, past the budget if need be: a batch merges block by block, so its memory is a
    block's (and the held tensor's), not the sum of its units'.
    """
    batch: list[WorkUnit] = []
    used = 0
    for unit in units:
        together = bool(batch) and unit.tensor in whole and batch[-1].tensor == unit.tensor
        if batch and not together and (used + unit.working_bytes > budget or len(batch) >= MAX_UNITS_PER_BATCH):
            yield batch
            batch, used = [], 0
        batch.append(unit)
        used += unit.working_bytes
    if batch:
        yield batch
