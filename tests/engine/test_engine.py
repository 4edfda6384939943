"""The merge engine end to end on an embedded Ray: reference equality, shard invariance,
loading in transformers, dtypes, tied embeddings and input mismatches."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from distmerge.engine.run import run_merge
from distmerge.errors import CheckpointError, OutputError
from distmerge.testing.tiny import build_family
from tests.helpers import file_bytes, load_state, make_config

pytestmark = pytest.mark.usefixtures("ray_local")


def _t(name: str, layers: int) -> float:
    m = re.search(r"layers\.(\d+)\.", name)
    return int(m.group(1)) / (layers - 1) if m else 0.0


def reference_task_arithmetic(base: Path, experts: list[Path], weight_fns, lam=1.0, layers=4):
    b = load_state(base)
    xs = [load_state(e) for e in experts]
    out = {}
    for name, tb in b.items():
        t = _t(name, layers)
        delta = sum(fn(t) * (x[name].float() - tb.float()) for fn, x in zip(weight_fns, xs, strict=True))
        out[name] = tb.float() + lam * delta
    return out


def test_task_arithmetic_equals_reference_with_gradient(llama_family, tmp_path):
    base, experts = llama_family
    cfg = make_config("task_arithmetic", base, experts, [0.6, [0.2, 0.8]], parameters={"lambda": 0.9},
                      execution={"shard_size": "10KB"})
    report = run_merge(cfg, tmp_path / "out", progress=False)
    got = load_state(tmp_path / "out")
    ref = reference_task_arithmetic(base, experts, [lambda t: 0.6, lambda t: 0.2 + 0.6 * t], lam=0.9)
    assert set(got) == set(ref)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-6, msg=name)
    assert report["units"] > len(ref)  # tensors really were cut into several row shards
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(ref)
    assert not list((tmp_path / "out").glob("*.partial"))


def test_linear_filters_equal_reference(llama_family, tmp_path):
    base, experts = llama_family
    weight = [{"filter": "mlp", "value": 2.0}, {"filter": "self_attn", "value": [0.0, 1.0]}, {"value": 1.0}]
    cfg = make_config("linear", None, experts, [weight, 1.0])
    run_merge(cfg, tmp_path / "out", progress=False)
    got = load_state(tmp_path / "out")
    xs = [load_state(e) for e in experts]
    for name, x0 in xs[0].items():
        w0 = 2.0 if "mlp" in name else (_t(name, 4) if "self_attn" in name else 1.0)
        expected = (w0 * x0 + 1.0 * xs[1][name]) / (w0 + 1.0)
        torch.testing.assert_close(got[name], expected, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("shard_size", ["1B", "13KB", "70KB", "1GB"])
def test_shard_invariance(llama_family, tmp_path, shard_size):
    base, experts = llama_family
    reference_dir = tmp_path.parent / "shard_reference"
    if not reference_dir.exists():
        run_merge(make_config("task_arithmetic", base, experts, [0.7, 0.4]), reference_dir, shard_size=10**12,
                  workers=1, progress=False)
    cfg = make_config("task_arithmetic", base, experts, [0.7, 0.4])
    report = run_merge(cfg, tmp_path / "out", shard_size=int(shard_size[:-2]) * 1000 if shard_size.endswith("KB")
                       else (1 if shard_size == "1B" else 10**9), workers=3, progress=False)
    assert file_bytes(tmp_path / "out") == file_bytes(reference_dir)
    if shard_size == "1B":
        rows = sum(t.shape[0] if t.dim() else 1 for t in load_state(base).values())
        assert report["units"] == rows  # one row per unit


def test_merged_checkpoint_loads_and_matches_in_memory_merge(llama_family, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, experts = llama_family
    run_merge(make_config("task_arithmetic", base, experts, [0.5, 0.5]), tmp_path / "out", progress=False)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    in_memory = AutoModelForCausalLM.from_pretrained(base)
    xs = [AutoModelForCausalLM.from_pretrained(e).state_dict() for e in experts]
    with torch.no_grad():
        state = {k: v + 0.5 * (xs[0][k] - v) + 0.5 * (xs[1][k] - v) for k, v in in_memory.state_dict().items()}
        in_memory.load_state_dict(state)
    ids = AutoTokenizer.from_pretrained(tmp_path / "out")("merge me", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, in_memory(ids).logits, rtol=1e-5, atol=1e-5)
    generated = merged.generate(ids, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] == ids.shape[1] + 4


@pytest.mark.parametrize("dtype,out_dtype", [(torch.bfloat16, None), (torch.float16, "float32"), (torch.float32, "bfloat16")])
def test_dtypes_and_tied_embeddings(tmp_path, dtype, out_dtype):
    base, experts = build_family(tmp_path / "models", n_experts=2, dtype=dtype, tie_word_embeddings=True)
    assert "lm_head.weight" not in load_state(base)
    extra = {"out_dtype": out_dtype} if out_dtype else {}
    run_merge(make_config("task_arithmetic", base, experts, [0.5, 0.25], **extra), tmp_path / "out", progress=False)
    got = load_state(tmp_path / "out")
    # No `dtype`: as mergekit 0.1.5, the merge runs in the stored dtype (each op rounded to it,
    # the sum over the models accumulated in float32 and rounded once), then out_dtype.
    b, xs = load_state(base), [load_state(e) for e in experts]
    w = torch.tensor([0.5, 0.25], dtype=dtype)
    ref = {name: tb + torch.stack([(x[name] - tb) * w[i] for i, x in enumerate(xs)]).sum(dim=0)
           for name, tb in b.items()}
    want = {None: dtype, "float32": torch.float32, "bfloat16": torch.bfloat16}[out_dtype]
    assert "lm_head.weight" not in got
    for name, r in ref.items():
        assert got[name].dtype == want
        torch.testing.assert_close(got[name], r.to(want), rtol=0, atol=0, msg=name)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == str(want).removeprefix("torch.")


def test_max_file_size_splits_output(llama_family, tmp_path):
    base, experts = llama_family
    cfg = make_config("linear", None, experts, [1.0, 1.0], execution={"max_file_size": "200KB"})
    run_merge(cfg, tmp_path / "out", progress=False)
    files = sorted(p.name for p in (tmp_path / "out").glob("*.safetensors"))
    assert len(files) >= 4 and all(p.stat().st_size <= 200_000 + 4096 for p in (tmp_path / "out").glob("*.safetensors"))
    assert files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    got = load_state(tmp_path / "out")
    xs = [load_state(e) for e in experts]
    for name in xs[0]:
        torch.testing.assert_close(got[name], (xs[0][name] + xs[1][name]) / 2)


def test_missing_tensor_and_shape_mismatch_are_named(llama_family, tmp_path):
    from safetensors.torch import load_file, save_file

    base, experts = llama_family
    broken = tmp_path / "broken"
    broken.mkdir()
    for p in experts[0].iterdir():
        (broken / p.name).write_bytes(p.read_bytes())
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    victim = "model.layers.1.mlp.down_proj.weight"
    file = broken / index["weight_map"][victim]
    tensors = load_file(file)
    tensors.pop(victim)
    save_file(tensors, file, metadata={"format": "pt"})
    del index["weight_map"][victim]
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"models\[1\].*down_proj.*missing"):
        run_merge(make_config("task_arithmetic", base, [experts[1], broken], [1, 1]), tmp_path / "o1", progress=False)

    tensors[victim] = torch.zeros(3, 3)
    save_file(tensors, file, metadata={"format": "pt"})
    index["weight_map"][victim] = file.name
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"down_proj.*shape \[3, 3\].*\[64, 160\]"):
        run_merge(make_config("task_arithmetic", base, [broken], [1]), tmp_path / "o2", progress=False)
    assert not (tmp_path / "o1" / "model.safetensors.index.json").exists()


def test_refuses_non_empty_output_dir(llama_family, tmp_path):
    base, experts = llama_family
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(OutputError, match="not empty.*--overwrite"):
        run_merge(make_config("linear", None, experts, [1, 1]), out, progress=False)
    assert (out / "precious.txt").read_text() == "keep me"


def test_report_records_nodes_and_memory(llama_family, tmp_path):
    base, experts = llama_family
    report = run_merge(make_config("task_arithmetic", base, experts, [1, 1]), tmp_path / "out", progress=False)
    saved = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    assert saved["bytes_written"] == report["bytes_written"] == sum(v.numel() * 4 for v in load_state(base).values())
    assert saved["bytes_read"] == 3 * saved["bytes_written"]
    assert sum(n["units"] for n in saved["nodes"].values()) == saved["units"]
    assert saved["peak_worker_anon_rss"] > 0
