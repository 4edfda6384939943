"""What ``distmerge stats`` and ``calibrate`` show about AIM statistics: hand-computed numbers,
the table, the plot, and the plot's target refused when distmerge did not write it."""

from __future__ import annotations

import pytest
import torch

from distmerge.aim import save_statistics
from distmerge.aim.stats_summary import format_table, summarize
from distmerge.cli import main

META = {"base_model": "/models/base", "dataset": "builtin", "n_blocks": "1", "block_size": "8", "tokens": "8"}


def peaked(n: int, peak: float) -> torch.Tensor:
    """``n`` channels of 1.0, the last one ``peak``."""
    a = torch.ones(n, dtype=torch.float64)
    a[-1] = peak
    return a


@pytest.fixture()
def stats() -> dict[str, torch.Tensor]:
    return {"model.layers.0.self_attn.q_proj": peaked(200, 30.0),
            "model.layers.1.self_attn.q_proj": peaked(200, 3.0),
            "model.layers.0.mlp.down_proj": torch.linspace(1.0, 2.0, 100, dtype=torch.float64),
            "lm_head": peaked(100, 5.0)}


def test_numbers_by_hand(stats: dict[str, torch.Tensor]) -> None:
    by_name = {m.name: m for m in summarize(stats, omega=0.4)}
    q0 = by_name["model.layers.0.self_attn.q_proj"]
    assert (q0.layer, q0.kind, q0.channels) == (0, "q_proj", 200)
    assert q0.max_over_median == pytest.approx(30.0)
    assert q0.top1pct_share == pytest.approx((30 + 1) / (30 + 199))  # top 2 of 200 channels
    assert q0.protected == 1 and q0.top_channels[0] == 199
    # r = 1 - 0.6 * a / 30: 199 channels at 0.98, one at 0.4
    assert q0.r_min == pytest.approx(0.4)
    assert q0.r_mean == pytest.approx((199 * (1 - 0.6 / 30) + 0.4) / 200)
    down = by_name["model.layers.0.mlp.down_proj"]
    assert down.max_over_median == pytest.approx(2.0 / 1.5, rel=1e-2)  # median of linspace(1, 2)
    assert down.protected == 100  # every channel has s >= 0.5
    head = by_name["lm_head"]
    assert head.layer is None and head.kind == "lm_head"
    assert [m.name for m in summarize(stats)][-1] == "lm_head"  # layers first, in order


def test_table_names_kinds_and_most_peaked(stats: dict[str, torch.Tensor]) -> None:
    table = format_table(summarize(stats, 0.4), 0.4)
    lines = table.splitlines()
    q_row = next(line for line in lines if line.startswith("q_proj"))
    assert q_row.split()[1] == "2" and "layer 0" in q_row  # two layers; the peaked one is layer 0
    assert "16.5" in q_row  # median of 30 and 3
    first_peaked = lines[lines.index(next(x for x in lines if x.startswith("most peaked"))) + 1]
    assert "model.layers.0.self_attn.q_proj: max/median 30.0" in first_peaked


def test_stats_command_table_and_plot(stats: dict[str, torch.Tensor], tmp_path, capsys) -> None:
    path = tmp_path / "s.safetensors"
    save_statistics(stats, path, META)
    png = tmp_path / "plot.png"
    assert main(["stats", str(path), "--omega", "0.2", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "factors at omega 0.2" in out and f"plot: {png}" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["stats", str(path), "--plot", str(png)]) == 0  # its own plot: replaced


@pytest.mark.parametrize("name, content, message", [
    ("photo.png", b"\x89PNG\r\n\x1a\nnot ours", "not a plot distmerge made"),
    ("plot.jpg", None, "ending in .png"),
])
def test_plot_target_refused(stats, tmp_path, capsys, name, content, message) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "s.safetensors"
    save_statistics(stats, path, META)
    target = tmp_path / name
    if content is not None:
        target.write_bytes(content)
    assert main(["stats", str(path), "--plot", str(target)]) == 2
    assert message in capsys.readouterr().err
    if content is not None:
        assert target.read_bytes() == content


def test_plot_onto_the_statistics_refused(stats, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "s.png"
    save_statistics(stats, path, META)
    before = path.read_bytes()
    assert main(["stats", str(path), "--plot", str(path)]) == 2
    assert path.read_bytes() == before
    assert "error" in capsys.readouterr().err


def test_omega_out_of_range(stats, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "s.safetensors"
    save_statistics(stats, path, META)
    with pytest.raises(SystemExit) as e:
        main(["stats", str(path), "--omega", "1.5"])
    assert e.value.code == 2 and "out of range" in capsys.readouterr().err


def test_calibrate_refuses_a_foreign_plot_before_calibrating(llama_family, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    import yaml

    base, experts = llama_family
    config = tmp_path / "merge.yaml"
    config.write_text(yaml.safe_dump({"merge_method": "task_arithmetic", "base_model": str(base),
                                      "models": [{"model": str(e), "parameters": {"weight": 0.5}} for e in experts],
                                      "aim": {"omega": 0.4}}))
    photo = tmp_path / "photo.png"
    photo.write_bytes(b"\x89PNG\r\n\x1a\nholiday")
    out = tmp_path / "stats.safetensors"
    assert main(["calibrate", str(config), "--out", str(out), "--plot", str(photo)]) == 2
    assert "not a plot distmerge made" in capsys.readouterr().err
    assert not out.exists() and photo.read_bytes() == b"\x89PNG\r\n\x1a\nholiday"
