"""Deciding what to do with an output directory, under its lock: start, resume, or nothing.

The order matters and is the safety argument: (1) OUT is checked against every input before
it is touched; (2) it is created and locked, so no other run can change it from here on;
(3) only then is what it holds examined, and (4) with ``--overwrite`` only the files a
distmerge run wrote are deleted, unless ``--overwrite-foreign`` says otherwise.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distmerge.config import MergeConfig
from distmerge.errors import CheckpointError, OutputError
from distmerge.io.locations import url_scheme
from distmerge.io.safetensors import INDEX_NAME
from distmerge.io.structured import read_json
from distmerge.lora import split_reference
from distmerge.output.journal import JOURNAL_NAME, JournalState, describe_difference, read_journal
from distmerge.output.location import check_output_location
from distmerge.output.ownership import clear_output, entries
from distmerge.output.report import REPORT_NAME

log = logging.getLogger(__name__)

def _as_input(text: str) -> Path | str:
    """A local path as a Path; a URL (``s3://``...) kept as text, for the object-store output's check."""
    return text if url_scheme(text) else Path(text)


def input_paths(cfg: MergeConfig, config_path: Path | None) -> dict[str, Path | str]:
    """Every model location (and LoRA adapter) and the config file the run reads, by role
    (features add their own): local ones as paths, remote ones as their URLs."""
    paths: dict[str, Path | str] = {}
    if config_path is not None:
        paths["the config file"] = config_path

    def add(role: str, reference: str) -> None:
        try:
            model, adapter = split_reference(reference)
        except CheckpointError:  # unparseable: the planner says so; keep the whole text as a path
            model, adapter = reference, None
        paths[role] = _as_input(model)
        if adapter is not None:
            paths[f"{role} adapter"] = _as_input(adapter)

    if cfg.base_model:
        add("base_model", cfg.base_model)
    for i, entry in enumerate(cfg.models or ()):
        add(f"models[{i}]", entry.model)
    for s, out_slice in enumerate(cfg.slices or ()):
        if out_slice.base_model:
            add(f"slices[{s}].base_model", out_slice.base_model)
        for j, source in enumerate(out_slice.sources):
            add(f"slices[{s}].sources[{j}]", source.model)
    if cfg.vocabulary_source not in (None, "base", "union"):
        paths["tokenizer_source"] = _as_input(str(cfg.vocabulary_source))
    return paths


def make_directory(out: Path) -> None:
    """Create OUT (and parents); refuse a path that exists and is not a directory."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{out}: cannot create the output directory ({e.strerror})") from e


@dataclass
class OutputState:
    """What OUT holds: ``fresh`` (start), ``resume`` (with its journal) or ``complete`` (report)."""

    kind: str
    journal: JournalState | None = None
    report: dict[str, Any] | None = None


def examine_output(out: Path, parts: dict[str, Any], config: dict[str, Any], *, overwrite: bool,
                   overwrite_foreign: bool, resume: bool) -> OutputState:
    """Decide what to do with the (locked) OUT, clearing it first for ``--overwrite``."""
    present = entries(out)
    if overwrite and present:
        try:
            journal = read_journal(out / JOURNAL_NAME)
        except OutputError:
            journal = None  # a damaged journal vouches for nothing: its files count as foreign
        clear_output(out, journal, include_foreign=overwrite_foreign)
        return OutputState("fresh")
    if not present:
        if resume:
            raise OutputError(f"{out}: nothing to resume (no {JOURNAL_NAME}); drop --resume to start the merge")
        return OutputState("fresh")
    journal = read_journal(out / JOURNAL_NAME)
    if journal is None:
        raise OutputError(
            f"{out}: directory is not empty and holds no distmerge journal; choose another OUT_DIR "
            "(distmerge never deletes files it did not write: only --overwrite --overwrite-foreign would)"
        )
    old = journal.header.get("parts", {})
    if old.get("fingerprint") != parts["fingerprint"]:
        what = describe_difference(old, parts, journal.header.get("config", {}), config)
        state = "a finished" if journal.complete else "an unfinished"
        raise OutputError(
            f"{out}: holds {state} merge of different inputs or config ({what}); use another OUT_DIR "
            "(a '{fingerprint}' in OUT_DIR names it by content), or pass --overwrite to replace it"
        )
    if journal.complete and (out / INDEX_NAME).is_file() and (out / REPORT_NAME).is_file():
        try:
            report = read_json(out / REPORT_NAME, "the merge report", OutputError)
        except OutputError:
            report = None
        if isinstance(report, dict):
            return OutputState("complete", journal, report)
    return OutputState("resume", journal)


def check_statistics_target(path: Path, inputs: dict[str, Path | str]) -> None:
    """``calibrate --out``: never an input or inside one, and never a file other than AIM statistics."""
    from distmerge.aim.stats_file import load_statistics
    from distmerge.errors import ConfigError

    check_output_location(path, inputs, "the statistics file (--out)",
                          "writing it could destroy an input. Choose an --out path outside every input")
    if os.path.lexists(path):
        if path.is_symlink() or not path.is_file():
            raise OutputError(f"{path}: exists and is not a regular file; refused (choose another --out)")
        try:
            load_statistics(path)
        except ConfigError:
            raise OutputError(f"{path}: exists and is not an AIM statistics file; refused, since distmerge never "
                              "overwrites a file it did not write (choose another --out)") from None


def check_plot_target(path: Path, inputs: dict[str, Path | str]) -> None:
    """``--plot``: never an input or inside one, and never an existing file distmerge did not plot."""
    from distmerge.aim.stats_summary import PLOT_MARKER

    check_output_location(path, inputs, "the --plot image",
                          "writing it could destroy an input. Choose a --plot path outside every input")
    if path.suffix.lower() != ".png":
        raise OutputError(f"{path}: --plot writes a PNG image; give a path ending in .png")
    if os.path.lexists(path):
        if path.is_symlink() or not path.is_file():
            raise OutputError(f"{path}: exists and is not a regular file; refused (choose another --plot)")
        with open(path, "rb") as f:
            head = f.read(1 << 16)
        if PLOT_MARKER not in head:
            raise OutputError(f"{path}: exists and is not a plot distmerge made; refused, since distmerge never "
                              "overwrites a file it did not write (choose another --plot)")
