"""AIM math without models or Ray: relaxation, sharding, statistic accumulation, stage sizing."""

from __future__ import annotations

import logging

import pytest
import torch

from distmerge.aim import apply_relaxation, module_for_tensor, relaxation_factors, shard_factors
from distmerge.aim.hooks import sequence_abs_mean_sum
from distmerge.aim.masks import causal_mask
from distmerge.aim.stage_split import split_by_memory, split_even, stage_resources
from distmerge.aim.wire import pack, unpack


def reference_aim(base: torch.Tensor, merged: torch.Tensor, a: torch.Tensor, omega: float) -> torch.Tensor:
    """The paper's formula written out element by element, in float64."""
    out = torch.empty_like(base, dtype=torch.float64)
    peak = max(float(v) for v in a)
    for idx in torch.cartesian_prod(*[torch.arange(n) for n in base.shape]).reshape(-1, base.dim()):
        idx = tuple(int(i) for i in idx)
        s = float(a[idx[-1]]) / peak
        r = 1 - (1 - omega) * s
        out[idx] = float(base[idx]) + (float(merged[idx]) - float(base[idx])) * r
    return out


def test_factors_match_formula() -> None:
    a = torch.tensor([0.0, 1.0, 2.0, 4.0])
    r = relaxation_factors(a, 0.4)
    assert r.dtype == torch.float32
    assert torch.allclose(r, torch.tensor([1.0, 0.85, 0.7, 0.4]))
    assert torch.equal(relaxation_factors(a, 1.0), torch.ones(4))
    assert torch.allclose(relaxation_factors(a, 0.0), torch.tensor([1.0, 0.75, 0.5, 0.0]))
    # A never-active module keeps its merge (r = 1) instead of 0/0.
    assert torch.equal(relaxation_factors(torch.zeros(3), 0.3), torch.ones(3))
    with pytest.raises(ValueError):
        relaxation_factors(torch.tensor([1.0, float("nan")]), 0.4)
    with pytest.raises(ValueError):
        relaxation_factors(a, 1.5)


@pytest.mark.parametrize("omega", [0.0, 0.2, 0.4, 0.6])
def test_apply_relaxation_matches_hand_reference(omega: float) -> None:
    g = torch.Generator().manual_seed(1)
    base = torch.randn(5, 7, generator=g)
    merged = base + 0.1 * torch.randn(5, 7, generator=g)
    a = torch.rand(7, generator=g) * 3
    out = apply_relaxation(base, merged, relaxation_factors(a, omega), omega)
    expected = reference_aim(base, merged, a, omega)
    assert out.dtype == torch.float32
    assert torch.allclose(out.double(), expected, atol=1e-6, rtol=1e-6)
    # The column with the largest activation keeps exactly omega of the delta.
    j = int(a.argmax())
    assert torch.allclose(out[:, j] - base[:, j], omega * (merged[:, j] - base[:, j]), atol=1e-6)


def test_omega_one_and_no_factors_return_merged_unchanged() -> None:
    base, merged = torch.randn(3, 4), torch.randn(3, 4)
    factors = relaxation_factors(torch.rand(4), 1.0)
    assert apply_relaxation(base, merged, factors, 1.0) is merged
    assert apply_relaxation(base, merged, None, 0.4) is merged


def test_row_shards_of_2d_and_norm_weights_equal_whole_tensor() -> None:
    g = torch.Generator().manual_seed(2)
    omega = 0.3
    for shape in [(6, 5), (10,)]:
        base = torch.randn(shape, generator=g)
        merged = base + torch.randn(shape, generator=g)
        factors = relaxation_factors(torch.rand(shape[-1], generator=g), omega)
        whole = apply_relaxation(base, merged, factors, omega)
        pieces = [
            apply_relaxation(base[r0:r1], merged[r0:r1], shard_factors(factors, shape, r0, r1), omega)
            for r0, r1 in [(0, 1), (1, 4), (4, shape[0])]
        ]
        assert torch.equal(torch.cat(pieces), whole)
    norm = torch.arange(10.0)
    assert torch.equal(shard_factors(norm, (10,), 3, 6), torch.tensor([3.0, 4.0, 5.0]))
    assert shard_factors(norm, (4, 10), 1, 3) is norm
    with pytest.raises(ValueError):
        shard_factors(norm, (4, 9), 0, 2)


def test_half_precision_is_computed_in_float32() -> None:
    base = torch.tensor([[1.0, 2.0]], dtype=torch.bfloat16)
    merged = torch.tensor([[1.5, 2.5]], dtype=torch.bfloat16)
    out = apply_relaxation(base, merged, torch.tensor([0.5, 1.0]), 0.5)
    assert out.dtype == torch.bfloat16
    assert out.tolist() == [[1.25, 2.5]]


def test_module_for_tensor() -> None:
    assert module_for_tensor("model.layers.0.self_attn.q_proj.weight") == "model.layers.0.self_attn.q_proj"
    assert module_for_tensor("model.norm.weight") == "model.norm"
    assert module_for_tensor("lm_head.weight") == "lm_head"
    assert module_for_tensor("model.layers.0.self_attn.q_proj.bias") is None
    assert module_for_tensor("model.embed_tokens.weight") is None
    assert module_for_tensor("model.rotary_emb.inv_freq") is None


def test_sequence_abs_mean_sum() -> None:
    x = torch.tensor([[[1.0, -2.0], [3.0, 0.0]], [[-1.0, 1.0], [1.0, 1.0]]])  # 2 sequences, 2 tokens
    # sequence 0 means: [2, 1]; sequence 1 means: [1, 1] -> sum [3, 2]
    assert sequence_abs_mean_sum(x).tolist() == [3.0, 2.0]
    assert sequence_abs_mean_sum(x).dtype == torch.float64
    # Per-head inputs [B, T, heads, D]: heads count as tokens.
    y = torch.ones(1, 2, 3, 4) * torch.tensor([1.0, -2.0, 3.0, 0.0])
    assert sequence_abs_mean_sum(y).tolist() == [1.0, 2.0, 3.0, 0.0]


def test_causal_mask_matches_transformers_semantics() -> None:
    m = causal_mask(5, torch.float32, sliding_window=2)[0, 0]
    allowed = (m == 0).int().tolist()
    assert allowed == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [0, 1, 1, 0, 0],
        [0, 0, 1, 1, 0],
        [0, 0, 0, 1, 1],
    ]
    assert float(m[0, 1]) == torch.finfo(torch.float32).min
    full = causal_mask(3, torch.bfloat16)[0, 0]
    assert (full == 0).int().tolist() == [[1, 0, 0], [1, 1, 0], [1, 1, 1]]


def test_split_even_and_clamp(caplog: pytest.LogCaptureFixture) -> None:
    assert split_even(5, 1) == [(0, 5)]
    assert split_even(5, 2) == [(0, 3), (3, 5)]
    assert split_even(4, 4) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    with caplog.at_level(logging.WARNING):
        assert split_even(3, 8) == [(0, 1), (1, 2), (2, 3)]
    assert "exceeds the 3 decoder layers" in caplog.text


def test_split_by_memory() -> None:
    # 4 layers of 10 bytes, embeddings 15, head 25.
    assert split_by_memory([10] * 4, 15, 25, 1000) == [(0, 4)]
    assert split_by_memory([10] * 4, 15, 25, 40) == [(0, 2), (2, 3), (3, 4)]
    assert split_by_memory([10] * 4, 0, 0, 20) == [(0, 2), (2, 4)]
    # A budget below one layer still places every layer, one per stage.
    assert split_by_memory([10] * 3, 0, 0, 1) == [(0, 1), (1, 2), (2, 3)]


def test_stage_resources_always_fit() -> None:
    assert stage_resources([4.0], [0.0], 2) == (2.0, 0.0)
    assert stage_resources([4.0], [0.0], 4) == (1.0, 0.0)
    assert stage_resources([4.0], [0.0], 8) == (0.5, 0.0)
    assert stage_resources([8.0, 8.0], [0.0, 0.0], 3) == (4.0, 0.0)  # 5 CPUs would fit only 2
    cpus, gpus = stage_resources([16.0], [3.0], 4)
    assert gpus == 0.5 and cpus == 4.0
    assert stage_resources([16.0], [8.0], 4)[1] == 1.0


def test_wire_roundtrip_bfloat16() -> None:
    t = torch.randn(2, 3).to(torch.bfloat16)
    back = unpack(pack(t))
    assert back.dtype == torch.bfloat16 and torch.equal(back, t)
    f = torch.randn(2, 3)
    assert torch.equal(unpack(pack(f)), f)
