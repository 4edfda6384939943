"""Task arithmetic (Ilharco et al. 2023): ``base + lambda * sum_i w_i (x_i - base)``.

The plain member of the task-vector family (no sparsification, no consensus); the pipeline
lives in :mod:`distmerge.methods.task_vectors`. With ``normalize`` the weighted delta sum is
divided by ``sum_i w_i`` (mergekit's default for task_arithmetic is normalize=false).
"""

from __future__ import annotations

from distmerge.methods.task_vectors import TaskArithmetic

__all__ = ["TaskArithmetic"]
