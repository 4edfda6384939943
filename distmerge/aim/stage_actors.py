"""The calibration's stage actors: planning them, their resources, starting and stopping them.

Split from :mod:`distmerge.aim.pipeline`, which runs the pass over the actors this module starts.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from distmerge.aim.stage_plan import (
    calibration_dtype,
    check_stage_cap,
    cluster_nodes,
    place_model_stages,
    stage_overhead,
)
from distmerge.aim.stage_split import StagePlacement, stage_resources
from distmerge.aim.stage_worker import StageWorker
from distmerge.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StagePlan:
    """Where each stage runs (its layers, node and memory) and the dtype the stages compute in."""

    placements: list[StagePlacement]
    dtype: torch.dtype


def plan_stages(
    checkpoint: Any, layout: Any, seq_len: int, stages: int | Literal["auto"], stage_memory: int | None,
    micro_batch_size: int, dtype: torch.dtype | None,
) -> StagePlan:
    """The stages for micro-batches of ``micro_batch_size`` sequences of ``seq_len`` tokens: each
    stage must find room for its layers and those activations (:func:`stage_overhead`), so the
    plan waits for the sequences' length. Starts the embedded Ray if none is running, since the
    placement reads the cluster's nodes; ``dtype`` None picks float32 on CPU and the checkpoint's
    bf16/fp16 on GPU."""
    import ray

    if micro_batch_size < 1:
        raise ConfigError(f"aim.micro_batch_size: must be at least 1, got {micro_batch_size}")
    if stages == "auto" and stage_memory is not None:
        check_stage_cap(checkpoint, layout, stage_memory, seq_len, micro_batch_size, dtype)
    if not ray.is_initialized():
        from distmerge.engine.cluster import connect

        log.info("Ray is not initialized; starting a local Ray for AIM calibration")
        connect()  # the embedded Ray: on loopback only, like a merge's
    chosen = calibration_dtype(checkpoint, layout, ray.cluster_resources().get("GPU", 0.0) > 0, dtype)
    itemsize = torch.empty((), dtype=chosen).element_size()
    overhead = stage_overhead(checkpoint.config, micro_batch_size, seq_len, itemsize)
    placements = place_model_stages(checkpoint, layout, stages, stage_memory, itemsize, overhead, cluster_nodes())
    return StagePlan(placements, chosen)


def stop_actors(actors: Sequence[Any]) -> None:
    """Kill each actor (one already dead is skipped by Ray)."""
    import ray

    for actor in actors:
        ray.kill(actor)


def actor_resources(placements: list[StagePlacement]) -> tuple[float, float]:
    """``(num_cpus, num_gpus)`` of each stage actor: shares of the nodes they are pinned to, or
    of the cluster (:func:`stage_resources`)."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    pinned = {p.node_id for p in placements if p.node_id}
    if pinned:  # stages pinned to nodes: each node's CPUs (GPUs) are shared by its own stages only
        count = {node: sum(p.node_id == node for p in placements) for node in pinned}
        res = {n["NodeID"]: n["Resources"] for n in nodes}
        cpu_share = min(res.get(node, {}).get("CPU", 0.0) / k for node, k in count.items())
        gpu_share = min(res.get(node, {}).get("GPU", 0.0) / k for node, k in count.items())
        num_cpus = float(math.floor(cpu_share)) if cpu_share >= 1 else max(cpu_share, 0.01)
        num_gpus = 1.0 if gpu_share >= 1 else (1.0 / math.ceil(1.0 / gpu_share) if gpu_share > 0 else 0.0)
        return num_cpus, num_gpus
    return stage_resources([n["Resources"].get("CPU", 0.0) for n in nodes],
                           [n["Resources"].get("GPU", 0.0) for n in nodes], len(placements))


def start_actors(model_dir: str | Path, placements: list[StagePlacement], dtype: torch.dtype) -> tuple[list[Any], bool]:
    """One :class:`StageActor` per placement, started without waiting; and whether they use GPUs."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    num_cpus, num_gpus = actor_resources(placements)
    actor_cls = ray.remote(StageActor)
    actors = []
    for i, p in enumerate(placements):
        options: dict[str, Any] = {"num_cpus": num_cpus, "num_gpus": num_gpus}
        if p.node_id:
            options.update(memory=p.memory, scheduling_strategy=NodeAffinitySchedulingStrategy(p.node_id, soft=False))
        actors.append(actor_cls.options(**options).remote(
            str(model_dir), p.layers[0], p.layers[1], i == 0, i == len(placements) - 1,
            str(dtype).removeprefix("torch."), "cuda" if num_gpus else "cpu", num_cpus,
        ))
    return actors, num_gpus > 0


class StageActor(StageWorker):
    """The Ray actor body: a StageWorker that sets its torch threads and picks its device."""

    def __init__(self, model_dir: str, start: int, end: int, first: bool, last: bool,
                 dtype: str, device: str, num_cpus: float) -> None:
        torch.set_num_threads(max(1, int(num_cpus)))
        if device == "cuda" and not torch.cuda.is_available():
            log.warning("stage %d-%d was given a GPU but torch sees none; using the CPU", start, end - 1)
            device = "cpu"
        super().__init__(model_dir, start, end, first, last, dtype, device)

    def describe(self) -> dict[str, Any]:
        """The stage's holdings (:meth:`StageWorker.describe`) and the Ray node it runs on."""
        import ray

        context = ray.get_runtime_context()
        return {**super().describe(), "node_id": context.get_node_id(),
                "node_address": ray.util.get_node_ip_address(), "pid": os.getpid()}
