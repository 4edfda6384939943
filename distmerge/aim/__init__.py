"""AIM (Activation-Informed Merging, arXiv 2502.02421): calibration statistics and relaxation.

Calibration runs a task-agnostic text set through the base model, stage by stage on Ray, and
records per module the mean |input| per channel summed over blocks; the merge then relaxes each
weight's delta towards the base by ``r = 1 - (1 - omega) * a / max(a)`` along its input
dimension. The math (:mod:`~distmerge.aim.relax`) is pure; Ray is confined to
:mod:`~distmerge.aim.pipeline`.
"""

from __future__ import annotations

from distmerge.aim.architectures import SUPPORTED as SUPPORTED_MODEL_TYPES
from distmerge.aim.blocks import load_calibration_blocks
from distmerge.aim.calibrate import calibrate
from distmerge.aim.pipeline import compute_statistics
from distmerge.aim.relax import (
    apply_relaxation,
    module_for_tensor,
    relaxation_factors,
    shard_factors,
)
from distmerge.aim.stats_file import check_statistics, load_statistics, save_statistics

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "apply_relaxation",
    "calibrate",
    "check_statistics",
    "compute_statistics",
    "load_calibration_blocks",
    "load_statistics",
    "module_for_tensor",
    "relaxation_factors",
    "save_statistics",
    "shard_factors",
]
