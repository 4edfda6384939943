"""The AIM statistic: per input channel, the mean over tokens of |x|, summed over sequences.

For every module that has a ``weight`` and is not an embedding (every Linear including
``lm_head``, every norm), a forward pre-hook sees the module's input ``x`` of shape
``[sequences, ..., channels]`` and adds ``sum_sequences mean_tokens |x_j|`` to a float64 accumulator.
Leading dimensions between the sequence and the channel (tokens; heads for per-head q/k norms) all
count as tokens, as the AIM authors' ``x.view(-1, in).abs().mean(0)`` per one-sequence forward does.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def sequence_abs_mean_sum(x: torch.Tensor) -> torch.Tensor:
    """``sum_b mean_tokens |x[b, ..., j]|`` as a float64 vector over the last dimension.

    A 1-D or 2-D input is one sequence whose tokens are its rows.
    """
    if x.dim() < 3:
        x = x.reshape(1, -1, x.shape[-1])
    x = x.reshape(x.shape[0], -1, x.shape[-1])
    per_sequence = torch.sum(x.abs(), dim=1, dtype=torch.float64) / x.shape[1]
    return per_sequence.sum(dim=0)


def is_statistic_module(module: nn.Module) -> bool:
    """A module whose weight AIM relaxes: it has a ``weight`` tensor and is not an embedding."""
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and not isinstance(module, nn.Embedding)


def statistic_modules(parts: Iterable[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    """``(full name, module)`` of every statistic module inside the given named parts."""
    found = []
    for prefix, part in parts:
        for name, module in part.named_modules():
            if is_statistic_module(module):
                found.append((f"{prefix}.{name}" if name else prefix, module))
    return found


class ActivationStatistics:
    """Forward pre-hooks accumulating :func:`sequence_abs_mean_sum` per module, in float64."""

    def __init__(self, modules: Iterable[tuple[str, nn.Module]]) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self._handles = []
        for name, module in modules:
            self.sums[name] = torch.zeros(0, dtype=torch.float64)
            self._handles.append(module.register_forward_pre_hook(self._hook(name), with_kwargs=True))

    def _hook(self, name: str):  # type: ignore[no-untyped-def]
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
            self.observe(name, x)

        return hook

    def observe(self, name: str, x: torch.Tensor) -> None:
        """Add the statistic of ``x`` as module ``name``'s input, without running the module.

        A module whose output nothing reads (the head: AIM needs only its input) is recorded this
        way, so its matmul, the largest of a small model with a large vocabulary, is never run.
        """
        value = sequence_abs_mean_sum(x.detach())
        total = self.sums[name]
        self.sums[name] = value if total.numel() == 0 else total + value

    def result(self) -> dict[str, torch.Tensor]:
        """The float64 sums on the CPU, in registration (module) order; unseen modules omitted."""
        return {k: v.cpu() for k, v in self.sums.items() if v.numel()}

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
