"""AIM (Activation-Informed Merging, arXiv 2502.02421): calibration statistics and relaxation.

Calibration runs a task-agnostic text set through the base model, stage by stage on Ray, and
records per module the mean |input| per channel summed over sequences; the merge then relaxes each
weight's delta towards the base by ``r = 1 - (1 - omega) * a / max(a)`` along its input
dimension. The math (:mod:`~distmerge.aim.relax`) is pure; Ray is confined to
:mod:`~distmerge.aim.pipeline`.
"""

from __future__ import annotations

import importlib
from typing import Any

# Attributes load their module on first use (PEP 562): a merge worker that only relaxes rows
# imports distmerge.aim.relax, never the calibration pipeline and its transformers/Ray imports.
_HOMES = {
    "SUPPORTED_MODEL_TYPES": ("distmerge.aim.architectures", "SUPPORTED"),
    "AimFeature": ("distmerge.aim.feature", "AimFeature"),
    "ChannelRelaxation": ("distmerge.aim.relax", "ChannelRelaxation"),
    "apply_relaxation": ("distmerge.aim.relax", "apply_relaxation"),
    "calibrate": ("distmerge.aim.calibration", "calibrate"),
    "calibrate_stages": ("distmerge.aim.pipeline", "calibrate_stages"),
    "load_calibration_sequences": ("distmerge.aim.sequences", "load_calibration_sequences"),
    "load_statistics": ("distmerge.aim.stats_file", "load_statistics"),
    "match_statistics": ("distmerge.aim.stats_file", "match_statistics"),
    "module_for_tensor": ("distmerge.aim.relax", "module_for_tensor"),
    "relaxation_factors": ("distmerge.aim.relax", "relaxation_factors"),
    "save_statistics": ("distmerge.aim.stats_file", "save_statistics"),
    "shard_factors": ("distmerge.aim.relax", "shard_factors"),
}

__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'distmerge.aim' has no attribute {name!r}")
    module, attribute = _HOMES[name]
    return getattr(importlib.import_module(module), attribute)
