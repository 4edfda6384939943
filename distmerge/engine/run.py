"""The merge driver: plan, prepare outputs, run units on Ray, finalize, report.

The driver holds no tensor data: it ships one job description to the object store, submits
batches of units with a bounded number in flight, renames each output file once all of its
rows are written, and writes the index last.
"""

from __future__ import annotations

import logging
import os
import stat
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch
import yaml

from distmerge.aim.stats_file import SAVED_NAME
from distmerge.config import MergeConfig, load_config
from distmerge.dtypes import ITEMSIZE, TORCH_NAME
from distmerge.engine.cluster import cluster_cpus, connect
from distmerge.engine.worker import BatchResult, MergeJob
from distmerge.errors import ConfigError, DistmergeError, OutputError
from distmerge.io.files import file_kind, require_regular
from distmerge.journal import (
    JOURNAL_NAME,
    JournalState,
    JournalWriter,
    crc_of_range,
    merge_fingerprint,
    read_journal,
)
from distmerge.methods.base import Partials, Reductions
from distmerge.output.directory import examine_output, input_paths, make_directory
from distmerge.output.location import check_output_location
from distmerge.output.lock import OutputLock
from distmerge.output.manifest import (
    INDEX_KEY,
    MANIFEST_NAME,
    add_other_files,
    build_manifest,
    write_manifest,
)
from distmerge.plan import MergePlan, WorkUnit, build_plan
from distmerge.report import (
    MODEL_CARD_NAME,
    REPORT_NAME,
    build_report,
    write_model_card,
    write_report,
)
from distmerge.verify import verify_output
from distmerge.writer import (
    CONFIG_COPY_NAME,
    INDEX_NAME,
    copy_side_files,
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


def _progress(total: int, enabled: bool, desc: str) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000, desc=desc,
                disable=not enabled, dynamic_ncols=True, mininterval=0.5)


def run_reduction_rounds(plan: MergePlan, job_ref: Any, limit: int, progress: bool) -> dict[int, Reductions]:
    """Multi-phase methods: rounds of canonical chunk partials, each reduced in chunk order."""
    import ray

    from distmerge.engine.tasks import reduction_task

    reduced: dict[int, Reductions] = {}
    for round_ in range(plan.reduction_rounds):
        units = [u for u in plan.reduction_units(round_) if not (u.tensor in reduced and reduced[u.tensor].complete)]
        if not units:
            break
        partials: dict[int, dict[int, Partials]] = defaultdict(dict)
        bar = _progress(sum(u.read_bytes for u in units), progress, f"reductions {round_ + 1}/{plan.reduction_rounds}")

        def done(batch: list[WorkUnit], result: list[tuple[int, int, Partials]], partials=partials, bar=bar) -> None:
            for tensor, row_start, part in result:
                partials[tensor][row_start] = part
            bar.update(sum(u.read_bytes for u in batch))

        previous_ref = ray.put(reduced)
        run_bounded(lambda b, r=round_, p=previous_ref: reduction_task.remote(job_ref, b, r, p),
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


def load_aim(config: MergeConfig, out: Path, progress: bool) -> tuple[dict[str, Any], dict[str, str]]:
    """AIM statistics: from ``aim.stats``, from an interrupted run's saved calibration, or
    calibrated now on the base model (and saved beside the output for reuse)."""
    from distmerge import aim

    assert config.aim is not None and config.base_model
    if config.aim.stats:
        return aim.load_statistics(Path(config.aim.stats))
    saved = out / SAVED_NAME
    if saved.is_file():
        log.info("reusing the calibration of the interrupted run: %s", saved)
        return aim.load_statistics(saved)
    return aim.calibrate(Path(config.base_model), config.aim, saved, progress=progress)


def input_fingerprint_data(plan: MergePlan) -> list[tuple[str, Any]]:
    """Per input: tensor headers and the identity (name, size, mtime) of every file it reads."""
    data = []
    for ckpt in plan.inputs:
        files = sorted({Path(t.file) for t in ckpt.tensors.values()} | {ckpt.path / "config.json"})
        data.append((str(ckpt.path), {
            "tensors": {n: [t.dtype, list(t.shape), Path(t.file).name, t.offset] for n, t in sorted(ckpt.tensors.items())},
            "files": [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files],
        }))
    return data


def fingerprint_config(cfg: MergeConfig) -> dict[str, Any]:
    """The config less what cannot change the output bytes (parallelism and shard size)."""
    return cfg.model_dump(mode="json", exclude={"execution": {"workers", "shard_size"}})


def _head(path: Path, n: int) -> bytes:
    with open(path, "rb") as f:
        return f.read(n)


def reopen_for_resume(out: Path, plan: MergePlan, journal: JournalState) -> set[tuple[int, int, int]]:
    """Re-open the files of an interrupted merge; return the units whose bytes verify.

    Every journaled unit is checked against the bytes on disk (a crash may have lost writes
    that the journal recorded); a file that is missing or of the wrong size is recreated.
    """
    done = set()
    names = journal.header.get("tensors", [])
    if names != [t.name for t in plan.tensors]:
        raise OutputError(f"{out}: the journal lists other tensors than this plan; pass --overwrite")
    by_file: dict[int, list[tuple[int, int, int]]] = defaultdict(list)
    for key in journal.units:
        by_file[plan.tensors[key[0]].file_index].append(key)
    for i, f in enumerate(plan.files):
        final, partial = out / f.name, partial_path(out, f.name)
        for path in (final, partial):
            if os.path.lexists(path) and not stat.S_ISREG(os.lstat(path).st_mode):
                raise OutputError(f"{path}: is {file_kind(os.lstat(path).st_mode)}, not a file distmerge wrote; "
                                  "refused (remove it, then rerun to resume)")
        if final.exists():
            os.replace(final, partial)
        if not partial.exists() or partial.stat().st_size != f.size or _head(partial, len(f.header)) != f.header:
            create_file(partial, f.header, f.size)
            continue
        for key in by_file.get(i, []):
            t = plan.tensors[key[0]]
            row_bytes = t.row_numel * ITEMSIZE[t.out_dtype]
            if crc_of_range(partial, t.out_offset + key[1] * row_bytes, (key[2] - key[1]) * row_bytes) == journal.units[key]:
                done.add(key)
    log.info("resuming: %d of %d units verified on disk and skipped", len(done), len(plan.units))
    return done


def run_merge(
    config: MergeConfig | str | Path,
    out_dir: str | Path,
    *,
    ray_address: str | None = None,
    shard_size: int | None = None,
    workers: int | None = None,
    seed: int | None = None,
    overwrite: bool = False,
    overwrite_foreign: bool = False,
    resume: bool = False,
    allow_nonfinite: bool | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run a merge end to end and return its report (also written to ``merge_report.json``).

    Rerunning a finished merge is a no-op; rerunning an interrupted one resumes it. A
    ``{fingerprint}`` in ``out_dir`` is replaced by the fingerprint of config and inputs.
    ``overwrite`` replaces an earlier distmerge output (only files a distmerge run wrote);
    ``overwrite_foreign`` also deletes anything else OUT holds. OUT is never an input, inside
    one or around one, and only one run at a time writes it (a lock held for the whole run).
    """
    started = time.time()
    if workers is not None and not (isinstance(workers, int) and workers >= 1):
        raise ConfigError(f"workers: {workers!r} is not a positive number of work units in flight")
    config_path = None if isinstance(config, MergeConfig) else Path(config)
    cfg = config if isinstance(config, MergeConfig) else load_config(config)
    execution = {}
    if seed is not None:
        execution["seed"] = seed
    if allow_nonfinite is not None:
        execution["allow_nonfinite"] = allow_nonfinite
    if execution:
        cfg = cfg.model_copy(update={"execution": cfg.execution.model_copy(update=execution)})
    plan = build_plan(cfg, shard_size)
    extra = {"aim.stats": Path(cfg.aim.stats)} if cfg.aim is not None and cfg.aim.stats else {}
    for p in extra.values():
        if not p.exists():
            raise OutputError(f"aim.stats: {p} does not exist; run distmerge calibrate first or drop aim.stats")
        require_regular(p, "aim.stats", ConfigError)
    config_data = fingerprint_config(cfg)
    parts = merge_fingerprint(config_data, input_fingerprint_data(plan), extra)
    out = Path(str(out_dir).replace("{fingerprint}", parts["fingerprint"]))
    check_output_location(out, input_paths(cfg, config_path))
    make_directory(out)
    with OutputLock(out) as lock:
        state = examine_output(out, parts, config_data, overwrite=overwrite, overwrite_foreign=overwrite_foreign,
                               resume=resume)
        if state.kind == "complete":
            assert state.report is not None
            log.info("%s: already complete (fingerprint %s); nothing to do", out, parts["fingerprint"])
            return {**state.report, "noop": True, "out_dir": str(out)}
        return _merge_locked(cfg, plan, out, parts, config_data, state.journal, lock, started,
                             ray_address=ray_address, workers=workers, progress=progress)


def _merge_locked(cfg: MergeConfig, plan: MergePlan, out: Path, parts: dict[str, Any], config_data: dict[str, Any],
                  journal: JournalState | None, lock: OutputLock, started: float, *, ray_address: str | None,
                  workers: int | None, progress: bool) -> dict[str, Any]:
    """The merge proper, with OUT locked and examined: fresh (``journal`` None) or resumed."""
    if journal is not None and journal.header.get("shard_size") != plan.shard_size:
        log.warning("resuming with the interrupted run's shard size %s", journal.header.get("shard_size"))
        plan = build_plan(cfg, journal.header["shard_size"])
    if journal is None:
        writer = JournalWriter(out / JOURNAL_NAME, {"parts": parts, "config": config_data, "shard_size": plan.shard_size,
                                                    "tensors": [t.name for t in plan.tensors],
                                                    "files": [f.name for f in plan.files]})
    else:
        writer = JournalWriter(out / JOURNAL_NAME, None)
    try:
        aim_stats: dict[str, Any] = {}
        aim_meta: dict[str, str] = {}
        if cfg.aim is not None:
            connect(ray_address)
            if not cfg.aim.stats:
                writer.wrote(SAVED_NAME)
            aim_stats, aim_meta = load_aim(cfg, out, progress)
            plan.aim_modules = aim_tensor_modules(plan, aim_stats)
        log.info("plan:\n%s", plan.summary())
        connect(ray_address)
        results, skip = _merge_units(cfg, plan, out, journal, writer, aim_stats, workers, progress)
        lock.check()
        report = _finalize(cfg, plan, out, writer, results, started, aim_stats, aim_meta)
        report.update(fingerprint=parts["fingerprint"], resumed_units=len(skip))
    finally:
        writer.close()
    log.info("merged %s into %s in %.1fs", plan.method.name, out / INDEX_NAME, report["seconds"])
    return report


def _merge_units(cfg: MergeConfig, plan: MergePlan, out: Path, journal: JournalState | None, writer: JournalWriter,
                 aim_stats: dict[str, Any], workers: int | None,
                 progress: bool) -> tuple[list[BatchResult], set[tuple[int, int, int]]]:
    """Write every unit not already verified on disk; rename each file once all its rows are in."""
    import ray

    from distmerge.engine.tasks import merge_batch_task

    cpus = cluster_cpus()
    concurrency = workers or cfg.execution.workers or cpus
    # Ray runs at most one task per CPU, so when every CPU may work, a queue of as many again
    # hides the submit/return round trip at no memory cost (queued tasks hold no buffers).
    limit = concurrency * 2 if concurrency >= cpus else concurrency
    if journal is None:
        for f in plan.files:
            create_file(partial_path(out, f.name), f.header, f.size)
        skip: set[tuple[int, int, int]] = set()
    else:
        skip = reopen_for_resume(out, plan, journal)
    factors = {}
    if cfg.aim is not None:
        from distmerge.aim import relaxation_factors

        factors = {i: relaxation_factors(aim_stats[m], cfg.aim.omega) for i, m in plan.aim_modules.items()}
        if cfg.aim.relaxation == "uniform":
            factors = {i: torch.full_like(f, float(f.double().mean())) for i, f in factors.items()}
    job = MergeJob(
        plan.method.name, tuple(plan.tensors), tuple(str(partial_path(out, f.name)) for f in plan.files),
        plan.compute_dtype, cfg.execution.seed, not cfg.execution.allow_nonfinite,
        cfg.aim.omega if cfg.aim else None, factors,
    )
    todo = [u for u in plan.units if (u.tensor, u.row_start, u.row_end) not in skip]
    remaining: dict[int, int] = defaultdict(int)
    for u in todo:
        remaining[plan.tensors[u.tensor].file_index] += 1
    results: list[BatchResult] = []
    for i, f in enumerate(plan.files):
        if remaining[i] == 0:
            finalize_file(out, f.name)
            writer.file(f.name)
    job_ref = ray.put(job)
    reduced = run_reduction_rounds(plan, job_ref, limit, progress) if todo else {}
    reduced_ref = ray.put(reduced)
    bar = _progress(sum(u.write_bytes for u in todo), progress, f"merge ({plan.method.name})")

    def done(batch: list[WorkUnit], result: BatchResult) -> None:
        results.append(result)
        for r in result.units:
            writer.unit(r.tensor, r.row_start, r.row_end, r.crc32)
        for w in result.warnings:
            log.warning("%s", w)
        bar.update(result.bytes_written)
        for u in batch:
            f = plan.tensors[u.tensor].file_index
            remaining[f] -= 1
            if remaining[f] == 0:
                finalize_file(out, plan.files[f].name)
                writer.file(plan.files[f].name)

    run_bounded(lambda b: merge_batch_task.remote(job_ref, b, reduced_ref), batches(todo, plan.shard_size), limit, done)
    bar.close()
    return results, skip


def _finalize(cfg: MergeConfig, plan: MergePlan, out: Path, writer: JournalWriter, results: list[BatchResult],
              started: float, aim_stats: dict[str, Any], aim_meta: dict[str, str]) -> dict[str, Any]:
    """Side files, the checksum manifest, verification, report, and the index last."""
    for stale in (INDEX_NAME, MANIFEST_NAME, REPORT_NAME, MODEL_CARD_NAME):  # an interrupted finish's
        (out / stale).unlink(missing_ok=True)
    out_dtypes = {t.out_dtype for t in plan.tensors if t.params is not None}
    writer.wrote("config.json")
    write_model_config(out, plan.template.config, TORCH_NAME.get(next(iter(out_dtypes))) if len(out_dtypes) == 1 else None)
    tokenizer_source = Path(cfg.tokenizer_source) if cfg.tokenizer_source not in (None, "base") else plan.template.path
    _, skipped = copy_side_files(tokenizer_source, out, writer.wrote)
    writer.wrote(CONFIG_COPY_NAME)
    write_text_atomic(out / CONFIG_COPY_NAME, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    writer.flush()
    journal = read_journal(out / JOURNAL_NAME)
    assert journal is not None
    missing = [u for u in plan.units if (u.tensor, u.row_start, u.row_end) not in journal.units]
    if missing:
        raise OutputError(f"{out}: {len(missing)} units have no checksum in the journal; rerun to finish them")
    manifest = build_manifest(((f.name, f.header, f.size) for f in plan.files),
                              ((t.name, t.file_index) for t in plan.tensors), journal.units)
    add_other_files(manifest, out, journal.written - {SAVED_NAME})
    weight_map = {t: f.name for f in plan.files for t in f.tensors}
    verified = verify_output(out, weight_map=weight_map, manifest=manifest, deep=cfg.execution.verify,
                             allow_nonfinite=cfg.execution.allow_nonfinite)
    if not verified.ok:
        raise OutputError(f"{out}: verification failed; the index was not written:\n  " + "\n  ".join(verified.problems))
    report = build_report(plan, results, time.time() - started, aim_stats=aim_stats, aim_meta=aim_meta)
    report.update(out_dir=str(out), verify=verified.as_dict(), skipped_side_files=skipped,
                  warnings=[w for r in results for w in r.warnings])
    for name in (REPORT_NAME, MODEL_CARD_NAME, MANIFEST_NAME, INDEX_NAME):
        writer.wrote(name)
    write_report(out, report)
    write_model_card(out, plan, report)
    add_other_files(manifest, out, [REPORT_NAME, MODEL_CARD_NAME])
    digest = write_manifest(out, manifest)
    write_index(out, [(f.name, f.tensors, f.size) for f in plan.files], sum(t.out_nbytes for t in plan.tensors),
                {INDEX_KEY: digest})
    writer.complete()
    return report
