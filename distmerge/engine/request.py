"""Phase: resolve what the caller asked for, once: config, command-line/API overrides, features.

Every later phase reads settings from the :class:`MergeRequest` only, so an override is applied
in exactly one place and a setting cannot mean one thing to the planner and another to the
scheduler.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from distmerge.config import EXECUTORS, MergeConfig, load_config
from distmerge.engine.features import MergeFeature, features_for
from distmerge.errors import ConfigError
from distmerge.output.directory import input_paths


@dataclass(frozen=True)
class MergeRequest:
    """A merge as asked: the config with overrides applied, where it came from, its features."""

    config: MergeConfig
    config_path: Path | None
    features: tuple[MergeFeature, ...]
    shard_size: int
    workers: int | None

    @property
    def needs_base(self) -> bool:
        return any(f.needs_base for f in self.features)

    def input_paths(self) -> dict[str, Path | str]:
        """Every location the run reads, by role (the output is kept apart from all of them)."""
        paths: dict[str, Path | str] = input_paths(self.config, self.config_path)
        for feature in self.features:
            paths.update(feature.input_paths())
        return paths


def resolve_request(config: MergeConfig | str | Path, *, shard_size: int | None = None, workers: int | None = None,
                    seed: int | None = None, allow_nonfinite: bool | None = None,
                    executor: str | None = None) -> MergeRequest:
    """Load the config (a path or a parsed config) and apply the overrides the caller passed."""
    if workers is not None and not (isinstance(workers, int) and workers >= 1):
        raise ConfigError(f"workers: {workers!r} is not a positive number of work units in flight")
    config_path = None if isinstance(config, MergeConfig) else Path(config)
    cfg = config if isinstance(config, MergeConfig) else load_config(config)
    execution = {}
    if seed is not None:
        execution["seed"] = seed
    if allow_nonfinite is not None:
        execution["allow_nonfinite"] = allow_nonfinite
    if executor is not None:
        if executor not in EXECUTORS:
            raise ConfigError(f"executor: {executor!r} is not one of {', '.join(EXECUTORS)}")
        execution["executor"] = executor
    if execution:
        cfg = cfg.model_copy(update={"execution": cfg.execution.model_copy(update=execution)})
    return MergeRequest(cfg, config_path, tuple(features_for(cfg)), shard_size or cfg.execution.shard_size,
                        workers or cfg.execution.workers)
