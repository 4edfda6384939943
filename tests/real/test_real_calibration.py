"""Staged calibration on real bf16 checkpoints equals a whole-model forward with hooks.

The AIM tests in ``tests/aim`` use tiny float32 models; a real checkpoint is bf16 on disk and
its statistics are peaked, which is where a stage computing something in the stored dtype
instead of the float32 compute dtype shows (issue 15). Stages run in process (the StageWorker
the Ray actors run) at S = 1, 2 and one per layer, on a few 128-token blocks of the built-in
calibration text tokenized by the model's own tokenizer.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from distmerge.aim import load_calibration_sequences
from distmerge.config import CalibrationConfig
from tests.aim.test_aim_pipeline import RTOL, reference_statistics, run_in_process

log = logging.getLogger(__name__)

pytestmark = pytest.mark.real


def largest_error(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> tuple[float, str]:
    """The largest relative error over modules (max abs difference / max of the reference).

    Unlike the tiny models' check, a channel may be exactly zero here: a real Gemma 3 norm
    weight can be -1, which zeroes that channel of ``(1 + w) * x`` for every token.
    """
    assert set(got) == set(ref), set(got) ^ set(ref)
    worst = (0.0, "")
    for name, value in ref.items():
        assert got[name].shape == value.shape, name
        assert float(value.max()) > 0, name  # real activations, nothing vacuous
        err = float((got[name].double() - value).abs().max() / value.abs().max())
        worst = max(worst, (err, name))
    return worst


def splits(num_layers: int) -> dict[str, list[tuple[int, int]]]:
    """One stage, two unequal stages, and one stage per decoder layer."""
    half = num_layers // 2 + 1
    return {"1": [(0, num_layers)], "2": [(0, half), (half, num_layers)],
            "per-layer": [(i, i + 1) for i in range(num_layers)]}


def check_staged_equals_whole(model_dir: Path, num_layers: int) -> None:
    cal = CalibrationConfig(dataset="builtin", n_samples=6, block_size=128, seed=0)
    sequences = load_calibration_sequences(cal, model_dir)
    assert sequences.shape[0] >= 2 and sequences.shape[1] == 128
    reference = reference_statistics(model_dir, sequences)
    for name, ranges in splits(num_layers).items():
        stats, reports = run_in_process(model_dir, sequences, ranges)
        assert all(v.dtype == torch.float64 for v in stats.values()), name
        assert [r["layers"] for r in reports] == ranges
        assert {"lm_head", "model.norm", "model.layers.2.mlp.down_proj"} <= set(stats)
        err, where = largest_error(stats, reference)
        log.info("%s, %s stages: largest relative error %.3g at %s", model_dir.name, name, err, where)
        assert err <= RTOL, f"{name} stages: relative error {err} at {where}"


def test_smollm2_staged_equals_whole_model(smollm2_bf16: Path) -> None:
    check_staged_equals_whole(smollm2_bf16, 30)


def test_gemma3_staged_equals_whole_model(gemma3_bf16: Path) -> None:
    check_staged_equals_whole(gemma3_bf16, 18)
