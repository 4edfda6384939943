"""Hidden states between stages as numpy arrays, so Ray ships them zero-copy.

bfloat16 has no numpy dtype: it travels as int16 bits with its dtype name alongside.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

_BITS = {torch.bfloat16: torch.int16}


def pack(t: torch.Tensor) -> dict[str, Any]:
    """A CPU numpy view of ``t`` plus its torch dtype name."""
    t = t.detach().to("cpu").contiguous()
    carrier = _BITS.get(t.dtype)
    array = (t.view(carrier) if carrier is not None else t).numpy()
    return {"array": array, "dtype": str(t.dtype).removeprefix("torch.")}


def unpack(payload: dict[str, Any], device: torch.device | str = "cpu") -> torch.Tensor:
    """The tensor :func:`pack` shipped, as a fresh writable tensor on ``device``."""
    dtype = getattr(torch, payload["dtype"])
    t = torch.from_numpy(np.array(payload["array"], copy=True))
    if dtype in _BITS:
        t = t.view(dtype)
    return t.to(device)
