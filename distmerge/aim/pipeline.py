"""The staged calibration forward on Ray: stage actors, micro-batches flowing between them.

Each stage is a Ray actor (:class:`~distmerge.aim.stage_worker.StageWorker`) holding only its
layers. A micro-batch is submitted to stage 0, and the ObjectRef of each stage's output is
passed straight to the next stage's call, so hidden states go actor to actor through the object
store without visiting the driver, and stage k works on micro-batch m while stage k+1 works on
m-1. At most ``stages + 1`` micro-batches are in flight, which bounds the object store use.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from distmerge.aim import in_process, stage_actors
from distmerge.aim.layout import ModelLayout, open_base
from distmerge.aim.stage_split import StagePlacement
from distmerge.aim.wire import pack
from distmerge.checkpoint import Checkpoint
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


def merge_statistics(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The stages' statistics as one float32 map; refused if two stages computed one module or
    a statistic is not finite."""
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
    opened: tuple[Checkpoint, ModelLayout] | None = None,
) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """AIM statistics of the base model over ``sequences`` by a staged forward on Ray (or, on
    one machine running no Ray with one stage asked for, by that stage in this process:
    :mod:`~distmerge.aim.in_process`), and per stage what it held and which node ran it.

    The statistics are one float32 vector per module (every Linear incl. ``lm_head``, every
    norm), keyed by its ``named_modules()`` name, each ``sum_sequences mean_tokens |input|``.

    Uses the Ray the caller initialized (a local one is started if none is and several stages
    are asked for). Stages use a GPU when the cluster (or this machine) has one, the CPU
    otherwise; ``dtype`` defaults to float32 on CPU and the checkpoint's float dtype on GPU.
    ``stages="auto"`` plans the stages from the memory the cluster's nodes offer
    (``stage_memory`` optionally caps a stage). ``opened`` is ``open_base(model_dir)`` when the
    caller has it already (``calibrate`` checks the folder before it tokenizes).
    """
    checkpoint, layout = opened if opened is not None else open_base(model_dir)
    vocab = checkpoint.tensors[layout.source(checkpoint, f"{layout.embed}.weight")].shape[0]
    sequences = _check_sequences(sequences, vocab)
    if in_process.runs_here(stages, stage_memory):
        placement, chosen, device = in_process.plan_here(checkpoint, layout, int(sequences.shape[1]),
                                                         micro_batch_size, dtype)
        del layout
        return in_process.run_here(model_dir, sequences, placement, micro_batch_size, progress, chosen, device)
    plan = stage_actors.plan_stages(checkpoint, layout, int(sequences.shape[1]), stages, stage_memory, micro_batch_size, dtype)
    del layout
    return run_stages(model_dir, sequences, plan.placements, micro_batch_size, progress, plan.dtype)


def run_stages(
    model_dir: str | Path,
    sequences: torch.Tensor,
    ranges: Sequence[tuple[int, int] | StagePlacement],
    micro_batch_size: int = 4,
    progress: bool = True,
    dtype: torch.dtype = torch.float32,
) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """Run the staged forward over given layer ranges (or placed stages); returns the statistics
    and what each stage held and where (its :meth:`StageActor.describe`).

    A stage actor that dies mid-pass (its node lost, the process killed) fails the pass; the
    pass then runs again on fresh actors, up to :data:`PASS_ATTEMPTS` times, so the statistics
    always come from one complete pass.
    """
    import ray

    placements = [r if isinstance(r, StagePlacement) else StagePlacement(tuple(r), None, "", 0) for r in ranges]
    for attempt in range(1, PASS_ATTEMPTS + 1):
        try:
            return _one_pass(model_dir, sequences, placements, micro_batch_size, progress, dtype)
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
) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    import ray
    from tqdm.auto import tqdm

    actors, on_gpu = stage_actors.start_actors(model_dir, placements, dtype)
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
        stats = merge_statistics(ray.get([a.statistics.remote() for a in actors]))
    finally:
        stage_actors.stop_actors(actors)
    log.info("AIM statistics computed for %d modules", len(stats))
    return stats, reports
