"""The merge report (``merge_report.json``) and the model card (``README.md``) of an output."""

from __future__ import annotations

import json
import platform
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from distmerge import __version__
from distmerge.io.writes import write_text_atomic
from distmerge.lora import LoraCheckpoint
from distmerge.output.writers import UploadedPart
from distmerge.sizes import format_size

if TYPE_CHECKING:
    from distmerge.plan import MergePlan

REPORT_NAME = "merge_report.json"
MODEL_CARD_NAME = "README.md"


class UnitFigures(Protocol):
    """What the report needs of one written unit: where it is and the CRC-32 of its bytes."""

    tensor: int
    row_start: int
    row_end: int
    crc32: int


class TaskFigures(Protocol):
    """What the report needs of any task a worker ran (a merge batch or a reduction round: the
    engine's ``BatchResult`` and ``ReductionResult``); a protocol, so the output layer never
    imports the engine above it."""

    bytes_read: int
    seconds: float
    node: str
    pid: int
    peak_anon_rss: int
    start_anon_rss: int
    bytes_fetched: int


class BatchFigures(TaskFigures, Protocol):
    """What the report needs of one merge batch besides :class:`TaskFigures`: what it wrote."""

    bytes_written: int

    @property
    def units(self) -> Sequence[UnitFigures]:  # read-only: a list of any UnitFigures type fits
        ...

    @property
    def parts(self) -> Sequence[UploadedPart]:  # object-store outputs: the parts the batch uploaded
        ...


def build_report(plan: MergePlan, results: Sequence[BatchFigures], seconds: float, *,
                 reductions: Sequence[TaskFigures] = (),
                 sections: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """The run's figures: what was merged, bytes and time per node and worker (merge batches and
    ``reductions``, the reduction rounds' tasks, both: a method with rounds reads a tensor for
    them too, unless it reads it once), checksums, and a section per feature of the merge
    (``sections``, e.g. ``aim``)."""
    nodes: dict[str, dict[str, int]] = defaultdict(lambda: {"bytes_read": 0, "bytes_fetched": 0, "bytes_written": 0,
                                                            "units": 0, "batches": 0, "reduction_tasks": 0,
                                                            "parts_uploaded": 0, "bytes_uploaded": 0})
    workers: dict[str, dict[str, Any]] = {}
    for r in [*results, *reductions]:
        n = nodes[r.node]
        n["bytes_read"] += r.bytes_read
        n["bytes_fetched"] += r.bytes_fetched
        key = f"{r.node}:{r.pid}"
        w = workers.setdefault(key, {"node": r.node, "pid": r.pid, "peak_anon_rss": 0, "baseline_anon_rss": r.start_anon_rss,
                                     "batches": 0, "reduction_tasks": 0, "busy_seconds": 0.0, "bytes_read": 0,
                                     "bytes_fetched": 0})
        w["peak_anon_rss"] = max(w["peak_anon_rss"], r.peak_anon_rss)
        w["baseline_anon_rss"] = min(w["baseline_anon_rss"], r.start_anon_rss)
        w["busy_seconds"] += r.seconds
        w["bytes_read"] += r.bytes_read
        w["bytes_fetched"] += r.bytes_fetched
    for r in results:
        n = nodes[r.node]
        n["bytes_written"] += r.bytes_written
        n["units"] += len(r.units)
        n["batches"] += 1
        n["parts_uploaded"] += len(r.parts)
        n["bytes_uploaded"] += sum(p.nbytes for p in r.parts)
        workers[f"{r.node}:{r.pid}"]["batches"] += 1
    for r in reductions:
        nodes[r.node]["reduction_tasks"] += 1
        workers[f"{r.node}:{r.pid}"]["reduction_tasks"] += 1
    rounds_read = sum(r.bytes_read for r in reductions)
    read = sum(r.bytes_read for r in results) + rounds_read
    written = sum(r.bytes_written for r in results)
    cfg = plan.config
    report: dict[str, Any] = {
        "distmerge_version": __version__,
        "python": platform.python_version(),
        "merge_method": plan.method.name,
        "base_model": plan.base.label if plan.base else None,
        "models": [e.label for e in plan.experts],
        **({"lora_adapters": {c.label: [str(f) for f in c.adapter_files] for c in plan.inputs
                              if isinstance(c, LoraCheckpoint)}}
           if any(isinstance(c, LoraCheckpoint) for c in plan.inputs) else {}),
        "compute_dtype": plan.compute_dtype,
        "tensors": len(plan.tensors),
        "merged_tensors": sum(1 for t in plan.tensors if t.params is not None),
        "units": len(plan.units),
        "files": [f.name for f in plan.files],
        "shard_size": plan.shard_size,
        "seed": cfg.execution.seed,
        "bytes_read": read,
        # Of those, what the reduction rounds' tasks read (the statistics of tensors not read once).
        "bytes_read_for_rounds": rounds_read,
        # Bytes that came over the network from remote inputs (0 for local ones): the ranges
        # the units needed, plus whatever retries asked for again.
        "bytes_fetched": sum(r.bytes_fetched for r in [*results, *reductions]),
        "bytes_written": written,
        # Object-store outputs: bytes sent as parts of the output files (headers included).
        "bytes_uploaded": sum(p.nbytes for r in results for p in r.parts),
        "seconds": round(seconds, 3),
        "read_throughput_bytes_per_s": read / seconds if seconds > 0 else None,
        "nodes": dict(nodes),
        "workers": sorted(workers.values(), key=lambda w: (w["node"], w["pid"])),
        "peak_worker_anon_rss": max((w["peak_anon_rss"] for w in workers.values()), default=0),
        "unit_checksums": sorted((r2.tensor, r2.row_start, r2.row_end, r2.crc32) for r in results for r2 in r.units),
    }
    report.update(sections or {})
    return report


def write_report(out_dir: Path, report: dict[str, Any]) -> None:
    write_text_atomic(out_dir / REPORT_NAME, json.dumps(report, indent=2) + "\n")


def write_model_card(out_dir: Path, plan: MergePlan, report: dict[str, Any], extra: Sequence[str] = ()) -> None:
    """A short README.md: what was merged, how, the numbers of the run and ``extra`` lines (one
    per feature of the merge)."""
    lines = [
        "---",
        "tags: [merge, distmerge]",
        "---",
        f"# Merged with distmerge ({plan.method.name})",
        "",
        f"- base model: `{report['base_model']}`" if report["base_model"] else "- base model: none",
        *[f"- model: `{m}`" for m in report["models"]],
        f"- tensors: {report['tensors']} ({report['merged_tensors']} merged), compute dtype {plan.compute_dtype}",
        f"- read {format_size(report['bytes_read'])}, wrote {format_size(report['bytes_written'])} "
        f"in {report['seconds']:.1f} s on {len(report['nodes'])} node(s)",
    ]
    lines += [f"- {line}" for line in extra]
    lines += ["", "The exact configuration is in `distmerge_config.yml`, the run's figures in `merge_report.json`.", ""]
    write_text_atomic(out_dir / MODEL_CARD_NAME, "\n".join(lines))
