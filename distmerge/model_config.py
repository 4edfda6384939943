"""A model's ``config.json`` checked against the tensors its folder actually holds.

Why: distmerge builds things from config values (the architecture ``verify`` compares the
output with, the layer positions of parameter gradients, the modules AIM calibrates), and a
config.json comes from whoever made the folder. ``num_hidden_layers: 1000000000`` once made a
finished merge hang in its final verification while transformers built a billion layers.
So before anything is built, every size a config states is held against the weights: a
layer count may not exceed the layers the tensor names show, and no width, vocabulary or head
count may exceed the largest dimension any tensor has.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from distmerge.errors import CheckpointError

LAYER_INDEX_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|block|layer)\.(\d{1,9})\.")
# Counts of repeated structures: bounded by the number of tensors (each has at least one).
COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "num_experts", "num_local_experts",
              "n_routed_experts")
# Widths, vocabularies and head counts: bounded by the largest dimension of any tensor.
WIDTH_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_attention_heads",
              "num_key_value_heads", "head_dim", "n_embd", "n_head", "n_inner", "d_model", "ffn_dim",
              "hidden_dim", "d_ff", "num_heads")
# Positions are not tied to any tensor's shape; bounded generously (longer than any model's context).
MAX_POSITIONS = 1 << 27
POSITION_KEYS = ("max_position_embeddings", "n_positions", "sliding_window")


def _sections(config: Mapping[str, Any], where: Path) -> list[tuple[str, Mapping[str, Any]]]:
    sections: list[tuple[str, Mapping[str, Any]]] = [("", config)]
    for key in ("text_config", "language_config", "llm_config"):
        sub = config.get(key)
        if sub is None:
            continue
        if not isinstance(sub, Mapping):
            raise CheckpointError(f"{where}: {key} is a {type(sub).__name__}, expected an object of settings")
        sections.append((f"{key}.", sub))
    return sections


def check_config_against_tensors(config: Mapping[str, Any], tensors: Mapping[str, Any], where: Path) -> None:
    """Refuse a config.json whose sizes the tensors (``name -> info with .shape``) cannot back."""
    shapes = [tuple(info.shape) for info in tensors.values()]
    largest_dim = max((d for shape in shapes for d in shape), default=0)
    layer_indices = {int(m.group(1)) for name in tensors for m in [LAYER_INDEX_RE.search(name)] if m}
    layers_in_weights = max(layer_indices) + 1 if layer_indices else 0
    for prefix, section in _sections(config, where):
        for key, bound, what in (
            *((k, len(tensors), f"the {len(tensors)} tensors") for k in COUNT_KEYS),
            *((k, largest_dim, f"the largest dimension of any tensor ({largest_dim})") for k in WIDTH_KEYS),
            *((k, MAX_POSITIONS, f"{MAX_POSITIONS} positions") for k in POSITION_KEYS),
        ):
            if key not in section or section[key] is None:
                continue
            value = section[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise CheckpointError(f"{where}: {prefix}{key} is {str(value)[:40]!r}, expected a non-negative integer")
            if value > bound:
                raise CheckpointError(
                    f"{where}: {prefix}{key} is {value}, more than {what} can back; the config does not "
                    "describe these weights (edited or from another model?)"
                )
        layers = section.get("num_hidden_layers")
        if isinstance(layers, int) and layer_indices and layers > layers_in_weights:
            raise CheckpointError(
                f"{where}: {prefix}num_hidden_layers is {layers} but the weights hold layers 0..{layers_in_weights - 1}; "
                "the config does not describe these weights"
            )
