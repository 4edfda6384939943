"""Phase: the output's model files, created empty at their full size, or reopened on resume.

A fresh run creates every file under its partial name with its final header. A resumed run
re-opens the interrupted run's files and checks every unit its journal recorded against the
bytes on disk (a crash may have lost writes the journal recorded); those that verify are
skipped, a file that is missing or of the wrong size is created afresh.
"""

from __future__ import annotations

import logging
import os
import stat
from collections import defaultdict
from pathlib import Path

from distmerge.errors import OutputError
from distmerge.io.files import file_kind
from distmerge.io.storage import storage_for
from distmerge.io.writes import create_file, partial_path
from distmerge.output.journal import JournalState, crc_of_range
from distmerge.plan import MergePlan

log = logging.getLogger(__name__)

UnitKey = tuple[int, int, int]  # (tensor index, row_start, row_end)


def open_output_files(out: Path, plan: MergePlan, interrupted: JournalState | None) -> set[UnitKey]:
    """Create (fresh run) or re-open (``interrupted``) the model files; the units already done."""
    if interrupted is None:
        for f in plan.files:
            create_file(partial_path(out, f.name), f.header, f.size)
        return set()
    return reopen_for_resume(out, plan, interrupted)


def _head(path: Path, n: int) -> bytes:
    with storage_for(path).open_reader(path, "an output file", OutputError) as reader:
        return reader.read(0, n)


def reopen_for_resume(out: Path, plan: MergePlan, journal: JournalState) -> set[UnitKey]:
    """Re-open the files of an interrupted merge; return the units whose bytes verify."""
    done = set()
    names = journal.header.get("tensors", [])
    if names != [t.name for t in plan.tensors]:
        raise OutputError(f"{out}: the journal lists other tensors than this plan; pass --overwrite")
    by_file: dict[int, list[UnitKey]] = defaultdict(list)
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
            if crc_of_range(partial, *plan.tensors[key[0]].out_span(key[1], key[2])) == journal.units[key]:
                done.add(key)
    log.info("resuming: %d of %d units verified on disk and skipped", len(done), len(plan.units))
    return done
