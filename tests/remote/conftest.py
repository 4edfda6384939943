"""Fixtures the object-store output tests share (S3 and Cloud Storage): one family, one local merge."""

from __future__ import annotations

import os

import pytest

from distmerge.testing.tiny import build_family
from tests.remote.remote_merges import merge, write_config


@pytest.fixture(scope="session")
def parts_family(tmp_path_factory):
    """Models whose merged bf16 file (21 MB) is uploaded in parts (8 MiB and up) at --shard-size 16MB."""
    return build_family(tmp_path_factory.mktemp("parts"), n_experts=2, hidden_size=512, intermediate_size=1536,
                        num_hidden_layers=2, vocab_size=4096, max_shard_size="12MB")


@pytest.fixture(scope="session")
def parts_local_merge(parts_family, tmp_path_factory):
    """The reference: the same merge from local folders into a local directory."""
    base, experts = parts_family
    tmp = tmp_path_factory.mktemp("local")
    cfg = write_config(tmp / "local.yml", {"base": str(base), "e1": str(experts[0]), "e2": str(experts[1])})
    run = merge({**os.environ, "RAY_ADDRESS": ""}, cfg, str(tmp / "out"))
    assert run.returncode == 0, run.stderr[-3000:]
    return tmp / "out"
