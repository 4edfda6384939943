"""AIM in a merge: one object that owns the feature's whole lifecycle.

The engine knows nothing of AIM. It asks each feature of the merge (see
:mod:`distmerge.engine.features`) what it reads, whether it needs the base rows, and, once the
output is locked, to prepare; AIM's preparation loads the statistics (``aim.stats``), reuses the
calibration an interrupted run saved in OUT, or calibrates the base model now (saving the result
in OUT so a resume does not calibrate again), checks them against the plan, and computes the
relaxation factors. What it hands back, a :class:`~distmerge.aim.relax.ChannelRelaxation`,
travels to the workers, which apply it to each merged row block. A new AIM variant (another
factor rule) is one more branch of :meth:`AimFeature._factors`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from distmerge.aim.relax import ChannelRelaxation, relaxation_factors
from distmerge.aim.stats_file import SAVED_NAME, load_statistics, match_statistics
from distmerge.aim.stats_summary import summarize
from distmerge.config import MergeConfig
from distmerge.errors import ConfigError
from distmerge.io.files import require_regular
from distmerge.io.locations import is_remote
from distmerge.io.remote_files import fetch_file
from distmerge.plan import MergePlan

log = logging.getLogger(__name__)

MAX_STATS_BYTES = 4 << 30  # a remote statistics file (a 70B model's: ~40 MB in float32)


def aim_summary(stats: dict[str, torch.Tensor], omega: float) -> dict[str, dict[str, float]]:
    """Per module, for the merge report: channels, peakedness and the factors at ``omega``
    (:mod:`distmerge.aim.stats_summary` says what each number means)."""
    return {m.name: {"channels": m.channels, "max_over_median": m.max_over_median, "top1pct_share": m.top1pct_share,
                     "protected_channels": m.protected, "r_mean": m.r_mean, "r_min": m.r_min}
            for m in summarize(stats, omega)}


class AimFeature:
    """Activation-Informed Merging (arXiv 2502.02421) layered on any merge method."""

    name = "aim"
    needs_base = True
    # The calibration a run saves in OUT so that a resumed run does not calibrate again; a
    # scratch file of the run, not part of the merged model (no manifest entry).
    scratch_files = (SAVED_NAME,)

    def __init__(self, config: MergeConfig) -> None:
        if config.aim is None:
            raise ValueError("AimFeature needs a config with an aim: block")
        if not config.base_model:
            raise ConfigError("aim: AIM relaxes each delta towards the base model; add base_model: PATH")
        self.aim = config.aim
        self.base_model = config.base_model  # a folder, a Hub id or s3://: kept as written
        self.statistics: dict[str, torch.Tensor] = {}
        self.metadata: dict[str, str] = {}
        self.modules: dict[int, str] = {}

    @classmethod
    def from_config(cls, config: MergeConfig) -> AimFeature | None:
        return cls(config) if config.aim is not None else None

    def input_paths(self) -> dict[str, Path | str]:
        """The files AIM reads, by config key (kept apart from the output; remote ones as URLs)."""
        paths: dict[str, Path | str] = {}
        if self.aim.stats:
            paths["aim.stats"] = self.aim.stats if is_remote(self.aim.stats) else Path(self.aim.stats)
        dataset = self.aim.calibration.dataset
        if dataset != "builtin":
            paths["aim.calibration.dataset"] = dataset if is_remote(dataset) else Path(dataset).expanduser()
        return paths

    def _stats_file(self) -> Path:
        """``aim.stats`` as a local file: itself, or its cached copy when it is remote."""
        assert self.aim.stats
        if is_remote(self.aim.stats):
            return fetch_file(self.aim.stats, "aim.stats", ConfigError, MAX_STATS_BYTES).path
        return Path(self.aim.stats)

    def fingerprint_files(self) -> dict[str, Path | list[Any]]:
        """Files whose identity changes the merged bytes (checked to exist before planning on):
        a local path, or a remote file's identity (name, size, ETag or commit)."""
        if not self.aim.stats:
            return {}
        if is_remote(self.aim.stats):
            return {"aim.stats": fetch_file(self.aim.stats, "aim.stats", ConfigError, MAX_STATS_BYTES).identity}
        path = Path(self.aim.stats)
        if not path.exists():
            raise ConfigError(f"aim.stats: {path} does not exist; run distmerge calibrate first or drop aim.stats")
        require_regular(path, "aim.stats", ConfigError)
        return {"aim.stats": path}

    def calibrate(self, out_path: Path | None, progress: bool) -> None:
        """Calibrate the base model now (on the connected Ray, else in this process), saving to
        ``out_path`` if given."""
        from distmerge.aim.calibration import calibrate

        self.statistics, self.metadata = calibrate(self.base_model, self.aim, out_path, progress=progress)

    def needs_ray(self, out: Path) -> str | None:
        """Calibrating the base model in a pipeline of several stages needs Ray (its stage actors);
        one stage runs in this process where no Ray runs, and loading statistics needs nothing."""
        if self.aim.stats or (out / SAVED_NAME).is_file():
            return None
        return self.pipeline_reason()

    def pipeline_reason(self) -> str | None:
        """Why calibrating takes a pipeline of Ray stage actors (None: one stage in this process
        will do); an ``aim.stage_memory`` no layer of the base model fits is refused here, from
        its headers, before Ray is started or joined for it."""
        from distmerge.aim.in_process import pipeline_reason

        reason = pipeline_reason(self.aim)
        if reason and self.aim.stages == "auto" and self.aim.stage_memory is not None:
            from distmerge.aim.layout import open_base
            from distmerge.aim.stage_plan import check_stage_cap

            checkpoint, layout = open_base(str(self.base_model))
            check_stage_cap(checkpoint, layout, self.aim.stage_memory, self.aim.calibration.block_size,
                            self.aim.micro_batch_size, None)
        return reason

    def prepare(self, plan: MergePlan, out: Path, record_written: Callable[[str], None],
                progress: bool) -> ChannelRelaxation:
        """Statistics loaded or calibrated, checked against ``plan``; the workers' relaxation."""
        saved = out / SAVED_NAME
        if self.aim.stats:
            self.statistics, self.metadata = load_statistics(self._stats_file())
        elif saved.is_file():
            log.info("reusing the calibration of the interrupted run: %s", saved)
            self.statistics, self.metadata = load_statistics(saved)
        else:
            record_written(SAVED_NAME)
            self.calibrate(saved, progress)
        # The statistics are the base model's: a tensor is relaxed by the statistic of the base
        # tensor it merges (the same name, unless slices took the base's layers elsewhere).
        merged = [(i, t) for i, t in enumerate(plan.tensors) if t.params is not None and t.base is not None]
        matched = match_statistics(self.statistics, {t.base.name: t.shape for _, t in merged})
        self.modules = {i: matched[t.base.name] for i, t in merged if t.base.name in matched}
        return ChannelRelaxation(self.aim.omega, {i: self._factors(self.statistics[m]) for i, m in self.modules.items()})

    def _factors(self, statistic: torch.Tensor) -> torch.Tensor:
        """One tensor's relaxation factors under the configured variant."""
        factors = relaxation_factors(statistic, self.aim.omega)
        if self.aim.relaxation == "uniform":  # the ablation control: the mean factor everywhere
            return torch.full_like(factors, float(factors.double().mean()))
        return factors

    def summary(self) -> str:
        return f"AIM: {len(self.modules)} tensors relaxed (omega {self.aim.omega})"

    def report_section(self) -> dict[str, Any]:
        return {
            "omega": self.aim.omega,
            "stats_source": self.aim.stats or "calibrated for this merge",
            "metadata": self.metadata,
            "relaxed_tensors": len(self.modules),
            "modules": aim_summary(self.statistics, self.aim.omega),
        }

    def card_line(self) -> str:
        return f"AIM (arXiv 2502.02421): omega {self.aim.omega}, {len(self.modules)} tensors relaxed"
