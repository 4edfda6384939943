"""Sparsification of the task-vector family as strategies, one module per kind.

Each kind (:class:`MagnitudeTrim` for TIES, :class:`BreadcrumbsTrim`, :class:`RandomDrop` for
DARE, :class:`DellaSampling`) is a :class:`Sparsifier`: its parameters, its reduction rounds (typed in
:mod:`.rounds`), its keep rule and its validation. ``TaskVectorMethod`` holds one instance
and knows nothing kind-specific.
"""

from distmerge.methods.sparsification.base import (
    RESCALE_MODES,
    KernelTerms,
    Rescale,
    Sparsifier,
    l1_ratio,
)
from distmerge.methods.sparsification.dare import RandomDrop
from distmerge.methods.sparsification.della import DellaSampling
from distmerge.methods.sparsification.magnitude import BreadcrumbsTrim, MagnitudeTrim
from distmerge.methods.sparsification.rounds import ChunkPartials, Round, TaskVectorReductions

MAGNITUDE = MagnitudeTrim()
BREADCRUMBS = BreadcrumbsTrim()
RANDOM = RandomDrop()
DELLA = DellaSampling()

__all__ = [
    "BREADCRUMBS", "DELLA", "MAGNITUDE", "RANDOM", "RESCALE_MODES", "BreadcrumbsTrim", "ChunkPartials",
    "DellaSampling", "KernelTerms", "MagnitudeTrim", "RandomDrop", "Rescale", "Round", "Sparsifier",
    "TaskVectorReductions", "l1_ratio",
]
