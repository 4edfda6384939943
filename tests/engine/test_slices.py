"""mergekit's slices on the streaming engine: layer stacking, layer ranges, per-slice parameters
and gradients, tied heads, and the 0.1.5 rules for ``models:`` (base as an input, filters)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from distmerge.config import parse_config
from distmerge.engine.run import run_merge
from distmerge.errors import ConfigError
from distmerge.plan import build_plan
from distmerge.testing.tiny import build_family
from tests.helpers import file_bytes, load_state

pytestmark = pytest.mark.usefixtures("ray_local")
LAYER = "model.layers.{}.{}"


def _layer_tensors(state: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    prefix = f"model.layers.{i}."
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def test_passthrough_stacks_layers_from_two_models(llama_family, tmp_path):
    """A frankenmerge: layers [0, 3) of one model then [1, 4) of another make a 6-layer model;
    embeddings come from the first slice's model, the final norm and head from the last's."""
    _, (a, b) = llama_family
    cfg = parse_config({"merge_method": "passthrough", "dtype": "float32", "slices": [
        {"sources": [{"model": str(a), "layer_range": [0, 3]}]},
        {"sources": [{"model": str(b), "layer_range": [1, 4]}]},
    ], "execution": {"shard_size": "7KB"}})
    run_merge(cfg, tmp_path / "out", progress=False)
    got, sa, sb = load_state(tmp_path / "out"), load_state(a), load_state(b)
    for i in range(3):
        for rest, v in _layer_tensors(sa, i).items():
            assert torch.equal(got[LAYER.format(i, rest)], v), (i, rest)
    for k in range(3):
        for rest, v in _layer_tensors(sb, 1 + k).items():
            assert torch.equal(got[LAYER.format(3 + k, rest)], v), (k, rest)
    assert torch.equal(got["model.embed_tokens.weight"], sa["model.embed_tokens.weight"])
    assert torch.equal(got["model.norm.weight"], sb["model.norm.weight"])
    assert torch.equal(got["lm_head.weight"], sb["lm_head.weight"])
    assert not any(k.startswith("model.layers.6.") for k in got)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["num_hidden_layers"] == 6
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert len(model.model.layers) == 6
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_slice_of_whole_models_equals_models_config(llama_family, tmp_path):
    """One slice holding every model's whole range is the ``models:`` merge, byte for byte."""
    base, experts = llama_family
    models = [{"model": str(e), "parameters": {"weight": w, "density": 0.6}} for e, w in zip(experts, [0.7, 0.4], strict=True)]
    common = {"merge_method": "ties", "base_model": str(base), "parameters": {"lambda": 0.9}}
    run_merge(parse_config({**common, "models": models}), tmp_path / "m", progress=False)
    sliced = [{"model": str(base), "layer_range": [0, 4]}] + [{**m, "layer_range": [0, 4]} for m in models]
    run_merge(parse_config({**common, "slices": [{"sources": sliced}], "execution": {"shard_size": "5KB"}}),
              tmp_path / "s", progress=False)
    assert file_bytes(tmp_path / "m") == file_bytes(tmp_path / "s")


def test_slice_gradient_and_parameters_follow_mergekit(llama_family, tmp_path):
    """Two SLERP slices with their own gradients: layer k of a slice of n layers takes
    t = k / (n - 1) (t = 1 for a one-layer slice), outside the layers t = 0; a slice's
    parameters override the global ones, and a source's override its slice's."""
    base, (a, _) = llama_family
    cfg = parse_config({"merge_method": "slerp", "base_model": str(base), "parameters": {"t": 0.25}, "slices": [
        {"sources": [{"model": str(base), "layer_range": [0, 3]}, {"model": str(a), "layer_range": [0, 3]}],
         "parameters": {"t": [{"filter": "mlp", "value": [0.0, 1.0]}, {"value": 0.5}]}},
        {"sources": [{"model": str(base), "layer_range": [3, 4]}, {"model": str(a), "layer_range": [3, 4]}]},
    ]})
    plan = build_plan(cfg)
    t_of = {p.name: p.params.global_["t"] for p in plan.tensors if p.params is not None}
    assert t_of["model.layers.0.mlp.up_proj.weight"] == 0.0
    assert t_of["model.layers.1.mlp.up_proj.weight"] == 0.5
    assert t_of["model.layers.2.mlp.up_proj.weight"] == 1.0
    assert t_of["model.layers.1.self_attn.q_proj.weight"] == 0.5
    assert t_of["model.layers.3.mlp.up_proj.weight"] == 0.25  # the second slice: global t
    assert t_of["model.embed_tokens.weight"] == 0.5  # first slice's parameters, t = 0 -> the fallback
    assert t_of["model.norm.weight"] == 0.25  # last slice's
    run_merge(cfg, tmp_path / "out", progress=False)
    got, sb, sa = load_state(tmp_path / "out"), load_state(base), load_state(a)
    # t = 0 and t = 1 are the end points exactly.
    assert torch.equal(got["model.layers.0.mlp.up_proj.weight"], sb["model.layers.0.mlp.up_proj.weight"])
    assert torch.equal(got["model.layers.2.mlp.up_proj.weight"], sa["model.layers.2.mlp.up_proj.weight"])


@pytest.mark.slow
def test_slice_merge_is_shard_invariant(llama_family, tmp_path):
    base, (a, b) = llama_family
    slices = [{"sources": [{"model": str(base), "layer_range": [0, 2]}, {"model": str(a), "layer_range": [1, 3]},
                           {"model": str(b), "layer_range": [2, 4]}]},
              {"sources": [{"model": str(base), "layer_range": [2, 4]}, {"model": str(a), "layer_range": [0, 2]},
                           {"model": str(b), "layer_range": [0, 2]}]}]
    common = {"merge_method": "ties", "base_model": str(base),
              "parameters": {"weight": 0.5, "density": [0.3, 0.9]}, "slices": slices}
    outs = []
    for shard in ("1B", "3KB", "1GB"):
        out = tmp_path / shard
        run_merge(parse_config({**common, "execution": {"shard_size": shard}}), out, progress=False)
        outs.append(file_bytes(out))
    assert outs[0] == outs[1] == outs[2]
    got = load_state(tmp_path / "1GB")
    assert len([k for k in got if k.endswith("mlp.up_proj.weight")]) == 4


def test_tied_base_and_untied_expert_merge_the_head(tmp_path):
    """A base that ties its head and an expert that does not: the output has an lm_head merged
    from the base's embedding and the expert's head (mergekit's reading), and says it is untied."""
    base, (tied_expert,) = build_family(tmp_path / "tied", n_experts=1, tie_word_embeddings=True)
    _, (untied,) = build_family(tmp_path / "untied", n_experts=1)
    cfg = parse_config({"merge_method": "linear", "models": [
        {"model": str(base), "parameters": {"weight": 0.25}}, {"model": str(untied), "parameters": {"weight": 0.75}}]})
    run_merge(cfg, tmp_path / "out", progress=False)
    got, sb, su = load_state(tmp_path / "out"), load_state(base), load_state(untied)
    assert "lm_head.weight" not in sb
    expected = (0.25 * sb["model.embed_tokens.weight"] + 0.75 * su["lm_head.weight"]) / 1.0
    torch.testing.assert_close(got["lm_head.weight"], expected, rtol=0, atol=1e-6)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is False
    # Two tied models stay tied: no head is invented.
    run_merge(parse_config({"merge_method": "linear", "models": [
        {"model": str(base), "parameters": {"weight": 1}}, {"model": str(tied_expert), "parameters": {"weight": 1}}]}),
        tmp_path / "tied-out", progress=False)
    assert "lm_head.weight" not in load_state(tmp_path / "tied-out")


def test_linear_with_base_model_merges_the_base_as_an_input(llama_family):
    """mergekit 0.1.5: a base_model not listed under models is one more input of ``linear``;
    without a weight for it the error says so and what to do."""
    base, experts = llama_family
    models = [{"model": str(e), "parameters": {"weight": 1.0}} for e in experts]
    plan = build_plan(parse_config({"merge_method": "linear", "base_model": str(base), "models": models,
                                    "parameters": {"weight": 2.0}}))
    merged = next(t for t in plan.tensors if t.params is not None)
    assert [e["weight"] for e in merged.params.experts] == [1.0, 1.0, 2.0]
    assert Path(merged.experts[2].file).parent == base
    with pytest.raises(ConfigError, match=r"base_model .*linear merges the base model as one more input.*'weight'"):
        build_plan(parse_config({"merge_method": "linear", "base_model": str(base), "models": models}))


def test_filters_first_match_and_wildcard(llama_family):
    """Filter entries are tried in list order; no filter and "*" match every tensor."""
    base, experts = llama_family

    def weights(entries):
        cfg = parse_config({"merge_method": "linear", "models": [
            {"model": str(experts[0]), "parameters": {"weight": entries}},
            {"model": str(experts[1]), "parameters": {"weight": 1.0}}]})
        return {t.name: t.params.experts[0]["weight"] for t in build_plan(cfg).tensors if t.params is not None}

    assert set(weights([{"value": 3.0}, {"filter": "mlp", "value": 2.0}]).values()) == {3.0}
    assert set(weights([{"filter": "*", "value": 4.0}, {"filter": "mlp", "value": 2.0}]).values()) == {4.0}
    w = weights([{"filter": "mlp", "value": 2.0}, {"filter": "*", "value": 4.0}])
    assert w["model.layers.0.mlp.up_proj.weight"] == 2.0 and w["model.norm.weight"] == 4.0


def test_slice_errors_name_the_slice(llama_family):
    base, (a, b) = llama_family
    with pytest.raises(ConfigError, match=r"slices\[0\]\.sources: every source of a slice must give the same number"):
        build_plan(parse_config({"merge_method": "linear", "slices": [{"sources": [
            {"model": str(a), "layer_range": [0, 2]}, {"model": str(b), "layer_range": [0, 3]}]}]}))
    with pytest.raises(ConfigError, match=r"slices\[0\]\.sources\[0\]\.layer_range \[2, 9\]: .* has 4 decoder layers"):
        build_plan(parse_config({"merge_method": "passthrough", "slices": [{"sources": [
            {"model": str(a), "layer_range": [2, 9]}]}]}))
    with pytest.raises(ConfigError, match=r"slices\[0\]\.sources: the base model .* is not among this slice's sources"):
        build_plan(parse_config({"merge_method": "task_arithmetic", "base_model": str(base), "slices": [{"sources": [
            {"model": str(a), "layer_range": [0, 4], "parameters": {"weight": 1}}]}]}))
    with pytest.raises(ConfigError, match="layer_range"):
        parse_config({"merge_method": "passthrough", "slices": [{"sources": [{"model": "x", "layer_range": [3, 1]}]}]})
