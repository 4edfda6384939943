"""A PEFT LoRA adapter as a model input: ``model: MODEL+ADAPTER`` (mergekit 0.1.5's syntax).

mergekit merges the adapter into a full copy of the model with PEFT (``merge_and_unload``) and
merges that copy. distmerge never writes that copy: opening ``MODEL+ADAPTER`` gives the model's
checkpoint with every adapted tensor replaced by a :class:`LoraTensorInfo` (the model tensor's
location plus the adapter's A and B factors, the scale and the kind), and the workers form the
adapted rows a row range at a time (:mod:`distmerge.lora.rows`). Only the adapter's header and
``adapter_config.json`` are read here; what PEFT cannot merge as plain LoRA is refused, naming
the file and the key.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distmerge.checkpoint import Checkpoint
from distmerge.errors import CheckpointError, shown
from distmerge.io.files import check_inside
from distmerge.io.safetensors import TensorInfo, parse_safetensors_header
from distmerge.io.structured import json_kind, read_json

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
LINEAR, EMBEDDING, FAN_IN_FAN_OUT = "linear", "embedding", "fan_in_fan_out"
FACTORS = {".lora_A.weight": (LINEAR, "A"), ".lora_B.weight": (LINEAR, "B"),
           ".lora_embedding_A": (EMBEDDING, "A"), ".lora_embedding_B": (EMBEDDING, "B")}
ADAPTED_DTYPES = ("F32", "BF16", "F16")  # PEFT upcasts these adapters to float32 on CPU
# Settings whose non-default value changes what merging means; refused rather than merged wrong.
REFUSED = {"use_dora": "DoRA (use_dora) rescales each column by a magnitude vector",
           "layer_replication": "layer_replication duplicates layers", "use_qalora": "QA-LoRA pools inputs",
           "target_parameters": "target_parameters adapts raw parameters (MoE experts)",
           "trainable_token_indices": "trainable_token_indices trains single embedding rows",
           "alora_invocation_tokens": "activated LoRA (aLoRA) applies only after invocation tokens"}
MAX_ADAPTER_CONFIG_BYTES = 1000**2
# Models whose projections are transformers' Conv1D (weight stored in x out). PEFT decides
# fan_in_fan_out by the layer's type, not by the config (it resets the flag with a warning), so
# distmerge decides by the model's type too.
CONV1D_MODEL_TYPES = ("gpt2", "openai-gpt")


@dataclass(frozen=True)
class LoraTensorInfo(TensorInfo):
    """A model tensor with a LoRA delta: name, file, dtype and offsets are the model tensor's.

    ``kind`` is ``linear`` (W is out x in; delta = scale * B @ A), ``fan_in_fan_out`` (W stored
    in x out: the delta transposed) or ``embedding`` (W is vocab x dim; delta = scale * (B @ A).T,
    rounded to W's dtype before it is added, as PEFT's ``Embedding.merge`` does).
    """

    lora_a: TensorInfo
    lora_b: TensorInfo
    scale: float
    kind: str
    adapter: str

    def identity(self) -> list[Any]:
        """What a run's fingerprint records of the adapter part (the factors' places, scale, kind)."""
        return [self.kind, repr(self.scale), *([Path(t.file).name, t.dtype, list(t.shape), t.offset]
                                               for t in (self.lora_a, self.lora_b))]


@dataclass
class LoraCheckpoint(Checkpoint):
    """``MODEL+ADAPTER``: the model's checkpoint with the adapted tensors substituted."""

    adapter: Path = Path()
    adapter_files: tuple[Path, ...] = ()
    order: tuple[str, ...] = ()  # the model's storage order (a modules_to_save tensor keeps its place)

    @property
    def label(self) -> str:
        return f"{super().label}+{self.adapter}"

    def ordered_names(self) -> list[str]:
        return list(self.order)

    def files_read(self) -> list[str]:
        return sorted({*super().files_read(), *map(str, self.adapter_files)})


def split_reference(reference: str) -> tuple[str, str | None]:
    """``(model, adapter)`` of a model reference; adapter None when there is none.

    mergekit's rule: split on ``+`` into at most two parts. A reference that is itself an
    existing path (a folder whose name contains ``+``) is a plain model, as is one with no ``+``.
    """
    if "+" not in reference or os.path.exists(reference):
        return reference, None
    splits = [k for k, c in enumerate(reference) if c == "+"]
    if len(splits) > 1:  # a '+' inside a path: the first split whose model part is an existing folder
        splits = [k for k in splits if os.path.isdir(reference[:k])]
        if not splits:
            raise CheckpointError(f"{reference}: cannot tell the model from the adapter (more than one '+', and no "
                                  "part before a '+' is an existing folder); write MODEL+ADAPTER")
    model, adapter = reference[:splits[0]], reference[splits[0] + 1:]
    if not model or not adapter:
        raise CheckpointError(f"{reference}: expected MODEL+ADAPTER (a model folder, '+', a PEFT LoRA adapter folder)")
    return model, adapter


def open_model(reference: str, role: str = "model") -> Checkpoint:
    """Open a model reference: a folder, or ``MODEL+ADAPTER`` with the adapter applied."""
    model, adapter = split_reference(reference)
    ckpt = Checkpoint.open(model, role)
    if adapter is None:
        return ckpt
    try:
        return _apply(ckpt, Path(adapter), f"{role} {reference}")
    except OSError as e:
        raise CheckpointError(f"{role} {reference}: adapter {adapter}: {e.strerror or e}") from None


def _apply(ckpt: Checkpoint, folder: Path, where: str) -> LoraCheckpoint:
    if not folder.is_dir():
        what = "does not exist" if not folder.exists() else "is not a folder"
        raise CheckpointError(f"{where}: adapter folder {folder} {what}; expected a PEFT LoRA adapter folder "
                              f"({ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    config_path, weights_path = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    for path in (config_path, weights_path):
        if not path.is_file():
            hint = " (pickle adapters, adapter_model.bin, are not read: save with safe_serialization)" \
                if path == weights_path and (folder / "adapter_model.bin").exists() else ""
            raise CheckpointError(f"{where}: {path} is missing; a PEFT LoRA adapter folder holds "
                                  f"{ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}{hint}")
    config = read_json(check_inside(config_path, folder, ADAPTER_CONFIG, CheckpointError, "adapter folder"),
                       ADAPTER_CONFIG, CheckpointError, limit=MAX_ADAPTER_CONFIG_BYTES)
    settings = _settings(config, config_path)
    factors, tensors = parse_safetensors_header(check_inside(weights_path, folder, ADAPTER_WEIGHTS, CheckpointError,
                                                             "adapter folder"))[0], dict(ckpt.tensors)
    pairs: dict[str, dict[str, TensorInfo]] = {}
    for key, info in factors.items():
        target, kind, role = _classify(key, info, weights_path, settings, ckpt)
        if role == "replace":
            tensors[target] = info
            continue
        pairs.setdefault(target, {"kind": kind})[role] = info  # type: ignore[assignment]
    for target, pair in sorted(pairs.items()):
        tensors[target] = _adapted(ckpt.tensors[target], pair, settings, weights_path, str(folder))
    return LoraCheckpoint(ckpt.path, ckpt.config, tensors, ckpt.source, adapter=folder,
                          adapter_files=(config_path.resolve(), weights_path.resolve()),
                          order=tuple(ckpt.ordered_names()))


def _settings(config: Any, path: Path) -> dict[str, Any]:
    """The adapter_config.json settings the merge uses, checked."""
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {json_kind(config)}")
    if config.get("peft_type") != "LORA":
        raise CheckpointError(f"{path}: peft_type is {shown(config.get('peft_type'))}; only LoRA adapters "
                              "(peft_type LORA) can be merged into a model")
    for key, why in REFUSED.items():
        if config.get(key) not in (None, False, [], {}, ""):
            raise CheckpointError(f"{path}: {key} is {shown(config.get(key))}: {why}, which distmerge does not "
                                  "merge; merge the adapter with PEFT first, or use a plain LoRA adapter")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        raise CheckpointError(f"{path}: bias is {shown(config.get('bias'))} (lora_bias {shown(config.get('lora_bias'))});"
                              " adapters that train biases are not supported (bias must be 'none')")
    init = config.get("init_lora_weights", True)
    if init not in (True, False, "gaussian", "orthogonal", "eva"):
        raise CheckpointError(f"{path}: init_lora_weights is {shown(init)}, which changes the base weights when "
                              "PEFT loads the adapter; convert it to a plain LoRA adapter first")
    settings = {"r": config.get("r"), "lora_alpha": config.get("lora_alpha"),
                "rank_pattern": config.get("rank_pattern") or {}, "alpha_pattern": config.get("alpha_pattern") or {},
                "use_rslora": config.get("use_rslora", False),
                "modules_to_save": config.get("modules_to_save") or []}
    number = (int, float)
    checks = [("r", isinstance(settings["r"], int) and not isinstance(settings["r"], bool) and settings["r"] > 0),
              ("lora_alpha", isinstance(settings["lora_alpha"], number) and not isinstance(settings["lora_alpha"], bool)
               and math.isfinite(settings["lora_alpha"])),
              ("rank_pattern", isinstance(settings["rank_pattern"], dict) and all(
                  isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in settings["rank_pattern"].values())),
              ("alpha_pattern", isinstance(settings["alpha_pattern"], dict) and all(
                  isinstance(v, number) and not isinstance(v, bool) and math.isfinite(v)
                  for v in settings["alpha_pattern"].values())),
              ("use_rslora", isinstance(settings["use_rslora"], bool)),
              ("modules_to_save", isinstance(settings["modules_to_save"], list)
               and all(isinstance(m, str) for m in settings["modules_to_save"]))]
    for key, ok in checks:
        if not ok:
            raise CheckpointError(f"{path}: {key} is {shown(config.get(key))}, not a valid LoRA setting")
    return settings


def _classify(key: str, info: TensorInfo, path: Path, settings: dict[str, Any],
              ckpt: Checkpoint) -> tuple[str, str, str]:
    """``(model tensor, kind, role)`` of an adapter key; role is A, B or replace (modules_to_save)."""
    if not key.startswith(PREFIX):
        raise CheckpointError(f"{path}: tensor {key!r} is not a PEFT adapter key (no {PREFIX!r} prefix)")
    name = key[len(PREFIX):]
    for suffix, (kind, role) in FACTORS.items():
        if name.endswith(suffix):
            target = name[: -len(suffix)] + ".weight"
            if target not in ckpt.tensors:
                raise CheckpointError(f"{path}: tensor {key!r} adapts {target!r}, which the model {ckpt.path} does "
                                      "not have; is this an adapter for another model?")
            if kind == LINEAR and ckpt.config.get("model_type") in CONV1D_MODEL_TYPES:
                kind = FAN_IN_FAN_OUT
            return target, kind, role
    if "lora_magnitude_vector" in name:
        raise CheckpointError(f"{path}: tensor {key!r} is a DoRA magnitude vector; DoRA is not supported")
    if ".lora_" in name:
        raise CheckpointError(f"{path}: tensor {key!r} is not a LoRA weight distmerge merges (bias or an unknown "
                              "LoRA variant)")
    module = name.rpartition(".")[0]
    if name in ckpt.tensors and any(module == m or module.endswith("." + m) for m in settings["modules_to_save"]):
        model, replacement = ckpt.tensors[name], info
        if (replacement.shape, replacement.dtype) != (model.shape, model.dtype):
            raise CheckpointError(f"{path}: tensor {key!r} (modules_to_save) is {replacement.dtype} "
                                  f"{list(replacement.shape)} but the model's {name!r} is {model.dtype} "
                                  f"{list(model.shape)}; is this an adapter for another model?")
        return name, "", "replace"
    raise CheckpointError(f"{path}: tensor {key!r} is neither a LoRA factor nor a tensor of a module in "
                          f"modules_to_save {settings['modules_to_save']} that the model {ckpt.path} has")


def _pattern(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's ``get_pattern_key``: the first pattern that matches the end of the module name."""
    for key, value in patterns.items():
        try:
            if re.match(rf"(.*\.)?({key})$", module):
                return value
        except re.error:
            continue
    return default


def _adapted(model: TensorInfo, pair: dict[str, Any], settings: dict[str, Any], path: Path,
             adapter: str) -> LoraTensorInfo:
    """The model tensor with its factors, after PEFT's checks (rank, shapes, dtypes)."""
    kind = pair["kind"]
    where = f"{path}: {model.name!r}"
    if "A" not in pair or "B" not in pair:
        raise CheckpointError(f"{where}: has lora_{'B' if 'A' in pair else 'A'} but no lora_{'A' if 'A' in pair else 'B'};"
                              " the adapter file is incomplete")
    a, b = pair["A"], pair["B"]
    module = model.name.removesuffix(".weight")
    rank = _pattern(settings["rank_pattern"], module, settings["r"])
    alpha = _pattern(settings["alpha_pattern"], module, settings["lora_alpha"])
    rows, cols = (model.shape + (0, 0))[:2]
    expected = {LINEAR: ((rank, cols), (rows, rank)), FAN_IN_FAN_OUT: ((rank, rows), (cols, rank)),
                EMBEDDING: ((rank, rows), (cols, rank))}[kind]
    if len(model.shape) != 2 or (a.shape, b.shape) != expected:
        raise CheckpointError(f"{where}: the adapter's A {list(a.shape)} and B {list(b.shape)} do not fit the model's "
                              f"{list(model.shape)} at rank {rank} (expected {list(expected[0])} and "
                              f"{list(expected[1])}); is this an adapter for another model?")
    for info, what in ((model, "the model tensor"), (a, "lora A"), (b, "lora B")):
        if info.dtype not in ADAPTED_DTYPES:
            raise CheckpointError(f"{where}: {what} is {info.dtype}; LoRA merging supports "
                                  f"{', '.join(ADAPTED_DTYPES)} weights")
    scale = alpha / math.sqrt(rank) if settings["use_rslora"] else alpha / rank
    return LoraTensorInfo(model.name, model.file, model.dtype, model.shape, model.offset, model.nbytes,
                          a, b, scale, kind, adapter)
