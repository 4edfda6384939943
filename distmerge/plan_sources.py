"""Every output tensor's inputs: which tensor of which model, with what parameters.

The planner's first half. It opens each model named in the config once (headers only),
lays the config out as mergekit's output slices (:mod:`distmerge.slices`), and for every
output tensor finds each input's tensor (at that input's own layer), checks that shapes and
kinds agree, sets the base apart for methods that take one, and resolves the parameters with
mergekit's precedence (the input's own entry, its slice's, the global ``parameters``). A head
tied to the embedding stands in for an untied model's ``lm_head``, as mergekit reads it.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from distmerge.checkpoint import LAYER_COUNT_KEYS, Checkpoint
from distmerge.config import MergeConfig
from distmerge.dtypes import FLOAT_CODES, SAFETENSORS_TO_TORCH, TORCH_TO_SAFETENSORS, promoted
from distmerge.errors import CheckpointError, ConfigError
from distmerge.io.safetensors import TensorInfo
from distmerge.lora import open_model
from distmerge.methods.base import MergeMethod, TensorParams
from distmerge.parameters import ExpertScope, check_parameter_names, resolve_parameters
from distmerge.plan_vocabulary import PlannedVocabulary, plan_vocabulary, tensor_vocabulary
from distmerge.slices import (
    EMBEDDING_NAMES,
    HEAD_NAME,
    LayerLayout,
    OutputTensorSources,
    SliceGroup,
    layer_layout,
    model_key,
    output_tensors,
    slice_groups,
)
from distmerge.vocab import VocabularyRows

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SourcedTensor:
    """One output tensor and its inputs; ``params`` None: copied from ``experts[0]`` unchanged."""

    name: str
    shape: tuple[int, ...]
    out_dtype: str
    base: TensorInfo | None
    experts: tuple[TensorInfo, ...]
    params: TensorParams | None
    compute_dtype: str = ""  # what it is merged in: ``dtype``, else its inputs' dtypes promoted
    vocabulary: VocabularyRows | None = None  # a token-indexed tensor's row recipes
    vocabulary_models: tuple[int, ...] = ()  # per source (base first), its model in ``vocabulary``


@dataclass
class PlanSources:
    template: Checkpoint  # the model whose config.json the output's is made from
    base: Checkpoint | None
    experts: list[Checkpoint]  # every other model read, in order of first mention
    tensors: list[SourcedTensor]
    model_config: dict[str, Any]
    layers: int
    vocabulary: PlannedVocabulary | None = None


class _Models:
    """Each model folder opened once, with its decoder-layer layout."""

    def __init__(self) -> None:
        self.opened: dict[str, Checkpoint] = {}
        self.layouts: dict[str, LayerLayout | None] = {}

    def open(self, path: str, where: str) -> Checkpoint:
        key = model_key(path)
        if key not in self.opened:
            ckpt = open_model(path, where)
            self.opened[key] = ckpt
            self.layouts[key] = layer_layout(ckpt.ordered_names(), ckpt.num_layers)
        return self.opened[key]

    def layout(self, path: str) -> LayerLayout | None:
        return self.layouts[model_key(path)]

    def names(self, path: str) -> list[str]:
        return self.opened[model_key(path)].ordered_names()

    def layers(self, path: str, where: str) -> int:
        self.open(path, where)
        layout = self.layout(path)
        return layout.count if layout is not None else 0


def _same(a: str, b: str) -> bool:
    return a == b or model_key(a) == model_key(b)


def _roles(group: SliceGroup, config: MergeConfig, method: MergeMethod, needs_base: bool) -> tuple[int | None, list[int]]:
    """The slice's base input (None: the method gets no base rows) and its expert inputs,
    checked against the method."""
    base_path = group.base_model or config.base_model
    base = next((k for k, i in enumerate(group.inputs) if base_path and _same(i.model, base_path)), None)
    # mergekit's optional-base methods (nuslerp, multislerp, karcher) take it when there is one.
    takes_base = method.uses_base or (method.base_optional and base is not None)
    if method.uses_base or needs_base:
        if base_path is None:
            raise ConfigError(f"base_model: {method.name} needs a base model; add base_model: PATH")
        if base is None:
            raise ConfigError(f"{group.where}.sources: the base model {base_path} is not among this slice's sources; "
                              f"add it with the layer_range {method.name} should take its layers from")
    experts = [k for k in range(len(group.inputs)) if not (takes_base and k == base)]
    n = len(experts)
    if n < method.min_experts or (method.max_experts is not None and n > method.max_experts):
        most = "" if method.max_experts is None else f" and at most {method.max_experts}"
        besides = " besides the base" if method.uses_base else ""
        raise ConfigError(f"{group.where}: {method.name} takes at least {method.min_experts}{most} models{besides}; got {n}")
    return (base if takes_base or needs_base else None), experts


def _tensor(models: _Models, group: SliceGroup, k: int, name: str, lead: TensorInfo, token_rows: bool = False) -> TensorInfo:
    """Input ``k``'s tensor ``name``, checked against the lead's (but for its row count, when
    rows are tokens of a merged vocabulary); a tied head reads the embedding."""
    inp = group.inputs[k]
    ckpt = models.open(inp.model, inp.where)
    info = ckpt.tensors.get(name)
    if info is None and name == HEAD_NAME:
        info = next((ckpt.tensors[e] for e in EMBEDDING_NAMES if e in ckpt.tensors), None)
    if info is None:
        raise CheckpointError(f"{inp.where} {inp.model}: tensor {name!r} is missing (the slice's first model has "
                              f"{lead.name!r} with shape {list(lead.shape)}); the models must share an architecture")
    if info.shape[token_rows:] != lead.shape[token_rows:]:
        raise CheckpointError(f"{inp.where} {inp.model}: tensor {info.name!r} has shape {list(info.shape)} but "
                              f"{lead.file} has {list(lead.shape)} for {lead.name!r}; the models must share an "
                              "architecture and vocabulary (or set tokenizer_source to merge vocabularies)")
    if (info.dtype in FLOAT_CODES) != (lead.dtype in FLOAT_CODES):
        raise CheckpointError(f"{inp.where} {inp.model}: tensor {info.name!r} is {info.dtype} but {lead.file} "
                              f"has {lead.dtype}")
    return info


def _with_tied_head(out: list[OutputTensorSources], groups: list[SliceGroup], models: _Models) -> bool:
    """Add ``lm_head`` when the lead model ties it but another model of the last slice has one
    (mergekit merges it, reading tied models' embeddings); True when it was added."""
    if any(o.name == HEAD_NAME for o in out):
        return False
    last = groups[-1]
    if not any(HEAD_NAME in models.open(i.model, i.where).tensors for i in last.inputs):
        return False
    out.append(OutputTensorSources(HEAD_NAME, len(groups) - 1, tuple(HEAD_NAME for _ in last.inputs), 0.0))
    return True


def _result_code(method: MergeMethod, compute: str) -> str:
    """Safetensors code of what ``method`` returns when merging in ``compute`` (mergekit writes
    that dtype when no ``out_dtype`` is set)."""
    return TORCH_TO_SAFETENSORS[method.result_dtype(SAFETENSORS_TO_TORCH[compute])]


def plan_sources(config: MergeConfig, method: MergeMethod, *, needs_base: bool = False) -> PlanSources:
    """Open the models and resolve every output tensor's inputs and parameters."""
    check_parameter_names(config, method)
    for s, out_slice in enumerate(config.slices or ()):
        if out_slice.residual_weight is not None:
            log.warning("slices[%d].residual_weight is ignored (mergekit 0.1.5 reads it and does nothing with it)", s)
    models = _Models()
    if config.base_model:
        models.open(config.base_model, "base_model")
    groups = slice_groups(config, models.layers, _same)
    roles = [_roles(g, config, method, needs_base) for g in groups]
    outputs, layers = output_tensors(groups, models.names, models.layout)
    head_added = _with_tied_head(outputs, groups, models)
    vocabulary = plan_vocabulary(config, _template(config, groups, models).config,
                                 [models.open(m, m).tensors for m in config.referenced_models()])
    tensors = []
    for o in outputs:
        group = groups[o.group]
        base_k, expert_ks = roles[o.group]
        lead_inp = group.inputs[group.lead]
        lead_ckpt = models.open(lead_inp.model, lead_inp.where)
        lead = lead_ckpt.tensors.get(o.input_names[group.lead])
        if lead is None:  # a head the lead model ties: its embedding stands for it
            lead = _tensor(models, group, group.lead, o.input_names[group.lead],
                           next(lead_ckpt.tensors[e] for e in EMBEDDING_NAMES if e in lead_ckpt.tensors))
        token_rows = vocabulary is not None and o.name in vocabulary.names
        infos = [_tensor(models, group, k, o.input_names[k], lead, token_rows) for k in range(len(group.inputs))]
        if lead.dtype not in FLOAT_CODES:  # integer and bool buffers: copied from the lead model
            tensors.append(SourcedTensor(o.name, lead.shape, lead.dtype, None, (lead,), None))
            continue
        scopes = _shared_scopes(group, config)
        experts = [ExpertScope(group.inputs[k].where, group.inputs[k].model,
                               ((f"{group.inputs[k].where}.parameters", group.inputs[k].parameters), *scopes),
                               o.input_names[k]) for k in expert_ks]
        base = infos[base_k] if base_k is not None else None
        order = ((base_k,) if base_k is not None else ()) + tuple(expert_ks)
        # the config's dtype, else (mergekit 0.1.5) the inputs' stored dtypes promoted
        compute = config.compute_dtype if config.dtype else promoted([infos[k].dtype for k in order])
        params = resolve_parameters(method, scopes, experts, o.name, o.t, compute)
        shape, rows, row_models = lead.shape, None, ()
        if token_rows:
            assert vocabulary is not None
            rows = tensor_vocabulary(vocabulary, o.name, [i.model for i in group.inputs], infos,
                                     group.base_model or config.base_model, compute)
            shape, row_models = (vocabulary.out_rows, *lead.shape[1:]), order
        # out_dtype, else (mergekit) the dtype the method returns in the compute dtype
        tensors.append(SourcedTensor(o.name, shape, config.out_dtype_code(_result_code(method, compute)), base,
                                     tuple(infos[k] for k in expert_ks), params, compute, rows, row_models))
    _warn_unused_tensors(groups, outputs, models)
    template = _template(config, groups, models)
    base = template if config.base_model else None
    experts = [c for c in models.opened.values() if c is not base]
    model_config = _output_model_config(template, groups, models, layers, head_added)
    if vocabulary is not None:
        for holder in (model_config, model_config.get("text_config")):
            if isinstance(holder, dict) and "vocab_size" in holder:
                holder["vocab_size"] = vocabulary.out_rows
    return PlanSources(template, base, experts, tensors, model_config, layers, vocabulary)


def _template(config: MergeConfig, groups: list[SliceGroup], models: _Models) -> Checkpoint:
    """The model whose config.json the output's is made from: the base, else the first input."""
    if config.base_model:
        return models.open(config.base_model, "base_model")
    return models.open(groups[0].inputs[0].model, groups[0].inputs[0].where)


def _shared_scopes(group: SliceGroup, config: MergeConfig) -> tuple[tuple[str, Mapping[str, Any]], ...]:
    if group.where == "models":
        return (("parameters", config.parameters),)
    return ((f"{group.where}.parameters", group.parameters), ("parameters", config.parameters))


def _warn_unused_tensors(groups: list[SliceGroup], outputs: list[OutputTensorSources], models: _Models) -> None:
    """Name the tensors of a whole-model merge that no output takes (a model with extra heads)."""
    if groups[0].where != "models":
        return
    used = {o.name for o in outputs}
    for inp in groups[0].inputs:
        extra = sorted(set(models.open(inp.model, inp.where).tensors) - used - set(EMBEDDING_NAMES))
        if extra:
            log.warning("%s %s has %d tensors the output does not take (ignored), e.g. %s",
                        inp.where, inp.model, len(extra), extra[0])


def _output_model_config(template: Checkpoint, groups: list[SliceGroup], models: _Models, layers: int,
                         head_added: bool) -> dict[str, Any]:
    """config.json of the output: the template's, with the layer count and per-layer lists of
    the slices, and an untied head when one was merged."""
    cfg = copy.deepcopy(template.config)
    sliced = not (len(groups) == 1 and groups[0].where == "models")
    for holder in (cfg, cfg.get("text_config")):
        if not isinstance(holder, dict):
            continue
        key = next((k for k in LAYER_COUNT_KEYS if isinstance(holder.get(k), int)), None)
        if key is None:
            continue
        if sliced:
            old = holder[key]
            holder[key] = layers
            for key, value in list(holder.items()):  # per-layer lists (layer_types, ...) follow the slices
                if isinstance(value, list) and len(value) == old and key.startswith("layer"):
                    holder[key] = _per_layer(key, groups, models)
        if head_added and holder.get("tie_word_embeddings"):
            holder["tie_word_embeddings"] = False
    if head_added and cfg.get("tie_word_embeddings", True):
        cfg["tie_word_embeddings"] = False
    return cfg


def _per_layer(key: str, groups: list[SliceGroup], models: _Models) -> list[Any]:
    out = []
    for group in groups:
        inp = group.inputs[group.lead]
        cfg = models.open(inp.model, inp.where).config
        holder = cfg if key in cfg else cfg.get("text_config") or {}
        values = holder.get(key) or []
        out += [values[inp.layer_start + k] if inp.layer_start + k < len(values) else None for k in range(group.layers)]
    return out

