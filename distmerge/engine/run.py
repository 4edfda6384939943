"""The merge driver: plan, prepare outputs, run units on Ray, finalize, report.

The driver holds no tensor data: it ships one job description to the object store, submits
batches of units with a bounded number in flight, renames each output file once all of its
rows are written, and writes the index last.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import yaml

from distmerge.config import MergeConfig, load_config
from distmerge.dtypes import TORCH_NAME
from distmerge.engine.cluster import cluster_cpus, connect
from distmerge.engine.worker import BatchResult, MergeJob
from distmerge.errors import DistmergeError, OutputError
from distmerge.plan import MergePlan, WorkUnit, build_plan
from distmerge.report import build_report, write_model_card, write_report
from distmerge.writer import (
    INDEX_NAME,
    PARTIAL_SUFFIX,
    copy_tokenizer,
    create_file,
    finalize_file,
    partial_path,
    write_index,
    write_model_config,
    write_text_atomic,
)

log = logging.getLogger(__name__)
T = TypeVar("T")
MAX_UNITS_PER_BATCH = 256


def batches(units: Iterable[WorkUnit], budget: int) -> Iterator[list[WorkUnit]]:
    """Group consecutive units into batches of at most ``budget`` working bytes (>= 1 unit)."""
    batch: list[WorkUnit] = []
    used = 0
    for unit in units:
        if batch and (used + unit.working_bytes > budget or len(batch) >= MAX_UNITS_PER_BATCH):
            yield batch
            batch, used = [], 0
        batch.append(unit)
        used += unit.working_bytes
    if batch:
        yield batch


def run_bounded(submit: Callable[[Any], Any], items: Iterable[Any], limit: int,
                on_done: Callable[[Any, Any], None]) -> None:
    """Submit Ray tasks for ``items`` with at most ``limit`` in flight; ``on_done(item, result)``."""
    import ray

    pending: dict[Any, Any] = {}
    iterator = iter(items)

    def fill() -> None:
        while len(pending) < limit:
            item = next(iterator, None)
            if item is None:
                return
            pending[submit(item)] = item

    fill()
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                item = pending.pop(ref)
                on_done(item, _unwrap(ref))
            fill()
    except BaseException:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise


def _unwrap(ref: Any) -> Any:
    """ray.get that re-raises a task's DistmergeError as itself (a message, not a traceback)."""
    import ray

    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, DistmergeError):
            raise cause from None
        raise


def prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Refuse a directory that holds something unless told to overwrite it."""
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"{out_dir}: exists and is not a directory")
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise OutputError(
                f"{out_dir}: directory is not empty; pass --overwrite to replace it, "
                "or --resume to finish an interrupted merge into it"
            )
        log.warning("overwriting %s", out_dir)
        for child in out_dir.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{out_dir}: cannot create the output directory ({e.strerror})") from e


def _progress(total: int, enabled: bool, desc: str) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000, desc=desc,
                disable=not enabled, dynamic_ncols=True, mininterval=0.5)


def compute_statistics_pass(plan: MergePlan, job_ref: Any, limit: int, progress: bool) -> dict[int, dict[str, Any]]:
    """Multi-phase methods: rounds of canonical chunk statistics, each reduced in chunk order."""
    import ray

    from distmerge.engine.tasks import statistics_task

    reduced: dict[int, dict[str, Any]] = {}
    for round_ in range(plan.statistics_rounds):
        units = plan.statistics_units(round_)
        partials: dict[int, dict[int, Any]] = defaultdict(dict)
        bar = _progress(sum(u.read_bytes for u in units), progress, f"statistics {round_ + 1}/{plan.statistics_rounds}")

        def done(batch: list[WorkUnit], result: list[tuple[int, int, dict[str, Any]]], partials=partials, bar=bar) -> None:
            for tensor, row_start, stats in result:
                partials[tensor][row_start] = stats
            bar.update(sum(u.read_bytes for u in batch))

        previous_ref = ray.put(reduced)
        run_bounded(lambda b, r=round_, p=previous_ref: statistics_task.remote(job_ref, b, r, p),
                    batches(units, plan.shard_size), limit, done)
        bar.close()
        for i, chunks in partials.items():
            t = plan.tensors[i]
            reduced[i] = plan.method.reduce([chunks[r] for r in sorted(chunks)], t.params, t.shape, round_,
                                            reduced.get(i))
    return reduced


def aim_tensor_modules(plan: MergePlan, stats: dict[str, Any]) -> dict[int, str]:
    """Which merged tensors AIM relaxes, and by which module's statistics (shapes checked)."""
    from distmerge.aim import module_for_tensor

    modules = {}
    for i, t in enumerate(plan.tensors):
        module = module_for_tensor(t.name) if t.params is not None else None
        if module is None or module not in stats:
            continue
        channels = t.shape[-1] if t.shape else 1
        if stats[module].numel() != channels:
            raise OutputError(
                f"aim.stats: module {module!r} has {stats[module].numel()} channels but tensor {t.name!r} "
                f"has {channels} input channels; the statistics belong to another model"
            )
        modules[i] = module
    if not modules:
        raise OutputError("aim: none of the statistics match a tensor of this model; check aim.stats")
    return modules


def load_aim(config: MergeConfig, progress: bool) -> tuple[dict[str, Any], dict[str, str]]:
    """AIM statistics, loaded from ``aim.stats`` or calibrated now on the base model."""
    from distmerge import aim

    assert config.aim is not None
    if not config.base_model:
        raise OutputError("aim: AIM needs base_model (its activations are the calibration signal)")
    if config.aim.stats:
        stats, metadata = aim.load_statistics(Path(config.aim.stats))
    else:
        stats, metadata = aim.calibrate(Path(config.base_model), config.aim, None, progress=progress)
    return stats, metadata


def run_merge(
    config: MergeConfig | str | Path,
    out_dir: str | Path,
    *,
    ray_address: str | None = None,
    shard_size: int | None = None,
    workers: int | None = None,
    seed: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Run a merge end to end and return its report (also written to ``merge_report.json``)."""
    started = time.time()
    cfg = config if isinstance(config, MergeConfig) else load_config(config)
    out = Path(out_dir)
    if seed is not None:
        cfg = cfg.model_copy(update={"execution": cfg.execution.model_copy(update={"seed": seed})})
    plan = build_plan(cfg, shard_size)
    aim_stats: dict[str, Any] = {}
    aim_meta: dict[str, str] = {}
    if cfg.aim is not None:
        connect(ray_address)
        aim_stats, aim_meta = load_aim(cfg, progress)
        plan.aim_modules = aim_tensor_modules(plan, aim_stats)
    log.info("plan:\n%s", plan.summary())
    prepare_out_dir(out, overwrite)
    connect(ray_address)
    import ray

    from distmerge.engine.tasks import merge_batch_task

    cpus = cluster_cpus()
    concurrency = workers or cfg.execution.workers or cpus
    # Ray runs at most one task per CPU, so when every CPU may work, a queue of as many again
    # hides the submit/return round trip at no memory cost (queued tasks hold no buffers).
    limit = concurrency * 2 if concurrency >= cpus else concurrency
    for f in plan.files:
        create_file(partial_path(out, f.name), f.header, f.size)
    factors = {}
    if cfg.aim is not None:
        from distmerge.aim import relaxation_factors

        factors = {i: relaxation_factors(aim_stats[m], cfg.aim.omega) for i, m in plan.aim_modules.items()}
    job = MergeJob(
        plan.method.name, tuple(plan.tensors), tuple(str(partial_path(out, f.name)) for f in plan.files),
        plan.compute_dtype, cfg.execution.seed, not cfg.execution.allow_nonfinite,
        cfg.aim.omega if cfg.aim else None, factors,
    )
    job_ref = ray.put(job)
    stats = compute_statistics_pass(plan, job_ref, limit, progress)
    stats_ref = ray.put(stats)
    remaining = defaultdict(int)
    for u in plan.units:
        remaining[plan.tensors[u.tensor].file_index] += 1
    results: list[BatchResult] = []
    bar = _progress(plan.write_bytes, progress, f"merge ({plan.method.name})")

    def done(batch: list[WorkUnit], result: BatchResult) -> None:
        results.append(result)
        bar.update(result.bytes_written)
        for u in batch:
            f = plan.tensors[u.tensor].file_index
            remaining[f] -= 1
            if remaining[f] == 0:
                finalize_file(out, plan.files[f].name)

    run_bounded(lambda b: merge_batch_task.remote(job_ref, b, stats_ref), batches(plan.units, plan.shard_size),
                limit, done)
    bar.close()
    out_dtypes = {t.out_dtype for t in plan.tensors if t.params is not None}
    write_model_config(out, plan.template.config, TORCH_NAME.get(next(iter(out_dtypes))) if len(out_dtypes) == 1 else None)
    tokenizer_source = Path(cfg.tokenizer_source) if cfg.tokenizer_source not in (None, "base") else plan.template.path
    copy_tokenizer(tokenizer_source, out)
    write_text_atomic(out / "distmerge_config.yml", yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    report = build_report(plan, results, time.time() - started, aim_stats=aim_stats, aim_meta=aim_meta)
    write_report(out, report)
    write_model_card(out, plan, report)
    write_index(out, [(f.name, f.tensors, f.size) for f in plan.files], sum(t.out_nbytes for t in plan.tensors))
    leftovers = list(out.glob("*" + PARTIAL_SUFFIX))
    if leftovers:
        raise OutputError(f"{out}: unfinished files remain: {', '.join(p.name for p in leftovers)}")
    log.info("merged %s into %s in %.1fs", plan.method.name, out / INDEX_NAME, report["seconds"])
    return report
