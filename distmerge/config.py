"""The merge configuration: mergekit's YAML schema plus distmerge's ``aim:`` and ``execution:``.

A mergekit 0.1.5 file runs unchanged: ``merge_method``, ``base_model``, ``models`` or
``slices`` (layer ranges of source models, see :mod:`distmerge.slices`), ``parameters``,
``dtype``, ``out_dtype``, ``tokenizer_source`` or the ``tokenizer:`` block, ``chat_template``.
Parameter values take mergekit's three forms, resolved per tensor by
:func:`distmerge.parameters.resolve_value`:

- a scalar;
- a list of numbers, a gradient over decoder layers: layer ``i`` of a slice of ``n`` layers
  takes ``t = i / (n - 1)`` (``t = 1`` when ``n == 1``; tensors outside the decoder layers take
  ``t = 0``) and the value is interpolated linearly at ``t * (len - 1)``;
- a list of ``{filter, value}`` entries, tried in list order: the first that matches wins, and
  an entry matches when it has no filter, when its filter is ``"*"`` or when its filter is a
  substring of the tensor name (mergekit's rule: an unfiltered entry listed first wins for
  every tensor).

Longer than 300 lines because it is the whole schema in one place (mergekit's keys, the
tokenizer block, ``aim:`` and ``execution:``) with the error formatting that names each key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)

from distmerge.dtypes import config_dtype
from distmerge.errors import ConfigError, shown
from distmerge.io.structured import check_bounded, read_yaml
from distmerge.sizes import parse_size
from distmerge.vocab.config import TokenizerConfig, tokenizer_settings

# Parameters mergekit accepts that change nothing here (memory tricks of a single-process merge).
IGNORED_PARAMETERS = {"int8_mask"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _plain_path(value: str | None) -> str | None:
    """A path a config names: no NUL byte (the system refuses it) and a sane length."""
    if value is not None and ("\0" in value or len(value) > 4096):
        raise ValueError("not a usable path (a NUL byte, or longer than 4096 characters)")
    return value


# Upper bounds on counts a config can ask for: generous for any real merge, and small enough
# that a typo (or a hostile file) is refused at load time instead of costing hours or all memory.
MAX_SEED = 2**63 - 1
MAX_WORKERS = 100_000
MAX_CALIBRATION_SAMPLES = 10_000_000
MAX_BLOCK_SIZE = 1 << 20
MAX_LIST_ENTRIES = 4096


class ModelEntry(_Strict):
    model: str
    parameters: dict[str, Any] = Field(default_factory=dict)

    @field_validator("model")
    @classmethod
    def _model_path(cls, v: str) -> str:
        return _plain_path(v) or v

    @field_validator("parameters", mode="before")
    @classmethod
    def _none_is_empty(cls, v: Any) -> Any:
        return {} if v is None else v  # mergekit writes ``parameters:`` with nothing under it


class SliceSource(ModelEntry):
    """Layers ``[start, end)`` of one model, an input of an output slice."""

    layer_range: tuple[int, int]

    @field_validator("layer_range")
    @classmethod
    def _range(cls, v: tuple[int, int]) -> tuple[int, int]:
        if not 0 <= v[0] <= v[1]:
            raise ValueError(f"layer_range [{v[0]}, {v[1]}] is not [start, end) with 0 <= start <= end")
        return v


class OutputSlice(_Strict):
    """A run of output layers: the same number of layers from each source, merged."""

    sources: list[SliceSource] = Field(min_length=1)
    base_model: str | None = None
    residual_weight: float | None = None  # in mergekit's schema, unused by mergekit 0.1.5 too
    parameters: dict[str, Any] = Field(default_factory=dict)

    @field_validator("parameters", mode="before")
    @classmethod
    def _none_is_empty(cls, v: Any) -> Any:
        return {} if v is None else v

    @field_validator("base_model")
    @classmethod
    def _base_path(cls, v: str | None) -> str | None:
        return _plain_path(v)


class CalibrationConfig(_Strict):
    dataset: str = "builtin"
    text_field: str = "text"

    @field_validator("dataset")
    @classmethod
    def _dataset_path(cls, v: str) -> str:
        return _plain_path(v) or v
    # Strict: a YAML `true` or `2.5` is a mistake to point at, not a count (lax ints take them).
    n_samples: StrictInt = Field(256, ge=1, le=MAX_CALIBRATION_SAMPLES)
    block_size: StrictInt = Field(512, ge=2, le=MAX_BLOCK_SIZE)
    seed: StrictInt = Field(42, ge=0, le=MAX_SEED)


class AimConfig(_Strict):
    omega: float = Field(0.4, ge=0.0, le=1.0)
    # "uniform" is the ablation control: each module's factors replaced by their mean, so the
    # delta shrinks by as much overall as with AIM but without the per-channel information.
    relaxation: Literal["activation", "uniform"] = "activation"
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    stats: str | None = None
    stages: int | Literal["auto"] = "auto"
    # None: each stage as large as the node it runs on allows (planned from Ray's per-node
    # memory); a size caps every stage's weights and activations (more, smaller stages).
    stage_memory: int | None = None
    micro_batch_size: StrictInt = Field(4, ge=1, le=65536)

    @field_validator("stats")
    @classmethod
    def _stats_path(cls, v: str | None) -> str | None:
        return _plain_path(v)

    @field_validator("stages", mode="before")
    @classmethod
    def _positive_stages(cls, v: Any) -> Any:
        if v != "auto" and (isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 4096):
            raise ValueError("must be 'auto' or an integer from 1 to 4096")
        return v

    @field_validator("stage_memory", mode="before")
    @classmethod
    def _size(cls, v: Any) -> int | None:
        return None if v is None else parse_size(v, "aim.stage_memory")


EXECUTORS = ("auto", "local", "ray")


class ExecutionConfig(_Strict):
    shard_size: int = 256 * 1000**2
    max_file_size: int = 5 * 1000**3
    workers: int | None = Field(None, ge=1, le=MAX_WORKERS)
    seed: int = Field(0, ge=0, le=MAX_SEED)
    allow_nonfinite: bool = False
    # How much of its output a merge reads back before writing the index: "sample" (the layout,
    # every header, a sample of the checksummed ranges, the workers' NaN/Inf counts), "full"
    # (every byte, as `distmerge verify`), "layout" (no tensor data). true/false: full/layout.
    verify: Literal["sample", "full", "layout"] = "sample"
    # Who runs the batches: "local" (threads of this process, starts at once), "ray" (Ray tasks:
    # an embedded Ray, or the cluster named by --ray-address / RAY_ADDRESS), "auto": Ray when an
    # address is given, Ray already runs here or AIM calibrates in several stages; local otherwise
    # (engine.executors; a one-stage calibration then runs in this process: aim.in_process).
    executor: Literal["auto", "local", "ray"] = "auto"

    @field_validator("verify", mode="before")
    @classmethod
    def _verify(cls, v: Any) -> Any:
        if isinstance(v, bool):
            return "full" if v else "layout"
        if v not in ("sample", "full", "layout"):
            raise ValueError(f"{v!r} is not one of sample, full, layout (or true/false)")
        return v

    @field_validator("shard_size", "max_file_size", mode="before")
    @classmethod
    def _size(cls, v: Any, info: Any) -> int:
        return parse_size(v, f"execution.{info.field_name}")


class MergeConfig(_Strict):
    merge_method: str
    base_model: str | None = None
    models: list[ModelEntry] | None = None
    slices: list[OutputSlice] | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    tokenizer: TokenizerConfig | None = None
    chat_template: str | None = None
    aim: AimConfig | None = None
    execution: ExecutionConfig = Field(default_factory=ExecutionConfig)

    @field_validator("parameters", mode="before")
    @classmethod
    def _none_is_empty(cls, v: Any) -> Any:
        return {} if v is None else v

    @model_validator(mode="after")
    def _inputs(self) -> MergeConfig:
        if (self.models is None) == (self.slices is None):
            raise ValueError("give exactly one of 'models' (whole models) or 'slices' (layer ranges)")
        if self.models is not None and not self.models:
            raise ValueError("models: the list is empty; name at least one model")
        if self.slices is not None and not self.slices:
            raise ValueError("slices: the list is empty; give at least one slice")
        if self.tokenizer_source is not None and self.tokenizer is not None:
            raise ValueError("give tokenizer_source or a tokenizer: block, not both")
        return self

    def referenced_models(self) -> list[str]:
        """Every model path the config names (base, models or slice sources), first mention first."""
        seen: dict[str, None] = {}
        if self.base_model:
            seen[self.base_model] = None
        for entry in self.models or ():
            seen.setdefault(entry.model, None)
        for out_slice in self.slices or ():
            if out_slice.base_model:
                seen.setdefault(out_slice.base_model, None)
            for source in out_slice.sources:
                seen.setdefault(source.model, None)
        return list(seen)

    @property
    def vocabulary_source(self) -> str | None:
        """Where the output vocabulary comes from: ``tokenizer.source`` or ``tokenizer_source``."""
        return self.tokenizer.source if self.tokenizer is not None else self.tokenizer_source

    @property
    def tokenizer_settings(self) -> TokenizerConfig | None:
        """The vocabulary to build (mergekit builds one whenever either key is given), or None:
        the output takes the template's tokenizer files unchanged."""
        return tokenizer_settings(self.tokenizer_source, self.tokenizer)

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
        return _plain_path(v)

    @property
    def compute_dtype(self) -> str:
        """Safetensors code of the dtype merges are computed in (float32 unless ``dtype`` says)."""
        return config_dtype(self.dtype, "dtype") if self.dtype else "F32"

    def out_dtype_code(self, result: str) -> str:
        """Output dtype of a merged tensor whose method returns ``result`` (the compute dtype,
        or what the method's arithmetic promotes it to): out_dtype, else ``result``, as
        mergekit writes what the method returns."""
        if self.out_dtype:
            return config_dtype(self.out_dtype, "out_dtype")
        return result


def _key_path(loc: tuple[Any, ...]) -> str:
    """A pydantic error location as distmerge's messages name keys: ``models[0].parameters``."""
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or "(top level)"


def _format_validation_error(error: ValidationError, source: str) -> str:
    """One line for one problem (``source: invalid merge config: key: why``), else a line each."""
    lines = []
    for item in error.errors():
        loc = _key_path(item["loc"])
        msg = item["msg"]
        if item["type"] == "extra_forbidden":
            parent = item["loc"][:-1]
            allowed = _allowed_keys(parent)
            msg = f"unknown key; allowed keys here: {', '.join(allowed)}"
        elif item["type"] == "missing":
            msg = "required key is missing"
        if item["type"] == "value_error":
            msg = msg.removeprefix("Value error, ")
        quiet = item["type"] in ("missing", "extra_forbidden") or not item["loc"]  # top level: not the whole file
        lines.append(f"{loc}: {msg}" + ("" if quiet else f" (got {shown(item['input'])})"))
    if len(lines) == 1:
        return f"{source}: invalid merge config: {lines[0]}"
    return "\n  ".join([f"{source}: invalid merge config ({len(lines)} problems)", *lines])


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation holds (``list[X] | None`` holds X, dict values too)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in getattr(annotation, "__args__", ()) for m in _models_in(arg)]


def _allowed_keys(parent: tuple[Any, ...]) -> list[str]:
    model: type[BaseModel] = MergeConfig
    for part in parent:
        if isinstance(part, int) or str(part) not in model.model_fields:
            continue  # a list index, a dict key, or pydantic's name of a union member
        candidates = _models_in(model.model_fields[str(part)].annotation)
        if not candidates:
            return []
        model = candidates[0]
    return sorted(model.model_fields)


def parse_config(data: Any, source: str = "config") -> MergeConfig:
    """Validate a config mapping; errors name the key and the allowed values."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of keys (merge_method, models, ...), got {type(data).__name__}")
    check_bounded(data, source, ConfigError)
    if "modules" in data:
        raise ConfigError(f"{source}: modules: (mergekit's per-module merges of multi-module models such as "
                          "vision-language ones) is not supported yet; merge with models: or slices:")
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
