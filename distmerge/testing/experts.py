"""Fine-tuning-like experts of a real checkpoint, made in a second instead of trained.

Each matrix gets a seeded rank-4 update of ``scale`` x its norm, every other tensor seeded
noise of ``scale`` x its mean magnitude, and the result is stored in bfloat16: structured, low-rank deltas
of a few percent, with the repeated magnitudes bf16 rounding gives (what TIES's selection and
AIM's statistics meet on real merges).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from distmerge.testing import real_models


def fine_tuned(w: torch.Tensor, g: torch.Generator, scale: float = 0.005) -> torch.Tensor:
    """``w`` plus its seeded fine-tuning-like delta, in bfloat16."""
    w32 = w.float()
    if w.dim() == 2:
        delta = torch.randn(w.shape[0], 4, generator=g) @ torch.randn(4, w.shape[1], generator=g)
        delta *= scale * w32.norm() / delta.norm()
    else:
        delta = scale * w32.abs().mean() * torch.randn(w.shape, generator=g)
    return (w32 + delta).to(torch.bfloat16)


def low_rank_expert(base: Path, out: Path, seed: int, scale: float = 0.005) -> Path:
    """A model folder at ``out``: ``base``'s weights made :func:`fine_tuned`, its other files copied."""
    g = torch.Generator().manual_seed(seed)
    state = {name: fine_tuned(w, g, scale) for name, w in load_file(str(base / real_models.WEIGHTS_FILE)).items()}
    out.mkdir(parents=True)
    save_file(state, str(out / real_models.WEIGHTS_FILE), metadata={"format": "pt"})
    for side in base.iterdir():
        if side.is_file() and side.name != real_models.WEIGHTS_FILE:
            shutil.copy2(side, out / side.name)
    return out
