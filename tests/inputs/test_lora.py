"""LoRA adapters as merge inputs (``model: MODEL+ADAPTER``, mergekit 0.1.5's syntax).

The reference is the whole model with the adapter merged the way PEFT's ``merge_and_unload``
does it (tests/inputs/lora_fixtures.py: plain torch, whole tensors); distmerge forms the same
rows a row range at a time. Cases: a bfloat16 model with a float32 adapter and a float32 model
with a bfloat16, rsLoRA adapter; both adapt the embedding, attention and MLP projections, have a
rank_pattern and an alpha_pattern entry and replace ``lm_head`` (modules_to_save).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file as load_state_file
from safetensors.torch import save_file

from distmerge.cli import main
from distmerge.config import parse_config
from distmerge.errors import CheckpointError, OutputError
from distmerge.lora import (
    LoraCheckpoint,
    LoraTensorInfo,
    open_model,
    read_adapted_rows,
    split_reference,
)
from distmerge.lora.rows import fma_product
from distmerge.output.directory import input_paths
from distmerge.output.location import check_output_location
from distmerge.plan import build_plan
from tests.helpers import file_bytes, load_state, read_chars
from tests.inputs.lora_fixtures import reference_merge, write_adapter

PEFT_SCRIPT = Path(__file__).with_name("peft_merge.py")
TARGETS = ["model.embed_tokens.weight",
           *(f"model.layers.{i}.self_attn.{p}.weight" for i in range(4) for p in ("q_proj", "v_proj")),
           *(f"model.layers.{i}.mlp.down_proj.weight" for i in range(4))]
CASES = {"bf16": (torch.bfloat16, torch.float32, False), "fp32": (torch.float32, torch.bfloat16, True),
         "fp16": (torch.float16, torch.float16, True)}


@pytest.fixture(scope="module")
def lora_cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """Per case: the model, the adapter, and a folder holding the fully merged reference weights."""
    from distmerge.testing.tiny import build_model

    root = tmp_path_factory.mktemp("lora")
    cases = {}
    for tag, (model_dtype, adapter_dtype, rslora) in CASES.items():
        model = build_model(root / f"model-{tag}", dtype=model_dtype, seed=1)
        state = load_state(model)
        adapter = root / f"adapter-{tag}"
        tensors = write_adapter(adapter, state, TARGETS, r=3, alpha=10, rslora=rslora, dtype=adapter_dtype,
                                rank_pattern={"layers.1.self_attn.q_proj": 2}, alpha_pattern={"down_proj": 3},
                                modules_to_save=["lm_head"], seed=7)
        reference = reference_merge(state, tensors, json.loads((adapter / "adapter_config.json").read_text()))
        merged = root / f"merged-{tag}"
        shutil.copytree(model, merged, ignore=shutil.ignore_patterns("*.safetensors"))
        for shard in sorted(model.glob("*.safetensors")):  # the model's own files, merged values
            names = list(load_state_file(shard))
            save_file({k: reference[k].contiguous() for k in names}, str(merged / shard.name), metadata={"format": "pt"})
        cases[tag] = {"model": model, "adapter": adapter, "merged": merged, "reference": reference,
                      "state": state, "ref": f"{model}+{adapter}"}
    return cases


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and \
        a.contiguous().view(torch.uint8).equal(b.contiguous().view(torch.uint8))


@pytest.mark.parametrize("tag", CASES)
def test_adapted_rows_equal_the_whole_merge_bit_for_bit(lora_cases, tag):
    case = lora_cases[tag]
    ckpt = open_model(case["ref"])
    assert isinstance(ckpt, LoraCheckpoint) and ckpt.label == case["ref"]
    adapted = {n: t for n, t in ckpt.tensors.items() if isinstance(t, LoraTensorInfo)}
    assert sorted(adapted) == sorted(TARGETS)
    assert adapted["model.embed_tokens.weight"].kind == "embedding"
    assert adapted["model.layers.1.self_attn.q_proj.weight"].lora_a.shape[0] == 2  # rank_pattern
    assert ckpt.tensors["lm_head.weight"].file.endswith("adapter_model.safetensors")  # modules_to_save
    for name, info in adapted.items():
        expected = case["reference"][name]
        assert not _same_bytes(expected, case["state"][name])  # the adapter changes every target
        rows = info.rows
        for r0, r1 in ((0, 1), (5, 6), (rows - 1, rows), (3, 10), (1, rows - 2), (0, rows)):
            assert _same_bytes(read_adapted_rows(info, r0, r1), expected[r0:r1]), (name, r0, r1)


def test_fma_chain_is_the_blas_product_and_a_row_slice_of_it_is_not():
    """Why the delta is not ``B[r0:r1] @ A``: a 1-row product takes another BLAS path and rounds
    differently, while the FMA chain equals the whole product for any row range."""
    gen = torch.Generator().manual_seed(0)
    b, a = torch.randn(160, 8, generator=gen), torch.randn(8, 64, generator=gen)
    whole = b @ a
    assert _same_bytes(fma_product(b, a), whole)
    assert all(_same_bytes(fma_product(b[i:i + 1], a), whole[i:i + 1]) for i in range(0, 160, 17))


def test_reads_only_the_rows_asked_for(lora_cases):
    """Bounded memory: rows [r0, r1) read only those rows of the weight and of B (A's columns
    for an embedding); the factor that is small (A, or an embedding's B) is read whole."""
    ckpt = open_model(lora_cases["bf16"]["ref"])
    for name in ("model.layers.2.mlp.down_proj.weight", "model.embed_tokens.weight"):
        info = ckpt.tensors[name]
        read_adapted_rows(info, 0, 1)  # the FMA loop compiled or loaded from numba's cache first
        r0, r1 = 7, 12
        start = read_chars()
        overhead = read_chars() - start  # reading /proc/self/io itself
        before = read_chars()
        read_adapted_rows(info, r0, r1)
        got = read_chars() - before - overhead
        a, b = info.lora_a, info.lora_b
        if info.kind == "linear":  # B's rows, A whole
            sliced, small = b.span(r0, r1)[1], a
        else:  # A's columns (one span per rank), B whole
            sliced, small = a.shape[0] * (r1 - r0) * (a.nbytes // a.numel), b
        assert got == info.span(r0, r1)[1] + sliced + small.nbytes, name
        assert got < info.nbytes + b.nbytes


def _run(cfg: dict, out: Path, shard: str) -> dict[str, bytes]:
    from distmerge.engine.run import run_merge

    run_merge(parse_config({**cfg, "execution": {"shard_size": shard}}), out, progress=False)
    return file_bytes(out)


@pytest.mark.slow
@pytest.mark.usefixtures("ray_local")
def test_merge_of_model_plus_adapter_equals_merge_of_merged_model(lora_cases, tmp_path):
    """linear (bf16) and TIES with the LoRA input as the base (fp32, reduction rounds): the output
    is the merge of the fully merged folder, byte for byte, under several shard sizes."""
    bf16 = lora_cases["bf16"]
    linear = {"merge_method": "linear", "dtype": "float32", "out_dtype": "bfloat16"}

    def models(first: str) -> list:
        return [{"model": first, "parameters": {"weight": 0.7}}, {"model": str(bf16["model"]),
                                                                  "parameters": {"weight": 0.3}}]

    expected = _run({**linear, "models": models(str(bf16["merged"]))}, tmp_path / "ref-linear", "1GB")
    for shard in ("3KB", "37KB", "1GB"):
        assert _run({**linear, "models": models(bf16["ref"])}, tmp_path / f"linear-{shard}", shard) == expected
    report = json.loads((tmp_path / "linear-3KB" / "merge_report.json").read_text())
    assert str(bf16["adapter"] / "adapter_model.safetensors") in report["lora_adapters"][bf16["ref"]]

    fp32 = lora_cases["fp32"]
    ties = {"merge_method": "ties", "models": [{"model": str(fp32["model"]), "parameters": {"weight": 0.5,
                                                                                             "density": 0.5}}]}
    expected = _run({**ties, "base_model": str(fp32["merged"])}, tmp_path / "ref-ties", "1GB")
    for shard in ("5KB", "1GB"):
        assert _run({**ties, "base_model": fp32["ref"]}, tmp_path / f"ties-{shard}", shard) == expected


def test_adapter_is_an_input_of_the_fingerprint_and_of_the_output_checks(lora_cases, tmp_path):
    from distmerge.engine.fingerprint import input_fingerprint_data

    case = lora_cases["fp32"]
    adapter = tmp_path / "adapter"
    shutil.copytree(case["adapter"], adapter)
    cfg = parse_config({"merge_method": "linear", "models": [
        {"model": f"{case['model']}+{adapter}", "parameters": {"weight": 1.0}}]})
    before = input_fingerprint_data(build_plan(cfg))
    config_path = adapter / "adapter_config.json"
    text = config_path.read_text()
    assert '"lora_alpha": 10' in text
    config_path.write_text(text.replace('"lora_alpha": 10', '"lora_alpha": 16'))
    assert input_fingerprint_data(build_plan(cfg)) != before  # scale changed
    before = input_fingerprint_data(build_plan(cfg))
    os.utime(adapter / "adapter_model.safetensors", ns=(1, 1))
    assert input_fingerprint_data(build_plan(cfg)) != before  # the weights file's identity changed
    paths = input_paths(cfg, None)
    assert paths["models[0]"] == case["model"] and paths["models[0] adapter"] == adapter
    with pytest.raises(OutputError):
        check_output_location(adapter / "out", paths)


def test_aim_calibration_of_a_lora_base_is_refused(lora_cases):
    from distmerge.aim.calibration import calibrate
    from distmerge.errors import ConfigError

    with pytest.raises(ConfigError, match="LoRA base"):
        calibrate(Path(lora_cases["fp32"]["ref"]), None)  # type: ignore[arg-type]


def test_split_reference_follows_mergekit(tmp_path):
    assert split_reference("/m/a+/m/b") == ("/m/a", "/m/b")
    assert split_reference("/m/a") == ("/m/a", None)
    plus = tmp_path / "a+b"
    plus.mkdir()
    assert split_reference(str(plus)) == (str(plus), None)  # an existing path with '+' is a model
    assert split_reference(f"{plus}+/x/y") == (str(plus), "/x/y")  # the split whose model exists
    with pytest.raises(CheckpointError, match="more than one"):
        split_reference("/no/a+/no/b+/no/c")
    with pytest.raises(CheckpointError, match="MODEL\\+ADAPTER"):
        split_reference("/m/a+")


def _careless(case: dict, tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """Adapter folders a user might pass by mistake, and what the error must name."""
    made = {}
    missing = tmp_path / "missing"
    made["missing adapter folder"] = (missing, "does not exist")
    other = tmp_path / "other"
    wrong = {n: torch.zeros(t.shape[0] * 2, t.shape[1]) for n, t in case["state"].items() if n in TARGETS}
    write_adapter(other, wrong, TARGETS)
    made["adapter for another model"] = (other, "another model")
    dora = tmp_path / "dora"
    write_adapter(dora, case["state"], TARGETS[1:3], extra_config={"use_dora": True})
    made["DoRA"] = (dora, "use_dora")
    corrupt = tmp_path / "corrupt"
    write_adapter(corrupt, case["state"], TARGETS[1:3])
    data = (corrupt / "adapter_model.safetensors").read_bytes()
    (corrupt / "adapter_model.safetensors").write_bytes(data[: len(data) - 100])
    made["corrupt adapter file"] = (corrupt, "adapter_model.safetensors")
    prefix = tmp_path / "prompt"
    write_adapter(prefix, case["state"], TARGETS[1:3], extra_config={"peft_type": "PREFIX_TUNING"})
    made["not a LoRA adapter"] = (prefix, "peft_type")
    untargeted = tmp_path / "untargeted"
    write_adapter(untargeted, {**case["state"], "model.layers.9.mlp.up_proj.weight": torch.zeros(160, 64)},
                  ["model.layers.9.mlp.up_proj.weight"])
    made["target missing from the model"] = (untargeted, "model.layers.9.mlp.up_proj.weight")
    return made


def test_careless_adapters_are_clear_errors_through_the_cli(lora_cases, tmp_path, capsys):
    case = lora_cases["fp32"]
    for what, (adapter, needle) in _careless(case, tmp_path).items():
        cfg = tmp_path / f"{adapter.name}.yml"
        cfg.write_text(yaml.safe_dump({"merge_method": "linear", "models": [
            {"model": f"{case['model']}+{adapter}", "parameters": {"weight": 1.0}}]}))
        assert main(["plan", str(cfg)]) == 2, what
        err = capsys.readouterr().err
        assert "Traceback" not in err and "internal error" not in err, (what, err)
        assert needle in err and str(adapter) in err, (what, err)


@pytest.fixture(scope="module")
def mergekit_python() -> Path:
    """The mergekit 0.1.5 reference venv's Python (it has PEFT), created on first use; its absence
    fails the test unless DISTMERGE_SKIP_MERGEKIT=1 opts out explicitly."""
    from distmerge.testing import mergekit_reference as ref

    if os.environ.get(ref.OPT_OUT_ENV) == "1":
        pytest.skip(f"{ref.OPT_OUT_ENV}=1: mergekit (and its PEFT) comparison explicitly opted out")
    try:
        return ref.ensure_reference_env().parent / "python"
    except ref.ReferenceUnavailable as e:
        pytest.fail(f"mergekit reference environment unavailable ({e})", pytrace=False)


@pytest.mark.parametrize("tag", CASES)
def test_adapted_tensors_equal_peft_merge_and_unload(lora_cases, tag, tmp_path, mergekit_python):
    """mergekit's own ``ModelReference.merged`` (PEFT ``merge_and_unload``) in its venv, against the
    tensors distmerge reads for ``MODEL+ADAPTER``: the same bytes."""
    case = lora_cases[tag]
    proc = subprocess.run([str(mergekit_python), str(PEFT_SCRIPT), str(case["model"]), str(case["adapter"]),
                           str(tmp_path / "peft")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    peft = load_state(tmp_path / "peft")
    ckpt = open_model(case["ref"])
    assert set(peft) == set(ckpt.tensors)
    from distmerge.lora import read_source_rows

    for name, info in ckpt.tensors.items():
        assert _same_bytes(read_source_rows(info, 0, info.rows), peft[name]), name


GPT2_TARGETS = ["transformer.h.0.attn.c_attn.weight", "transformer.h.1.attn.c_proj.weight",
                "transformer.h.1.mlp.c_fc.weight"]


def _gpt2_with_adapter(folder: Path) -> dict[str, torch.Tensor]:
    """A bf16 GPT-2 and a fan_in_fan_out rsLoRA adapter on its Conv1D projections; returns the
    independent reference merge (PEFT's formula, whole tensors)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=260, n_positions=64, eos_token_id=0, bos_token_id=0)
    GPT2LMHeadModel(config).to(torch.bfloat16).save_pretrained(folder / "gpt2")
    state = load_state(folder / "gpt2")
    tensors = write_adapter(folder / "adapter", state, GPT2_TARGETS, fan_in_fan_out=True, rslora=True,
                            rank_pattern={"c_fc": 2})
    return reference_merge(state, tensors, json.loads((folder / "adapter" / "adapter_config.json").read_text()))


def test_gpt2_conv1d_adapter_is_fan_in_fan_out(tmp_path):
    """GPT-2's projections are Conv1D (weight stored in x out): PEFT merges the transposed delta
    (fan_in_fan_out); so does distmerge, bit for bit, for any row range."""
    reference = _gpt2_with_adapter(tmp_path)
    ckpt = open_model(f"{tmp_path / 'gpt2'}+{tmp_path / 'adapter'}")
    for name in GPT2_TARGETS:
        info = ckpt.tensors[name]
        assert info.kind == "fan_in_fan_out"
        for r0, r1 in ((0, 1), (5, 6), (3, 40), (0, info.rows)):
            assert _same_bytes(read_adapted_rows(info, r0, r1), reference[name][r0:r1]), (name, r0, r1)


def test_gpt2_conv1d_reference_is_peft(tmp_path, mergekit_python):
    """The reference formula above is PEFT's own merge_and_unload for Conv1D, bit for bit."""
    reference = _gpt2_with_adapter(tmp_path)
    proc = subprocess.run([str(mergekit_python), str(PEFT_SCRIPT), str(tmp_path / "gpt2"), str(tmp_path / "adapter"),
                           str(tmp_path / "peft")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    peft = load_state(tmp_path / "peft")
    assert all(_same_bytes(reference[n], peft[n]) for n in GPT2_TARGETS)
