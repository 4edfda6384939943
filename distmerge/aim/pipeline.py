"""The staged calibration forward on Ray: stage actors, micro-batches flowing between them.

Each stage is a Ray actor (:class:`~distmerge.aim.stage_worker.StageWorker`) holding only its
layers. A micro-batch is submitted to stage 0, and the ObjectRef of each stage's output is
passed straight to the next stage's call, so hidden states go actor to actor through the object
store without visiting the driver, and stage k works on micro-batch m while stage k+1 works on
m-1. At most ``stages + 1`` micro-batches are in flight, which bounds the object store use.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import torch

from distmerge.aim.layout import ModelLayout, open_base
from distmerge.aim.stage_split import split_by_memory, split_even, stage_resources
from distmerge.aim.stage_worker import StageWorker
from distmerge.aim.wire import pack
from distmerge.checkpoint import Checkpoint
from distmerge.errors import ConfigError, DistmergeError

log = logging.getLogger(__name__)


def plan_model_stages(
    checkpoint: Checkpoint, layout: ModelLayout, stages: int | Literal["auto"], stage_memory: int, itemsize: int
) -> list[tuple[int, int]]:
    """Layer ranges for the base model: even split for an int, by memory budget for ``auto``."""
    n = len(layout.layers)
    if stages == "auto":
        layer_bytes = [layout.part_bytes(checkpoint, [name], itemsize) for name in layout.layers]
        embed = layout.part_bytes(checkpoint, [layout.embed], itemsize)
        head = layout.part_bytes(checkpoint, [layout.norm, layout.head], itemsize)
        return split_by_memory(layer_bytes, embed, head, int(stage_memory))
    if isinstance(stages, bool) or not isinstance(stages, int) or stages < 1:
        raise ConfigError(f"aim.stages: expected 'auto' or a positive integer, got {stages!r}")
    return split_even(n, stages)


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


def compute_statistics(
    model_dir: str | Path,
    sequences: torch.Tensor,
    stages: int | Literal["auto"] = "auto",
    stage_memory: int = 2 * 1000**3,
    micro_batch_size: int = 4,
    progress: bool = True,
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """AIM statistics of the base model over ``sequences``, by a staged forward on Ray.

    Returns one float32 vector per module (every Linear incl. ``lm_head``, every norm), keyed by
    its ``named_modules()`` name, each ``sum_sequences mean_tokens |input|``. Uses the Ray the
    caller initialized (a local one is started if none is). Stages use a GPU when the cluster
    has one, the CPU otherwise; ``dtype`` defaults to float32 on CPU and the checkpoint's float
    dtype on GPU.
    """
    import ray

    checkpoint, layout = open_base(model_dir)
    vocab = checkpoint.tensors[layout.source(checkpoint, f"{layout.embed}.weight")].shape[0]
    sequences = _check_sequences(sequences, vocab)
    if micro_batch_size < 1:
        raise ConfigError(f"aim.micro_batch_size: must be at least 1, got {micro_batch_size}")
    if not ray.is_initialized():
        from distmerge.engine.cluster import connect

        log.info("Ray is not initialized; starting a local Ray for AIM calibration")
        connect()  # the embedded Ray: on loopback only, like a merge's
    use_gpu = ray.cluster_resources().get("GPU", 0.0) > 0
    if dtype is None:
        stored = checkpoint.tensors[layout.source(checkpoint, f"{layout.embed}.weight")]
        dtype = torch.float32 if not use_gpu or stored.dtype not in ("BF16", "F16") else (
            torch.bfloat16 if stored.dtype == "BF16" else torch.float16)
    itemsize = torch.empty((), dtype=dtype).element_size()
    ranges = plan_model_stages(checkpoint, layout, stages, stage_memory, itemsize)
    del layout
    stats, _ = run_stages(model_dir, sequences, ranges, micro_batch_size, progress, dtype)
    return stats


def run_stages(
    model_dir: str | Path,
    sequences: torch.Tensor,
    ranges: list[tuple[int, int]],
    micro_batch_size: int = 4,
    progress: bool = True,
    dtype: torch.dtype = torch.float32,
) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """Run the staged forward over given layer ranges; returns the statistics and what each
    stage held (its :meth:`StageWorker.describe`), so memory per stage can be checked."""
    import ray
    from tqdm.auto import tqdm

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    num_cpus, num_gpus = stage_resources(
        [n["Resources"].get("CPU", 0.0) for n in nodes], [n["Resources"].get("GPU", 0.0) for n in nodes], len(ranges)
    )
    log.info(
        "AIM calibration of %s: %d sequences x %d tokens, %d stages %s, %s %s, micro-batches of %d",
        model_dir, sequences.shape[0], sequences.shape[1], len(ranges), ranges,
        "GPU" if num_gpus else "CPU", str(dtype).removeprefix("torch."), micro_batch_size,
    )
    actor_cls = ray.remote(StageActor)
    actors = [
        actor_cls.options(num_cpus=num_cpus, num_gpus=num_gpus).remote(
            str(model_dir), start, end, i == 0, i == len(ranges) - 1,
            str(dtype).removeprefix("torch."), "cuda" if num_gpus else "cpu", num_cpus,
        )
        for i, (start, end) in enumerate(ranges)
    ]
    try:
        reports = ray.get([a.describe.remote() for a in actors])
        for i, report in enumerate(reports):
            log.info("stage %d: layers %d-%d, %d bytes of weights on %s", i, report["layers"][0],
                     report["layers"][1] - 1, report["bytes"], report["device"])
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
        for actor in actors:
            ray.kill(actor)
    log.info("AIM statistics computed for %d modules", len(stats))
    return stats, reports


class StageActor(StageWorker):
    """The Ray actor body: a StageWorker that sets its torch threads and picks its device."""

    def __init__(self, model_dir: str, start: int, end: int, first: bool, last: bool,
                 dtype: str, device: str, num_cpus: float) -> None:
        torch.set_num_threads(max(1, int(num_cpus)))
        if device == "cuda" and not torch.cuda.is_available():
            log.warning("stage %d-%d was given a GPU but torch sees none; using the CPU", start, end - 1)
            device = "cpu"
        super().__init__(model_dir, start, end, first, last, dtype, device)
