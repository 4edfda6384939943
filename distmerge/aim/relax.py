"""AIM relaxation: pull the merged weights back towards the base where the base is active.

Pure tensor math, no I/O and no Ray. With the calibration statistic ``a`` of a module
(per input channel), ``s = a / max(a)`` and ``r = 1 - (1 - omega) * s``: channels the base
model relies on most (s near 1) keep only ``omega`` of the merge delta, idle channels keep all
of it. ``W_aim = W_base + (W_merged - W_base) * r``, ``r`` broadcast along the last (input)
dimension of a weight, elementwise for a 1-D norm weight.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from distmerge.aim.relax_kernel import relax
from distmerge.methods.kernels import as_array

# Tensor-name endings of embedding matrices, which AIM never relaxes.
EMBEDDING_MODULES = ("embed_tokens", "wte", "wpe", "word_embeddings", "embed_in", "embed_positions")


def module_for_tensor(tensor_name: str) -> str | None:
    """The module whose statistic relaxes ``tensor_name``, or None if it is not relaxed.

    Only ``.weight`` tensors are relaxed (biases are not), and never embeddings:
    ``model.layers.0.self_attn.q_proj.weight`` -> ``model.layers.0.self_attn.q_proj``. The engine
    relaxes a tensor when this is not None and the statistics file has that module.
    """
    if not tensor_name.endswith(".weight"):
        return None
    module = tensor_name[: -len(".weight")]
    if not module or module.rsplit(".", 1)[-1] in EMBEDDING_MODULES:
        return None
    return module


def relaxation_factors(stat: torch.Tensor, omega: float) -> torch.Tensor:
    """``r = 1 - (1 - omega) * a / max(a)`` as float32, in ``[omega, 1]``.

    A module whose statistic is all zero (never active) gets ``r = 1``: its merge is kept as is,
    rather than the 0/0 the formula would give. ``omega = 1`` gives exactly ones.
    """
    if not 0.0 <= omega <= 1.0:
        raise ValueError(f"omega must be in [0, 1], got {omega}")
    a = stat.detach().to(torch.float64)
    if a.dim() != 1 or a.numel() == 0:
        raise ValueError(f"an AIM statistic is a non-empty vector, got shape {tuple(stat.shape)}")
    if not torch.isfinite(a).all() or (a < 0).any():
        raise ValueError("an AIM statistic must be finite and non-negative")
    peak = a.max()
    s = a / peak if peak > 0 else torch.zeros_like(a)
    return (1.0 - (1.0 - omega) * s).to(torch.float32)


def shard_factors(
    factors: torch.Tensor, shape: tuple[int, ...] | torch.Size, row_start: int, row_end: int
) -> torch.Tensor:
    """The part of ``factors`` that broadcasts against rows ``[row_start, row_end)`` of a tensor.

    ``shape`` is the whole tensor's shape. For a weight of two or more dimensions the factors
    run along the last (input) dimension, so every row shard takes all of them; for a 1-D norm
    weight they are elementwise, so the shard takes ``factors[row_start:row_end]``.
    """
    shape = tuple(shape)
    if not shape:
        raise ValueError("AIM does not relax 0-d tensors")
    if factors.dim() != 1 or factors.numel() != shape[-1]:
        raise ValueError(
            f"AIM factors of length {factors.numel()} do not match the last dimension of a tensor of shape {shape}"
        )
    if not 0 <= row_start <= row_end <= shape[0]:
        raise ValueError(f"rows [{row_start}, {row_end}) are outside a tensor of shape {shape}")
    if len(shape) == 1:
        return factors[row_start:row_end]
    return factors


def apply_relaxation(
    base: torch.Tensor, merged: torch.Tensor, factors: torch.Tensor | None, omega: float
) -> torch.Tensor:
    """``base + (merged - base) * factors`` in ``merged``'s dtype; ``merged`` itself if no-op.

    ``factors`` are what :func:`shard_factors` returned for this shard (or the whole vector for a
    whole tensor); they broadcast along the last dimension. With ``omega == 1`` or no factors
    the merged tensor is returned unchanged, so AIM at omega 1 is the plain merge bit for bit.
    Half-precision inputs are computed in float32 and rounded once.
    """
    if omega == 1 or factors is None:
        return merged
    if base.shape != merged.shape:
        raise ValueError(f"base shard {tuple(base.shape)} and merged shard {tuple(merged.shape)} differ")
    if not merged.shape or factors.shape[-1] != merged.shape[-1]:
        raise ValueError(
            f"AIM factors of shape {tuple(factors.shape)} do not broadcast along the last dimension "
            f"of a shard of shape {tuple(merged.shape)}"
        )
    compute = torch.promote_types(merged.dtype, torch.float32)
    # One fused pass (three separately rounded ops, as ``b + (m - b) * f`` in torch would be).
    out = relax(as_array(base, compute), as_array(merged, compute), as_array(factors, compute))
    return torch.from_numpy(out).reshape(merged.shape).to(merged.dtype)


@dataclass(frozen=True)
class ChannelRelaxation:
    """What a merge worker needs to relax its rows: omega and each relaxed tensor's factors.

    Shipped once per merge with the job; ``factors`` maps a tensor's index in the plan to its
    full factor vector (:func:`relaxation_factors`), and tensors not in it pass unchanged.
    """

    omega: float
    factors: dict[int, torch.Tensor] = field(default_factory=dict)

    def apply(self, tensor: int, shape: tuple[int, ...], row_start: int, row_end: int,
              base: torch.Tensor | None, merged: torch.Tensor) -> torch.Tensor:
        """Rows ``[row_start, row_end)`` of tensor ``tensor``, relaxed towards ``base``."""
        factors = self.factors.get(tensor)
        if factors is None or base is None:
            return merged
        return apply_relaxation(base, merged, shard_factors(factors, shape, row_start, row_end), self.omega)
