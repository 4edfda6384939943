"""The AIM experiments' counting rules on hand-made results: paired differences per seed,
"beyond seed noise" as mean > 2 standard errors, perplexity lower-is-better, retention and
mean exact match higher-is-better, and the real experiment's report written end to end."""

from __future__ import annotations

import json

import pytest

from benchmarks.quality import report as toy
from benchmarks.real import report as real


def row(seed: int, variant: str, omega: float | None, reverse: float, shift: float, retention: float,
        ppl: float) -> dict:
    return {"key": f"{seed}/ties/reverse+shift/{variant}/{omega}", "kind": "merge", "seed": seed, "method": "ties",
            "combo": "reverse+shift", "variant": variant, "omega": omega, "reverse": reverse, "shift": shift,
            "retention": retention, "ppl": ppl}


ROWS = [
    # seed, variant, omega, reverse, shift, retention, ppl
    row(0, "none", None, 0.50, 0.70, 0.60, 15.0), row(1, "none", None, 0.40, 0.60, 0.70, 15.2),
    row(2, "none", None, 0.45, 0.65, 0.65, 15.1),
    # AIM: +0.10 mean accuracy on every seed (beyond noise), ppl 0.2 lower, retention equal
    row(0, "aim", 0.4, 0.60, 0.80, 0.60, 14.8), row(1, "aim", 0.4, 0.50, 0.70, 0.70, 15.0),
    row(2, "aim", 0.4, 0.55, 0.75, 0.65, 14.9),
    # uniform: accuracy like no AIM, ppl up on one seed and down on two (noise)
    row(0, "uniform", 0.4, 0.50, 0.70, 0.60, 15.1), row(1, "uniform", 0.4, 0.40, 0.60, 0.70, 15.0),
    row(2, "uniform", 0.4, 0.45, 0.65, 0.65, 15.0),
]


def test_counts_by_hand() -> None:
    idx = toy.index(ROWS, ("reverse", "shift"))
    assert idx[("ties", "reverse+shift", "aim", 0.4)][1]["mean"] == pytest.approx(0.6)
    c = toy.counts(idx, 0.4, ("mean", "retention", "ppl"))
    assert c["cells"] == 1 and "shuffled_cells" not in c
    assert c["aim_better_acc"] == 1 and c["aim_better_ppl"] == 1 and c["aim_better_retention"] == 0
    assert c["gain_aim_mean"] == pytest.approx(0.10) and c["gain_aim_ppl"] == pytest.approx(-0.2)
    assert c["gain_ctrl_ppl"] == pytest.approx((0.1 - 0.2 - 0.1) / 3)
    # AIM - uniform: accuracy +0.10 on every seed (zero spread: beyond noise); ppl -0.3, 0, -0.1
    # (mean -0.133, standard error 0.088: not beyond 2 SE); retention identical
    assert c["aim_beats_ctrl_acc_noise"] == 1 and c["ctrl_beats_aim_acc_noise"] == 0
    assert c["aim_beats_ctrl_ppl_noise"] == 0 and c["ctrl_beats_aim_ppl_noise"] == 0
    assert c["aim_beats_ctrl_retention_noise"] == 0


def test_beyond_noise_rule() -> None:
    assert toy.beyond_noise([0.1]) == 0  # one seed: never beyond noise
    assert toy.beyond_noise([0.1, 0.1]) == 1 and toy.beyond_noise([-0.1, -0.12]) == -1
    assert toy.beyond_noise([0.3, -0.1, 0.1]) == 0


def test_real_report_written(tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "work"
    out.mkdir()
    base = {"key": "base", "kind": "base", "seed": None, "method": "-", "combo": "-", "variant": "base",
            "omega": None, "reverse": 0.0, "shift": 0.0, "sort": 0.0, "retention": 1.0, "ppl": 14.6}
    (out / "results.jsonl").write_text("\n".join(json.dumps(r) for r in [base, *ROWS]) + "\n")
    summary = real.write_report(out, tmp_path / "dest")
    assert summary["merges"] == len(ROWS) and summary["seeds"] == [0, 1, 2]
    text = (tmp_path / "dest" / "summary.md").read_text()
    assert "| base | - | 0.000 | 0.000 | 0.000 | 1.000 | 14.60 |" in text
    # The headline cell: reverse no AIM / AIM / uniform (means over 3 seeds), AIM bold.
    assert "| ties | reverse+shift (3) | 0.45 / **0.55** / 0.45 |" in text
    assert "| 0.4 | mean | 1 | 1 | 0 | 1 | 0 | - | - | +0.1000 |" in text
