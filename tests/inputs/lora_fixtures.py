"""PEFT-format LoRA adapters written by hand, and the fully merged weights computed as PEFT does.

The reference here is independent of distmerge: whole tensors, plain torch, PEFT's own formula
(``transpose(B @ A, fan_in_fan_out) * scaling`` with the adapter upcast to float32, added to the
weight the way ``Linear.merge`` and ``Embedding.merge`` add it).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

PREFIX = "base_model.model."


def module_of(name: str) -> str:
    return name.removesuffix(".weight")


def pattern_value(patterns: dict, module: str, default):
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def write_adapter(folder: Path, state: dict[str, torch.Tensor], targets: list[str], *, r: int = 4, alpha: float = 8,
                  rslora: bool = False, rank_pattern: dict | None = None, alpha_pattern: dict | None = None,
                  dtype: torch.dtype = torch.float32, seed: int = 0, modules_to_save: list[str] | None = None,
                  fan_in_fan_out: bool = False, extra_config: dict | None = None) -> dict[str, torch.Tensor]:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` for the model tensors named
    in ``targets`` (full weight names); returns the adapter's tensors by key."""
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    rank_pattern, alpha_pattern = rank_pattern or {}, alpha_pattern or {}
    for name in targets:
        module = module_of(name)
        rank = pattern_value(rank_pattern, module, r)
        rows, cols = state[name].shape[::-1] if fan_in_fan_out else state[name].shape  # Conv1D: in x out
        if "embed_tokens" in name:  # PEFT Embedding: A is (r, num_embeddings), B is (embedding_dim, r)
            tensors[f"{PREFIX}{module}.lora_embedding_A"] = torch.randn(rank, rows, generator=gen).to(dtype)
            tensors[f"{PREFIX}{module}.lora_embedding_B"] = (0.1 * torch.randn(cols, rank, generator=gen)).to(dtype)
        else:
            tensors[f"{PREFIX}{module}.lora_A.weight"] = (0.3 * torch.randn(rank, cols, generator=gen)).to(dtype)
            tensors[f"{PREFIX}{module}.lora_B.weight"] = (0.1 * torch.randn(rows, rank, generator=gen)).to(dtype)
    for module in modules_to_save or ():
        w = state[f"{module}.weight"]
        tensors[f"{PREFIX}{module}.weight"] = (w.float() + 0.05 * torch.randn(w.shape, generator=gen)).to(w.dtype)
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": None, "r": r, "lora_alpha": alpha,
        "target_modules": sorted({module_of(n).rsplit(".", 1)[-1] for n in targets}), "lora_dropout": 0.0,
        "use_rslora": rslora, "fan_in_fan_out": fan_in_fan_out, "bias": "none", "use_dora": False,
        "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern, "modules_to_save": modules_to_save,
        "init_lora_weights": True, "inference_mode": True, **(extra_config or {}),
    }
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return tensors


def reference_merge(state: dict[str, torch.Tensor], adapter: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """The whole model with the adapter merged, computed as PEFT's ``merge_and_unload`` does on CPU."""
    out = dict(state)
    for key in adapter:
        if not key.endswith((".lora_A.weight", ".lora_embedding_A")):
            continue
        embedding = key.endswith("lora_embedding_A")
        module = key[len(PREFIX):].removesuffix(".lora_A.weight").removesuffix(".lora_embedding_A")
        a = adapter[key].float()  # PEFT upcasts bf16/fp16 adapters to float32 (autocast_adapter_dtype)
        b = adapter[key.replace("lora_A", "lora_B").replace("lora_embedding_A", "lora_embedding_B")].float()
        rank = pattern_value(config["rank_pattern"], module, config["r"])
        alpha = pattern_value(config["alpha_pattern"], module, config["lora_alpha"])
        scaling = alpha / math.sqrt(rank) if config["use_rslora"] else alpha / rank
        w = state[f"{module}.weight"]
        if embedding:
            delta = (b @ a).T * scaling
            out[f"{module}.weight"] = w + delta.to(w.dtype)  # Embedding.merge: delta rounded, then added
        else:
            delta = (b @ a).T * scaling if config["fan_in_fan_out"] else (b @ a) * scaling
            merged = w.clone()
            merged += delta  # Linear.merge: weight.data += delta (float32 delta into the weight's dtype)
            out[f"{module}.weight"] = merged
    for key, value in adapter.items():
        if "lora_" not in key and key[len(PREFIX):] in state:
            out[key[len(PREFIX):]] = value.to(state[key[len(PREFIX):]].dtype)
    return out
