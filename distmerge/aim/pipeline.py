"""The staged calibration forward on Ray: stage actors, micro-batches flowing between them.

Each stage is a Ray actor (:class:`~distmerge.aim.stage_worker.StageWorker`) holding only its
layers. A micro-batch is submitted to stage 0, and the ObjectRef of each stage's output is
passed straight to the next stage's call, so hidden states go actor to actor through the object
store without visiting the driver, and stage k works on micro-batch m while stage k+1 works on
m-1. At most ``stages + 1`` micro-batches are in flight, which bounds the object store use.
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

from distmerge.aim.layout import open_base
from distmerge.aim.stage_plan import cluster_nodes, place_model_stages, stage_overhead
from distmerge.aim.stage_split import StagePlacement, stage_resources
from distmerge.aim.stage_worker import StageWorker
from distmerge.aim.wire import pack
from distmerge.errors import ConfigError, DistmergeError

log = logging.getLogger(__name__)


# Attempts of the whole pass when a stage actor dies (node lost, OOM-killed): each attempt starts
# fresh actors, so a statistic never mixes a dead actor's partial sums with a new one's.
PASS_ATTEMPTS = 3


def _check_sequences(sequences: torch.Tensor, vocab_size: int | None) -> torch.Tensor:
    if not isinstance(sequences, torch.Tensor) or sequences.dim() != 2 or sequences.numel() == 0:
        raise ConfigError("aim.calibration: sequences must be a non-empty [n_sequences, block_size] tensor of token ids")
    if sequences.dtype.is_floating_point or sequences.dtype == torch.bool:
        raise ConfigError(f"aim.calibration: token ids must be integers, got {sequences.dtype}")
    sequences = sequences.to(torch.int64)
    low, high = int(sequences.min()), int(sequences.max())
    if low < 0 or (vocab_size is not None and high >= vocab_size):
        raise ConfigError(
            f"aim.calibration: token ids span [{low}, {high}] but the base model's vocabulary has "
            f"{vocab_size} entries; was the data tokenized with another tokenizer?"
        )
    return sequences


def _merge_statistics(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    merged: dict[str, torch.Tensor] = {}
    for part in parts:
        for name, value in part.items():
            if name in merged:
                raise RuntimeError(f"module {name!r} was computed by two stages")
            merged[name] = value
    bad = [name for name, v in merged.items() if not torch.isfinite(v).all()]
    if bad:
        raise DistmergeError(
            f"AIM statistics are not finite for {len(bad)} modules (e.g. {bad[0]}): the forward pass "
            "overflowed; calibrate in float32"
        )
    return {name: v.to(torch.float32) for name, v in merged.items()}


def calibrate_stages(
    model_dir: str | Path,
    sequences: torch.Tensor,
    stages: int | Literal["auto"] = "auto",
    stage_memory: int | None = None,
    micro_batch_size: int = 4,
    progress: bool = True,
    dtype: torch.dtype | None = None,
    started: StartedStages | None = None,
) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """AIM statistics of the base model over ``sequences`` by a staged forward on Ray, and per
    stage what it held and which node ran it.

    The statistics are one float32 vector per module (every Linear incl. ``lm_head``, every
    norm), keyed by its ``named_modules()`` name, each ``sum_sequences mean_tokens |input|``.

    Uses the Ray the caller initialized (a local one is started if none is). Stages use a GPU
    when the cluster has one, the CPU otherwise; ``dtype`` defaults to float32 on CPU and the
    checkpoint's float dtype on GPU. ``stages="auto"`` plans the stages from the memory the
    cluster's nodes offer (``stage_memory`` optionally caps a stage). ``started``: stage actors
    :func:`start_stages` started ahead of the data, used where they were planned for sequences
    of this length (else stopped, and the stages planned again).
    """
    checkpoint, layout = open_base(model_dir)
    vocab = checkpoint.tensors[layout.source(checkpoint, f"{layout.embed}.weight")].shape[0]
    sequences = _check_sequences(sequences, vocab)
    request = (int(sequences.shape[1]), stages, stage_memory, micro_batch_size, dtype)
    taken = started.take(request) if started is not None else None
    if taken is not None:
        plan = started.plan
    else:
        plan = _plan(checkpoint, layout, int(sequences.shape[1]), stages, stage_memory, micro_batch_size, dtype)
    del layout
    return run_stages(model_dir, sequences, plan.placements, micro_batch_size, progress, plan.dtype, taken)


@dataclass(frozen=True)
class StagePlan:
    """Where each stage runs, in which dtype, planned for micro-batches of sequences of ``seq_len``
    tokens (the activations a stage must find room for)."""

    placements: list[StagePlacement]
    dtype: torch.dtype
    #: What it was planned for: ``(seq_len, stages, stage_memory, micro_batch_size, dtype asked)``.
    request: tuple[Any, ...]


def _plan(
    checkpoint: Any, layout: Any, seq_len: int, stages: int | Literal["auto"], stage_memory: int | None,
    micro_batch_size: int, dtype: torch.dtype | None,
) -> StagePlan:
    import ray

    if micro_batch_size < 1:
        raise ConfigError(f"aim.micro_batch_size: must be at least 1, got {micro_batch_size}")
    if not ray.is_initialized():
        from distmerge.engine.cluster import connect

        log.info("Ray is not initialized; starting a local Ray for AIM calibration")
        connect()  # the embedded Ray: on loopback only, like a merge's
    use_gpu = ray.cluster_resources().get("GPU", 0.0) > 0
    chosen = dtype
    if chosen is None:
        stored = checkpoint.tensors[layout.source(checkpoint, f"{layout.embed}.weight")]
        chosen = torch.float32 if not use_gpu or stored.dtype not in ("BF16", "F16") else (
            torch.bfloat16 if stored.dtype == "BF16" else torch.float16)
    itemsize = torch.empty((), dtype=chosen).element_size()
    overhead = stage_overhead(checkpoint.config, micro_batch_size, seq_len, itemsize)
    placements = place_model_stages(checkpoint, layout, stages, stage_memory, itemsize, overhead, cluster_nodes())
    return StagePlan(placements, chosen, (seq_len, stages, stage_memory, micro_batch_size, dtype))


class StartedStages:
    """Stage actors started before the calibration data is ready.

    Why: a stage actor's start (a Ray worker importing torch and transformers, then reading its
    layers) takes seconds, and so does loading the tokenizer and tokenizing in the driver; started
    first, the two overlap. A ``with`` block owns the actors: whatever the pass did not take, or
    left alive, is stopped when it ends (on an error in the data too).
    """

    def __init__(self, model_dir: str | Path, plan: StagePlan) -> None:
        self.plan = plan
        self._started: tuple[list[Any], bool] | None = _start_actors(model_dir, plan.placements, plan.dtype)
        self._all = list(self._started[0])

    def take(self, request: tuple[Any, ...]) -> tuple[list[Any], bool] | None:
        """The actors and whether they use GPUs, once, if they were planned for this ``request``
        (as :attr:`StagePlan.request`); None (and the actors stopped) if not."""
        started, self._started = self._started, None
        if started is None:
            return None
        if request != self.plan.request:
            log.info("AIM calibration: the stages were started for sequences of %d tokens (%s); this pass "
                     "has %d (%s): planning them again", self.plan.request[0], self.plan.request[1:],
                     request[0], request[1:])
            _stop(started[0])
            return None
        return started

    def __enter__(self) -> StartedStages:
        return self

    def __exit__(self, *exc: object) -> None:
        _stop(self._all)


def start_stages(
    model_dir: str | Path,
    seq_len: int,
    stages: int | Literal["auto"] = "auto",
    stage_memory: int | None = None,
    micro_batch_size: int = 4,
    dtype: torch.dtype | None = None,
) -> StartedStages:
    """Plan the stages for sequences of ``seq_len`` tokens and start their actors now, without
    waiting for them (see :class:`StartedStages`); pass the result to :func:`calibrate_stages`."""
    checkpoint, layout = open_base(model_dir)
    return StartedStages(model_dir, _plan(checkpoint, layout, seq_len, stages, stage_memory, micro_batch_size, dtype))


def _stop(actors: Sequence[Any]) -> None:
    import ray

    for actor in actors:
        ray.kill(actor)


def run_stages(
    model_dir: str | Path,
    sequences: torch.Tensor,
    ranges: Sequence[tuple[int, int] | StagePlacement],
    micro_batch_size: int = 4,
    progress: bool = True,
    dtype: torch.dtype = torch.float32,
    started: tuple[list[Any], bool] | None = None,
) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """Run the staged forward over given layer ranges (or placed stages); returns the statistics
    and what each stage held and where (its :meth:`StageActor.describe`).

    A stage actor that dies mid-pass (its node lost, the process killed) fails the pass; the
    pass then runs again on fresh actors, up to :data:`PASS_ATTEMPTS` times, so the statistics
    always come from one complete pass. ``started``: the first attempt's actors, already started
    for these placements, and whether they use GPUs (:meth:`StartedStages.take`).
    """
    import ray

    placements = [r if isinstance(r, StagePlacement) else StagePlacement(tuple(r), None, "", 0) for r in ranges]
    for attempt in range(1, PASS_ATTEMPTS + 1):
        try:
            first, started = started, None
            return _one_pass(model_dir, sequences, placements, micro_batch_size, progress, dtype, first)
        except (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError) as e:
            if attempt == PASS_ATTEMPTS:
                raise DistmergeError(f"AIM calibration: a stage actor died in each of {PASS_ATTEMPTS} attempts "
                                     f"(last: {type(e).__name__}: {str(e)[:300]})") from e
            log.warning("AIM calibration: a stage actor died (%s); discarding this pass and running it again "
                        "on fresh actors (attempt %d of %d)", type(e).__name__, attempt + 1, PASS_ATTEMPTS)
    raise AssertionError("unreachable")


def _one_pass(
    model_dir: str | Path,
    sequences: torch.Tensor,
    placements: list[StagePlacement],
    micro_batch_size: int,
    progress: bool,
    dtype: torch.dtype,
    started: tuple[list[Any], bool] | None = None,
) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    import ray
    from tqdm.auto import tqdm

    actors, on_gpu = started if started is not None else _start_actors(model_dir, placements, dtype)
    log.info(
        "AIM calibration of %s: %d sequences x %d tokens, %d stages %s, %s %s, micro-batches of %d",
        model_dir, sequences.shape[0], sequences.shape[1], len(placements), [p.layers for p in placements],
        "GPU" if on_gpu else "CPU", str(dtype).removeprefix("torch."), micro_batch_size,
    )
    try:
        reports = ray.get([a.describe.remote() for a in actors])
        for i, report in enumerate(reports):
            log.info("stage %d: layers %d-%d, %d bytes of weights on %s, node %s (%s)", i, report["layers"][0],
                     report["layers"][1] - 1, report["bytes"], report["device"], report["node_address"],
                     report["node_id"][:12])
        batches = list(torch.split(sequences, micro_batch_size))
        max_in_flight = len(actors) + 1
        pending: list[Any] = []
        with tqdm(total=len(batches), desc="AIM calibration", unit="batch", disable=not progress) as bar:
            for batch in batches:
                ref: Any = {"input_ids": pack(batch)}
                for actor in actors:  # each stage's output ObjectRef goes straight to the next stage
                    ref = actor.forward.remote(ref)
                pending.append(ref)
                while len(pending) >= max_in_flight:
                    done, pending = ray.wait(pending, num_returns=1)
                    ray.get(done)
                    bar.update(len(done))
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                ray.get(done)
                bar.update(len(done))
        stats = _merge_statistics(ray.get([a.statistics.remote() for a in actors]))
    finally:
        _stop(actors)
    log.info("AIM statistics computed for %d modules", len(stats))
    return stats, reports


def _resources(placements: list[StagePlacement]) -> tuple[float, float]:
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


def _start_actors(model_dir: str | Path, placements: list[StagePlacement], dtype: torch.dtype) -> tuple[list[Any], bool]:
    """One :class:`StageActor` per placement, started without waiting; and whether they use GPUs."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    num_cpus, num_gpus = _resources(placements)
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
