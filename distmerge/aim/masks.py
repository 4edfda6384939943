"""Additive 4-D causal attention masks, independent of the attention implementation.

``transformers`` treats ``attention_mask=None`` as causal only under SDPA; the staged forward
pins eager attention and passes this mask explicitly so the result never depends on which
kernel happens to be selected. Semantics match ``transformers.masking_utils``: query ``q`` sees
key ``k`` when ``k <= q`` and, for a sliding window ``w``, when ``q - k < w``.
"""

from __future__ import annotations

import torch


def causal_mask(
    seq_len: int,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    sliding_window: int | None = None,
) -> torch.Tensor:
    """A ``[1, 1, seq_len, seq_len]`` mask: 0 where attention is allowed, dtype-min elsewhere."""
    q = torch.arange(seq_len, device=device).unsqueeze(1)
    k = torch.arange(seq_len, device=device).unsqueeze(0)
    allowed = k <= q
    if sliding_window is not None:
        allowed = allowed & (q - k < sliding_window)
    mask = torch.zeros(seq_len, seq_len, dtype=dtype, device=device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None]
