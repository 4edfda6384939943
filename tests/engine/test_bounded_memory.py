"""Bounded memory: with tensors far larger than the shard budget, no worker allocates more
than a few shards' worth (peak anonymous RSS measured inside each worker)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from distmerge.engine.run import run_merge
from tests.helpers import file_bytes, load_state, make_config

MB = 1000**2


def _synthetic(folder: Path, seed: int, held_rows: int = 0) -> Path:
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    # Two 32 MB tensors per model: each far above the 2 MB shard budget used below.
    tensors = {
        "model.layers.0.mlp.up_proj.weight": torch.randn(2048, 4096, generator=g),
        "model.layers.0.mlp.down_proj.weight": torch.randn(4096, 2048, generator=g),
        "model.norm.weight": torch.randn(4096, generator=g),
    }
    if held_rows:  # a tensor small enough to be read once (held whole) at the shard size of its test
        tensors["model.layers.0.self_attn.o_proj.weight"] = torch.randn(held_rows, 2048, generator=g)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    # Not a real architecture: verify then checks files, headers and checksums, not layer names.
    (folder / "config.json").write_text(json.dumps({"model_type": "synthetic-test", "num_hidden_layers": 1}))
    return folder


def _settled_growth(cfg, tmp_path: Path, shard: int, **options) -> tuple[dict, list[int]]:
    """Merge ``cfg`` until every worker of the last run had merged it before, and return that
    run's report with each worker's growth.

    A worker's first merge of a kind imports and compiles what that kind uses (~40-60 MB),
    and Ray may hand a batch to any process of its pool, so one warm-up run does not make
    every worker of the next run seasoned (CI once measured a fresh one at 58 MB)."""
    seen: set[tuple[str, int]] = set()
    for attempt in range(5):
        out = tmp_path / f"run-{attempt}"
        report = run_merge(cfg, out, shard_size=shard, workers=2, progress=False, **options)
        workers = {(w["node"], w["pid"]) for w in report["workers"]}
        settled = attempt > 0 and workers <= seen
        seen |= workers
        if settled:
            out.rename(tmp_path / "out")
            break
        shutil.rmtree(out)
    else:
        pytest.fail(f"five merges in a row each reached a worker new to this merge: {sorted(seen)}")
    return report, [w["peak_anon_rss"] - w["baseline_anon_rss"] for w in report["workers"]]


@pytest.mark.usefixtures("ray_local")
@pytest.mark.parametrize("executor", ["ray", "local"])
def test_worker_memory_is_bounded_by_shard_size(tmp_path, executor):
    """Ray: each worker process within a few shards. Local: the threads share one process, so
    its growth is bounded by the workers' shards together (the driver holds no tensor data)."""
    base = _synthetic(tmp_path / "base", 0)
    experts = [_synthetic(tmp_path / f"e{i}", i + 1) for i in range(2)]
    shard = 2 * MB
    cfg = make_config("task_arithmetic", base, experts, [0.5, 0.5])
    report, growth = _settled_growth(cfg, tmp_path, shard, executor=executor)
    assert report["executor"] == executor
    tensor_bytes = 2048 * 4096 * 4
    whole_tensor_working_set = 3 * tensor_bytes * 4  # inputs + float32 deltas + output, at least
    assert report["units"] >= 2 * tensor_bytes * 3 * 4 // shard // 4
    workers = 2 if executor == "local" else 1
    assert max(growth) <= workers * 4 * shard + 24 * MB, (growth, report["workers"])
    assert max(growth) < whole_tensor_working_set / 8
    got = load_state(tmp_path / "out")
    b = load_state(base)
    xs = [load_state(e) for e in experts]
    for name in b:
        torch.testing.assert_close(got[name], b[name] + 0.5 * (xs[0][name] - b[name]) + 0.5 * (xs[1][name] - b[name]))


@pytest.mark.usefixtures("ray_local")
@pytest.mark.parametrize("executor", ["ray", "local"])
def test_read_once_memory_is_bounded_by_shard_size(tmp_path, executor):
    """TIES holds a tensor whose rows fit the shard size whole while it runs its rounds and
    merge on them (read once); the 32 MB tensors are reduced apart, in canonical chunks of 2**22
    elements whatever the shard size (here 3 x 16 MB read, more than the shard). No worker grows
    past a few shards or two such chunks, whichever is more, all the same (the report counts the
    reduction tasks' memory too), and the merge is TIES's."""
    from distmerge.plan import build_plan

    base = _synthetic(tmp_path / "base", 0, held_rows=256)
    experts = [_synthetic(tmp_path / f"e{i}", i + 1, held_rows=256) for i in range(2)]
    shard = 8 * MB
    cfg = make_config("ties", base, experts, [0.5, 0.5], parameters={"density": 0.5})
    plan = build_plan(cfg, shard)
    held = {plan.tensors[i].name for i in plan.read_once_tensors}
    assert "model.layers.0.self_attn.o_proj.weight" in held and "model.layers.0.mlp.up_proj.weight" not in held
    chunk = max(c.read_bytes for c in plan.reduction_units(0) if c.tensor not in plan.read_once_tensors)
    assert chunk == 3 * 16 * 2**20 and plan.peak_worker_bytes > chunk > shard
    report, growth = _settled_growth(cfg, tmp_path, shard, executor=executor)
    assert sum(w["reduction_tasks"] for w in report["workers"]) > 0
    workers = 2 if executor == "local" else 1
    assert max(growth) <= workers * max(4 * shard, 2 * chunk) + 24 * MB, (growth, report["workers"])
    reference = tmp_path / "reference"
    run_merge(cfg, reference, shard_size=MB, workers=2, progress=False)  # nothing held: every tensor reduced apart
    assert build_plan(cfg, MB).read_once_tensors <= {i for i, t in enumerate(plan.tensors) if t.name == "model.norm.weight"}
    assert file_bytes(tmp_path / "out") == file_bytes(reference)


@pytest.mark.usefixtures("ray_local")
def test_slice_merge_memory_is_bounded_by_shard_size(tmp_path):
    """Slices stream like any merge: two stacked copies of a layer merged from three models,
    each tensor far above the shard budget, and no worker grows past a few shards."""
    from distmerge.config import parse_config

    base = _synthetic(tmp_path / "base", 0)
    experts = [_synthetic(tmp_path / f"e{i}", i + 1) for i in range(2)]
    sources = [{"model": str(base), "layer_range": [0, 1]}] + [
        {"model": str(e), "layer_range": [0, 1], "parameters": {"weight": w}} for e, w in zip(experts, [0.5, 0.25], strict=True)]
    cfg = parse_config({"merge_method": "task_arithmetic", "base_model": str(base),
                        "slices": [{"sources": sources}, {"sources": sources, "parameters": {"lambda": 2.0}}]})
    shard = 2 * MB
    report, growth = _settled_growth(cfg, tmp_path, shard)
    assert max(growth) <= 4 * shard + 24 * MB, (growth, report["workers"])
    got = load_state(tmp_path / "out")
    b, xs = load_state(base), [load_state(e) for e in experts]
    for layer, lam in ((0, 1.0), (1, 2.0)):
        for rest in ("mlp.up_proj.weight", "mlp.down_proj.weight"):
            name = f"model.layers.0.{rest}"
            delta = 0.5 * (xs[0][name] - b[name]) + 0.25 * (xs[1][name] - b[name])
            torch.testing.assert_close(got[f"model.layers.{layer}.{rest}"], b[name] + lam * delta)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 2


def _vocab_model(folder: Path, seed: int, added: list[str]) -> Path:
    """A one-layer Llama whose token tensors (16384 x 1024 float32, 64 MB) dwarf the shard."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from tests.vocab.conftest import make_tokenizer

    rows = 16384 + len(added)
    cfg = LlamaConfig(vocab_size=rows, hidden_size=1024, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=False)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder, safe_serialization=True)
    make_tokenizer(16384, added).save_pretrained(folder)
    return folder


@pytest.mark.slow
@pytest.mark.usefixtures("ray_local")
def test_vocabulary_merge_memory_is_bounded_by_shard_size(tmp_path):
    """A merged vocabulary streams by rows too: aligned rows are assembled per unit, and the
    padding rows' mean is streamed in chunks, so no worker grows past a few shards."""
    from distmerge.config import parse_config

    a = _vocab_model(tmp_path / "a", 0, [])
    b = _vocab_model(tmp_path / "b", 1, ["<|x|>", "<|y|>"])
    cfg = parse_config({"merge_method": "linear", "tokenizer": {"source": "union", "pad_to_multiple_of": 64},
                        "models": [{"model": str(a), "parameters": {"weight": 0.5}},
                                   {"model": str(b), "parameters": {"weight": 0.5}}]})
    shard = 2 * MB
    report, growth = _settled_growth(cfg, tmp_path, shard)
    # Measured 20-35 MB (Ray's per-batch buffers and the first use of the kernels included); a
    # worker holding one whole aligned input (16448 x 1024 float32) would add 67 MB, the two
    # inputs and the output that a whole-tensor merge needs 200 MB.
    tensor_bytes = 16448 * 1024 * 4
    assert max(growth) < tensor_bytes * 3 // 4, (growth, report["workers"])
    got, sa, sb = load_state(tmp_path / "out"), load_state(a), load_state(b)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert got[name].shape == (16448, 1024)
        aligned_a = torch.cat([sa[name], sb[name][16384:]])  # a lacks the two added tokens: b's rows
        torch.testing.assert_close(got[name][:16386], (0.5 * aligned_a + 0.5 * sb[name]) / 1.0)
        torch.testing.assert_close(got[name][16386:], ((0.5 * aligned_a.mean(0) + 0.5 * sb[name].mean(0)) / 1.0)
                                   .expand(62, 1024), rtol=1e-5, atol=1e-6)
