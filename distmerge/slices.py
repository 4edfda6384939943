"""Which input tensors make each output tensor: mergekit's slices, and ``models:`` as one slice.

mergekit 0.1.5 turns every config into output *slices*: a slice takes the same number of
decoder layers from each of its sources (``layer_range: [start, end)``) and merges layer
``start + k`` of every source into output layer ``offset + k``, where ``offset`` counts the
layers of the slices before it. ``models:`` is one slice holding every model's whole layer
range, with the base model appended as an input when it is not listed (mergekit does that for
every method; methods that take a base then set it apart). Tensors outside the decoder layers
come from the first slice's sources when they sit before the layers (embeddings) and from the
last slice's sources otherwise (final norm, ``lm_head``).

Gradients follow the slice: layer ``k`` of a slice of ``n`` layers takes ``t = k / (n - 1)``
(``t = 1`` for a one-layer slice, as mergekit), tensors outside the layers ``t = 0``.

This module is names only: it reads no tensor data and knows nothing of methods or files
beyond the tensor names and layer counts of the checkpoints it is given.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distmerge.config import MergeConfig
from distmerge.errors import CheckpointError, ConfigError

# A decoder layer's tensors: ``<container>.<index>.<rest>``, the container being the last name
# segment before the index (Llama/Mistral/Qwen/Gemma ``model.layers``, GPT-2 ``transformer.h``,
# ``blocks``...). Which container holds the decoder layers is decided per model by the count.
_LAYER = re.compile(r"^(?P<prefix>(?:[^.]+\.)*?[^.]+)\.(?P<index>\d{1,9})\.(?P<rest>.+)$")
# Non-layer tensors taken from the first slice's sources (the rest come from the last slice's).
_PRE_LAYER = ("embed", "wte", "wpe", "word_embeddings", "position_embeddings", "token_type_embeddings")
# An output head that may be tied to the input embedding: (head, embedding names to stand in).
HEAD_NAME = "lm_head.weight"
EMBEDDING_NAMES = ("model.embed_tokens.weight", "transformer.wte.weight", "model.decoder.embed_tokens.weight",
                   "embed_tokens.weight", "transformer.word_embeddings.weight", "model.embed.weight")


@dataclass(frozen=True)
class LayerLayout:
    """Where a model keeps its decoder layers: tensor ``f"{prefix}.{i}.{rest}"`` of layer ``i``."""

    prefix: str
    count: int
    rests: Mapping[int, tuple[str, ...]]  # per layer index, its tensors' name tails

    def name(self, index: int, rest: str) -> str:
        return f"{self.prefix}.{index}.{rest}"

    def split(self, tensor: str) -> tuple[int, str] | None:
        """``(layer index, name tail)`` of a decoder-layer tensor, else None."""
        match = _LAYER.match(tensor)
        if match is None or match["prefix"] != self.prefix:
            return None
        return int(match["index"]), match["rest"]


def layer_layout(tensor_names: list[str], num_layers: int | None) -> LayerLayout | None:
    """The decoder layers among ``tensor_names``: the indexed container with ``num_layers``
    layers (config.json's count), else the one with the most layers; None if there is none."""
    containers: dict[str, dict[int, list[str]]] = {}
    for name in tensor_names:
        match = _LAYER.match(name)
        if match:
            containers.setdefault(match["prefix"], {}).setdefault(int(match["index"]), []).append(match["rest"])
    candidates = [(prefix, layers) for prefix, layers in containers.items() if set(layers) == set(range(len(layers)))]
    if not candidates:
        return None
    exact = [c for c in candidates if len(c[1]) == num_layers]
    prefix, layers = exact[0] if exact else max(candidates, key=lambda c: (len(c[1]), c[0]))
    return LayerLayout(prefix, len(layers), {i: tuple(rests) for i, rests in layers.items()})


@dataclass(frozen=True)
class SliceInput:
    """One input of a slice: a model, where its layers start, its parameters, its config key."""

    model: str
    where: str
    layer_start: int
    parameters: Mapping[str, Any]
    added_base: bool = False  # the base model mergekit appends to ``models:`` when not listed


@dataclass(frozen=True)
class SliceGroup:
    """An output slice: ``layers`` output layers from each input, merged with these settings."""

    inputs: tuple[SliceInput, ...]
    layers: int
    base_model: str | None
    parameters: Mapping[str, Any]
    where: str
    lead: int = 0  # the input whose tensor names and order the slice follows (the base, if listed)


@dataclass(frozen=True)
class OutputTensorSources:
    """One output tensor: its slice, the input tensor's name in each of the slice's inputs, t."""

    name: str
    group: int
    input_names: tuple[str, ...]
    t: float


def slice_groups(config: MergeConfig, layers_of: Callable[[str, str], int], same: Callable[[str, str], bool]) -> list[SliceGroup]:
    """The config as mergekit's output slices. ``layers_of(model, where)`` is a model's layer
    count; ``same(a, b)`` says whether two paths name the same model."""
    if config.models is not None:
        inputs = [SliceInput(e.model, f"models[{i}]", 0, e.parameters) for i, e in enumerate(config.models)]
        if config.base_model and not any(same(i.model, config.base_model) for i in inputs):
            inputs.append(SliceInput(config.base_model, "base_model", 0, {}, added_base=True))
        counts = {i.where: layers_of(i.model, i.where) for i in inputs}
        if len(set(counts.values())) > 1:
            listed = ", ".join(f"{where}: {n}" for where, n in counts.items())
            raise CheckpointError(f"models: the models have different numbers of decoder layers ({listed}); a merge "
                                  "of whole models needs the same count (use slices: with layer_range to pick layers)")
        lead = next((k for k, i in enumerate(inputs) if config.base_model and same(i.model, config.base_model)), 0)
        return [SliceGroup(tuple(inputs), next(iter(counts.values())), None, {}, "models", lead)]
    groups = []
    for s, out_slice in enumerate(config.slices or ()):
        where = f"slices[{s}]"
        lengths = {end - start for start, end in (src.layer_range for src in out_slice.sources)}
        if len(lengths) > 1:
            ranges = ", ".join(f"{src.model} {list(src.layer_range)}" for src in out_slice.sources)
            raise ConfigError(f"{where}.sources: every source of a slice must give the same number of layers; got {ranges}")
        inputs = []
        for j, src in enumerate(out_slice.sources):
            available = layers_of(src.model, f"{where}.sources[{j}]")
            if src.layer_range[1] > available:
                raise ConfigError(f"{where}.sources[{j}].layer_range {list(src.layer_range)}: {src.model} has "
                                  f"{available} decoder layers (valid ranges lie within [0, {available}])")
            inputs.append(SliceInput(src.model, f"{where}.sources[{j}]", src.layer_range[0], src.parameters))
        groups.append(SliceGroup(tuple(inputs), lengths.pop(), out_slice.base_model, out_slice.parameters, where))
    return groups


def is_pre_layer(name: str) -> bool:
    """Whether a non-layer tensor sits before the decoder layers (taken from the first slice)."""
    return any(part in name for part in _PRE_LAYER)


def output_tensors(groups: list[SliceGroup], names_of: Callable[[str], list[str]],
                   layout_of: Callable[[str], LayerLayout | None]) -> tuple[list[OutputTensorSources], int]:
    """Every output tensor with its sources and the output's layer count.

    A slice's lead input names the tensors; every other input must have the same tensor at its
    own layer. Output order: the lead model's own order when the output has exactly its layers
    (``models:``, or one slice of a whole model), else before the layers, the layers, after them.
    """
    first, last = groups[0], groups[-1]
    lead_model = first.inputs[first.lead].model
    lead_layout = layout_of(lead_model)
    tail_model = last.inputs[last.lead].model
    tail_layout = layout_of(tail_model)
    out = [OutputTensorSources(n, 0, _same_name(first, n), 0.0) for n in names_of(lead_model)
           if (lead_layout is None or lead_layout.split(n) is None) and is_pre_layer(n)]
    offset = 0
    out_prefix = lead_layout.prefix if lead_layout is not None else ""
    for g, group in enumerate(groups):
        layouts = [layout_of(i.model) for i in group.inputs]
        for k in range(group.layers):
            t = k / (group.layers - 1) if group.layers > 1 else 1.0
            lead = group.inputs[group.lead]
            lead_layout_g = layouts[group.lead]
            assert lead_layout_g is not None  # a slice with layers has them in every input
            for rest in lead_layout_g.rests[lead.layer_start + k]:
                names = tuple(layout.name(inp.layer_start + k, rest)  # type: ignore[union-attr]
                              for inp, layout in zip(group.inputs, layouts, strict=True))
                out.append(OutputTensorSources(f"{out_prefix}.{offset + k}.{rest}", g, names, t))
        offset += group.layers
    out += [OutputTensorSources(n, len(groups) - 1, _same_name(last, n), 0.0) for n in names_of(tail_model)
            if (tail_layout is None or tail_layout.split(n) is None) and not is_pre_layer(n)]
    whole = len(groups) == 1 and all(i.layer_start == 0 for i in first.inputs) and \
        (lead_layout is None or first.layers == lead_layout.count)
    if whole:
        order = {n: i for i, n in enumerate(names_of(lead_model))}
        out.sort(key=lambda o: order[o.name])
    return out, offset


def _same_name(group: SliceGroup, name: str) -> tuple[str, ...]:
    return tuple(name for _ in group.inputs)


def model_key(path: str) -> str:
    """A stable key for a model path (resolved when the system allows)."""
    try:
        return str(Path(path).resolve())
    except (OSError, RuntimeError, ValueError):
        return path
