"""A tensor held whole by one unit runs its reduction rounds in the batch that merges it, on the
rows it read once: the same bytes as the driver's rounds, for every method with rounds, with
the tensors cut into many canonical chunks (as a real model's are), and fewer reads."""

from __future__ import annotations

import pytest

from distmerge import plan as plan_module
from distmerge.config import parse_config
from distmerge.engine import worker
from distmerge.engine.run import run_merge
from distmerge.plan import TensorPlan, build_plan
from distmerge.testing.method_cases import CASES, method_config
from tests.helpers import file_bytes

WITH_ROUNDS = ["ties", "dare_ties", "dare_linear", "della", "della_linear", "breadcrumbs", "breadcrumbs_ties", "sce",
               "slerp", "nuslerp", "multislerp", "karcher", "model_stock", "arcee_fusion", "ramplus_tl"]


def test_the_list_holds_every_method_with_rounds(llama_family):
    base, experts = llama_family
    rounds = {m for m in CASES
              if build_plan(parse_config(method_config(m, base, experts)), 10**12).reduction_rounds}
    assert rounds == set(WITH_ROUNDS)


@pytest.mark.parametrize("method", WITH_ROUNDS)
def test_rounds_in_the_unit_give_the_driver_rounds_bytes(llama_family, tmp_path, monkeypatch, method):
    base, experts = llama_family
    # The tiny model's tensors (up to 16640 elements) in up to 17 canonical chunks each; the
    # local executor runs in this process, so the workers see the same chunks.
    monkeypatch.setattr(plan_module, "REDUCTION_CHUNK_ELEMENTS", 1000)
    config = parse_config(method_config(method, base, experts, execution={"seed": 7}))
    plan = build_plan(config, 10**12)
    whole = [t for t, u in zip(plan.tensors, plan.units, strict=True) if t.reduced_in_unit(u)]
    assert whole and max(len(t.reduction_chunks()) for t in whole) > 10

    reads: list[tuple[int, int, int]] = []
    read_block = worker.read_block

    def counted(job, unit):
        reads.append((unit.tensor, unit.row_start, unit.row_end))
        return read_block(job, unit)

    monkeypatch.setattr(worker, "read_block", counted)
    options = {"shard_size": 10**12, "workers": 2, "executor": "local", "progress": False}
    run_merge(config, tmp_path / "in-unit", **options)
    in_unit = len(reads)
    reads.clear()
    monkeypatch.setattr(TensorPlan, "reduced_in_unit", lambda self, unit: False)
    run_merge(config, tmp_path / "driver", **options)
    assert file_bytes(tmp_path / "in-unit") == file_bytes(tmp_path / "driver")
    assert in_unit == len(plan.units)  # every tensor read once
    assert len(reads) >= in_unit + sum(len(t.reduction_chunks()) for t in whole)
