"""Method registry: name -> method instance."""

from __future__ import annotations

from distmerge.errors import ConfigError
from distmerge.methods.base import MergeMethod
from distmerge.methods.linear import Linear
from distmerge.methods.task_arithmetic import TaskArithmetic

METHODS: dict[str, MergeMethod] = {m.name: m for m in (Linear(), TaskArithmetic())}


def get_method(name: str) -> MergeMethod:
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(
            f"merge_method: unknown method {name!r}; available: {', '.join(sorted(METHODS))}"
        ) from None
