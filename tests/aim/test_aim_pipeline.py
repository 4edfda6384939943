"""Pipeline equality: staged AIM statistics equal one whole-model transformers forward with hooks.

The reference below is written independently of distmerge.aim: ``from_pretrained`` with eager
attention, forward pre-hooks on every module with a weight that is not an embedding, and
``sum over sequences of mean over tokens of |input|`` in float64. Stages are checked in process
(the StageWorker the Ray actors run) for every architecture and S = 1, 2 and one per layer, and
through Ray for Mistral, Gemma 3 and Phi-3 (S = 2) and for Llama at S = 1 (via ``calibrate``) and one
stage per layer, where each actor also reports what it holds.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distmerge.aim import calibrate, calibrate_stages, load_calibration_sequences, load_statistics
from distmerge.aim.pipeline import run_stages
from distmerge.aim.stage_worker import StageWorker
from distmerge.aim.wire import pack
from distmerge.checkpoint import Checkpoint
from distmerge.config import AimConfig, CalibrationConfig
from distmerge.errors import ConfigError
from tests.conftest import AIM_ARCHS

RTOL = 1e-5
SPLITS = {1: [(0, 3)], 2: [(0, 2), (2, 3)], 3: [(0, 1), (1, 2), (2, 3)]}


def reference_statistics(model_dir: Path, sequences: torch.Tensor, micro_batch: int = 2) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager", dtype=torch.float32).eval()
    sums: dict[str, torch.Tensor] = {}

    def hook_for(name: str):  # type: ignore[no-untyped-def]
        def hook(module, args):  # type: ignore[no-untyped-def]
            x = args[0].detach().double().abs()
            x = x.reshape(x.shape[0], -1, x.shape[-1])  # [blocks, tokens (x heads), channels]
            sums[name] = sums.get(name, 0) + x.mean(dim=1).sum(dim=0)

        return hook

    for name, module in model.named_modules():
        if isinstance(getattr(module, "weight", None), torch.Tensor) and not isinstance(module, torch.nn.Embedding):
            module.register_forward_pre_hook(hook_for(name))
    with torch.no_grad():
        for batch in sequences.split(micro_batch):
            model(input_ids=batch)
    return sums


def assert_stats_equal(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(ref), set(got) ^ set(ref)
    assert {"lm_head", "model.norm", "model.layers.2.mlp.down_proj"} <= set(got)
    for name, value in ref.items():
        assert got[name].shape == value.shape, name
        assert bool((value > 0).all()), name  # real activations, nothing vacuous
        err = float((got[name].double() - value).abs().max() / value.abs().max())
        assert err <= RTOL, f"{name}: relative error {err}"


def run_in_process(model_dir: Path, sequences: torch.Tensor, ranges: list[tuple[int, int]], micro_batch: int = 2):  # type: ignore[no-untyped-def]
    workers = [StageWorker(model_dir, a, b, i == 0, i == len(ranges) - 1) for i, (a, b) in enumerate(ranges)]
    for batch in sequences.split(micro_batch):
        payload = {"input_ids": pack(batch)}
        for worker in workers:
            payload = worker.forward(payload)
    stats: dict[str, torch.Tensor] = {}
    for worker in workers:
        stats.update(worker.statistics())
    return stats, [w.describe() for w in workers]


def expected_holdings(model_dir: Path, ranges: list[tuple[int, int]]) -> list[tuple[set[str], int]]:
    """Per stage: the parameter names it must hold and their bytes (tied head read from embeddings)."""
    ckpt = Checkpoint.open(model_dir)
    out = []
    for i, (a, b) in enumerate(ranges):
        names = {n for n in ckpt.tensors if any(n.startswith(f"model.layers.{j}.") for j in range(a, b))}
        if i == 0:
            names.add("model.embed_tokens.weight")
        if i == len(ranges) - 1:
            names |= {"model.norm.weight", "lm_head.weight"}
        storage = {n if n in ckpt.tensors else "model.embed_tokens.weight" for n in names}
        out.append((names, sum(ckpt.tensors[n].nbytes for n in storage)))
    return out


@pytest.fixture(scope="module")
def sequences() -> torch.Tensor:
    return torch.randint(0, 256, (5, 24), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def references(aim_models: dict[str, Path], sequences: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
    return {arch: reference_statistics(path, sequences) for arch, path in aim_models.items()}


@pytest.mark.parametrize("arch", list(AIM_ARCHS))
def test_staged_equals_whole_model_in_process(arch: str, aim_models, sequences, references) -> None:  # type: ignore[no-untyped-def]
    for num_stages, ranges in SPLITS.items():
        stats, reports = run_in_process(aim_models[arch], sequences, ranges)
        assert_stats_equal(stats, references[arch])
        for report, (names, nbytes) in zip(reports, expected_holdings(aim_models[arch], ranges), strict=True):
            assert set(report["parameters"]) == names, (num_stages, report["layers"])
            assert report["bytes"] == nbytes, (num_stages, report["layers"])


def test_the_last_stage_takes_the_heads_statistic_without_computing_logits(aim_models, sequences, references) -> None:  # type: ignore[no-untyped-def]
    """The head's output is never read, so its matmul (vocab x hidden per token, the largest of a
    small model) is not run; its statistic, its input's, still equals the whole model's."""
    head_calls: list[str] = []
    for arch in ("llama", "gemma3"):
        worker = StageWorker(aim_models[arch], 1, 3, False, True)
        worker.head.register_forward_hook(lambda module, args, out, arch=arch: head_calls.append(arch))
        first = StageWorker(aim_models[arch], 0, 1, True, False)
        for batch in sequences.split(2):
            worker.forward(first.forward({"input_ids": pack(batch)}))
        got, ref = worker.statistics()["lm_head"], references[arch]["lm_head"]
        assert bool((ref > 0).all())
        assert float((got.double() - ref).abs().max() / ref.abs().max()) <= RTOL, arch
    assert head_calls == []


def test_masks_and_rope_are_exercised(aim_models, sequences, references, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Dropping the sliding window or Gemma 3's per-type rope breaks equality: the test sees them."""
    import distmerge.aim.stage_worker as sw

    original = sw.causal_mask
    monkeypatch.setattr(sw, "causal_mask", lambda t, d, dev, sliding_window=None: original(t, d, dev))
    for arch in ("mistral", "gemma2"):
        stats, _ = run_in_process(aim_models[arch], sequences, SPLITS[1])
        ref = references[arch]
        err = float((stats["lm_head"] - ref["lm_head"]).abs().max() / ref["lm_head"].abs().max())
        assert err > 1e-3, arch
    monkeypatch.undo()
    worker = StageWorker(aim_models["gemma3"], 0, 3, True, True)
    rotary = worker.rotary
    worker.rotary = lambda h, pos, kind: rotary(h, pos, "sliding_attention")  # global layer gets local rope
    worker.forward({"input_ids": pack(sequences)})
    got, ref = worker.statistics()["lm_head"], references["gemma3"]["lm_head"]
    assert float((got - ref).abs().max() / ref.abs().max()) > 1e-3


# Through Ray: the layouts that differ most (sliding windows, tied head, local/global rope, fused
# projections); every architecture is covered at every S in process above, by the same StageWorker.
@pytest.mark.parametrize("arch", ["mistral", "gemma3", "phi3"])
def test_ray_pipeline_equals_whole_model(arch: str, ray_local, aim_models, sequences, references) -> None:  # type: ignore[no-untyped-def]
    stats, _ = calibrate_stages(aim_models[arch], sequences, stages=2, micro_batch_size=2, progress=False)
    assert all(v.dtype == torch.float32 for v in stats.values())
    assert_stats_equal(stats, references[arch])


def test_ray_one_stage_per_layer_holds_only_its_layers(ray_local, aim_models, sequences, references) -> None:  # type: ignore[no-untyped-def]
    ranges = SPLITS[3]
    stats, reports = run_stages(aim_models["llama"], sequences, ranges, micro_batch_size=1, progress=False)
    assert_stats_equal(stats, references["llama"])
    for report, (names, nbytes) in zip(reports, expected_holdings(aim_models["llama"], ranges), strict=True):
        assert set(report["parameters"]) == names
        assert report["bytes"] == nbytes
        assert report["device"] == "cpu"
    total = Checkpoint.open(aim_models["llama"]).total_bytes
    assert sum(r["bytes"] for r in reports) == total  # nothing held twice


def _count_actor_starts(monkeypatch) -> list:  # type: ignore[no-untyped-def]
    from distmerge.aim import stage_actors

    starts: list = []
    start = stage_actors.start_actors
    monkeypatch.setattr(stage_actors, "start_actors", lambda *args: starts.append(args[2]) or start(*args))
    return starts


def test_data_that_fails_its_checks_starts_no_stage(ray_local, aim_models, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The stage actors start only once the data is tokenized: a user's mistake in the data or
    the tokenizer's files is reported without any actor (killing one still being created makes
    Ray print a worker error beside distmerge's own)."""
    import shutil

    from distmerge.errors import CheckpointError

    starts = _count_actor_starts(monkeypatch)
    bare = tmp_path / "no_tokenizer"
    shutil.copytree(aim_models["llama"], bare, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens*"))
    aim = AimConfig(calibration=CalibrationConfig(dataset="builtin", n_samples=2, block_size=64), stages=1)
    with pytest.raises(CheckpointError, match="no tokenizer found"):
        calibrate(bare, aim, None, progress=False)
    # Settings without a vocabulary: named as such (transformers speaks of converters, in 5 lines).
    shutil.copy(aim_models["llama"] / "tokenizer_config.json", bare)
    with pytest.raises(CheckpointError, match=r"no_tokenizer: its tokenizer has settings \(tokenizer_config\.json\) "
                                              r"but no vocabulary \(tokenizer\.json, ") as caught:
        calibrate(bare, aim, None, progress=False)
    assert "\n" not in str(caught.value)
    # A broken config.json is named as the model folder's error, before the tokenizer is loaded.
    shutil.copy(aim_models["llama"] / "tokenizer.json", bare)
    for text, message in [("[]", "config.json: expected a JSON object of settings, got an array"),
                          ("{broken", "config.json: not valid JSON")]:
        (bare / "config.json").write_text(text)
        with pytest.raises(CheckpointError, match=message):
            calibrate(bare, aim, None, progress=False)
    # A broken tokenizer file is named (transformers' JSON error does not say which file).
    shutil.copy(aim_models["llama"] / "config.json", bare)
    for name, text, why in [("tokenizer.json", None, "not valid JSON"), ("tokenizer_config.json", None, "not valid JSON"),
                            ("tokenizer.json", b"null", "expected a JSON object, got null"),
                            ("tokenizer_config.json", b"[]", "expected a JSON object, got an array")]:
        good = (bare / name).read_bytes()
        (bare / name).write_bytes(good[:-40] if text is None else text)
        with pytest.raises(CheckpointError, match=rf"no_tokenizer: cannot load its tokenizer: {name}: {why}"):
            calibrate(bare, aim, None, progress=False)
        (bare / name).write_bytes(good)
    (bare / "tokenizer.json").write_bytes(b"{}")  # an object without what transformers looks up: still one line
    with pytest.raises(CheckpointError, match=r"no_tokenizer: cannot load its tokenizer \(a tokenizer file lacks"):
        calibrate(bare, aim, None, progress=False)
    shutil.copy(aim_models["llama"] / "tokenizer.json", bare)
    text = tmp_path / "d.jsonl"
    text.write_text('{"body": "some text"}\n')
    aim = AimConfig(calibration=CalibrationConfig(dataset=str(text), n_samples=2, block_size=64), stages=1)
    with pytest.raises(ConfigError, match="column 'text' is not in"):
        calibrate(aim_models["llama"], aim, None, progress=False)
    assert starts == []


def test_calibrate_one_stage_saves_statistics(ray_local, aim_models, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    base = aim_models["llama"]
    aim = AimConfig(calibration=CalibrationConfig(dataset="builtin", n_samples=6, block_size=512, seed=1), stages=1)
    out = tmp_path / "aim_stats.safetensors"
    starts = _count_actor_starts(monkeypatch)
    stats, meta = calibrate(base, aim, out, progress=False)
    assert len(starts) == 1  # one start of the stages: no pass run twice
    sequences = load_calibration_sequences(aim.calibration, base)
    assert_stats_equal(stats, reference_statistics(base, sequences, micro_batch=4))
    loaded, saved_meta = load_statistics(out)
    assert set(loaded) == set(stats) and all(torch.equal(loaded[k], stats[k]) for k in stats)
    assert saved_meta["n_blocks"] == str(sequences.shape[0]) and saved_meta["block_size"] == "512"
    assert saved_meta["tokens"] == str(sequences.numel()) and saved_meta["dataset"] == "builtin"
    assert saved_meta["base_model"] == str(base.resolve())


def test_one_stage_in_this_process_equals_the_ray_stage_bit_for_bit(ray_local, aim_models, sequences, references) -> None:  # type: ignore[no-untyped-def]
    """The in-process path (no Ray running, one stage) computes what a lone Ray stage actor
    computes, with the threads that actor gets: the same statistics, not just close ones."""
    from distmerge.aim import in_process, stage_actors
    from distmerge.aim.layout import open_base

    base = aim_models["gemma3"]
    checkpoint, layout = open_base(base)
    placement, dtype, device = in_process.plan_here(checkpoint, layout, sequences.shape[1], 2, None)
    assert (placement.layers, dtype, device) == ((0, 3), torch.float32, "cpu")
    threads = int(stage_actors.actor_resources([placement])[0])
    here, reports = in_process.run_here(base, sequences, placement, 2, False, dtype, device, threads=threads)
    on_ray, _ = run_stages(base, sequences, [(0, 3)], micro_batch_size=2, progress=False)
    assert here.keys() == on_ray.keys() and all(torch.equal(here[k], on_ray[k]) for k in here)
    assert_stats_equal(here, references["gemma3"])
    assert [(r["layers"], r["node_id"], r["device"]) for r in reports] == [((0, 3), "in-process", "cpu")]


def test_calibrate_runs_in_this_process_only_without_ray_and_for_one_stage(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from distmerge.aim import in_process
    from distmerge.engine import executors

    monkeypatch.setattr(executors, "ray_running", lambda: False)
    assert in_process.runs_here("auto", None) and in_process.runs_here(1, None)
    assert not in_process.runs_here(2, None) and not in_process.runs_here("auto", 10**9)
    monkeypatch.setattr(executors, "ray_running", lambda: True)
    assert not in_process.runs_here("auto", None)
    assert in_process.pipeline_reason(AimConfig(stages=3)) == "aim.stages: 3 asks for a pipeline of 3 Ray stage actors"
    assert "aim.stage_memory" in in_process.pipeline_reason(AimConfig(stage_memory="2GB"))
    assert in_process.pipeline_reason(AimConfig()) is None and in_process.pipeline_reason(AimConfig(stages=1)) is None


def test_unsupported_architecture_and_bad_ids(tmp_path, aim_models) -> None:  # type: ignore[no-untyped-def]
    import json
    import shutil

    other = tmp_path / "gpt2ish"
    shutil.copytree(aim_models["llama"], other)
    config = json.loads((other / "config.json").read_text())
    config["model_type"] = "gpt2"
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="gemma2, gemma3_text, llama, mistral, phi3, qwen2, qwen3"):
        calibrate_stages(other, torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ConfigError, match="vocabulary has 260"):
        calibrate_stages(aim_models["llama"], torch.full((1, 4), 999))


def test_auto_stages_follow_the_memory_budget(aim_models, caplog) -> None:  # type: ignore[no-untyped-def]
    from distmerge.aim.layout import open_base
    from distmerge.aim.stage_plan import plan_model_stages

    ckpt, layout = open_base(aim_models["llama"])
    layer = sum(i.nbytes for n, i in ckpt.tensors.items() if n.startswith("model.layers.0."))
    embed = ckpt.tensors["model.embed_tokens.weight"].nbytes
    head = ckpt.tensors["lm_head.weight"].nbytes + ckpt.tensors["model.norm.weight"].nbytes
    assert plan_model_stages(ckpt, layout, "auto", 10**9, 4) == [(0, 3)]
    assert plan_model_stages(ckpt, layout, "auto", embed + 2 * layer, 4) == [(0, 2), (2, 3)]
    assert plan_model_stages(ckpt, layout, "auto", max(embed, head) + layer, 4) == [(0, 1), (1, 2), (2, 3)]
    # bf16 compute halves the bytes: two fp32-sized layers fit a one-layer budget.
    assert plan_model_stages(ckpt, layout, "auto", (embed + 2 * layer) // 2, 2) == [(0, 2), (2, 3)]
    assert plan_model_stages(ckpt, layout, 5, 0, 4) == [(0, 1), (1, 2), (2, 3)]
    assert "exceeds the 3 decoder layers" in caplog.text


def test_bf16_checkpoint_computes_in_float32(tmp_path, sequences) -> None:  # type: ignore[no-untyped-def]
    """A bf16 Gemma 3 checkpoint calibrated in float32 equals the float32 whole-model forward.

    Its embedding scale sqrt(80) is not a bf16 number: built in the checkpoint's dtype (as
    ``from_config`` does by default) it was rounded, and every statistic moved by ~7e-4.
    """
    from distmerge.testing.tiny import build_model

    kw = dict(AIM_ARCHS["gemma3"], hidden_size=80)
    model_dir = build_model(tmp_path / "gemma3_bf16", "gemma3", dtype=torch.bfloat16, num_hidden_layers=3, **kw)
    worker = StageWorker(model_dir, 0, 3, True, True)
    assert worker.embed.embed_scale.dtype == torch.float32
    assert float(worker.embed.embed_scale) == pytest.approx(80**0.5, rel=1e-7)
    ref = reference_statistics(model_dir, sequences)
    for ranges in SPLITS.values():
        assert_stats_equal(run_in_process(model_dir, sequences, ranges)[0], ref)
