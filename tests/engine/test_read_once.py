"""A tensor whose rows of every source fit the shard size is read once: its reduction rounds
and its merge run in one task on those rows held in memory, instead of one pass over the
inputs for the rounds and another for the merge. The bytes are the ones separate
reduction tasks give, for every method that has rounds, on threads and on Ray."""

from __future__ import annotations

from collections import Counter

import pytest

import distmerge.engine.batch as batch
import distmerge.engine.worker as worker
from distmerge.config import parse_config
from distmerge.engine.run import run_merge
from distmerge.methods import get_method
from distmerge.plan import build_plan
from distmerge.testing.method_cases import CASES, method_config
from tests.helpers import file_bytes

pytestmark = pytest.mark.usefixtures("ray_local")

WITH_ROUNDS = sorted(m for m in CASES if m not in ("linear", "task_arithmetic", "passthrough", "nearswap", "ram"))
SMALL_SHARD = 20_000  # most tiny-model tensors are larger: they get reduction tasks


def _rows_read(monkeypatch: pytest.MonkeyPatch) -> Counter:
    """Rows read per (file, tensor) by this process's workers (the local executor's threads)."""
    counts: Counter = Counter()
    real = worker.read_source_rows

    def counting(info, row_start, row_end):  # noqa: ANN001, ANN202 - read_source_rows' signature
        counts[(str(info.file), info.name)] += row_end - row_start
        return real(info, row_start, row_end)

    monkeypatch.setattr(worker, "read_source_rows", counting)
    return counts


@pytest.mark.parametrize("method", WITH_ROUNDS)
def test_the_rounds_and_the_merge_share_one_read(llama_family, tmp_path, monkeypatch, method):
    base, experts = llama_family
    cfg = parse_config(method_config(method, base, experts, execution={"seed": 5}))
    plan = build_plan(cfg, 10**9)
    rounds = {t.name: t for t in plan.tensors if t.reduction_rounds}
    assert rounds, f"{method} has no reduction rounds here: take it out of WITH_ROUNDS"
    assert set(plan.read_once_tensors) == {i for i, t in enumerate(plan.tensors) if t.reduction_rounds}

    counts = _rows_read(monkeypatch)
    run_merge(cfg, tmp_path / "once", executor="local", shard_size=10**9, workers=2, progress=False)
    read = {name: n for (_, name), n in counts.items()}
    for name, t in rounds.items():
        per_source = [n for (_, tensor), n in counts.items() if tensor == name]
        assert per_source and all(n == t.rows for n in per_source), (name, per_source)
    assert set(read) >= set(rounds)

    counts.clear()
    apart = run_merge(cfg, tmp_path / "apart", executor="local", shard_size=SMALL_SHARD, workers=2, progress=False)
    assert apart["units"] > len(plan.tensors)
    twice = [name for name, t in rounds.items()
             if all(n >= 2 * t.rows for (_, tensor), n in counts.items() if tensor == name)]
    assert twice, "with a small shard size no tensor was read for its rounds and again for its merge"
    assert file_bytes(tmp_path / "once") == file_bytes(tmp_path / "apart")


@pytest.mark.parametrize("method", ["ties", "della", "model_stock"])
def test_read_once_on_ray_gives_the_same_bytes(llama_family, tmp_path, method):
    base, experts = llama_family
    cfg = parse_config(method_config(method, base, experts, execution={"seed": 5}))
    run_merge(cfg, tmp_path / "ray", executor="ray", shard_size=10**9, workers=2, progress=False)
    run_merge(cfg, tmp_path / "apart", executor="local", shard_size=SMALL_SHARD, workers=2, progress=False)
    assert file_bytes(tmp_path / "ray") == file_bytes(tmp_path / "apart")


def test_plan_counts_the_held_rows_in_a_workers_memory(llama_family):
    base, experts = llama_family
    plan = build_plan(parse_config(method_config("ties", base, experts)), 10**9)
    for u in plan.units:  # one unit per tensor at this shard size
        t = plan.tensors[u.tensor]
        held = t.rows * sum(t.row_nbytes(s.dtype) for s in t.sources) if t.reduction_rounds else 0
        assert plan.peak_worker_bytes >= u.working_bytes + held, t.name


@pytest.mark.parametrize("method", ["ties", "della", "breadcrumbs", "model_stock", "karcher", "sce"])
def test_read_once_over_many_chunks_gives_the_same_bytes(llama_family, tmp_path, monkeypatch, method):
    """With chunks of a few rows, a held tensor's later rounds read only some of its chunks (TIES's
    tie counts, the radix rounds) and its blocks are cut at chunk ends: still the same bytes."""
    import distmerge.plan as plan_module

    monkeypatch.setattr(plan_module, "REDUCTION_CHUNK_ELEMENTS", 1000)
    base, experts = llama_family
    cfg = parse_config(method_config(method, base, experts, execution={"seed": 5}))
    plan = build_plan(cfg, 10**9)
    many = [t.name for i, t in enumerate(plan.tensors)
            if i in plan.read_once_tensors and len(plan_module.reduction_chunks(i, t)) >= 4]
    assert many, "no held tensor has several chunks"
    run_merge(cfg, tmp_path / "once", executor="local", shard_size=10**9, workers=2, progress=False)
    run_merge(cfg, tmp_path / "apart", executor="local", shard_size=SMALL_SHARD, workers=2, progress=False)
    assert file_bytes(tmp_path / "once") == file_bytes(tmp_path / "apart")


def _keep_rule_elements(monkeypatch: pytest.MonkeyPatch, method: str) -> Counter:
    """Elements the method's keep rule decided (draws, ranks), per tensor, in this process."""
    sparsifier = type(get_method(method).sparsifier)
    real = sparsifier.kernel_keep
    counts: Counter = Counter()

    def counting(self, e, x, base, p, ctx, reduced):  # noqa: ANN001, ANN202 - kernel_keep's signature
        counts[ctx.tensor] += x.numel()
        return real(self, e, x, base, p, ctx, reduced)

    monkeypatch.setattr(sparsifier, "kernel_keep", counting)
    return counts


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties", "della", "della_linear"])
@pytest.mark.parametrize("chunk_elements", [1000, None])
def test_a_held_tensors_merge_reads_the_masks_its_l1_round_made(llama_family, tmp_path, monkeypatch, method,
                                                                chunk_elements):
    """DARE's draws and DELLA's ranks and draws decide each element of a held tensor once: its L1
    round keeps each chunk's masks (``ShardContext.held``) and the merge reads them, also with
    blocks cut at chunk ends. Read per block, each element is decided twice. Same bytes."""
    import distmerge.plan as plan_module

    if chunk_elements is not None:
        monkeypatch.setattr(plan_module, "REDUCTION_CHUNK_ELEMENTS", chunk_elements)
    base, experts = llama_family
    cfg = parse_config(method_config(method, base, experts, execution={"seed": 5}))
    plan = build_plan(cfg, 10**9)
    matrices = {t.name: t.numel * (len(t.sources) - 1) for i, t in enumerate(plan.tensors)
                if i in plan.read_once_tensors and len(t.shape) == 2}
    assert matrices
    decided = _keep_rule_elements(monkeypatch, method)
    run_merge(cfg, tmp_path / "once", executor="local", shard_size=10**9, workers=2, progress=False)
    assert {name: decided[name] for name in matrices} == matrices
    decided.clear()
    run_merge(cfg, tmp_path / "apart", executor="local", shard_size=SMALL_SHARD, workers=2, progress=False)
    assert {name: decided[name] for name in matrices} == {name: 2 * n for name, n in matrices.items()}
    assert file_bytes(tmp_path / "once") == file_bytes(tmp_path / "apart")


@pytest.mark.parametrize(("method", "rescale", "masks"), [("dare_ties", True, True), ("della", True, True),
                                                          ("dare_ties", False, False), ("ties", True, False)])
def test_plan_counts_the_masks_a_held_tensor_keeps(llama_family, method, rescale, masks):
    """One byte per element of each sparsified expert, where an L1 round keeps masks (not for a
    1-D DELLA tensor: its round ranks the whole vector in the reduce and keeps none)."""
    base, experts = llama_family
    cfg = parse_config(method_config(method, base, experts, parameters={"rescale": rescale}))
    plan = build_plan(cfg, 10**9)
    m = get_method(method)
    assert len(plan.read_once_tensors) == (len(plan.tensors) if rescale else 0)
    for i, t in enumerate(plan.tensors):
        want = t.numel * (len(t.sources) - 1) if masks and (method != "della" or len(t.shape) >= 2) else 0
        assert m.held_scratch_bytes(t.params, t.shape) == want, t.name
        if i in plan.read_once_tensors:
            unit = next(u for u in plan.units if u.tensor == i)
            held = t.rows * sum(t.row_nbytes(s.dtype) for s in t.sources)
            assert plan.peak_worker_bytes >= unit.working_bytes + held + want, t.name


def test_a_batchs_steps_read_each_chunk_once_and_merge_every_row_once(llama_family, monkeypatch):
    import distmerge.plan as plan_module

    monkeypatch.setattr(plan_module, "REDUCTION_CHUNK_ELEMENTS", 1000)
    base, experts = llama_family
    plan = build_plan(parse_config(method_config("ties", base, experts)), 10**9)
    job = worker.MergeJob("ties", tuple(plan.tensors), None, plan.compute_dtype, 0, block_bytes=20_000)
    held = plan.read_once_tensors
    steps = batch.batch_steps(job, plan.units, held)
    for i, t in enumerate(plan.tensors):
        mine = [s for s in steps if s.rows.tensor == i]
        merged = sorted((s.rows.row_start, s.rows.row_end) for s in mine if s.kind == "merge")
        assert merged[0][0] == 0 and merged[-1][1] == t.rows
        assert all(a[1] == b[0] for a, b in zip(merged, merged[1:], strict=False)), t.name  # every row once, in order
        chunks = [(s.rows.row_start, s.rows.row_end) for s in mine if s.kind == "chunk"]
        if i not in held:
            assert not chunks
            continue
        assert chunks == [(c.row_start, c.row_end) for c in plan_module.reduction_chunks(i, t)]
        assert [s.kind for s in mine[:len(chunks)]] == ["chunk"] * len(chunks)  # read before any merge
        ends = {c[1] for c in chunks}
        assert all(not any(r0 < e < r1 for e in ends) for r0, r1 in merged), t.name  # one chunk per block


def _bytes_read(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The bytes of every row range this process's workers read from an input, as they come."""
    sizes: list[int] = []
    real = worker.read_source_rows

    def counting(info, row_start, row_end):  # noqa: ANN001, ANN202 - read_source_rows' signature
        rows = real(info, row_start, row_end)
        sizes.append(rows.numel() * rows.element_size())
        return rows

    monkeypatch.setattr(worker, "read_source_rows", counting)
    return sizes


@pytest.mark.parametrize(("method", "shard_size"), [("ties", SMALL_SHARD), ("ties", 10**9), ("model_stock", SMALL_SHARD),
                                                    ("linear", SMALL_SHARD)])
def test_the_report_counts_every_byte_the_workers_read(llama_family, tmp_path, monkeypatch, method, shard_size):
    """The report's bytes read are the reduction tasks' reads and the merge batches' together,
    as the workers read them; a merge that reads every tensor once reads no byte for its rounds."""
    base, experts = llama_family
    cfg = parse_config(method_config(method, base, experts, execution={"seed": 5}))
    sizes = _bytes_read(monkeypatch)
    report = run_merge(cfg, tmp_path / "out", executor="local", shard_size=shard_size, workers=2, progress=False)
    assert report["bytes_read"] == sum(sizes) > 0
    assert sum(w["bytes_read"] for w in report["workers"]) == sum(n["bytes_read"] for n in report["nodes"].values()) \
        == report["bytes_read"]
    reduction_tasks = sum(w["reduction_tasks"] for w in report["workers"])
    if method == "linear" or shard_size == 10**9:
        assert report["bytes_read_for_rounds"] == 0 and reduction_tasks == 0
    else:
        assert 0 < report["bytes_read_for_rounds"] < report["bytes_read"] and reduction_tasks > 0
        assert sum(n["reduction_tasks"] for n in report["nodes"].values()) == reduction_tasks


def test_a_tensor_is_held_only_where_its_rows_and_masks_fit_the_shard_size(llama_family):
    """The masks DARE's L1 round keeps count against the shard size like the rows they go with:
    a tensor whose rows fit but whose rows and masks do not is read per block (TIES, which keeps
    no masks, still holds it)."""
    from distmerge.plan import held_bytes

    base, experts = llama_family
    dare = build_plan(parse_config(method_config("dare_ties", base, experts)), 10**9)
    index, t = max(enumerate(dare.tensors), key=lambda it: it[1].numel)
    masks = t.numel * (len(t.sources) - 1)
    between = held_bytes(t) + masks - 1
    assert index not in build_plan(parse_config(method_config("dare_ties", base, experts)), between).read_once_tensors
    assert index in build_plan(parse_config(method_config("dare_ties", base, experts)), between + 1).read_once_tensors
    assert index in build_plan(parse_config(method_config("ties", base, experts)), between).read_once_tensors
