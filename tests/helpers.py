"""Independent helpers for tests: read checkpoints with the safetensors library itself."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from distmerge.config import MergeConfig, parse_config


def load_state(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a HF folder, read with safetensors (not with distmerge's reader)."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else [
        p.name for p in folder.glob("*.safetensors")]
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(folder / name))
    return state


def file_bytes(folder: Path) -> dict[str, bytes]:
    """Every safetensors file's bytes, for bit-identity checks."""
    return {p.name: p.read_bytes() for p in sorted(Path(folder).glob("model-*.safetensors"))}


def make_config(method: str, base: Path | None, experts: list[Path], weights: list, **extra) -> MergeConfig:
    data = {
        "merge_method": method,
        "models": [{"model": str(e), "parameters": {"weight": w}} for e, w in zip(experts, weights, strict=True)],
        **extra,
    }
    if base is not None:
        data["base_model"] = str(base)
    return parse_config(data)
