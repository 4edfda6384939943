"""Shared fixtures: one local Ray per test session, and tiny model families built once."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)


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
    from distmerge.tiny import build_family

    return build_family(tmp_path_factory.mktemp("llama"), n_experts=2)
