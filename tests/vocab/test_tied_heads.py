"""Tied and untied heads: which input tensor each model contributes to each vocabulary tensor,
against what mergekit 0.1.5 merges (run_merge in its venv: linear, weights 0.5, tokenizer from
the base so its vocabulary alignment is in play)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distmerge.checkpoint import Checkpoint
from distmerge.errors import CheckpointError, ConfigError
from distmerge.testing.tiny import build_model
from distmerge.vocab import vocabulary_tensors
from tests.vocab.conftest import MERGEKIT_PYTHON, mergekit_missing

MERGE = """
import sys
from mergekit.config import MergeConfiguration
from mergekit.merge import MergeOptions, run_merge
for out, base, other in zip(*[iter(sys.argv[1:])] * 3):
    cfg = MergeConfiguration.model_validate({
        "merge_method": "linear", "base_model": base, "dtype": "float32", "tokenizer_source": "base",
        "models": [{"model": base, "parameters": {"weight": 0.5}},
                   {"model": other, "parameters": {"weight": 0.5}}]})
    run_merge(cfg, out, MergeOptions(quiet=True))
"""
PAIRS = {"base_tied": (True, False), "expert_tied": (False, True), "both_tied": (True, True),
         "none_tied": (False, False)}


def tensors_of(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    reason = mergekit_missing()
    if reason:
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("tied")
    args = []
    for name, (base_tied, other_tied) in PAIRS.items():
        base = build_model(root / name / "base", seed=1, tie_word_embeddings=base_tied)
        other = build_model(root / name / "other", seed=2, tie_word_embeddings=other_tied)
        args += [str(root / name / "out"), str(base), str(other)]
    subprocess.run([str(MERGEKIT_PYTHON), "-c", MERGE, *args], check=True, timeout=600, stdout=sys.stderr,
                   env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    return root


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_vocabulary_sources_match_mergekit(merged, name):
    base, other = (Checkpoint.open(merged / name / m) for m in ("base", "other"))
    assert ("lm_head.weight" not in base.tensors) == PAIRS[name][0]  # tied models store no head
    vts = vocabulary_tensors(base.config, [base.tensors, other.tensors])
    out = tensors_of(merged / name / "out")
    names = sorted(t.name for t in vts)
    assert names == sorted(n for n in out if n in ("model.embed_tokens.weight", "lm_head.weight"))
    inputs = [tensors_of(merged / name / m) for m in ("base", "other")]
    for vt in vts:
        assert vt.models() == [0, 1] and vt.axis == 0
        a, b = (inputs[i][vt.sources[i]] for i in (0, 1))
        assert torch.equal(out[vt.name], (a * 0.5 + b * 0.5) / 1.0), vt.name
    config = json.loads((merged / name / "out" / "config.json").read_text())
    assert config.get("tie_word_embeddings", False) == PAIRS[name][0]  # the base's, unchanged


def test_unknown_architecture_and_missing_required_tensor():
    with pytest.raises(ConfigError, match="'NopeForCausalLM': its vocabulary tensors are unknown"):
        vocabulary_tensors({"architectures": ["NopeForCausalLM"]}, [{"x"}])
    phi3 = {"architectures": ["Phi3ForCausalLM"]}
    with pytest.raises(CheckpointError, match="'lm_head.weight' is required"):
        vocabulary_tensors(phi3, [{"model.embed_tokens.weight", "lm_head.weight"}, {"model.embed_tokens.weight"}],
                           ["/a", "/b"])
    gpt2 = vocabulary_tensors({"architectures": ["GPT2LMHeadModel"]}, [{"wte.weight"}, {"transformer.wte.weight",
                                                                                       "lm_head.weight"}])
    assert [(v.name, v.sources) for v in gpt2] == [
        ("transformer.wte.weight", ("wte.weight", "transformer.wte.weight")),
        ("lm_head.weight", ("wte.weight", "lm_head.weight"))]
    phi = vocabulary_tensors({"architectures": ["PhiForCausalLM"]},
                             [{"model.embed_tokens.weight", "lm_head.weight", "lm_head.bias"}])
    assert [v.name for v in phi] == ["model.embed_tokens.weight", "lm_head.bias", "lm_head.weight"]
