"""Cutting the decoder layers into contiguous stages, and the Ray resources of each stage.

Pure functions: bytes in, layer ranges and resource amounts out, so the sizing is testable
without a model or a cluster.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

from distmerge.sizes import format_size

log = logging.getLogger(__name__)

Stage = tuple[int, int]


def split_even(num_layers: int, num_stages: int) -> list[Stage]:
    """``num_stages`` contiguous ranges of near-equal layer counts (earlier stages get extras).

    More stages than layers is clamped to one stage per layer, with a warning.
    """
    if num_layers < 1:
        raise ValueError("the model has no decoder layers")
    if num_stages > num_layers:
        log.warning("aim.stages=%d exceeds the %d decoder layers; using %d stages (one per layer)",
                    num_stages, num_layers, num_layers)
        num_stages = num_layers
    base, extra = divmod(num_layers, num_stages)
    stages, start = [], 0
    for i in range(num_stages):
        end = start + base + (1 if i < extra else 0)
        stages.append((start, end))
        start = end
    return stages


def split_by_memory(layer_bytes: Sequence[int], embed_bytes: int, head_bytes: int, budget: int) -> list[Stage]:
    """Greedy contiguous packing of layers into stages of at most ``budget`` weight bytes.

    The embeddings count against the first stage, the final norm and head against the last.
    A single layer (with its embeddings or head) above the budget gets a stage of its own and a
    warning, since a layer cannot be split.
    """
    n = len(layer_bytes)
    if n < 1:
        raise ValueError("the model has no decoder layers")
    sizes = list(layer_bytes)
    sizes[0] += embed_bytes
    sizes[-1] += head_bytes
    stages: list[Stage] = []
    start, used = 0, 0
    for i, size in enumerate(sizes):
        if i > start and used + size > budget:
            stages.append((start, i))
            start, used = i, 0
        used += size
    stages.append((start, n))
    over = [s for s in stages if sum(sizes[s[0]:s[1]]) > budget]
    if over:
        log.warning("aim.stage_memory=%d bytes is smaller than what stages %s need; they exceed it",
                    budget, over)
    return stages


def stage_resources(node_cpus: Sequence[float], node_gpus: Sequence[float], num_stages: int) -> tuple[float, float]:
    """``(num_cpus, num_gpus)`` per stage actor such that all stages fit the nodes at once.

    With GPUs each stage takes one GPU, or an equal fraction when there are more stages than
    GPUs; CPU-only, each stage takes an equal whole share of CPUs (its torch threads), or a
    fraction when there are more stages than CPUs. Checked per node, since an actor cannot span
    nodes: every stage must be placed or the pipeline would wait forever.
    """
    def fits(per: float, capacities: Sequence[float]) -> bool:
        return sum(math.floor(c / per + 1e-9) for c in capacities) >= num_stages

    gpus = 0.0
    if sum(node_gpus) >= 1e-9:
        k = 1
        while not fits(1.0 / k, node_gpus):
            k += 1
        gpus = 1.0 / k
    cpu_total = sum(node_cpus)
    start = min(max(node_cpus, default=1), max(1, math.floor(cpu_total / num_stages)))
    if gpus:
        start = min(start, 4)
    per = float(max(1, start))
    while per > 1 and not fits(per, node_cpus):
        per -= 1
    if not fits(per, node_cpus):
        k = 2
        while not fits(1.0 / k, node_cpus) and k < 10000:
            k += 1
        per = 1.0 / k
    return per, gpus


@dataclass(frozen=True)
class NodeMemory:
    """A Ray node as the stage planner sees it: its id, address and the memory Ray offers actors."""

    node_id: str
    address: str
    memory: int


@dataclass(frozen=True)
class StagePlacement:
    """One stage: its layers, the node it must run on (None: Ray chooses) and the bytes it asks for."""

    layers: Stage
    node_id: str | None
    address: str
    memory: int


def place_stages(sizes: Sequence[int], overhead: int, nodes: Sequence[NodeMemory],
                 cap: int | None = None) -> list[StagePlacement]:
    """Contiguous stages that each fit the node they are placed on, fewest stages first.

    ``sizes[i]`` is layer i's weight bytes (the embeddings added to layer 0, the final norm and
    head to the last); a stage on a node needs its layers' bytes plus ``overhead`` (its
    activations and the worker process). A model that fits the node offering the most memory is
    one stage there; otherwise each stage takes as many layers as fit the node with the most
    memory left, so stages land one per node while they must and share a node only where it
    has room for both; that many stages are then rebalanced to equal weight where they still
    fit (:func:`_balanced`). ``cap`` (``aim.stage_memory``) additionally bounds each stage's need.
    Raises ValueError, saying what is missing, when a layer fits no node or the nodes together
    cannot hold the model.
    """
    if not sizes:
        raise ValueError("the model has no decoder layers")
    if not nodes:
        raise ValueError("the Ray cluster has no alive node to place calibration stages on")
    left = {n.node_id: n.memory for n in nodes}
    by_id = {n.node_id: n for n in nodes}
    limit = cap if cap is not None else max(left.values())
    placements: list[StagePlacement] = []
    start = 0
    while start < len(sizes):
        node = max(nodes, key=lambda n: (left[n.node_id], n.node_id))
        room = min(left[node.node_id], limit)
        used = overhead
        end = start
        while end < len(sizes) and used + sizes[end] <= room:
            used += sizes[end]
            end += 1
        if end == start:
            need = overhead + sizes[start]
            total = sum(sizes) + overhead
            offered = ", ".join(f"{by_id[i].address} ({by_id[i].node_id[:8]}): {format_size(m)} free"
                                for i, m in left.items())
            what = (f"layer {start} alone needs {format_size(need)}" if need > limit or need > max(n.memory for n in nodes)
                    else f"the model needs {format_size(total)} in all and layers {start}.. do not fit what is left")
            capped = cap is not None and need > cap
            advice = (f"raise aim.stage_memory to at least {format_size(need)} or drop it" if capped else
                      "add nodes or memory (ray start --memory), calibrate on GPUs in bf16, "
                      "or give precomputed statistics with aim.stats")
            raise ValueError(f"AIM calibration stages cannot be placed: {what}, but the nodes offer {offered}"
                             + (f" and aim.stage_memory caps a stage at {format_size(cap)}" if cap else "")
                             + f"; {advice}")
        placements.append(StagePlacement((start, end), node.node_id, node.address, used))
        left[node.node_id] -= used
        start = end
    return _balanced(sizes, overhead, nodes, limit, len(placements)) or placements


def _balanced(sizes: Sequence[int], overhead: int, nodes: Sequence[NodeMemory], limit: int,
              num_stages: int) -> list[StagePlacement] | None:
    """The same number of stages with the largest as small as possible, if they all still fit.

    A pipeline runs at its slowest stage's pace, and filling the first node to the brim leaves
    the last stage light (70B in float32 on two 200 GB nodes: 196 + 86 GB, not 141 + 141).
    Contiguous ranges minimizing the largest stage (binary search on the bound), the largest
    stage placed on the node with the most memory; None when that does not fit (the greedy
    plan then stands).
    """
    if num_stages < 2:
        return None

    def cut(bound: int) -> list[Stage]:
        ranges, start, used = [], 0, 0
        for i, size in enumerate(sizes):
            if i > start and used + size > bound:
                ranges.append((start, i))
                start, used = i, 0
            used += size
        ranges.append((start, len(sizes)))
        return ranges

    low, high = max(sizes), sum(sizes)
    while low < high:
        mid = (low + high) // 2
        if len(cut(mid)) <= num_stages:
            high = mid
        else:
            low = mid + 1
    ranges = cut(low)
    left = {n.node_id: n.memory for n in nodes}
    by_id = {n.node_id: n for n in nodes}
    chosen: dict[Stage, str] = {}
    for r in sorted(ranges, key=lambda r: -sum(sizes[r[0]:r[1]])):
        need = overhead + sum(sizes[r[0]:r[1]])
        node_id = max(left, key=lambda i: (left[i], i))
        if need > min(left[node_id], limit):
            return None
        chosen[r] = node_id
        left[node_id] -= need
    return [StagePlacement(r, chosen[r], by_id[chosen[r]].address, overhead + sum(sizes[r[0]:r[1]])) for r in ranges]
