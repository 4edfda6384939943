"""AIM fused into the merge: the engine's output equals the whole-tensor formula given the
statistics, omega = 1 is the plain merge bit for bit, and statistics are calibrated or reused."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch
import yaml

from distmerge.aim import load_statistics, module_for_tensor, save_statistics
from distmerge.engine.run import run_merge
from tests.helpers import file_bytes, load_state, make_config

pytestmark = pytest.mark.usefixtures("ray_local")


def _fake_stats(base) -> dict[str, torch.Tensor]:
    """Heavy-tailed positive statistics for every relaxable module of the base model."""
    g = torch.Generator().manual_seed(7)
    stats = {}
    for name, t in load_state(base).items():
        module = module_for_tensor(name)
        if module is not None:
            stats[module] = torch.rand(t.shape[-1], generator=g) ** 4 + 1e-3
    return stats


def _ta_reference(base, experts, weights):
    b = load_state(base)
    xs = [load_state(e) for e in experts]
    return b, {n: v + sum(w * (x[n] - v) for w, x in zip(weights, xs, strict=True)) for n, v in b.items()}


@pytest.mark.parametrize("omega", [0.2, 0.6])
def test_aim_equals_whole_tensor_formula(llama_family, tmp_path, omega):
    base, experts = llama_family
    stats = _fake_stats(base)
    save_statistics(stats, tmp_path / "stats.safetensors", {"base_model": str(base), "dataset": "test",
                                                            "n_blocks": "1", "block_size": "8", "tokens": "8"})
    cfg = make_config("task_arithmetic", base, experts, [0.7, 0.5], aim={"omega": omega, "stats": str(tmp_path / "stats.safetensors")},
                      execution={"shard_size": "30KB"})
    report = run_merge(cfg, tmp_path / "out", progress=False)
    got = load_state(tmp_path / "out")
    b, merged = _ta_reference(base, experts, [0.7, 0.5])
    relaxed = 0
    for name, w in merged.items():
        module = module_for_tensor(name)
        if module in stats:
            a = stats[module].double()
            r = (1 - (1 - omega) * a / a.max()).float()
            expected = b[name] + (w - b[name]) * r  # broadcast along the last (input) dim
            relaxed += 1
        else:
            expected = w
            assert "embed_tokens" in name
        torch.testing.assert_close(got[name], expected, rtol=1e-5, atol=1e-6, msg=name)
    assert relaxed == report["aim"]["relaxed_tensors"] == len(merged) - 1
    assert report["aim"]["modules"]["lm_head"]["max_over_median"] > 1


def test_omega_one_is_the_plain_merge_bit_for_bit(llama_family, tmp_path):
    base, experts = llama_family
    save_statistics(_fake_stats(base), tmp_path / "s.safetensors", {"base_model": str(base), "dataset": "t",
                                                                    "n_blocks": "1", "block_size": "8", "tokens": "8"})
    plain = make_config("task_arithmetic", base, experts, [0.7, 0.5])
    aim = make_config("task_arithmetic", base, experts, [0.7, 0.5], aim={"omega": 1.0, "stats": str(tmp_path / "s.safetensors")})
    run_merge(plain, tmp_path / "plain", progress=False)
    run_merge(aim, tmp_path / "aim", progress=False)
    assert file_bytes(tmp_path / "plain") == file_bytes(tmp_path / "aim")


@pytest.mark.slow
def test_calibrate_command_then_merge_reuses_statistics(llama_family, tmp_path):
    base, experts = llama_family
    config = make_config("task_arithmetic", base, experts, [0.5, 0.5],
                         aim={"omega": 0.4, "stages": 2, "calibration": {"n_samples": 8, "block_size": 512}})
    path = tmp_path / "merge.yml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    proc = subprocess.run([sys.executable, "-m", "distmerge", "calibrate", str(path), "--out", str(tmp_path / "stats.safetensors"),
                           "--no-progress", "--plot", str(tmp_path / "stats.png")], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The user sees what AIM will do before merging: the table per module kind, and the plot.
    assert "factors at omega 0.4" in proc.stdout and "most peaked modules" in proc.stdout
    assert re.search(r"^down_proj +4 ", proc.stdout, re.M), proc.stdout
    assert (tmp_path / "stats.png").read_bytes()[:4] == b"\x89PNG"
    stats, meta = load_statistics(tmp_path / "stats.safetensors")
    assert meta["dataset"] == "builtin" and int(meta["block_size"]) == 512
    assert "model.layers.3.mlp.down_proj" in stats and stats["model.layers.3.mlp.down_proj"].numel() == 160
    # Calibrating inside the merge gives the same statistics as the saved file (same data, seed).
    report = run_merge(config, tmp_path / "calibrated", progress=False)
    reused = config.model_copy(update={"aim": config.aim.model_copy(update={"stats": str(tmp_path / "stats.safetensors")})})
    run_merge(reused, tmp_path / "reused", progress=False)
    assert file_bytes(tmp_path / "calibrated") == file_bytes(tmp_path / "reused")
    assert report["aim"]["stats_source"] == "calibrated for this merge"
    assert report["aim"]["metadata"]["tokens"] == meta["tokens"]
    saved = json.loads((tmp_path / "reused" / "merge_report.json").read_text())
    assert saved["aim"]["stats_source"].endswith("stats.safetensors")
    assert all(re.fullmatch(r"(model\.layers\.\d+\.\w+(\.\w+)?|model\.norm|lm_head)", m) for m in saved["aim"]["modules"])


def test_statistics_of_another_model_are_refused(llama_family, tmp_path):
    from distmerge.errors import ConfigError

    base, experts = llama_family
    bad = {"model.layers.0.mlp.up_proj": torch.ones(7)}
    save_statistics(bad, tmp_path / "bad.safetensors", {"base_model": "x", "dataset": "t", "n_blocks": "1",
                                                        "block_size": "8", "tokens": "8"})
    cfg = make_config("task_arithmetic", base, experts, [1, 1], aim={"stats": str(tmp_path / "bad.safetensors")})
    with pytest.raises(ConfigError, match="up_proj.*7 channels.*64 input channels"):
        run_merge(cfg, tmp_path / "out", progress=False)


def test_uniform_control_relaxes_by_the_mean_factor(llama_family, tmp_path):
    base, experts = llama_family
    stats = _fake_stats(base)
    save_statistics(stats, tmp_path / "s.safetensors", {"base_model": str(base), "dataset": "t",
                                                        "n_blocks": "1", "block_size": "8", "tokens": "8"})
    cfg = make_config("task_arithmetic", base, experts, [0.7, 0.5],
                      aim={"omega": 0.3, "stats": str(tmp_path / "s.safetensors"), "relaxation": "uniform"})
    run_merge(cfg, tmp_path / "out", progress=False)
    got = load_state(tmp_path / "out")
    b, merged = _ta_reference(base, experts, [0.7, 0.5])
    for name, w in merged.items():
        module = module_for_tensor(name)
        if module not in stats:
            continue
        a = stats[module].double()
        mean_r = float((1 - 0.7 * a / a.max()).mean())
        torch.testing.assert_close(got[name], b[name] + (w - b[name]) * mean_r, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("method,params", [("ties", {"weight": 0.6, "density": 0.5}),
                                           ("dare_ties", {"weight": 0.6, "density": 0.5})])
def test_aim_on_ties_and_dare_equals_formula_over_the_plain_merge(llama_family, tmp_path, method, params):
    """AIM on TIES and DARE: the relaxed output is base + (plain merge - base) * r, channel by
    channel, with the plain merge itself checked against whole-tensor references elsewhere."""
    from tests.helpers import parse_config

    base, experts = llama_family
    stats = _fake_stats(base)
    save_statistics(stats, tmp_path / "s.safetensors", {"base_model": str(base), "dataset": "t",
                                                        "n_blocks": "1", "block_size": "8", "tokens": "8"})
    data = {"merge_method": method, "base_model": str(base),
            "models": [{"model": str(e), "parameters": params} for e in experts], "execution": {"seed": 5}}
    run_merge(parse_config(data), tmp_path / "plain", progress=False)
    omega = 0.3
    run_merge(parse_config({**data, "aim": {"omega": omega, "stats": str(tmp_path / "s.safetensors")}}),
              tmp_path / "aim", progress=False)
    b, plain, got = load_state(base), load_state(tmp_path / "plain"), load_state(tmp_path / "aim")
    for name, w in plain.items():
        module = module_for_tensor(name)
        expected = w
        if module in stats:
            a = stats[module].double()
            expected = b[name] + (w - b[name]) * (1 - (1 - omega) * a / a.max()).float()
        torch.testing.assert_close(got[name], expected, rtol=1e-5, atol=1e-6, msg=name)


def test_aim_on_stacked_slices_uses_the_base_layer_each_output_layer_merges(llama_family, tmp_path):
    """With slices, an output layer is relaxed by the statistic of the base layer it merges
    (output layer 2 below merges base layer 0, so it takes layer 0's statistics)."""
    base, (expert, _) = llama_family
    stats = _fake_stats(base)
    save_statistics(stats, tmp_path / "stats.safetensors", {"base_model": str(base), "dataset": "test",
                                                            "n_blocks": "1", "block_size": "8", "tokens": "8"})
    ranges = [[0, 2], [0, 2]]
    cfg = {"merge_method": "task_arithmetic", "base_model": str(base), "parameters": {"weight": 0.6},
           "aim": {"omega": 0.3, "stats": str(tmp_path / "stats.safetensors")},
           "slices": [{"sources": [{"model": str(base), "layer_range": r}, {"model": str(expert), "layer_range": r}]}
                      for r in ranges]}
    from distmerge.config import parse_config

    run_merge(parse_config(cfg), tmp_path / "out", progress=False)
    got, b, x = load_state(tmp_path / "out"), load_state(base), load_state(expert)
    for out_layer, src_layer in ((0, 0), (1, 1), (2, 0), (3, 1)):
        name = f"model.layers.{src_layer}.self_attn.q_proj.weight"
        a = stats[module_for_tensor(name)].double()
        r = (1 - 0.7 * a / a.max()).float()
        expected = b[name] + (0.6 * (x[name] - b[name])) * r
        torch.testing.assert_close(got[f"model.layers.{out_layer}.self_attn.q_proj.weight"], expected,
                                   rtol=1e-5, atol=1e-6)
