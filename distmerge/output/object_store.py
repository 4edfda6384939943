"""An output on an object store (``s3://bucket/prefix``, ``gs://bucket/prefix``): model files uploaded in parts from every node.

The run works in a local folder of its own (under ``DISTMERGE_CACHE``, named by the URL) that
holds the journal and the small files, exactly as a local output's directory does, so the same
journal, manifest, report and verification code serves both. What differs:

- each model file is a multipart upload (:mod:`distmerge.io.s3_writes`, :mod:`~distmerge.io.gcs_writes`) whose parts are groups
  of whole units (:mod:`distmerge.output.parts`), uploaded by the workers that merge them; the
  journal records the upload and each part's ETag, and the file is completed from them when its
  last part is in;
- a rerun on any machine resumes from the journal's copy in the store (kept fresh by
  :class:`~distmerge.output.remote_lock.RemoteLock`): a part counts as done only if the store
  still holds it with the journaled ETag (ListParts), so every part is either kept whole or
  uploaded again;
- the small files are uploaded after verification, the index last, so an output without its
  index is never complete, and one with it always is.

Nothing is ever deleted in the store except what a distmerge journal there names (and, with
``--overwrite-foreign``, what the prefix holds besides).
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Any

from distmerge.errors import OutputError
from distmerge.io.locations import LocationError, parse_remote, relation_to
from distmerge.io.model_source import cache_root
from distmerge.io.object_stores import object_store
from distmerge.io.safetensors import INDEX_NAME
from distmerge.output.directory import OutputState, examine_output
from distmerge.output.journal import JOURNAL_NAME, JournalState, JournalWriter, read_journal
from distmerge.output.local_files import UnitKey
from distmerge.output.lock import LOCK_NAME
from distmerge.output.ownership import owned_names
from distmerge.output.parts import Part, plan_parts
from distmerge.output.remote_lock import HeldOutput, RemoteLock
from distmerge.output.writers import PartUploads, UploadedPart
from distmerge.plan import MergePlan, WorkUnit

log = logging.getLogger(__name__)

MAX_SMALL_FILE = 1 << 30  # a file the folder mirrors (AIM statistics of a 70B model are ~40 MB)


def _key(u: WorkUnit) -> UnitKey:
    return (u.tensor, u.row_start, u.row_end)


class ObjectStoreOutput:
    """``OUT`` = ``s3://bucket/prefix`` or ``gs://bucket/prefix``: see the module's docstring."""

    def __init__(self, location: str) -> None:
        self.location = location.rstrip("/")
        try:
            self.root = parse_remote(self.location)
        except LocationError as e:
            raise OutputError(f"output {e}") from None
        self.store = object_store(self.location)
        self.folder = cache_root() / "outputs" / hashlib.sha256(self.location.encode()).hexdigest()[:16]
        self._lock: RemoteLock | None = None
        self._parts: list[Part] = []
        self._uploads: dict[int, str] = {}
        self._etags: dict[int, dict[int, str]] = defaultdict(dict)
        self._complete: set[int] = set()
        self._file_names: list[str] = []

    def url(self, name: str) -> str:
        return str(self.root.child(name))

    # --- before the run: apart from the inputs, locked, examined ---

    def check_apart(self, inputs: dict[str, Path | str]) -> None:
        for role, where in inputs.items():
            relation = relation_to(self.root, where) if isinstance(where, str) else None
            if relation:
                raise OutputError(f"{self.location}: the output {relation} {role} {where}; refused, since writing "
                                  "(or --overwrite) there could destroy an input. Choose an output outside every input")

    def locked(self) -> HeldOutput:
        self.folder.mkdir(parents=True, exist_ok=True)
        return HeldOutput(self.folder, self.url(LOCK_NAME), self.url(JOURNAL_NAME), self._held)

    def _held(self, lock: RemoteLock) -> None:
        self._lock = lock

    def _stored(self) -> dict[str, int]:
        listed = self.store.list_folder(self.root, "the output", OutputError)
        return {name: st.size for name, st in listed.items() if name != LOCK_NAME and name}

    def _reset_folder(self, journal: bytes | None) -> None:
        """Empty the run's own local folder (its lock excepted) and put the journal back."""
        for entry in self.folder.iterdir():
            if entry.name != LOCK_NAME:
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        if journal is not None:
            (self.folder / JOURNAL_NAME).write_bytes(journal)

    def examine(self, parts: dict[str, Any], config: dict[str, Any], *, overwrite: bool,
                overwrite_foreign: bool, resume: bool) -> OutputState:
        stored = self._stored()
        journal_bytes = None
        if JOURNAL_NAME in stored:
            copy = self.store.get_object(self.url(JOURNAL_NAME), "the journal")
            local = self.folder / JOURNAL_NAME
            mine = local.read_bytes() if local.is_file() else b""
            # A run on this machine killed between two copies left a longer journal here.
            journal_bytes = mine if copy is not None and copy.data and mine.startswith(copy.data) else \
                (copy.data if copy is not None else None)
        self._reset_folder(journal_bytes)
        try:
            journal = read_journal(self.folder / JOURNAL_NAME)
        except OutputError as e:
            if not overwrite:
                raise OutputError(str(e).replace(str(self.folder), self.location)) from None
            journal = None
        if overwrite and stored:
            self._clear(stored, journal, overwrite_foreign)
            self._reset_folder(None)
            return OutputState("fresh")
        if not stored:
            if resume:
                raise OutputError(f"{self.location}: nothing to resume (no {JOURNAL_NAME}); drop --resume to start "
                                  "the merge")
            return OutputState("fresh")
        if journal is None:
            raise OutputError(f"{self.location}: holds objects and no distmerge journal; choose another output "
                              "(distmerge never deletes what it did not write: only --overwrite --overwrite-foreign would)")
        weights = set(journal.header.get("files", []))
        for name, size in stored.items():
            if name not in weights and name != JOURNAL_NAME and size <= MAX_SMALL_FILE and "/" not in name:
                got = self.store.get_object(self.url(name), "a file of the output")
                if got is not None:
                    (self.folder / name).write_bytes(got.data)
        try:
            state = examine_output(self.folder, parts, config, overwrite=False, overwrite_foreign=False, resume=resume)
        except OutputError as e:
            raise OutputError(str(e).replace(str(self.folder), self.location)) from None
        if state.kind == "resume" and INDEX_NAME in stored:  # an interrupted finish: not complete until redone
            self.store.delete_object(self.url(INDEX_NAME), "the index of an unfinished output")
        return state

    def _clear(self, stored: dict[str, int], journal: JournalState | None, foreign_too: bool) -> None:
        owned = owned_names(journal)
        foreign = sorted(n for n in stored if n not in owned)
        if foreign and not foreign_too:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise OutputError(f"{self.location}: --overwrite refused: the prefix holds objects no distmerge run wrote "
                              f"({shown}). Choose another output, or add --overwrite-foreign to delete them too")
        log.warning("overwriting %s (%d objects%s)", self.location, len(stored),
                    f", {len(foreign)} not written by distmerge" if foreign else "")
        for name, upload_id in self.store.open_uploads(self.root, "the output"):
            if foreign_too or name in owned:
                self.store.abort_upload(self.url(name), upload_id, "an unfinished upload of the output")
        for name in stored:
            self.store.delete_object(self.url(name), "an object of the output")

    # --- the run: files opened, parts recorded, files completed ---

    def open_files(self, plan: MergePlan, interrupted: JournalState | None, journal: JournalWriter) -> set[UnitKey]:
        self._parts = plan_parts(plan)
        self._file_names = [f.name for f in plan.files]
        if interrupted is not None and interrupted.header.get("tensors") != [t.name for t in plan.tensors]:
            raise OutputError(f"{self.location}: the journal lists other tensors than this plan; pass --overwrite")
        done: set[UnitKey] = set()
        by_file: dict[int, list[Part]] = defaultdict(list)
        for part in self._parts:
            by_file[part.file].append(part)
        for i, f in enumerate(plan.files):
            url = self.url(f.name)
            if interrupted is not None:
                kept = self._kept(i, f.name, f.size, by_file[i], interrupted)
                if kept is not None:
                    done |= kept
                    continue
            self._uploads[i] = self.store.create_upload(url, "an output file")
            journal.upload(f.name, self._uploads[i])
        assert self._lock is not None
        self._lock.mirror()  # the uploads are on record before any part is sent
        for i, file_parts in by_file.items():  # a file of empty tensors only: its header is its one part
            for part in file_parts:
                if not part.units and i not in self._complete and part.number not in self._etags[i]:
                    header = plan.files[i].header
                    etag = self.store.upload_part(self.url(plan.files[i].name), self._uploads[i], part.number, header,
                                       "an output file part")
                    self.parts_done([UploadedPart(i, self._uploads[i], part.number, etag, len(header))], journal)
        if interrupted is not None:
            log.info("resuming: %d of %d units are in parts the store holds, and skipped", len(done), len(plan.units))
        return done

    def _kept(self, i: int, name: str, size: int, parts: list[Part], journal: JournalState) -> set[UnitKey] | None:
        """The units of file ``i`` an interrupted run finished, or None to start the file afresh."""
        keys = [_key(u) for p in parts for u in p.units]
        if name in journal.files and all(k in journal.units for k in keys):
            try:
                stored = self.store.list_folder(self.root, "the output", OutputError).get(name)
            except OutputError:
                stored = None
            if stored is not None and stored.size == size:
                self._complete.add(i)
                return set(keys)
        upload_id = journal.uploads.get(name)
        held = self.store.uploaded_parts(self.url(name), upload_id, "an unfinished upload") if upload_id else None
        if held is None:
            return None
        self._uploads[i] = upload_id  # type: ignore[assignment]
        kept: set[UnitKey] = set()
        for p in parts:
            etag = journal.parts.get(name, {}).get(p.number)
            unit_keys = [_key(u) for u in p.units]
            if etag is not None and held.get(p.number) == etag and all(k in journal.units for k in unit_keys):
                self._etags[i][p.number] = etag
                kept.update(unit_keys)
        return kept

    def writer(self, plan: MergePlan) -> PartUploads:
        starts: dict[int, list[int]] = defaultdict(list)
        for part in self._parts:
            starts[part.file].append(part.start)
        return PartUploads(tuple(self.url(f.name) for f in plan.files),
                           tuple(self._uploads.get(i, "") for i in range(len(plan.files))),
                           tuple(tuple(starts[i]) for i in range(len(plan.files))),
                           tuple(f.size for f in plan.files), tuple(f.header for f in plan.files))

    def batches(self, plan: MergePlan, todo: list[WorkUnit]) -> list[list[WorkUnit]]:
        wanted = {_key(u) for u in todo}
        return [list(p.units) for p in self._parts if p.units and _key(p.units[0]) in wanted]

    def parts_done(self, parts: list[UploadedPart], journal: JournalWriter) -> None:
        for p in parts:
            if self._uploads.get(p.file) != p.upload_id:
                raise OutputError(f"{self.location}: a part of an upload this run does not own came back")
            self._etags[p.file][p.number] = p.etag
            journal.part(self._name(p.file), p.upload_id, p.number, p.etag)

    def _name(self, file: int) -> str:
        return self._file_names[file]

    def file_done(self, plan: MergePlan, file: int, journal: JournalWriter) -> None:
        name = plan.files[file].name
        if file not in self._complete:
            wanted = [p.number for p in self._parts if p.file == file]
            missing = [n for n in wanted if n not in self._etags[file]]
            if missing:
                raise OutputError(f"{self.url(name)}: parts {missing[:5]} were never uploaded; rerun to resume")
            assert self._lock is not None
            self._lock.check()  # a run that lost its lock (a stalled heartbeat) must not complete files
            self.store.complete_upload(self.url(name), self._uploads[file], dict(self._etags[file]), "an output file")
            self._complete.add(file)
        journal.file(name)

    # --- the end: read back, published ---

    def weights_at(self, name: str) -> str:
        return self.url(name)

    def listing(self) -> list[str]:
        return sorted(self._stored())

    def publish(self, names: list[str]) -> None:
        for name in names:
            self.store.put_object(self.url(name), (self.folder / name).read_bytes(), f"{name} of the output")
