"""Methods that read bfloat16 rows as stored (``MergeMethod.reads_stored_rows``) give, bit for
bit, what they give the same rows cast to float32 first: every reduction and every merged row,
on every selection path, chunking and sharding; and the engine passes stored rows exactly when
the method reads them, the compute dtype is float32 and every row is bfloat16."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from distmerge.engine.worker import MergeJob, compute_rows, merge_block, shard_context
from distmerge.methods import METHODS, get_method
from distmerge.methods.base import TensorParams, chunk_read
from distmerge.plan import WorkUnit
from distmerge.testing.method_cases import CASES, NO_BASE, ONE
from tests.methods.test_kernels import same_values
from tests.methods.test_methods_catalogue import (
    SELECTION_PATHS,
    ctx,
    force_selection_path,
    params_for,
    reductions,
)

STORED = sorted(n for n, m in METHODS.items() if m.reads_stored_rows)
F32 = torch.float32


def test_the_methods_that_read_stored_rows():
    """The flag is where the fused loops are, and on passthrough, whose copy is the rows as read."""
    assert sorted(["linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "della", "della_linear",
                   "breadcrumbs", "breadcrumbs_ties", "slerp", "model_stock", "ram", "ramplus_tl", "nuslerp", "karcher",
                   "multislerp", "sce", "arcee_fusion", "nearswap", "passthrough"]) == STORED


def bf16_inputs(shape, n, seed, ties):
    """bfloat16 base and experts; ``ties``: deltas on a coarse grid, so magnitudes repeat and
    the selections cut through ties (split merges, explicit masks)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    if ties:
        xs = [base + (torch.randint(-6, 7, shape, generator=g).float() / 64) for _ in range(n)]
    else:
        xs = [base + 0.05 * torch.randn(shape, generator=g) for _ in range(n)]
    return base.to(torch.bfloat16), [x.to(torch.bfloat16) for x in xs]


def case_params(name, n, extra=None):
    _, glob, model = CASES[name]
    if name == "slerp":
        glob = {"t": 0.3}  # the case's gradient resolves per tensor in the plan
    return params_for(name, n, glob=glob | (extra or {}), model=model)


def both_ways(name, base, xs, params, chunk_rows, steps, every_chunk=False, with_base=None):
    """(cast rows' reductions and merges, stored rows' reductions and merges): the rounds on
    canonical chunks of ``chunk_rows`` rows, the merge on shards of each of ``steps`` rows. The
    base goes to the rounds and the merge alike: always for a method that uses one, else
    where ``with_base`` (a base_optional method's task vectors)."""
    m = get_method(name)
    use_base = m.uses_base if with_base is None else with_base
    shape = tuple(base.shape)
    out = []
    for b, e, compute in ((base.float(), [x.float() for x in xs], None), (base, xs, F32)):
        reduced = None
        for r in range(m.reduction_rounds(params, shape)):
            chunks = [(a, min(shape[0], a + chunk_rows)) for a in range(0, shape[0], chunk_rows)]
            chunks = [(a, z) for a, z in chunks if every_chunk or chunk_read(reduced, r, a, z)]
            if chunks:
                parts = [m.partial_reductions(b[a:z] if use_base else None, [x[a:z] for x in e], params,
                                              ctx(shape, a, z, 3, len(e), compute), r, reduced) for a, z in chunks]
                reduced = m.reduce(parts, params, shape, r, reduced)
        merged = [torch.cat([m.merge(b[a:a + step] if use_base else None, [x[a:a + step] for x in e], params,
                                     ctx(shape, a, min(shape[0], a + step), 3, len(e), compute), reduced)
                             for a in range(0, shape[0], step)]) for step in steps]
        out.append((reduced, merged))
    return out


def assert_same(cast, stored, copies=False):
    """``copies``: the method may return stored rows as they are (passthrough at scale 1), which
    must widen to the cast rows' bits."""
    (r_cast, m_cast), (r_stored, m_stored) = cast, stored
    assert same_values(r_cast, r_stored)
    for a, b in zip(m_cast, m_stored, strict=True):
        assert a.dtype == F32 and b.dtype == (torch.bfloat16 if copies else F32)
        assert torch.equal(a.view(torch.int32), b.float().view(torch.int32))


@pytest.mark.parametrize("ties", [False, True], ids=["smooth", "tied"])
@pytest.mark.parametrize("shape", [(37, 19), (5,), (3, 5, 4), (64, 48)], ids=str)
@pytest.mark.parametrize("name", STORED)
def test_stored_rows_merge_as_cast_rows(name, shape, ties):
    n = 1 if CASES[name][0] == ONE else 2
    base, xs = bf16_inputs(shape, n, seed=len(name) + shape[0], ties=ties)
    params = case_params(name, n)
    rows = shape[0]
    cast, stored = both_ways(name, base, xs, params, chunk_rows=4, steps=(3, rows))
    assert_same(cast, stored, copies=name == "passthrough")
    # the merge did something: it is not the base (arcee_fusion keeps it where no importance
    # of a 5-element vector reaches Q2 + 1.5 IQR)
    if name not in NO_BASE and not (name == "arcee_fusion" and shape == (5,)):
        assert not torch.equal(cast[1][0], base.float())


@pytest.mark.parametrize("path", SELECTION_PATHS)
@pytest.mark.parametrize("name", ["ties", "breadcrumbs", "breadcrumbs_ties"])
@pytest.mark.parametrize("every_chunk", [False, True], ids=["engine-reads", "every-chunk"])
def test_stored_rows_select_as_cast_rows(name, path, every_chunk, monkeypatch):
    """Every selection path (resolved speculatively, after round 0, after round 1) and the tie
    cuts, with the L1 rescale's round too."""
    force_selection_path(path, monkeypatch)
    base, xs = bf16_inputs((64, 48), 2, seed=11, ties=True)
    for extra in ({}, {"rescale": True}):
        params = case_params(name, 2, extra)
        for chunk in (1, 7, 64):
            cast, stored = both_ways(name, base, xs, params, chunk_rows=chunk, steps=(5, 64), every_chunk=every_chunk)
            assert_same(cast, stored)


def test_stored_rows_model_stock_filter_wise():
    """model_stock's filter-wise path: one t per last-dim vector from the shard's own rows."""
    base, xs = bf16_inputs((37, 19), 2, seed=6, ties=False)
    params = case_params("model_stock", 2, {"filter_wise": True})
    cast, stored = both_ways("model_stock", base, xs, params, chunk_rows=4, steps=(3, 37))
    assert_same(cast, stored)


@pytest.mark.parametrize("name", ["dare_ties", "della", "breadcrumbs"])
def test_stored_rows_rescale_modes(name):
    """inverse_density rescale (a divisor, DELLA's per-element probabilities) on stored rows."""
    base, xs = bf16_inputs((37, 19), 2, seed=5, ties=False)
    params = case_params(name, 2, {"rescale": True, "rescale_mode": "inverse_density"})
    cast, stored = both_ways(name, base, xs, params, chunk_rows=4, steps=(3, 37))
    assert_same(cast, stored)


# ---- the engine's choice ----------------------------------------------------------------------

@dataclasses.dataclass
class _Tensor:  # what compute_rows and shard_context read of a TensorPlan
    name: str = "w"
    shape: tuple[int, ...] = (4, 3)
    compute_dtype: str = ""
    base: int | None = 0


def _job(method, compute="F32"):
    return MergeJob(method, (_Tensor(),), None, compute, 0)  # type: ignore[arg-type]


UNIT = WorkUnit(0, 0, 4, 0, 0, 0)


@pytest.mark.parametrize(("method", "compute", "dtypes", "stored"), [
    ("ties", "F32", (torch.bfloat16,) * 3, True),
    ("linear", "F32", (torch.bfloat16,) * 3, True),
    ("passthrough", "F32", (torch.bfloat16,), True),
    ("passthrough", "F32", (torch.float16,), False),  # float16 rows: cast
    ("ties", "BF16", (torch.bfloat16,) * 3, False),  # already the compute dtype
    ("ties", "F64", (torch.bfloat16,) * 3, False),  # float64 compute: cast
    ("ties", "F32", (torch.bfloat16, torch.float16, torch.bfloat16), False),  # mixed: cast all
    ("ties", "F32", (torch.float32,) * 3, False),
])
def test_engine_passes_stored_rows_only_where_exact(method, compute, dtypes, stored):
    raw = [torch.ones(4, 3, dtype=d) for d in dtypes]
    rows = compute_rows(_job(method, compute), UNIT, raw)
    want = {"F32": torch.float32, "BF16": torch.bfloat16, "F64": torch.float64}[compute]
    ctx = shard_context(_job(method, compute), UNIT, rows)
    if stored:
        assert [r.dtype for r in rows] == list(dtypes) and all(r is s for r, s in zip(rows, raw, strict=True))
        assert ctx.compute == want
    else:
        assert all(r.dtype == want for r in rows)
        assert ctx.compute is None
    assert ctx.expert_ids == tuple(range(len(dtypes) - 1))


@dataclasses.dataclass
class _PlannedTensor(_Tensor):  # what merge_block reads of a TensorPlan: a (16, 8) tensor with a base
    shape: tuple[int, ...] = (16, 8)
    params: TensorParams = dataclasses.field(default_factory=TensorParams)
    out_dtype: str = "F32"
    sources: tuple = (None, None, None)
    reduction_rounds: int = 0


def test_merge_block_bytes_with_and_without_stored_rows(monkeypatch):
    """The engine's merge of a unit (bf16 inputs, float32 compute, bf16 output) gives the same
    bytes whether the method is handed stored rows or cast ones."""
    base, xs = bf16_inputs((16, 8), 2, seed=2, ties=True)
    params = case_params("ties", 2)
    t = _PlannedTensor(params=params, out_dtype="BF16", reduction_rounds=4)
    reduced = reductions("ties", base.float(), [x.float() for x in xs], params, chunk_rows=16)
    job = dataclasses.replace(MergeJob("ties", (t,), None, "F32", 0), check_finite=False)  # type: ignore[arg-type]
    unit = WorkUnit(0, 0, 16, 0, 0, 0)
    stored = merge_block(job, unit, [base, *xs], reduced)
    monkeypatch.setattr(type(get_method("ties")), "reads_stored_rows", False)
    cast = merge_block(job, unit, [base, *xs], reduced)
    assert stored.dtype == torch.bfloat16
    assert torch.equal(stored.view(torch.int16), cast.view(torch.int16))


@pytest.mark.parametrize("glob", [{}, {"nuslerp_flatten": False}, {"nuslerp_flatten": False, "nuslerp_row_wise": True}],
                         ids=["whole", "last-dim", "row-wise"])
@pytest.mark.parametrize("with_base", [False, True], ids=["experts", "task-vectors"])
def test_stored_rows_nuslerp_modes(glob, with_base):
    """nuslerp's three modes, blending the experts or their task vectors (a base_model given)."""
    base, xs = bf16_inputs((37, 19), 2, seed=8, ties=False)
    params = case_params("nuslerp", 2, glob)
    assert_same(*both_ways("nuslerp", base, xs, params, chunk_rows=4, steps=(5, 37), with_base=with_base))


@pytest.mark.parametrize("name", ["karcher", "multislerp"])
def test_stored_rows_with_an_optional_base(name):
    """karcher and multislerp with a base_model: the task vectors' mean, then + base."""
    base, xs = bf16_inputs((37, 19), 2, seed=9, ties=False)
    assert_same(*both_ways(name, base, xs, case_params(name, 2), chunk_rows=4, steps=(5, 37), with_base=True))


class _RecordBase:
    """A row step (as AIM's relaxation is) that records the base rows it is given and adds them."""

    def __init__(self) -> None:
        self.seen: list[torch.Tensor] = []

    def apply(self, tensor, shape, row_start, row_end, base, merged):  # noqa: ANN001, ANN201
        self.seen.append(base)
        return merged + base


def test_row_steps_get_the_base_in_the_compute_dtype():
    """A feature's row step (AIM's) computes with the base rows: it gets them in float32 when
    the method was handed bfloat16 rows as stored, and its result is the cast run's."""
    base, xs = bf16_inputs((16, 8), 2, seed=3, ties=False)
    params = case_params("linear", 2)
    t = _PlannedTensor(params=params, out_dtype="F32")
    unit = WorkUnit(0, 0, 16, 0, 0, 0)
    step = _RecordBase()
    job = MergeJob("linear", (t,), None, "F32", 0, check_finite=False, row_steps=(step,))  # type: ignore[arg-type]
    got = merge_block(job, unit, [base, *xs], None)
    assert step.seen[0].dtype == F32 and torch.equal(step.seen[0], base.float())
    want = get_method("linear").merge(None, [x.float() for x in xs], params, shard_context(job, unit, [base.float()])) + base.float()
    assert torch.equal(got, want)


def test_a_method_without_the_flag_gets_cast_rows(monkeypatch):
    monkeypatch.setattr(type(get_method("passthrough")), "reads_stored_rows", False)
    raw = [torch.ones(4, 3, dtype=torch.bfloat16)]
    rows = compute_rows(_job("passthrough"), UNIT, raw)
    assert rows[0].dtype == F32 and shard_context(_job("passthrough"), UNIT, rows).compute is None


def _passthrough_block(raw, out_dtype, scale=1.0, row_steps=(), monkeypatch=None):
    """merge_block of passthrough over one source's bf16 rows (float32 compute); with
    ``monkeypatch``, the rows cast first as a method without the flag gets them."""
    params = params_for("passthrough", 1, model={"scale": scale})
    t = _PlannedTensor(shape=tuple(raw.shape), base=None, params=params, out_dtype=out_dtype, sources=(None,))
    job = dataclasses.replace(MergeJob("passthrough", (t,), None, "F32", 0), check_finite=False,  # type: ignore[arg-type]
                              row_steps=row_steps)
    if monkeypatch is not None:
        monkeypatch.setattr(type(get_method("passthrough")), "reads_stored_rows", False)
    return merge_block(job, WorkUnit(0, 0, raw.shape[0], 0, 0, 0), [raw], None, scan_inputs=False)  # as the batch calls it


@pytest.mark.parametrize("out_dtype", ["BF16", "F32", "F16"])
def test_passthrough_writes_clean_rows_as_read(out_dtype, monkeypatch):
    """Scale 1 on finite rows: no cast and no copy where the output is bfloat16; every output
    dtype gets the bytes of the cast rows."""
    raw = (torch.randn(16, 8) * 100).to(torch.bfloat16)
    raw[0, :3] = torch.tensor([0.0, -0.0, 1e-40])  # signed zeros and a subnormal survive too
    fast = _passthrough_block(raw, out_dtype)
    if out_dtype == "BF16":
        assert fast is raw
    cast = _passthrough_block(raw, out_dtype, monkeypatch=monkeypatch)
    assert fast.dtype == cast.dtype and torch.equal(fast.view(torch.uint8), cast.view(torch.uint8))


def test_passthrough_rows_with_nan_payloads_give_the_cast_bytes(monkeypatch):
    """A NaN's payload and sign do not survive torch's bfloat16 -> float32 -> bfloat16 casts
    (mergekit's path at float32 compute): such rows are cast, so the bytes stay the same."""
    bits = torch.tensor([[0x7FC1, -0x003F, 0x7F80, -0x0080], [0x3F80, 0x7FFF, 0x0001, -0x7FBF]], dtype=torch.int16)
    raw = bits.view(torch.bfloat16)
    fast = _passthrough_block(raw, "BF16")
    cast = _passthrough_block(raw, "BF16", monkeypatch=monkeypatch)
    assert not torch.equal(raw.view(torch.int16), cast.view(torch.int16))  # the cast path rewrites the NaNs
    assert torch.equal(fast.view(torch.int16), cast.view(torch.int16))


def test_passthrough_scales_and_row_steps_see_the_compute_dtype():
    raw = torch.randn(16, 8).to(torch.bfloat16)
    scaled = _passthrough_block(raw, "F32", scale=0.5)
    assert torch.equal(scaled, raw.float() * 0.5)
    seen = []

    class Step:  # a feature's row step (engine.features.RowStep)
        def apply(self, tensor, shape, row_start, row_end, base, merged):
            seen.append((base, merged.dtype))
            return merged

    out = _passthrough_block(raw, "BF16", row_steps=(Step(),))
    assert seen == [(None, F32)] and torch.equal(out.view(torch.int16), raw.view(torch.int16))
