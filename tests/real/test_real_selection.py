"""TIES's speculative round on a real checkpoint: every threshold resolves in one read and is
the exact k-th largest |delta|, with the ties per chunk that the tie cut reads.

Random test tensors are alike chunk to chunk; a real embedding is not (rows of rare and
frequent tokens, a small last chunk), which is what decides whether the windows hold.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from distmerge.methods import selection
from distmerge.plan import REDUCTION_CHUNK_ELEMENTS
from distmerge.testing import real_models
from distmerge.testing.experts import fine_tuned

pytestmark = pytest.mark.real

TENSORS = ("model.embed_tokens.weight", "model.layers.3.mlp.down_proj.weight")


@pytest.mark.parametrize("name", TENSORS)
def test_speculative_thresholds_on_smollm2_are_exact(smollm2_bf16: Path, name: str) -> None:
    with safe_open(str(smollm2_bf16 / real_models.WEIGHTS_FILE), "pt") as f:
        w = f.get_tensor(name)
    base, expert = w.float(), fine_tuned(w, torch.Generator().manual_seed(1)).float()
    keys = (expert - base).abs().reshape(-1).view(torch.int32)
    rows = max(1, REDUCTION_CHUNK_ELEMENTS // base.shape[1])
    starts = range(0, base.shape[0], rows)
    for density in (0.1, 0.5, 0.9):
        rank = int(density * keys.numel())
        parts = [selection.DeltaKeys(base[a:a + rows], expert[a:a + rows]).speculate({"t": rank}, keys.numel())["t"]
                 for a in starts]
        resolved = selection.resolve_windows(parts, rank)
        assert resolved is not None, density
        exact = int(torch.kthvalue(keys, keys.numel() - rank + 1).values)
        assert resolved.key == exact and resolved.above == int((keys > exact).sum())
        per_chunk = keys.reshape(base.shape)
        assert resolved.tied == tuple(int((per_chunk[a:a + rows] == exact).sum()) for a in starts)
