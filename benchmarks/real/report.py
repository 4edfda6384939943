"""Tables, counts and plots of the real-model AIM experiment, from ``results.jsonl``.

    .venv/bin/python -m benchmarks.real.report --out benchmarks/_work/real

Writes ``benchmarks/real/summary.md`` (base and experts, the paper-style table per omega, the
counts, the base's channel statistics), ``results_table.md`` (every variant, mean ± std over
seeds), ``counts.json``, ``aim_real.png`` (change vs the no-AIM merge) and
``channel_stats.png`` (how peaked SmolLM2's per-channel statistics are, and where). The
counting rules are the toy experiment's (:mod:`benchmarks.quality.report`): "beyond seed noise"
means the paired difference's mean exceeds twice its standard error over seeds.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from benchmarks.quality import report as toy
from benchmarks.real.run import HEADLINE_OMEGA, SKILLS

HERE = Path(__file__).resolve().parent
METRICS = ("mean", "retention", "ppl")
COLS = (*SKILLS, *METRICS)


def load_rows(out: Path) -> list[dict[str, Any]]:
    path = out / "results.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def references(rows: list[dict[str, Any]]) -> list[str]:
    """Base and each expert (per seed): the scores every merge is compared with."""
    cols = (*SKILLS, "retention", "ppl")
    lines = ["| model | seed | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for r in rows:
        if r["kind"] != "merge":
            name = "base" if r["kind"] == "base" else f"expert {r['combo']}"
            lines.append(f"| {name} | {r['seed'] if r['seed'] is not None else '-'} | "
                         + " | ".join(f"{r[c]:.3f}" if c != "ppl" else f"{r[c]:.2f}" for c in cols) + " |")
    return lines


def counts_table(all_counts: dict[float, dict[str, Any]]) -> list[str]:
    """Per omega and metric: AIM vs no AIM, and AIM vs each control beyond seed noise."""
    lines = ["| omega | metric | cells | AIM better than no AIM | uniform better than no AIM | "
             "AIM beats uniform (noise) | uniform beats AIM (noise) | AIM beats shuffled (noise) | "
             "shuffled beats AIM (noise) | Δ AIM | Δ uniform | Δ shuffled |", "|---" * 12 + "|"]
    for w, c in all_counts.items():
        n = max(1, c.get("cells", 0))
        for metric in METRICS:
            key = toy.COUNT_NAMES.get(metric, metric)
            shuf = bool(c.get("shuffled_cells"))
            lines.append(
                f"| {w} | {metric} | {c.get('cells', 0)} | {c.get(f'aim_better_{key}', 0)} | "
                f"{c.get(f'ctrl_better_{key}', 0)} | {c.get(f'aim_beats_ctrl_{key}_noise', 0)} | "
                f"{c.get(f'ctrl_beats_aim_{key}_noise', 0)} | "
                + (f"{c.get(f'aim_beats_shuf_{key}_noise', 0)} | {c.get(f'shuf_beats_aim_{key}_noise', 0)} | "
                   if shuf else "- | - | ")
                + " | ".join(f"{c[f'gain_{v}_{metric}'] / n:+.4f}" if f"gain_{v}_{metric}" in c else "-"
                             for v in ("aim", "ctrl", "shuf")) + " |")
    return lines


def write_report(out: Path, dest: Path = HERE) -> dict[str, Any]:
    rows = load_rows(out)
    idx = toy.index(rows, SKILLS)
    omegas = tuple(sorted({k[3] for k in idx if k[3] is not None}))
    seeds = sorted({r["seed"] for r in rows if r["seed"] is not None})
    all_counts = {w: toy.counts(idx, w, METRICS) for w in omegas}
    settings = json.loads((out / "settings.json").read_text()) if (out / "settings.json").is_file() else {}
    merges = sum(r["kind"] == "merge" for r in rows)
    lines = [f"Seeds {seeds}; {merges} scored merges. Settings: `{json.dumps(settings.get('scale', {}))}`.",
             "Cells are method x expert combination; 'mean' is the mean exact match over the skills merged",
             "in that cell, 'retention' the share of the base's chat questions still answered, 'ppl' the",
             "perplexity per token on held-out prose. Each table cell: no AIM / +AIM / uniform control /",
             "shuffled control (where run), means over the seeds that have every variant (their number in",
             "brackets); bold = best of the row.", "", "### Base and experts", ""]
    lines += references(rows) + [""]
    for w in omegas:
        lines += [f"### omega = {w}", ""] + toy.headline_table(idx, w, COLS) + [""]
    lines += ["### Counts (cells with no AIM, AIM and the uniform control; Δ = mean change vs no AIM)", ""]
    lines += counts_table(all_counts) + [""]
    stats_path = out / "aim_stats.safetensors"
    channel_summary = []
    if stats_path.is_file():
        from distmerge.aim import load_statistics
        from distmerge.aim.stats_summary import format_table, summarize

        channel_summary = summarize(load_statistics(stats_path)[0], HEADLINE_OMEGA)
        lines += ["### The base's per-channel statistics (AIM's input, as `distmerge calibrate` prints them)", "",
                  "```", format_table(channel_summary, HEADLINE_OMEGA), "```"]
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "summary.md").write_text("\n".join(lines) + "\n")
    (dest / "results_table.md").write_text("# AIM on SmolLM2: every variant (mean ± std over seeds)\n\n"
                                           + "\n".join(toy.full_table(idx, COLS)) + "\n")
    (dest / "counts.json").write_text(json.dumps({str(w): c for w, c in all_counts.items()}, indent=1))
    plotted = toy.plot(idx, dest / "aim_real.png", omegas) if idx else False
    stats_plotted = False
    if channel_summary:
        from distmerge.aim.stats_summary import plot as plot_statistics

        try:
            plot_statistics(channel_summary, dest / "channel_stats.png",
                            "SmolLM2-135M-Instruct: per-input-channel activation statistic a (AIM's input), "
                            "builtin calibration set")
            stats_plotted = True
        except ImportError:
            pass
    return {"seeds": seeds, "merges": merges, "counts": all_counts, "plot": plotted, "channel_plot": stats_plotted}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("benchmarks/_work/real"))
    p.add_argument("--dest", type=Path, default=HERE)
    args = p.parse_args(argv)
    print(json.dumps(write_report(args.out, args.dest), indent=1, default=str))


if __name__ == "__main__":
    main()
