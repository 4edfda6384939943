"""Where a merge's output goes: a local directory, or an object-store prefix; one interface for both.

Why one interface: the engine's phases (lock and examine the output, open its model files,
write units, finish each file, publish the small files with the index last) are the same
wherever the output lives; what differs is how a file is assembled (written in place and
renamed, or uploaded in parts and completed) and where the journal lives. The engine calls an
:class:`OutputTarget` and never branches on the kind; :func:`output_target` picks it from OUT.

Every target has a local ``folder`` holding the journal and the small files while the run
works (for a local output, OUT itself); an object-store target mirrors it to the store.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol

from distmerge.errors import OutputError
from distmerge.io.locations import HUB_SCHEME, OBJECT_STORE_SCHEMES, url_scheme
from distmerge.io.writes import finalize_file, partial_path
from distmerge.output.directory import OutputState, examine_output, make_directory
from distmerge.output.journal import JournalState, JournalWriter
from distmerge.output.local_files import UnitKey, open_output_files
from distmerge.output.location import check_output_location
from distmerge.output.lock import OutputLock
from distmerge.output.writers import LocalFiles, PartUploads, UploadedPart
from distmerge.plan import MergePlan, WorkUnit, batches


class Lock(Protocol):
    def check(self) -> None:
        """Raise if this run no longer holds the output."""
        ...


class OutputTarget(Protocol):
    location: str  # OUT as the user named it (a path or a URL), for messages and the report
    folder: Path  # the local folder of the journal and the small files

    def check_apart(self, inputs: dict[str, Path | str]) -> None:
        """Refuse an output that is, is inside or contains an input."""
        ...

    def locked(self) -> AbstractContextManager[Lock]:
        """Hold the output for this run (created if needed)."""
        ...

    def examine(self, parts: dict[str, Any], config: dict[str, Any], *, overwrite: bool,
                overwrite_foreign: bool, resume: bool) -> OutputState:
        """Fresh start, resume or complete; an earlier output cleared first for ``overwrite``."""
        ...

    def open_files(self, plan: MergePlan, interrupted: JournalState | None, journal: JournalWriter) -> set[UnitKey]:
        """Create (or reopen on resume) the model files; the units whose bytes are already there."""
        ...

    def writer(self, plan: MergePlan) -> LocalFiles | PartUploads:
        """What the workers write through (shipped with the job)."""
        ...

    def batches(self, plan: MergePlan, todo: list[WorkUnit]) -> Iterable[list[WorkUnit]]:
        """The units to write, grouped into the batches the workers run."""
        ...

    def parts_done(self, parts: list[UploadedPart], journal: JournalWriter) -> None:
        """Record the parts a batch uploaded (before its units are journaled)."""
        ...

    def file_done(self, plan: MergePlan, file: int, journal: JournalWriter) -> None:
        """Every row of model file ``file`` is written: give it its final name."""
        ...

    def weights_at(self, name: str) -> Path | str:
        """Where model file ``name`` is read back (verify)."""
        ...

    def listing(self) -> list[str]:
        """The names OUT holds (verify: nothing the merge did not write)."""
        ...

    def publish(self, names: list[str]) -> None:
        """Small files of the folder to their final place, in order (the index is last)."""
        ...


class LocalOutput:
    """A directory on a file system every Ray node sees (a shared volume on a cluster)."""

    def __init__(self, out: Path) -> None:
        self.location, self.folder = str(out), out

    def check_apart(self, inputs: dict[str, Path | str]) -> None:
        check_output_location(self.folder, {k: v for k, v in inputs.items() if isinstance(v, Path)})

    def locked(self) -> AbstractContextManager[Lock]:
        make_directory(self.folder)
        return OutputLock(self.folder)

    def examine(self, parts: dict[str, Any], config: dict[str, Any], *, overwrite: bool,
                overwrite_foreign: bool, resume: bool) -> OutputState:
        return examine_output(self.folder, parts, config, overwrite=overwrite, overwrite_foreign=overwrite_foreign,
                              resume=resume)

    def open_files(self, plan: MergePlan, interrupted: JournalState | None, journal: JournalWriter) -> set[UnitKey]:
        return open_output_files(self.folder, plan, interrupted)

    def writer(self, plan: MergePlan) -> LocalFiles:
        return LocalFiles(tuple(str(partial_path(self.folder, f.name)) for f in plan.files))

    def batches(self, plan: MergePlan, todo: list[WorkUnit]) -> Iterator[list[WorkUnit]]:
        return batches(todo, plan.shard_size, plan.read_once_tensors)

    def parts_done(self, parts: list[UploadedPart], journal: JournalWriter) -> None:
        if parts:
            raise OutputError(f"{self.location}: a worker uploaded parts to a local output")

    def file_done(self, plan: MergePlan, file: int, journal: JournalWriter) -> None:
        finalize_file(self.folder, plan.files[file].name)
        journal.file(plan.files[file].name)

    def weights_at(self, name: str) -> Path:
        return self.folder / name

    def listing(self) -> list[str]:
        import os

        return sorted(os.listdir(self.folder))

    def publish(self, names: list[str]) -> None:
        pass  # written in place, the index last already


def output_target(location: str | Path) -> OutputTarget:
    """The target OUT names: an object-store URL, or a local directory."""
    scheme = url_scheme(location)
    if scheme is None:
        return LocalOutput(Path(location))
    if scheme in OBJECT_STORE_SCHEMES:
        from distmerge.output.object_store import ObjectStoreOutput

        return ObjectStoreOutput(str(location))
    if scheme == HUB_SCHEME:
        # The Hub's upload protocol (Git LFS) names a file by the SHA-256 of its whole content
        # before any byte is sent, so no file can be uploaded in parts as its units are merged.
        raise OutputError(f"{location}: a merge cannot be written to the Hugging Face Hub directly (the Hub "
                          "needs each file's SHA-256 before its upload, which no node has until the whole file is "
                          "merged); merge to a directory or s3:// or gs://, then `huggingface-cli upload`")
    raise OutputError(f"{location}: an output on {scheme}:// is not supported; give a local directory or "
                      "s3://bucket/prefix or gs://bucket/prefix")
