"""Each tensor's merge parameters, resolved from the config as mergekit resolves them.

A parameter is looked up per tensor, as mergekit 0.1.5 does: the model's own entry (its
``models:`` or slice ``sources:`` item), else its slice's ``parameters``, else the global
``parameters:``, else the method's default (a filter list with no matching entry passes the
lookup on); a per-model value's filters match the model's own tensor name; a value may be a number, a gradient over the decoder layers or
a list of filters (see :func:`resolve_value`). Resolution happens at plan time
for every tensor, so a missing, mistyped or out-of-range value fails before any data is read.
"""

from __future__ import annotations

import difflib
import functools
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from distmerge.config import IGNORED_PARAMETERS, MAX_LIST_ENTRIES, MergeConfig
from distmerge.dtypes import SAFETENSORS_TO_TORCH, TORCH_NAME
from distmerge.errors import ConfigError, shown
from distmerge.methods.base import MergeMethod, ParamSpec, TensorParams

log = logging.getLogger(__name__)


Scope = tuple[str, Mapping[str, Any]]  # (where in the config, its parameters)


@dataclass(frozen=True)
class ExpertScope:
    """One merged input of a tensor: where it is configured, its model, the parameter scopes that
    apply to it from highest precedence down, and its own tensor's name (filters match it)."""

    where: str
    model: str
    scopes: tuple[Scope, ...]
    input_name: str


def _resolve(key: str, spec: ParamSpec, scopes: tuple[Scope, ...], tensor: str, t: float) -> tuple[Any, str | None]:
    """The first scope's value that applies (mergekit: a filter list with no match passes on)."""
    for where, values in scopes:
        if key in values:
            value = resolve_value(values[key], tensor, t, f"{where}.{key}", spec.read)
            if value is not None:
                return value, f"{where}.{key}"
    return None, None


def resolve_parameters(method: MergeMethod, shared: tuple[Scope, ...], experts: list[ExpertScope], tensor: str,
                       t: float, compute_dtype: str) -> TensorParams:
    """Global and per-model parameters of ``tensor`` at layer position ``t``, validated."""
    global_values: dict[str, Any] = {}
    for key, spec in method.global_parameters.items():
        value, where = _resolve(key, spec, shared, tensor, t)
        if value is None and spec.default is None:
            raise ConfigError(f"parameters.{key}: required by {method.name}, and no value applies to tensor {tensor} "
                              f"(add parameters: {{{key}: ...}}, or an entry without a filter)")
        global_values[key] = spec.validate(spec.default if value is None else value,
                                           f"{where or 'default'} (tensor {tensor})")
    expert_values = []
    for expert in experts:
        values = {}
        for key, spec in method.model_parameters.items():
            value, where = _resolve(key, spec, expert.scopes, expert.input_name, t)
            if value is None:
                if spec.default is None and expert.where == "base_model":
                    raise ConfigError(f"base_model ({expert.model}): {method.name} merges the base model as one more "
                                      f"input (as mergekit 0.1.5 does), and it has no {key!r}; give one in the global "
                                      f"parameters, list the base under models with its {key}, or drop base_model")
                if spec.default is None:
                    raise ConfigError(f"{expert.where} ({expert.model}): parameter {key!r} is required and has no "
                                      f"value for tensor {expert.input_name}")
                value = spec.default
            values[key] = spec.validate(value, f"{where or 'default'} of {expert.model} (tensor {expert.input_name})")
        expert_values.append(values)
    params = TensorParams(global_values, tuple(expert_values))
    method.validate(params, f"tensor {tensor}", [expert.where for expert in experts])
    _check_representable(params, compute_dtype, experts, tensor)
    return params


@functools.lru_cache(maxsize=4096)
def _finite_in(value: float, dtype: str) -> bool:
    return bool(torch.isfinite(torch.tensor(value, dtype=SAFETENSORS_TO_TORCH[dtype])))


def _check_representable(params: TensorParams, compute: str, experts: list[ExpertScope], tensor: str) -> None:
    """Refuse a parameter the compute dtype rounds to infinity (a weight of 1e5 in float16)
    at plan time, instead of a merge of infinities discovered after the whole run."""
    places = [("parameters", params.global_)]
    places += [(f"{expert.where}.parameters", values) for expert, values in zip(experts, params.experts, strict=True)]
    for where, values in places:
        for key, value in values.items():
            if isinstance(value, float) and not _finite_in(value, compute):
                raise ConfigError(f"{where}.{key} (tensor {tensor}): {value!r} overflows the compute dtype "
                                  f"{TORCH_NAME.get(compute, compute)}; use a smaller value or dtype: float32")


def check_parameter_names(config: MergeConfig, method: MergeMethod) -> list[str]:
    """Warn (as mergekit accepts and ignores them) about parameters the method does not use;
    returns the warnings, one per key and place."""
    model_keys = set(method.model_parameters)
    global_keys = set(method.global_parameters) | model_keys | IGNORED_PARAMETERS
    places: list[tuple[str, Mapping[str, Any], set[str]]] = [("parameters", config.parameters, global_keys)]
    places += [(f"models[{i}]", e.parameters, model_keys | IGNORED_PARAMETERS) for i, e in enumerate(config.models or ())]
    for s, out_slice in enumerate(config.slices or ()):
        places.append((f"slices[{s}].parameters", out_slice.parameters, global_keys))
        places += [(f"slices[{s}].sources[{j}]", src.parameters, model_keys | IGNORED_PARAMETERS)
                   for j, src in enumerate(out_slice.sources)]
    warnings = []
    for where, values, allowed in places:
        for key in values:
            if key not in allowed:
                hint = difflib.get_close_matches(key, sorted(allowed - IGNORED_PARAMETERS), 1)
                warnings.append(f"{where}: parameter {key!r} is not used by {method.name} and is ignored (as mergekit "
                                f"does){f'; did you mean {hint[0]!r}?' if hint else ''} (it uses: "
                                f"{', '.join(sorted(allowed - IGNORED_PARAMETERS)) or 'none here'})")
    for warning in warnings:
        log.warning("%s", warning)
    return warnings


def resolve_value(value: Any, tensor: str, t: float, where: str, read: Callable[[Any, str], Any]) -> Any:
    """Resolve a parameter value (scalar, gradient or filter list) for one tensor; a single
    ``{filter, value}`` mapping is a one-entry list (mergekit's ``ConditionalParameter``).

    As in mergekit 0.1.5, a list's scalars are first ``read`` as the parameter's kind (for a
    number, ``"0.2"`` is 0.2 and ``true`` 1.0): a list that is then all numbers is a gradient,
    interpolated at ``t``; any other list selects its entry at ``int(t * (len - 1))``."""
    if isinstance(value, dict) and "value" in value:
        value = [value]
    if isinstance(value, list):
        if not value:
            return None  # as in mergekit: not set here, the next scope's value or the default applies
        if len(value) > MAX_LIST_ENTRIES:
            raise ConfigError(f"{where}: a list of {len(value)} entries; at most {MAX_LIST_ENTRIES} (a gradient or "
                              "filter list that long is a mistake)")
        if all(isinstance(v, dict) for v in value):
            # mergekit's rule: entries in list order, the first that matches wins.
            for entry in value:
                unknown = set(entry) - {"filter", "value"}
                if unknown or "value" not in entry:
                    raise ConfigError(f"{where}: filter entries take keys 'filter' and 'value', got {sorted(map(str, entry))}")
                flt = entry.get("filter")
                if flt is not None and not isinstance(flt, str):
                    raise ConfigError(f"{where}: filter {shown(flt, 40)} is a {type(flt).__name__} (a number or list); a filter is a "
                                      "string matched against tensor names (quote it: filter: \"1\")")
            for entry in value:
                flt = entry.get("filter")
                if flt is None or flt == "*" or flt in tensor:
                    return resolve_value(entry["value"], tensor, t, where, read)
            return None
        if all(isinstance(v, (int, float, bool, str)) for v in value):
            points = [read(v, f"{where}[{i}]") for i, v in enumerate(value)]
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in points):
                return points[int(t * (len(points) - 1))]  # booleans and strings select
            if len(points) == 1:
                return float(points[0])
            x = t * (len(points) - 1)
            i = min(int(math.floor(x)), len(points) - 2)
            frac = x - i
            return float(points[i]) * (1 - frac) + float(points[i + 1]) * frac
        raise ConfigError(f"{where}: a list must be all numbers (a gradient), all {{filter, value}} entries "
                          "or all scalars")
    if isinstance(value, dict):
        raise ConfigError(f"{where}: expected a number, a gradient list, a {{filter, value}} entry or a list of "
                          f"them, got a mapping with keys {sorted(map(str, value))}")
    return read(value, where)
