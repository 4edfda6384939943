"""Shared fixtures: one local Ray per test session, and tiny model families built once."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Two torch threads per test process on the two cores, one each under two pytest-xdist workers
# (spinning threads of both workers on the same cores slow both).
torch.set_num_threads(max(1, 2 // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))

HEAVY_MARKERS = ("slow", "real", "mergekit")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Modules with a slow, real-checkpoint or mergekit test first, each module's tests kept
    together and in order: ``scripts/test.sh`` runs modules on two pytest-xdist workers, and the
    longest started first leave the short ones to fill the end, instead of one worker finishing
    a long module alone."""
    heavy = {item.module.__name__ for item in items
             if getattr(item, "module", None) is not None and any(item.get_closest_marker(m) for m in HEAVY_MARKERS)}
    items.sort(key=lambda item: getattr(getattr(item, "module", None), "__name__", None) not in heavy)


@pytest.fixture(scope="session")
def ray_local() -> Iterator[None]:
    """A local Ray with explicit CPUs and object store, started once and shut down at the end."""
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=4,
            object_store_memory=200 * 1024 * 1024,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def llama_family(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """A tiny fp32 Llama base and two experts, sharded safetensors with an index."""
    from distmerge.testing.tiny import build_family

    return build_family(tmp_path_factory.mktemp("llama"), n_experts=2)


# AIM: tiny 3-layer models of every architecture the staged calibration supports. Sliding
# windows are shorter than the test blocks (and Gemma 3 mixes local and global layers) so the
# masks and per-layer-type rotary embeddings are really exercised; Gemma ties its embeddings.
AIM_ARCHS: dict[str, dict] = {
    "llama": {},
    "mistral": {"sliding_window": 8},
    "qwen2": {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1},
    "qwen3": {},
    "gemma2": {"sliding_window": 8, "tie_word_embeddings": True},
    "gemma3": {
        "sliding_window": 8,
        "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
        "tie_word_embeddings": True,
    },
    "phi3": {"sliding_window": 8},
}


@pytest.fixture(scope="session")
def aim_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny fp32 base model per AIM-supported architecture, 3 decoder layers each."""
    from distmerge.testing.tiny import build_model

    root = tmp_path_factory.mktemp("aim_models")
    return {arch: build_model(root / arch, arch, num_hidden_layers=3, **kw) for arch, kw in AIM_ARCHS.items()}
