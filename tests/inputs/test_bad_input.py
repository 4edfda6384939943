"""Bad input ends with a short message naming the file, tensor or field, exit code 2, no
traceback (unless --debug), and no output that looks finished."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from distmerge.config import MergeConfig, parse_config
from distmerge.engine.run import run_merge
from distmerge.errors import CheckpointError
from distmerge.testing.method_cases import CASES, NO_BASE, method_config
from tests.helpers import load_state, make_config

INDEX = "model.safetensors.index.json"


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _cli(args: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distmerge", *args], capture_output=True, text=True, timeout=300, **kw)


def _write_config(path: Path, cfg) -> Path:
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return path


def _poison(folder: Path, tensor: str, value: float) -> None:
    index = json.loads((folder / INDEX).read_text())
    file = folder / index["weight_map"][tensor]
    tensors = load_file(file)
    tensors[tensor][1, 2] = value
    save_file(tensors, file, metadata={"format": "pt"})


def _base_unless_linear(method: str, base: Path) -> dict[str, str]:
    """linear merges a configured base as one more input (mergekit's way): these tests leave it out."""
    return {} if method == "linear" else {"base_model": str(base)}


def _config_with(method: str, base: Path, models: list[Path], **top: Any) -> MergeConfig:
    """``method`` over ``models`` (arcee_fusion: the first alone, onto ``base``)."""
    if method == "arcee_fusion":
        return parse_config(method_config(method, base, models[:1], **top))
    params = {"weight": 0.5} | ({"density": 0.5} if method == "ties" else {})
    return parse_config({"merge_method": method, **_base_unless_linear(method, base), **top,
                         "models": [{"model": str(m), "parameters": params} for m in models]})


@pytest.mark.usefixtures("ray_local")
# ties: caught in its statistics pass; linear, task_arithmetic and arcee_fusion (rounds, but its
# output shows every input NaN/Inf): found by the output's scan (engine.worker.output_scan_suffices),
# then named by scanning that block's inputs
@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties", "arcee_fusion"])
def test_nan_input_is_an_error_or_a_warning(llama_family, tmp_path, method):
    base, experts = llama_family
    bad = _copy(experts[0], tmp_path / "nan")
    _poison(bad, "model.layers.2.mlp.up_proj.weight", float("nan"))
    cfg = _config_with(method, base, [bad, experts[1]])
    with pytest.raises(CheckpointError, match=r"nan/model-\d+-of-\d+\.safetensors: tensor 'model\.layers\.2\.mlp\.up_proj\.weight' has 1 NaN/Inf"):
        run_merge(cfg, tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / INDEX).exists()
    report = run_merge(cfg, tmp_path / "out2", allow_nonfinite=True, progress=False)
    assert any("up_proj" in w for w in report["warnings"])
    assert any("NaN/Inf" in w for w in report["verify"]["warnings"])
    assert torch.isnan(load_state(tmp_path / "out2")["model.layers.2.mlp.up_proj.weight"][1, 2])


def _poison_at(folder: Path, tensor: str, where: int, value: float) -> None:
    """Set the element at flat index ``where`` (negative: from the end) of a stored tensor."""
    index = json.loads((folder / INDEX).read_text())
    file = folder / index["weight_map"][tensor]
    tensors = load_file(file)
    tensors[tensor].view(-1)[where] = value
    save_file(tensors, file, metadata={"format": "pt"})


MATRIX, VECTOR = "model.layers.2.mlp.up_proj.weight", "model.layers.1.post_attention_layernorm.weight"


@pytest.mark.parametrize("method", list(CASES))
def test_every_broken_input_is_named_where_rounds_prove_clean_ones_finite(llama_family, tmp_path, method):
    """Where a method's first round proves clean inputs finite (``Partials.inputs_finite``) the
    engine skips their scan, so that proof must fail on every broken input: a NaN, +Inf or -Inf
    in the base or in any model, in a matrix or a vector, at its first, a middle or its last
    element, with the tensor held in one batch or its rounds in their own tasks (a shard size
    below the tensor). Each fails the merge naming the model's file and the tensor, and
    publishes nothing."""
    base, experts = llama_family
    kind = CASES[method][0]
    models = [base] if method == "passthrough" else experts[:1] if kind == "one expert" else experts
    first = base if method not in NO_BASE else models[0]
    cases = [(models[0], MATRIX, 1234, float("nan"), None),
             (first, VECTOR, -1, float("inf"), None),
             (models[-1], MATRIX, 0, float("-inf"), 20_000),
             (first, MATRIX, -1, float("nan"), 20_000)]
    for k, (model, tensor, where, value, shard_size) in enumerate(cases):
        bad = _copy(model, tmp_path / f"bad{k}")
        _poison_at(bad, tensor, where, value)
        swap = {model: bad}
        cfg = parse_config(method_config(method, swap.get(base, base), [swap.get(m, m) for m in experts]))
        out = tmp_path / f"out{k}"
        with pytest.raises(CheckpointError, match=rf"bad{k}/model-\d+-of-\d+\.safetensors: tensor '{re.escape(tensor)}' "
                                                  r"has 1 NaN/Inf values in rows"):
            run_merge(cfg, out, executor="local", shard_size=shard_size, progress=False)
        assert not (out / INDEX).exists()


@pytest.mark.usefixtures("ray_local")
@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties", "arcee_fusion"])  # as above
def test_overflow_in_the_compute_dtype_is_not_blamed_on_the_input(llama_family, tmp_path, method):
    """A finite weight too large for ``dtype: float16`` becomes Inf in the cast: the error names
    the compute dtype and a wider one, not a broken input; a NaN as stored is still the input's."""
    base, experts = llama_family
    big = _copy(experts[0], tmp_path / "big")
    _poison(big, "model.layers.2.mlp.up_proj.weight", 70000.0)  # float16 holds up to 65504
    assert torch.isfinite(load_state(big)["model.layers.2.mlp.up_proj.weight"]).all()
    cfg = _config_with(method, base, [big, experts[1]], dtype="float16")
    with pytest.raises(CheckpointError) as caught:
        run_merge(cfg, tmp_path / "out", progress=False)
    message = str(caught.value)
    assert "big/model-" in message and "'model.layers.2.mlp.up_proj.weight' has 1 finite values" in message
    assert "too large for the compute dtype float16" in message and "wider dtype than float16" in message
    assert "broken" not in message
    assert not (tmp_path / "out" / INDEX).exists()
    _poison(big, "model.layers.2.mlp.up_proj.weight", float("nan"))  # now the input's own
    with pytest.raises(CheckpointError, match=r"has 1 NaN/Inf values in rows .*the input is broken"):
        run_merge(cfg, tmp_path / "out3", progress=False)


# Scans per merged block on a clean merge: 1 is the output's alone. nearswap and ram have no
# rounds and can drop a NaN, so they scan their inputs too; sce's first round proves nothing.
SCANS_PER_BLOCK = {"nearswap": 3, "ram": 4, "sce": 4}


@pytest.mark.parametrize("method", list(CASES))
def test_a_clean_merge_scans_the_inputs_only_where_the_method_needs_it(llama_family, tmp_path, monkeypatch,
                                                                        method):
    """linear, task_arithmetic and arcee_fusion carry every NaN/Inf to the output, so a clean merge
    scans each block's output alone (one pass instead of one per model and the output; for
    arcee_fusion none in its reduction rounds either). The methods whose first round sums a term
    of every element (squares, magnitudes, or counts the NaN/Inf keys) prove the inputs finite
    there (``Partials.inputs_finite``) and scan the output alone too. Counted on the local
    executor, whose threads run in this process: the inputs' scans in the worker's functions,
    the outputs' in the batch's loop."""
    scans_per_block = SCANS_PER_BLOCK.get(method, 1)
    from distmerge.engine import batch, worker

    base, experts = llama_family
    scans, blocks = [], []
    count, merge = worker.count_nonfinite, worker.merge_block

    def counting(values: torch.Tensor) -> int:
        scans.append(values.numel())
        return count(values)

    def merging(*args, **kwargs) -> torch.Tensor:
        blocks.append(args[1])
        return merge(*args, **kwargs)

    monkeypatch.setattr(worker, "count_nonfinite", counting)
    monkeypatch.setattr(batch, "count_nonfinite", counting)
    monkeypatch.setattr(batch, "merge_block", merging)
    cfg = parse_config(method_config(method, base, experts))
    report = run_merge(cfg, tmp_path / "out", executor="local", progress=False)
    assert not report["warnings"] and len(blocks) >= len(load_state(tmp_path / "out"))
    assert len(scans) == scans_per_block * len(blocks)


def test_cli_errors_are_messages_not_tracebacks(llama_family, tmp_path):
    base, experts = llama_family
    broken = _copy(experts[0], tmp_path / "trunc")
    victim = sorted(broken.glob("model-*.safetensors"))[2]
    victim.write_bytes(victim.read_bytes()[:-7])
    cfg = _write_config(tmp_path / "m.yml", make_config("task_arithmetic", base, [broken], [1.0]))
    proc = _cli(["merge", str(cfg), str(tmp_path / "out")])
    assert proc.returncode == 2
    assert victim.name in proc.stderr and "truncated" in proc.stderr and "Traceback" not in proc.stderr
    for flags in (["--debug", "merge", str(cfg), str(tmp_path / "out")],
                  ["merge", str(cfg), str(tmp_path / "out"), "--debug"]):  # either place, as users type it
        debug = _cli(flags)
        assert debug.returncode != 0 and "Traceback" in debug.stderr and victim.name in debug.stderr
    assert not (tmp_path / "out" / INDEX).exists()


def test_dtype_kind_mismatch_is_named(llama_family, tmp_path):
    base, experts = llama_family
    bad = _copy(experts[0], tmp_path / "int")
    index = json.loads((bad / INDEX).read_text())
    name = "model.norm.weight"
    file = bad / index["weight_map"][name]
    tensors = load_file(file)
    tensors[name] = tensors[name].to(torch.int32)
    save_file(tensors, file, metadata={"format": "pt"})
    cfg = make_config("task_arithmetic", base, [bad], [1.0])
    with pytest.raises(CheckpointError, match=r"models\[0\].*'model\.norm\.weight' is I32 but .* has F32"):
        run_merge(cfg, tmp_path / "out", progress=False)


def _can_mount() -> bool:
    return os.geteuid() == 0 and shutil.which("mount") is not None


@contextlib.contextmanager
def _tmpfs(path: Path, options: str) -> Iterator[Path]:
    """A small tmpfs mounted at ``path`` for the test's duration (skips where mount is refused)."""
    path.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)]).returncode != 0:
        pytest.skip("tmpfs mount not permitted here")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)])


@pytest.mark.skipif(not _can_mount(), reason="needs root to mount a small tmpfs")
def test_disk_full_is_reported_before_work(llama_family, tmp_path):
    base, experts = llama_family
    with _tmpfs(tmp_path / "small", "size=256k") as mnt:
        cfg = _write_config(tmp_path / "m.yml", make_config("task_arithmetic", base, experts, [0.5, 0.5]))
        proc = _cli(["merge", str(cfg), str(mnt / "out"), "--no-progress"])
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert "no space left on the device" in proc.stderr and "Traceback" not in proc.stderr
        assert not (mnt / "out" / INDEX).exists()


@pytest.mark.skipif(not _can_mount(), reason="needs root to mount a read-only tmpfs")
def test_read_only_output_is_reported(llama_family, tmp_path):
    _, experts = llama_family
    with _tmpfs(tmp_path / "ro", "size=1m,ro") as mnt:
        cfg = _write_config(tmp_path / "m.yml", make_config("linear", None, experts, [1, 1]))
        proc = _cli(["merge", str(cfg), str(mnt / "out"), "--no-progress"])
        assert proc.returncode == 2 and "cannot create the output directory" in proc.stderr


def _without_dac_override() -> list[str] | None:
    """A command prefix under which even root obeys file permissions (drops CAP_DAC_*)."""
    setpriv = shutil.which("setpriv")
    if os.geteuid() != 0 or setpriv is None:
        return None
    caps = "-dac_override,-dac_read_search"
    return [setpriv, f"--inh-caps={caps}", f"--bounding-set={caps}"]


@pytest.mark.skipif(_without_dac_override() is None, reason="needs root and setpriv to drop CAP_DAC_OVERRIDE")
def test_permission_denied_on_input_is_named(llama_family, tmp_path):
    _, experts = llama_family
    model = _copy(experts[0], tmp_path / "model")
    locked = sorted(model.glob("model-*.safetensors"))[0]
    locked.chmod(0o000)
    cfg = _write_config(tmp_path / "m.yml", make_config("linear", None, [model], [1]))
    proc = subprocess.run([*_without_dac_override(), sys.executable, "-m", "distmerge", "plan", str(cfg)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"{locked}: permission denied" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.skipif(_without_dac_override() is None, reason="needs root and setpriv to drop CAP_DAC_OVERRIDE")
def test_permission_denied_on_output_is_named(llama_family, tmp_path):
    _, experts = llama_family
    parent = tmp_path / "locked"
    parent.mkdir()
    parent.chmod(0o555)
    cfg = _write_config(tmp_path / "m.yml", make_config("linear", None, experts, [1, 1]))
    proc = subprocess.run([*_without_dac_override(), sys.executable, "-m", "distmerge", "merge", str(cfg),
                           str(parent / "out"), "--no-progress"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"{parent / 'out'}: cannot create the output directory (Permission denied)" in proc.stderr
