"""Method registry: mergekit's method names -> method instances."""

from __future__ import annotations

from distmerge.errors import ConfigError
from distmerge.methods.arcee_fusion import ArceeFusion
from distmerge.methods.base import MergeMethod
from distmerge.methods.karcher import Karcher
from distmerge.methods.linear import Linear
from distmerge.methods.model_stock import ModelStock
from distmerge.methods.multislerp import MultiSlerp
from distmerge.methods.nearswap import NearSwap
from distmerge.methods.nuslerp import NuSlerp
from distmerge.methods.passthrough import Passthrough
from distmerge.methods.ram import Ram, RamPlusTl
from distmerge.methods.sce import Sce
from distmerge.methods.slerp import Slerp
from distmerge.methods.task_vectors import (
    Breadcrumbs,
    BreadcrumbsTies,
    DareLinear,
    DareTies,
    Della,
    DellaLinear,
    TaskArithmetic,
    Ties,
)

METHODS: dict[str, MergeMethod] = {
    m.name: m
    for m in (
        Linear(), TaskArithmetic(), Ties(), DareLinear(), DareTies(), Breadcrumbs(), BreadcrumbsTies(),
        Della(), DellaLinear(), Slerp(), ModelStock(), Passthrough(),
        # added in mergekit 0.1.5
        NearSwap(), Ram(), RamPlusTl(), NuSlerp(), MultiSlerp(), Sce(), Karcher(), ArceeFusion(),
    )
}


def get_method(name: str) -> MergeMethod:
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(
            f"merge_method: unknown method {name!r}; available: {', '.join(sorted(METHODS))}"
        ) from None
