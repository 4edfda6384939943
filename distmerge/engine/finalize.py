"""Phase: finish the output so that it is complete exactly when its index exists.

Side files (model config, tokenizer, the config copy), the checksum manifest built from the
journal, a verification of the written files against it, the report and model card, and the
index last: a reader that finds the index finds a whole, verified checkpoint.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from distmerge.dtypes import TORCH_NAME
from distmerge.engine.phases import Phases
from distmerge.engine.request import MergeRequest
from distmerge.engine.worker import BatchResult, ReductionResult
from distmerge.errors import OutputError
from distmerge.io.safetensors import INDEX_NAME, write_index
from distmerge.io.writes import write_text_atomic
from distmerge.output.journal import JOURNAL_NAME, JournalWriter, read_journal
from distmerge.output.manifest import (
    INDEX_KEY,
    MANIFEST_NAME,
    add_other_files,
    build_manifest,
    write_manifest,
)
from distmerge.output.report import (
    MODEL_CARD_NAME,
    REPORT_NAME,
    build_report,
    write_model_card,
    write_report,
)
from distmerge.output.side_files import (
    CONFIG_COPY_NAME,
    copy_side_files,
    write_model_config,
    write_tokenizer_files,
)
from distmerge.output.target import OutputTarget
from distmerge.output.verify import StoredOutput, verify_output
from distmerge.output.verify_sample import SAMPLE_EVERY
from distmerge.plan import MergePlan
from distmerge.vocab import tokenizer_files
from distmerge.vocab.files import load_tokenizer

log = logging.getLogger(__name__)


def write_side_files(request: MergeRequest, plan: MergePlan, out: Path, journal: JournalWriter) -> list[str]:
    """config.json (with the output dtype), the tokenizer files and the config copy; returns the
    side files skipped as unsafe to copy."""
    cfg = request.config
    out_dtypes = {t.out_dtype for t in plan.tensors if t.params is not None}
    journal.wrote("config.json")
    write_model_config(out, plan.model_config, TORCH_NAME.get(next(iter(out_dtypes))) if len(out_dtypes) == 1 else None)
    if plan.vocabulary is not None:  # a built tokenizer (tokenizer_source / tokenizer:), as mergekit writes it
        _, skipped = copy_side_files(plan.template.path, out, journal.wrote, ("generation_config.json",))
        write_tokenizer_files(out, tokenizer_files(plan.vocabulary.info.tokenizer, plan.chat_template), journal.wrote)
    else:
        _, skipped = copy_side_files(plan.template.path, out, journal.wrote)
        if plan.chat_template:  # the template's tokenizer, re-saved with the chat template (mergekit's way)
            tokenizer = load_tokenizer(plan.template.path, "the tokenizer's model")
            if tokenizer is None:
                log.warning("chat_template: %s has no tokenizer, so the chat template is not saved", plan.template.path)
            else:
                write_tokenizer_files(out, tokenizer_files(tokenizer, plan.chat_template), journal.wrote)
    journal.wrote(CONFIG_COPY_NAME)
    write_text_atomic(out / CONFIG_COPY_NAME, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    return skipped


def finalize(request: MergeRequest, plan: MergePlan, target: OutputTarget, journal: JournalWriter,
             results: list[BatchResult], reductions: list[ReductionResult], started: float, check_lock: Callable[[], None],
             phases: Phases, executor: str) -> dict[str, Any]:
    """Side files, the checksum manifest, verification, report, and the index last (for an
    object-store output: the small files uploaded after verification, the index last)."""
    out = target.folder
    for stale in (INDEX_NAME, MANIFEST_NAME, REPORT_NAME, MODEL_CARD_NAME):  # an interrupted finish's
        (out / stale).unlink(missing_ok=True)
    skipped = write_side_files(request, plan, out, journal)
    journal.flush()
    recorded = read_journal(out / JOURNAL_NAME)
    assert recorded is not None
    missing = [u for u in plan.units if (u.tensor, u.row_start, u.row_end) not in recorded.units]
    if missing:
        raise OutputError(f"{out}: {len(missing)} units have no checksum in the journal; rerun to finish them")
    phases.mark("side files")
    manifest = build_manifest(((f.name, f.header, f.size) for f in plan.files),
                              ((t.name, t.file_index) for t in plan.tensors), recorded.units)
    scratch = {name for feature in request.features for name in feature.scratch_files}
    add_other_files(manifest, out, recorded.written - scratch)
    weight_map = {t: f.name for f in plan.files for t in f.tensors}
    execution = request.config.execution
    nonfinite: dict[str, int] = {}
    for (tensor, _, _), bad in recorded.nonfinite.items():
        nonfinite[plan.tensors[tensor].name] = nonfinite.get(plan.tensors[tensor].name, 0) + bad
    verified = verify_output(out, weight_map=weight_map, manifest=manifest, deep=execution.verify == "full",
                             allow_nonfinite=execution.allow_nonfinite,
                             stored=StoredOutput(target.location, target.weights_at, target.listing),
                             sample_every=SAMPLE_EVERY if execution.verify == "sample" else None,
                             nonfinite=None if execution.verify == "full" else nonfinite)
    if not verified.ok:
        raise OutputError(f"{out}: verification failed; the index was not written:\n  " + "\n  ".join(verified.problems))
    for warning in verified.warnings:  # also in the report's "verify"; said here so the user sees it
        log.warning("verify: %s", warning)
    phases.mark("verify")
    report = build_report(plan, results, time.time() - started, reductions=reductions,
                          sections={f.name: f.report_section() for f in request.features})
    report.update(out_dir=target.location, executor=executor, verify=verified.as_dict(), skipped_side_files=skipped, phases_s=dict(phases.seconds),
                  warnings=[w for r in results for w in r.warnings])
    for name in (REPORT_NAME, MODEL_CARD_NAME, MANIFEST_NAME, INDEX_NAME):
        journal.wrote(name)
    write_report(out, report)
    write_model_card(out, plan, report, [f.card_line() for f in request.features])
    add_other_files(manifest, out, [REPORT_NAME, MODEL_CARD_NAME])
    digest = write_manifest(out, manifest)
    write_index(out, [(f.name, f.tensors, f.size) for f in plan.files], sum(t.out_nbytes for t in plan.tensors),
                {INDEX_KEY: digest})
    check_lock()
    small = {*recorded.written, REPORT_NAME, MODEL_CARD_NAME, MANIFEST_NAME} - {INDEX_NAME}
    target.publish([*sorted(n for n in small if (out / n).is_file()), INDEX_NAME])
    journal.complete()
    phases.mark("report and index")
    return report
