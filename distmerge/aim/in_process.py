"""The calibration forward in this process, when one machine runs it and one stage holds the model.

Why: on one machine without Ray, a pipeline of one stage actor computes exactly what a
:class:`~distmerge.aim.stage_worker.StageWorker` in this process computes, but first starts an
embedded Ray and a worker process that imports torch and transformers again: ~15 s of the
21-24 s a ``distmerge calibrate`` of a 4-layer model took (``benchmarks/bench_calibrate_command``,
RESULTS.md). Here the same worker runs in the command's process with the thread count the
embedded Ray would give that one actor (every CPU), so both paths give the same statistics
(tested).

The Ray pipeline stays the path wherever Ray runs or is asked for: a cluster address
(``--ray-address``, ``RAY_ADDRESS``: ``ray job submit``, KubeRay), a Ray this process already
runs, ``executor: ray``, or a pipeline of several stages (``aim.stages`` > 1 or
``aim.stage_memory``).
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from typing import Any, Literal

import psutil
import torch

from distmerge.aim.stage_plan import calibration_dtype, place_model_stages, stage_overhead
from distmerge.aim.stage_split import NodeMemory, StagePlacement
from distmerge.aim.stage_worker import StageWorker
from distmerge.aim.wire import pack
from distmerge.config import AimConfig
from distmerge.errors import ConfigError
from distmerge.torch_threads import torch_threads

log = logging.getLogger(__name__)

NODE_ID = "in-process"  # the statistics file's ``stages`` metadata: no Ray node ran them


def pipeline_reason(aim: AimConfig) -> str | None:
    """Why calibrating needs Ray stage actors even on one machine: the config asks for several
    stages (None when one stage, here, will do)."""
    if aim.stage_memory is not None:
        return "aim.stage_memory caps each calibration stage, so the base model runs as a pipeline of Ray stage actors"
    if aim.stages not in ("auto", 1):
        return f"aim.stages: {aim.stages} asks for a pipeline of {aim.stages} Ray stage actors"
    return None


def runs_here(stages: int | Literal["auto"], stage_memory: int | None) -> bool:
    """Whether the calibration runs in this process: this process runs no Ray, and one stage is
    asked for. Whoever wants the Ray pipeline connects first (the commands do, by the executor
    rule a merge follows: :func:`~distmerge.engine.executors.choose_executor`)."""
    from distmerge.engine.executors import ray_running

    return not ray_running() and stage_memory is None and stages in ("auto", 1)


def plan_here(checkpoint: Any, layout: Any, seq_len: int, micro_batch_size: int,
              dtype: torch.dtype | None) -> tuple[StagePlacement, torch.dtype, str]:
    """The one stage, its dtype and device: the whole model must fit the memory available now
    (with one micro-batch's activations), as it must fit a node for a one-stage Ray plan."""
    if micro_batch_size < 1:
        raise ConfigError(f"aim.micro_batch_size: must be at least 1, got {micro_batch_size}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    chosen = calibration_dtype(checkpoint, layout, device == "cuda", dtype)
    itemsize = torch.empty((), dtype=chosen).element_size()
    overhead = stage_overhead(checkpoint.config, micro_batch_size, seq_len, itemsize)
    here = NodeMemory(NODE_ID, socket.gethostname(), int(psutil.virtual_memory().available))
    try:
        placements = place_model_stages(checkpoint, layout, "auto", None, itemsize, overhead, [here])
    except ConfigError as e:
        raise ConfigError(f"{e}; or join a Ray cluster (--ray-address), whose nodes then hold a stage each") from None
    return placements[0], chosen, device  # one node: one stage, or place_model_stages raised


def run_here(model_dir: str | Path, sequences: torch.Tensor, placement: StagePlacement, micro_batch_size: int,
             progress: bool, dtype: torch.dtype, device: str,
             threads: int | None = None) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """The statistics of one stage holding ``placement``'s layers, run in this process over
    micro-batches, and its report (as :meth:`StageActor.describe` gives, node ``in-process``).

    ``threads`` defaults to every CPU: what the embedded Ray gives a lone stage actor."""
    from tqdm.auto import tqdm

    from distmerge.aim.pipeline import merge_statistics

    start, end = placement.layers
    with torch_threads(threads or os.cpu_count() or 1):
        worker = StageWorker(model_dir, start, end, True, True, str(dtype).removeprefix("torch."), device)
        log.info("AIM calibration of %s: %d sequences x %d tokens, one stage (layers %d-%d) in this process "
                 "(no Ray needed), %s %s, micro-batches of %d", model_dir, sequences.shape[0], sequences.shape[1],
                 start, end - 1, device.upper(), str(dtype).removeprefix("torch."), micro_batch_size)
        batches = list(torch.split(sequences, micro_batch_size))
        with tqdm(total=len(batches), desc="AIM calibration", unit="batch", disable=not progress) as bar:
            for batch in batches:
                worker.forward({"input_ids": pack(batch)})
                bar.update(1)
        stats = merge_statistics([worker.statistics()])
    report = {**worker.describe(), "node_id": NODE_ID, "node_address": socket.gethostname(), "pid": os.getpid()}
    log.info("AIM statistics computed for %d modules", len(stats))
    return stats, [report]
