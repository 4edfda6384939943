"""Planning calibration stages for a model on a cluster: layer bytes, a stage's overhead, the
nodes' memory, and the placement ``aim.stages`` asks for.

The cutting itself is pure (:mod:`distmerge.aim.stage_split`); this module measures the model
(from its checkpoint headers) and reads the cluster (Ray's node table) to feed it.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from distmerge.aim.layout import ModelLayout
from distmerge.aim.stage_split import (
    NodeMemory,
    StagePlacement,
    place_stages,
    split_by_memory,
    split_even,
)
from distmerge.checkpoint import Checkpoint
from distmerge.errors import ConfigError
from distmerge.sizes import format_size

# A stage worker's own footprint beyond its weights and activations: the Python process with
# torch, transformers and Ray loaded (measured ~0.35 GB resident on CPU), rounded up.
WORKER_BYTES = 500 * 1000**2


def plan_model_stages(
    checkpoint: Checkpoint, layout: ModelLayout, stages: int | Literal["auto"], stage_memory: int, itemsize: int
) -> list[tuple[int, int]]:
    """Layer ranges for the base model: even split for an int, by a per-stage weight budget for ``auto``."""
    n = len(layout.layers)
    if stages == "auto":
        return split_by_memory(*_layer_sizes(checkpoint, layout, itemsize), int(stage_memory))
    if isinstance(stages, bool) or not isinstance(stages, int) or stages < 1:
        raise ConfigError(f"aim.stages: expected 'auto' or a positive integer, got {stages!r}")
    return split_even(n, stages)


def _layer_sizes(checkpoint: Checkpoint, layout: ModelLayout, itemsize: int) -> tuple[list[int], int, int]:
    """Weight bytes per decoder layer, of the embeddings, and of the final norm and head."""
    layer_bytes = [layout.part_bytes(checkpoint, [name], itemsize) for name in layout.layers]
    embed = layout.part_bytes(checkpoint, [layout.embed], itemsize)
    head = layout.part_bytes(checkpoint, [layout.norm, layout.head], itemsize)
    return layer_bytes, embed, head


def _stage_sizes(checkpoint: Checkpoint, layout: ModelLayout, itemsize: int) -> list[int]:
    """Weight bytes per decoder layer as stages hold them: the embeddings with the first layer,
    the final norm and head with the last."""
    layer_bytes, embed, head = _layer_sizes(checkpoint, layout, itemsize)
    sizes = list(layer_bytes)
    sizes[0] += embed
    sizes[-1] += head
    return sizes


def check_stage_cap(checkpoint: Checkpoint, layout: ModelLayout, stage_memory: int, seq_len: int,
                    micro_batch_size: int, dtype: torch.dtype | None) -> None:
    """Refuse an ``aim.stage_memory`` that some layer exceeds on any device, before Ray starts.

    Why here: the placement needs the cluster's nodes and the device (float32 on CPU, the
    checkpoint's bf16/fp16 on a GPU), so it runs after Ray has started (15 s on a laptop). A
    layer that needs more than the cap even in the narrowest dtype a stage may compute in fits
    no stage anywhere, which the headers alone tell.
    """
    narrowest = min((calibration_dtype(checkpoint, layout, gpu, dtype) for gpu in (False, True)),
                    key=lambda d: torch.empty((), dtype=d).element_size())
    itemsize = torch.empty((), dtype=narrowest).element_size()
    sizes = _stage_sizes(checkpoint, layout, itemsize)
    overhead = stage_overhead(checkpoint.config, micro_batch_size, seq_len, itemsize)
    largest = max(range(len(sizes)), key=sizes.__getitem__)
    need = overhead + sizes[largest]
    if need > stage_memory:
        raise ConfigError(f"aim.stages=auto: AIM calibration stages cannot be placed: layer {largest} alone needs "
                          f"{format_size(need)} (computing in {str(narrowest).removeprefix('torch.')}, with one "
                          f"micro-batch's activations and the worker) and aim.stage_memory caps a stage at "
                          f"{format_size(stage_memory)}; raise aim.stage_memory to at least {format_size(need)} or drop it")


def calibration_dtype(checkpoint: Checkpoint, layout: ModelLayout, on_gpu: bool, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype the stages compute in: ``dtype`` if given, else float32 on CPU and the
    checkpoint's own bf16/fp16 on a GPU (one rule for the Ray stages and the in-process one)."""
    if dtype is not None:
        return dtype
    stored = checkpoint.tensors[layout.source(checkpoint, f"{layout.embed}.weight")].dtype
    if not on_gpu or stored not in ("BF16", "F16"):
        return torch.float32
    return torch.bfloat16 if stored == "BF16" else torch.float16


def stage_overhead(config: dict[str, Any], micro_batch: int, seq_len: int, itemsize: int) -> int:
    """Bytes a stage needs beyond its weights: activations of one micro-batch and the worker.

    Hidden states and MLP intermediates of a layer and eager attention's ``[B, heads, T, T]``
    scores. No logits: the last stage takes the head's statistic from its input.
    """
    text = config.get("text_config") or config
    hidden = int(text.get("hidden_size") or 0)
    inter = int(text.get("intermediate_size") or 4 * hidden)
    heads = int(text.get("num_attention_heads") or 1)
    per_token = 8 * hidden + 3 * inter
    activations = micro_batch * seq_len * per_token + micro_batch * heads * seq_len * seq_len
    return WORKER_BYTES + activations * itemsize


def cluster_nodes() -> list[NodeMemory]:
    """The alive Ray nodes with the memory Ray's scheduler offers actors on each."""
    import ray

    return [NodeMemory(n["NodeID"], n.get("NodeManagerAddress", "?"), int(n["Resources"].get("memory", 0)))
            for n in ray.nodes() if n.get("Alive")]


def place_model_stages(checkpoint: Checkpoint, layout: ModelLayout, stages: int | Literal["auto"],
                       stage_memory: int | None, itemsize: int, overhead: int,
                       nodes: list[NodeMemory]) -> list[StagePlacement]:
    """Where each stage runs: for ``auto``, planned from the memory the nodes offer (each stage on
    a node it fits, see :func:`place_stages`); for an integer, an even split Ray places freely."""
    if stages != "auto":
        return [StagePlacement(r, None, "", 0) for r in plan_model_stages(checkpoint, layout, stages, 0, itemsize)]
    try:
        return place_stages(_stage_sizes(checkpoint, layout, itemsize), overhead, nodes, stage_memory)
    except ValueError as e:
        raise ConfigError(f"aim.stages=auto: {e}") from None
