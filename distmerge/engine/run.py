"""The merge, as a short list of phases; each phase is a function in a module named for it.

    resolve (engine.request) -> plan (plan) -> identify and lock the output (engine.fingerprint,
    output.target: a local directory or an object-store prefix) -> prepare features such as AIM
    (engine.features) -> open the output files -> reduction rounds and merge units
    (engine.merge_units) -> finalize (engine.finalize)

The engine only schedules: the math is in methods/ and aim/, every byte goes through io/ and
output/, and Ray is confined to engine.scheduling, engine.tasks and engine.cluster.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from distmerge.config import MergeConfig
from distmerge.engine.executors import choose_executor, join_named_cluster
from distmerge.engine.finalize import finalize
from distmerge.engine.fingerprint import identify
from distmerge.engine.merge_units import merge_job, merge_units
from distmerge.engine.phases import Phases
from distmerge.engine.request import resolve_request
from distmerge.output.architecture import prepare_architecture
from distmerge.output.journal import JOURNAL_NAME, JournalWriter
from distmerge.output.target import output_target
from distmerge.plan import build_plan

log = logging.getLogger(__name__)


def run_merge(config: MergeConfig | str | Path, out_dir: str | Path, *, ray_address: str | None = None,
              shard_size: int | None = None, workers: int | None = None, seed: int | None = None,
              overwrite: bool = False, overwrite_foreign: bool = False, resume: bool = False,
              allow_nonfinite: bool | None = None, executor: str | None = None,
              progress: bool = True) -> dict[str, Any]:
    """Run a merge end to end and return its report (also written to ``merge_report.json``).

    Rerunning a finished merge is a no-op; rerunning an interrupted one resumes it. A
    ``{fingerprint}`` in ``out_dir`` is replaced by the fingerprint of config and inputs.
    ``out_dir`` is a local directory or an object-store prefix (``s3://bucket/prefix``, ``gs://bucket/prefix``).
    ``overwrite`` replaces an earlier distmerge output (only files a distmerge run wrote);
    ``overwrite_foreign`` also deletes anything else OUT holds. OUT is never an input, inside
    one or around one, and only one run at a time writes it (a lock held for the whole run).
    ``executor`` (auto, local, ray; default ``execution.executor``) says who runs the batches:
    threads of this process, or Ray tasks (:mod:`distmerge.engine.executors`).
    """
    started, phases = time.time(), Phases()
    # 1. Resolve config, overrides and features once; plan from the inputs' headers.
    request = resolve_request(config, shard_size=shard_size, workers=workers, seed=seed,
                              allow_nonfinite=allow_nonfinite, executor=executor)
    plan = build_plan(request.config, request.shard_size, needs_base=request.needs_base)
    join_named_cluster(request.config.execution.executor, ray_address)
    # 2. The output: named by the merge's identity, apart from every input, locked, examined.
    identity = identify(request, plan)
    phases.mark("plan")
    # The verification needs the architecture's shapes (transformers: seconds of imports): cached,
    # or built now by a child process beside the merge, they cost the finish nothing.
    prepare_architecture(plan.model_config)
    target = output_target(identity.output_location(out_dir))
    target.check_apart(request.input_paths())
    with target.locked() as lock:
        out = target.folder  # the journal and the small files (OUT itself for a local output)
        state = target.examine(identity.parts, identity.config, overwrite=overwrite,
                               overwrite_foreign=overwrite_foreign, resume=resume)
        if state.kind == "complete":
            log.info("%s: already complete (fingerprint %s); nothing to do", target.location, identity.fingerprint)
            return {**(state.report or {}), "fingerprint": identity.fingerprint, "noop": True, "out_dir": target.location}
        interrupted = state.journal
        if interrupted is not None and interrupted.header.get("shard_size") != plan.shard_size:
            log.warning("resuming with the interrupted run's shard size %s", interrupted.header.get("shard_size"))
            plan = plan.with_shard_size(interrupted.header["shard_size"])
        header = None if interrupted else {"parts": identity.parts, "config": identity.config,
                                           "shard_size": plan.shard_size, "tensors": [t.name for t in plan.tensors],
                                           "files": [f.name for f in plan.files]}
        phases.mark("output")
        needs_ray = next((why for f in request.features if (why := f.needs_ray(out))), None)
        runner = choose_executor(request.config.execution.executor, ray_address, needs_ray)
        with JournalWriter(out / JOURNAL_NAME, header) as journal:
            # 3. The executor (local threads, or Ray), then the features (AIM: statistics loaded or
            # calibrated, checked, factors).
            runner.start()
            phases.mark(runner.name)
            row_steps = tuple(s for f in request.features if (s := f.prepare(plan, out, journal.wrote, progress)))
            if request.features:
                phases.mark("features")
            log.info("plan:\n%s", "\n".join([plan.summary(), *(f.summary() for f in request.features)]))
            # 4. Model files created or reopened; reduction rounds; every unit merged and written.
            done_units = target.open_files(plan, interrupted, journal)
            phases.mark("open files")
            results, reductions = merge_units(plan, target, merge_job(plan, target, row_steps), journal, done_units,
                                              runner, request.workers, progress)
            lock.check()
            phases.mark("merge")
            # 5. Side files, manifest, verification, report, and the index last.
            report = finalize(request, plan, target, journal, results, reductions, started, lock.check, phases,
                              runner.name)
    report.update(fingerprint=identity.fingerprint, resumed_units=len(done_units))
    log.info("merged %s into %s in %.1fs (%s)", plan.method.name, target.location, report["seconds"], phases.summary())
    return report
