"""What a run may delete in its output directory: only files a distmerge run wrote there.

Why: ``--overwrite`` used to empty OUT whatever it held. Now the journal names every file a
run writes (model files in its header, every other file in a ``wrote`` record made *before*
the file is created), so the files of an earlier run are known by name, and anything else in
OUT is someone else's: ``--overwrite`` refuses while such files exist and says which, and only
``--overwrite-foreign`` (an explicit second flag) lets them go. Links are removed as links,
never followed, and the lock file of the current run is never touched.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from distmerge.aim.stats_file import SAVED_NAME
from distmerge.checkpoint import SIDE_FILES
from distmerge.errors import OutputError
from distmerge.io.safetensors import INDEX_NAME
from distmerge.output.journal import JOURNAL_NAME, JournalState
from distmerge.output.lock import LOCK_NAME
from distmerge.output.manifest import MANIFEST_NAME
from distmerge.output.report import MODEL_CARD_NAME, REPORT_NAME
from distmerge.output.side_files import CONFIG_COPY_NAME

log = logging.getLogger(__name__)

# Every name a merge writes in OUT besides its model files (which its journal's header lists).
RUN_FILE_NAMES = frozenset({"config.json", CONFIG_COPY_NAME, REPORT_NAME, MODEL_CARD_NAME, MANIFEST_NAME, INDEX_NAME,
                            SAVED_NAME, *SIDE_FILES})
# Suffixes of the temporary names distmerge writes a file under before renaming it.
TEMPORARY_SUFFIXES = (".partial", ".tmp")


def owned_names(journal: JournalState | None) -> set[str]:
    """Names in OUT that a distmerge run wrote, by its journal.

    Where a journal proves a distmerge run worked here, the fixed names every run writes
    count as its own too, even when no ``wrote`` record names them (journals of older
    versions have none).
    """
    if journal is None:
        return set()
    names = {JOURNAL_NAME, *journal.written, *RUN_FILE_NAMES}
    names.update(str(n) for n in journal.header.get("files", []) if isinstance(n, str))
    return names | {n + suffix for n in names for suffix in TEMPORARY_SUFFIXES}


def entries(out: Path) -> list[str]:
    """What OUT holds, less this run's lock file."""
    return sorted(n for n in os.listdir(out) if n != LOCK_NAME)


def foreign_entries(out: Path, journal: JournalState | None) -> list[str]:
    """Entries of OUT that no distmerge run wrote (a directory of ours is never expected)."""
    owned = owned_names(journal)
    return [n for n in entries(out) if n not in owned or (out / n).is_dir() and not (out / n).is_symlink()]


def clear_output(out: Path, journal: JournalState | None, include_foreign: bool) -> None:
    """Delete what earlier runs wrote in OUT (and, with ``include_foreign``, everything else)."""
    foreign = foreign_entries(out, journal)
    if foreign and not include_foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise OutputError(
            f"{out}: --overwrite refused: the directory holds files no distmerge run wrote ({shown}). "
            "Choose another OUT_DIR, or add --overwrite-foreign to delete them too"
        )
    log.warning("overwriting %s (%d entries%s)", out, len(entries(out)),
                f", {len(foreign)} not written by distmerge" if foreign else "")
    for name in entries(out):
        path = out / name
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)  # rmtree never follows links inside the tree
            else:
                path.unlink()
        except OSError as e:
            raise OutputError(f"{path}: cannot delete it for --overwrite ({e.strerror})") from None
