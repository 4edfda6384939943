"""Which decoder architectures the staged calibration forward supports, and how each differs.

The staged forward re-implements the decoder model's loop (embeddings, rotary position
embeddings, attention masks, layers, final norm) one stage at a time, so it must know the few
ways supported families differ. Everything else (the layers themselves) is run as
``transformers`` defines it. An unknown ``model_type`` is refused rather than guessed: a wrong
mask or rotary embedding would silently give wrong statistics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from distmerge.errors import ConfigError

FULL = "full_attention"
SLIDING = "sliding_attention"


@dataclass(frozen=True)
class ArchSpec:
    """How one family's decoder model loop differs from Llama's.

    ``layer_types``: where each layer's attention kind comes from; ``"config"`` reads
    ``config.layer_types`` (Qwen2/3, Gemma 2/3), ``"window"`` makes every layer sliding when
    ``config.sliding_window`` is set (Mistral, Phi-3), ``"full"`` is always causal (Llama).
    ``rope_per_layer_type``: the rotary module takes the layer type and has one frequency table
    per type (Gemma 3: local and global rope).
    """

    model_type: str
    layer_types: str = "full"
    rope_per_layer_type: bool = False


SUPPORTED: dict[str, ArchSpec] = {
    spec.model_type: spec
    for spec in (
        ArchSpec("llama"),
        ArchSpec("mistral", layer_types="window"),
        ArchSpec("qwen2", layer_types="config"),
        ArchSpec("qwen3", layer_types="config"),
        ArchSpec("gemma2", layer_types="config"),
        ArchSpec("gemma3_text", layer_types="config", rope_per_layer_type=True),
        ArchSpec("phi3", layer_types="window"),
    )
}


def architecture(config: dict[str, Any], where: str = "base model") -> ArchSpec:
    """The spec for a config.json mapping; a ConfigError naming the supported types otherwise."""
    model_type = config.get("model_type")
    spec = SUPPORTED.get(str(model_type))
    if spec is None:
        hint = ""
        if model_type == "gemma3":
            hint = " (multimodal Gemma 3 checkpoints are not supported; use a text-only gemma3_text model)"
        raise ConfigError(
            f"aim: {where} has model_type {model_type!r}, which AIM calibration does not support{hint}; "
            f"supported model_type values: {', '.join(sorted(SUPPORTED))}"
        )
    if config.get("use_bidirectional_attention"):
        raise ConfigError(f"aim: {where} uses bidirectional attention, which AIM calibration does not support")
    return spec


def layer_attention_types(spec: ArchSpec, hf_config: Any) -> list[str]:
    """Attention kind (``full_attention`` / ``sliding_attention``) of every decoder layer.

    Mirrors the decoder model's own choice in ``transformers``: Mistral and Phi-3 use a sliding
    window on every layer when ``sliding_window`` is set, Qwen and Gemma read ``layer_types``.
    """
    n = hf_config.num_hidden_layers
    if spec.layer_types == "config":
        types = list(getattr(hf_config, "layer_types", None) or [FULL] * n)
    elif spec.layer_types == "window":
        types = [SLIDING if getattr(hf_config, "sliding_window", None) else FULL] * n
    else:
        types = [FULL] * n
    unknown = sorted(set(types) - {FULL, SLIDING})
    if unknown:
        raise ConfigError(f"aim: unsupported attention layer types {unknown}; supported: {FULL}, {SLIDING}")
    if SLIDING in types and not getattr(hf_config, "sliding_window", None):
        raise ConfigError("aim: the config has sliding-attention layers but no sliding_window size")
    return types[:n]
