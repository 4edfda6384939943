"""The merge configuration: mergekit's YAML schema plus distmerge's ``aim:`` and ``execution:``.

A mergekit user's file runs unchanged for the common case (``merge_method``, ``base_model``,
``models``, ``parameters``, ``dtype``, ``out_dtype``, ``tokenizer_source``). Parameter values
take mergekit's three forms, resolved per tensor by :func:`resolve_value`:

- a scalar;
- a list of numbers, a gradient over decoder layers: layer ``i`` of ``L`` takes
  ``t = i / (L - 1)`` (tensors outside the decoder layers take ``t = 0``) and the value is
  interpolated linearly at ``t * (len - 1)``;
- a list of ``{filter, value}`` entries: the first whose filter is a substring of the tensor
  name wins, an entry without a filter is the fallback.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from distmerge.dtypes import config_dtype
from distmerge.errors import ConfigError, shown
from distmerge.io.structured import check_bounded, read_yaml
from distmerge.sizes import parse_size

LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d{1,9})\.")
# Parameters mergekit accepts that change nothing here (memory tricks of a single-process merge).
IGNORED_PARAMETERS = {"int8_mask"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _plain_path(value: str | None) -> str | None:
    """A path a config names: no NUL byte (the system refuses it) and a sane length."""
    if value is not None and ("\0" in value or len(value) > 4096):
        raise ValueError("not a usable path (a NUL byte, or longer than 4096 characters)")
    return value


class ModelEntry(_Strict):
    model: str
    parameters: dict[str, Any] = Field(default_factory=dict)

    @field_validator("model")
    @classmethod
    def _model_path(cls, v: str) -> str:
        return _plain_path(v) or v


# Upper bounds on counts a config can ask for: generous for any real merge, and small enough
# that a typo (or a hostile file) is refused at load time instead of costing hours or all memory.
MAX_SEED = 2**63 - 1
MAX_WORKERS = 100_000
MAX_CALIBRATION_SAMPLES = 10_000_000
MAX_BLOCK_SIZE = 1 << 20
MAX_LIST_ENTRIES = 4096


class CalibrationConfig(_Strict):
    dataset: str = "builtin"
    text_field: str = "text"

    @field_validator("dataset")
    @classmethod
    def _dataset_path(cls, v: str) -> str:
        return _plain_path(v) or v
    n_samples: int = Field(256, ge=1, le=MAX_CALIBRATION_SAMPLES)
    block_size: int = Field(512, ge=2, le=MAX_BLOCK_SIZE)
    seed: int = Field(42, ge=0, le=MAX_SEED)


class AimConfig(_Strict):
    omega: float = Field(0.4, ge=0.0, le=1.0)
    # "uniform" is the ablation control: each module's factors replaced by their mean, so the
    # delta shrinks by as much overall as with AIM but without the per-channel information.
    relaxation: Literal["activation", "uniform"] = "activation"
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    stats: str | None = None
    stages: int | Literal["auto"] = "auto"
    stage_memory: int = 2 * 1000**3
    micro_batch_size: int = Field(4, ge=1, le=65536)

    @field_validator("stats")
    @classmethod
    def _stats_path(cls, v: str | None) -> str | None:
        return _plain_path(v)

    @field_validator("stages")
    @classmethod
    def _positive_stages(cls, v: int | str) -> int | str:
        if isinstance(v, int) and not 1 <= v <= 4096:
            raise ValueError("stages must be 'auto' or an integer from 1 to 4096")
        return v

    @field_validator("stage_memory", mode="before")
    @classmethod
    def _size(cls, v: Any) -> int:
        return parse_size(v, "aim.stage_memory")


class ExecutionConfig(_Strict):
    shard_size: int = 256 * 1000**2
    max_file_size: int = 5 * 1000**3
    workers: int | None = Field(None, ge=1, le=MAX_WORKERS)
    seed: int = Field(0, ge=0, le=MAX_SEED)
    allow_nonfinite: bool = False
    verify: bool = True

    @field_validator("shard_size", "max_file_size", mode="before")
    @classmethod
    def _size(cls, v: Any, info: Any) -> int:
        return parse_size(v, f"execution.{info.field_name}")


class MergeConfig(_Strict):
    merge_method: str
    base_model: str | None = None
    models: list[ModelEntry] = Field(min_length=1)
    parameters: dict[str, Any] = Field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    aim: AimConfig | None = None
    execution: ExecutionConfig = Field(default_factory=ExecutionConfig)

    @field_validator("dtype", "out_dtype")
    @classmethod
    def _dtype(cls, v: str | None, info: Any) -> str | None:
        if v is not None:
            config_dtype(v, info.field_name)
        return v

    @field_validator("base_model")
    @classmethod
    def _base_path(cls, v: str | None) -> str | None:
        return _plain_path(v)

    @field_validator("tokenizer_source")
    @classmethod
    def _tokenizer_source(cls, v: str | None) -> str | None:
        _plain_path(v)
        if v == "union":
            raise ValueError("'union' (a merged vocabulary) is not supported; use 'base' or a model path")
        return v

    @property
    def compute_dtype(self) -> str:
        """Safetensors code of the dtype merges are computed in (float32 unless ``dtype`` says)."""
        return config_dtype(self.dtype, "dtype") if self.dtype else "F32"

    def out_dtype_code(self, stored: str) -> str:
        """Output dtype of a tensor stored as ``stored``: out_dtype, else dtype, else as stored."""
        if self.out_dtype:
            return config_dtype(self.out_dtype, "out_dtype")
        if self.dtype:
            return config_dtype(self.dtype, "dtype")
        return stored


def _format_validation_error(error: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid merge config"]
    for item in error.errors():
        loc = ".".join(str(p) for p in item["loc"]) or "(top level)"
        msg = item["msg"]
        if item["type"] == "extra_forbidden":
            parent = item["loc"][:-1]
            allowed = _allowed_keys(parent)
            msg = f"unknown key; allowed keys here: {', '.join(allowed)}"
        elif item["type"] == "missing":
            msg = "required key is missing"
        lines.append(f"  {loc}: {msg}" + (f" (got {shown(item['input'])})" if item["type"] not in ("missing", "extra_forbidden") else ""))
    return "\n".join(lines)


def _allowed_keys(parent: tuple[Any, ...]) -> list[str]:
    model: type[BaseModel] = MergeConfig
    for part in parent:
        if isinstance(part, int):
            continue
        annotation = model.model_fields[str(part)].annotation
        candidates = [a for a in getattr(annotation, "__args__", (annotation,)) if isinstance(a, type)]
        for cand in candidates:
            if issubclass(cand, BaseModel):
                model = cand
                break
        else:
            return []
    return sorted(model.model_fields)


def parse_config(data: Any, source: str = "config") -> MergeConfig:
    """Validate a config mapping; errors name the key and the allowed values."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of keys (merge_method, models, ...), got {type(data).__name__}")
    check_bounded(data, source, ConfigError)
    try:
        return MergeConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, source)) from None


def load_config(path: str | Path) -> MergeConfig:
    """Read a YAML config file; YAML syntax errors report the line and column."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: config file not found")
    return parse_config(read_yaml(path, "the merge config", ConfigError), str(path))


def layer_position(tensor: str, num_layers: int | None) -> float:
    """mergekit's gradient position t in [0, 1]: i / (L - 1) in decoder layer i, else 0."""
    match = LAYER_RE.search(tensor)
    if not match or not num_layers or num_layers <= 1:
        return 0.0
    return min(int(match.group(1)), num_layers - 1) / (num_layers - 1)


def resolve_value(value: Any, tensor: str, t: float, where: str) -> Any:
    """Resolve a parameter value (scalar, gradient or filter list) for one tensor.

    As mergekit 0.1.5: filter entries are tried in list order and the first that matches wins;
    an entry matches when it has no filter, when its filter is ``"*"``, or when its filter is a
    substring of the tensor name (so an unfiltered entry placed first wins for every tensor);
    a single ``{filter, value}`` mapping is a one-entry list.
    """
    if isinstance(value, dict) and "value" in value:
        value = [value]
    if isinstance(value, list):
        if not value:
            raise ConfigError(f"{where}: empty list; give a number, a gradient or {{filter, value}} entries")
        if len(value) > MAX_LIST_ENTRIES:
            raise ConfigError(f"{where}: a list of {len(value)} entries; at most {MAX_LIST_ENTRIES} (a gradient or "
                              "filter list that long is a mistake)")
        if all(isinstance(v, dict) for v in value):
            for entry in value:
                unknown = set(entry) - {"filter", "value"}
                if unknown or "value" not in entry:
                    raise ConfigError(f"{where}: filter entries take keys 'filter' and 'value', got {sorted(entry)}")
                flt = entry.get("filter")
                if flt is not None and not isinstance(flt, str):
                    raise ConfigError(f"{where}: filter {shown(flt, 40)} is a {type(flt).__name__} (a number or list); a filter is a "
                                      "string matched against tensor names (quote it: filter: \"1\")")
                if flt is None or flt == "*" or flt in tensor:
                    return resolve_value(entry["value"], tensor, t, where)
            return None
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            if len(value) == 1:
                return float(value[0])
            x = t * (len(value) - 1)
            i = min(int(math.floor(x)), len(value) - 2)
            frac = x - i
            return float(value[i]) * (1 - frac) + float(value[i + 1]) * frac
        raise ConfigError(f"{where}: a list must be all numbers (a gradient) or all {{filter, value}} entries")
    if isinstance(value, dict):
        raise ConfigError(f"{where}: expected a number, a gradient list, a {{filter, value}} entry or a list of "
                          f"them, got a mapping with keys {sorted(value)}")
    return value
