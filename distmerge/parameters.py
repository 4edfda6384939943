"""Each tensor's merge parameters, resolved from the config as mergekit resolves them.

A parameter is looked up per tensor: the model's own entry, else the global ``parameters:``
entry, else the method's default; a value may be a number, a gradient over the decoder layers or
a list of filters (see :func:`distmerge.config.resolve_value`). Resolution happens at plan time
for every tensor, so a missing, mistyped or out-of-range value fails before any data is read.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch

from distmerge.config import IGNORED_PARAMETERS, MergeConfig, resolve_value
from distmerge.dtypes import SAFETENSORS_TO_TORCH, TORCH_NAME
from distmerge.errors import ConfigError
from distmerge.methods.base import MergeMethod, TensorParams

log = logging.getLogger(__name__)


def resolve_parameters(config: MergeConfig, method: MergeMethod, expert_entries: list[tuple[int, Any]],
                       tensor: str, t: float, compute: str | None = None) -> TensorParams:
    """Global and per-model parameters of ``tensor`` at layer position ``t``, validated."""
    global_values: dict[str, Any] = {}
    for key, spec in method.global_parameters.items():
        where = f"parameters.{key}"
        value = resolve_value(config.parameters.get(key), tensor, t, where) if key in config.parameters else None
        if value is None and spec.default is None:
            raise ConfigError(f"{where}: required, and no value applies to tensor {tensor} (no filter matches it "
                              "and there is no entry without a filter)" if key in config.parameters
                              else f"{where}: required by {method.name}; add parameters: {{{key}: ...}}")
        global_values[key] = spec.validate(spec.default if value is None else value, f"{where} (tensor {tensor})")
    experts = []
    for index, entry in expert_entries:
        values = {}
        for key, spec in method.model_parameters.items():
            value = None
            where = f"models[{index}].parameters.{key}"
            if key in entry.parameters:
                value = resolve_value(entry.parameters[key], tensor, t, where)
            if value is None and key in config.parameters:
                where = f"parameters.{key}"
                value = resolve_value(config.parameters[key], tensor, t, where)
            if value is None:
                if spec.default is None:
                    raise ConfigError(
                        f"models[{index}] ({entry.model}): parameter {key!r} is required "
                        f"and has no value for tensor {tensor}"
                    )
                value = spec.default
            values[key] = spec.validate(value, f"{where} of {entry.model} (tensor {tensor})")
        experts.append(values)
    params = TensorParams(global_values, tuple(experts))
    method.validate(params, f"tensor {tensor}")
    _check_representable(params, compute or config.compute_dtype, expert_entries, tensor)
    return params


@functools.lru_cache(maxsize=4096)
def _finite_in(value: float, dtype: str) -> bool:
    return bool(torch.isfinite(torch.tensor(value, dtype=SAFETENSORS_TO_TORCH[dtype])))


def _check_representable(params: TensorParams, compute: str, expert_entries: list[tuple[int, Any]],
                         tensor: str) -> None:
    """Refuse a parameter the compute dtype rounds to infinity (a weight of 1e5 in float16)
    at plan time, instead of a merge of infinities discovered after the whole run."""
    places = [("parameters", params.global_)]
    places += [(f"models[{index}].parameters", values)
               for (index, _), values in zip(expert_entries, params.experts, strict=True)]
    for where, values in places:
        for key, value in values.items():
            if isinstance(value, float) and not _finite_in(value, compute):
                raise ConfigError(f"{where}.{key} (tensor {tensor}): {value!r} overflows the compute dtype "
                                  f"{TORCH_NAME.get(compute, compute)}; use a smaller value or dtype: float32")


# Parameter names of mergekit 0.1.5's methods. mergekit accepts a parameter a method does not
# use (a weight on slerp, a density on task_arithmetic) and ignores it; so does distmerge, for
# these names, with a warning. Any other name is refused as a typo.
MERGEKIT_PARAMETER_NAMES = frozenset({
    "weight", "density", "gamma", "epsilon", "lambda", "normalize", "rescale", "int8_mask", "t", "scale",
    "filter_wise", "select_topk", "nuslerp_flatten", "nuslerp_row_wise", "normalize_weights", "eps",
    "max_iter", "tol", "r", "alpha",
})


def check_parameter_names(config: MergeConfig, method: MergeMethod) -> None:
    """Every key in the config is a parameter of the method (global, or per model), or one of
    mergekit's parameter names, which the method ignores as mergekit does (with a warning)."""
    model_keys = set(method.model_parameters)
    global_keys = set(method.global_parameters) | model_keys | IGNORED_PARAMETERS
    for key in config.parameters:
        if key not in global_keys:
            if key in MERGEKIT_PARAMETER_NAMES:
                log.warning("parameters.%s: not used by %s; ignored (as mergekit does)", key, method.name)
                continue
            raise ConfigError(
                f"parameters.{key}: not a parameter of {method.name}; allowed: {', '.join(sorted(global_keys - IGNORED_PARAMETERS))}"
            )
    for i, entry in enumerate(config.models):
        for key in entry.parameters:
            if key not in model_keys:
                if key in MERGEKIT_PARAMETER_NAMES:
                    log.warning("models[%d].parameters.%s: not used by %s; ignored (as mergekit does)", i, key,
                                method.name)
                    continue
                raise ConfigError(
                    f"models[{i}].parameters.{key} ({entry.model}): not a per-model parameter of {method.name}; "
                    f"allowed: {', '.join(sorted(model_keys)) or '(none)'}"
                )
