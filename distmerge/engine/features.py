"""Cross-cutting features of a merge (AIM today): the small interface the engine drives.

A feature owns its whole lifecycle, the way a converter does in torchtitan: the engine asks
each one what it reads, whether every merged tensor needs the base rows, whether it needs Ray,
to prepare once the output is locked and the executor started, and for its lines of the plan, report and model card. What
``prepare`` returns (a :class:`RowStep`) goes to the workers with the job and is applied to
every merged row block after the method's merge. The engine never branches on a feature's
kind: adding one is a class with these members and one line in :func:`features_for`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch

from distmerge.config import MergeConfig
from distmerge.plan import MergePlan


class RowStep(Protocol):
    """Applied by a worker to the merged rows of one block (picklable: it ships with the job)."""

    def apply(self, tensor: int, shape: tuple[int, ...], row_start: int, row_end: int,
              base: torch.Tensor | None, merged: torch.Tensor) -> torch.Tensor: ...


class MergeFeature(Protocol):
    name: str  # its section in merge_report.json
    needs_base: bool  # every merged tensor reads the base rows (given to its RowStep)
    scratch_files: tuple[str, ...]  # files it may write into OUT that are not part of the model

    def input_paths(self) -> dict[str, Path | str]: ...

    def fingerprint_files(self) -> dict[str, Path | list[Any]]: ...

    def needs_ray(self, out: Path) -> str | None:
        """Why this run needs Ray (e.g. a calibration pipeline of stage actors), or None."""
        ...

    def prepare(self, plan: MergePlan, out: Path, record_written: Callable[[str], None],
                progress: bool) -> RowStep | None: ...

    def summary(self) -> str: ...

    def report_section(self) -> dict[str, Any]: ...

    def card_line(self) -> str: ...


def features_for(config: MergeConfig) -> list[MergeFeature]:
    """The features ``config`` turns on, in the order their row steps apply."""
    from distmerge.aim.feature import AimFeature

    return [f for f in (AimFeature.from_config(config),) if f is not None]
