"""Merges of real bf16 checkpoints: AIM equals its formula, the output loads in transformers
with the in-memory merge's logits, and a SmolLM2 merge still answers the base's chat questions.

Experts are the base plus a seeded rank-4 update of every matrix (0.5% of its norm) and a small
change of every norm weight: fine-tuning-like deltas (structured, low rank, a few percent) made
in a second instead of trained. Statistics are the real base's, calibrated through distmerge's
staged pipeline on Ray, so the relaxation factors are as peaked as users will see them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distmerge.aim import calibrate, load_statistics, module_for_tensor
from distmerge.aim.relax import apply_relaxation, relaxation_factors
from distmerge.config import AimConfig, CalibrationConfig
from distmerge.engine.run import run_merge
from distmerge.methods import get_method
from distmerge.methods.base import ShardContext
from distmerge.testing import chat_questions, real_models
from distmerge.testing.experts import low_rank_expert
from tests.helpers import load_state, make_config
from tests.methods.test_methods_catalogue import params_for

pytestmark = [pytest.mark.real, pytest.mark.usefixtures("ray_local")]

WEIGHTS = (0.7, 0.5)
OMEGA = 0.4
FORMULA_ELEMENTS = 1 << 24  # tensors above this are checked against the formulas on a row sample
# Task-vector weights are rounded to the compute dtype, as mergekit does (docs/methods.md).
BF16_WEIGHTS = tuple(float(torch.tensor(w, dtype=torch.bfloat16)) for w in WEIGHTS)


def in_memory_merge(base: Path, experts: list[Path], stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same merge with distmerge's math on whole tensors: no shards, no Ray, no files written."""
    method = get_method("task_arithmetic")
    params = params_for("task_arithmetic", len(WEIGHTS), model=[{"weight": w} for w in WEIGHTS])
    b_state = load_file(str(base / real_models.WEIGHTS_FILE))
    x_states = [load_file(str(e / real_models.WEIGHTS_FILE)) for e in experts]
    out = {}
    for name, b in b_state.items():
        ctx = ShardContext(name, tuple(b.shape), 0, b.shape[0])
        merged = method.merge(b, [x[name] for x in x_states], params, ctx)
        module = module_for_tensor(name)
        if module in stats:
            merged = apply_relaxation(b, merged, relaxation_factors(stats[module], OMEGA), OMEGA)
        out[name] = merged
    return out


def ulp_bf16(x: torch.Tensor) -> torch.Tensor:
    """The spacing of bf16 numbers at ``|x|`` (normal range; 2^-133 for the smallest)."""
    exponent = torch.floor(torch.log2(x.abs().clamp_min(2.0 ** -126)))
    return torch.pow(2.0, exponent - 7)


@pytest.fixture(scope="module", params=["smollm2", "gemma3"])
def merged(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    base = request.getfixturevalue(f"{request.param}_bf16")
    root = tmp_path_factory.mktemp(request.param)
    experts = [low_rank_expert(base, root / f"expert{i}", seed=i + 1) for i in range(2)]
    stats_path = root / "stats.safetensors"
    aim = AimConfig(calibration=CalibrationConfig(n_samples=4, block_size=64), stages=2)
    calibrate(base, aim, stats_path, progress=False)
    stats, _ = load_statistics(stats_path)
    outputs = {}
    for name, extra in (("plain", {}), ("aim", {"aim": {"omega": OMEGA, "stats": str(stats_path)}})):
        config = make_config("task_arithmetic", base, experts, list(WEIGHTS), **extra)
        run_merge(config, root / name, progress=False)
        outputs[name] = root / name
    return {"name": request.param, "base": base, "experts": experts, "stats": stats, **outputs}


def test_aim_merge_equals_formula(merged: dict) -> None:
    """Bit for bit the in-memory merge; the plain merge within four bf16 ulps of the float64
    task arithmetic ``b + sum_i w_i (x_i - b)``, and the AIM merge within one ulp of
    ``b + (plain - b) * (1 - (1 - omega) a / max a)`` per input channel."""
    got = load_state(merged["aim"])
    plain = load_state(merged["plain"])
    expected = in_memory_merge(merged["base"], merged["experts"], merged["stats"])
    assert set(got) == set(expected) == set(plain)
    b_state = load_file(str(merged["base"] / real_models.WEIGHTS_FILE))
    x_states = [load_file(str(e / real_models.WEIGHTS_FILE)) for e in merged["experts"]]

    def within(value: torch.Tensor, formula: torch.Tensor, operands: list[torch.Tensor], ulps: int, what: str) -> None:
        # bf16 rounding is relative to the operands (a delta cancels against the base): the
        # bound is ``ulps`` ulps of the largest of the operands and the result at each element.
        scale = torch.stack([formula.abs(), *(o.double().abs() for o in operands)]).amax(0)
        ratio = (value.double() - formula).abs() / (ulps * ulp_bf16(scale))
        assert float(ratio.max()) <= 1.0, f"{what}: {float(ratio.max()):.2f} x the bound"

    relaxed = 0
    for name, value in got.items():
        assert value.dtype == plain[name].dtype == torch.bfloat16, name
        assert torch.equal(value, expected[name]), name
        # The float64 formulas on every row of tensors up to 16M elements and on evenly spaced
        # rows of larger ones (Gemma's 168M-element embedding: ~30 s of float64 otherwise); the
        # bit-for-bit check above covers every element.
        rows = slice(None, None, max(1, -(-value.numel() // FORMULA_ELEMENTS))) if value.dim() else slice(None)
        b = b_state[name][rows].double()
        # mergekit's bf16 task arithmetic rounds each delta, product and sum: four ulps.
        ta = b + sum(w * (x[name][rows].double() - b) for w, x in zip(BF16_WEIGHTS, x_states, strict=True))
        within(plain[name][rows], ta, [b, *(x[name][rows] for x in x_states)], 4, f"plain {name}")
        module = module_for_tensor(name)
        if module in merged["stats"]:
            a = merged["stats"][module].double()
            aim = b + (plain[name][rows].double() - b) * (1 - (1 - OMEGA) * a / a.max())
            within(value[rows], aim, [b, plain[name][rows]], 1, f"AIM {name}")
            relaxed += 1
        else:
            assert torch.equal(value, plain[name]), name
    assert relaxed == len(got) - 1  # every weight but the (tied) embedding
    # The relaxation is visible: on each module's most active input channel (s = 1) the AIM
    # delta is omega times the plain delta, so (bf16 rounding aside) every element the plain
    # merge moved from the base moves less.
    moved = pulled_back = 0
    for name, value in got.items():
        module = module_for_tensor(name)
        if module in merged["stats"] and value.dim() == 2:
            top = int(merged["stats"][module].argmax())
            b, p, v = b_state[name][:, top], plain[name][:, top], value[:, top]
            moved += int((p != b).sum())
            pulled_back += int(((v - b).abs() < (p - b).abs()).sum())
    assert moved > 1000 and pulled_back / moved > 0.9, (moved, pulled_back)


def logits(model: torch.nn.Module, tok, text: str) -> torch.Tensor:  # type: ignore[no-untyped-def]
    with torch.no_grad():
        return model(**tok(text, return_tensors="pt")).logits


def test_merged_model_loads_with_in_memory_logits(merged: dict) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(merged["aim"])
    loaded, info = AutoModelForCausalLM.from_pretrained(merged["aim"], output_loading_info=True)
    assert not any(info.values()), info  # nothing missing, unexpected or mismatched
    assert loaded.dtype == torch.bfloat16
    reference = AutoModelForCausalLM.from_pretrained(merged["base"])
    expected = in_memory_merge(merged["base"], merged["experts"], merged["stats"])
    missing, unexpected = reference.load_state_dict(expected, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    text = "The capital of France is Paris. The capital of Japan is"
    got, want = logits(loaded.eval(), tok, text), logits(reference.eval(), tok, text)
    assert torch.equal(got, want)
    base = AutoModelForCausalLM.from_pretrained(merged["base"]).eval()
    assert not torch.equal(got, logits(base, tok, text))  # the merge changed the model


@pytest.mark.parametrize("merged", ["smollm2"], indirect=True)  # Gemma-3-270M is a base model: no chat
def test_smollm2_merges_answer_the_base_questions(merged: dict) -> None:
    """Every question the base answers, the plain and the AIM merge still answer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(merged["base"])
    base = AutoModelForCausalLM.from_pretrained(merged["base"], dtype=torch.float32).eval()
    assert chat_questions.retention(base, tok) == 1.0
    for variant in ("plain", "aim"):
        model = AutoModelForCausalLM.from_pretrained(merged[variant], dtype=torch.float32).eval()
        answers = chat_questions.answers(model, tok)
        wrong = [(q, a) for (q, _), a, ok in zip(chat_questions.QUESTIONS, answers, chat_questions.graded(answers),
                                                  strict=True) if not ok]
        assert not wrong, f"{variant} merge: {wrong}"
