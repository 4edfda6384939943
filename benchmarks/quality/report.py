"""Tables, counts and the plot of the AIM quality experiment, from the per-seed results files.

    .venv/bin/python -m benchmarks.quality.report --out benchmarks/_work/quality

Writes ``benchmarks/quality/results_table.md`` (every variant, mean +- std over seeds),
``benchmarks/quality/summary.md`` (the paper-style table at omega 0.4 and the counts) and
``benchmarks/quality/aim_quality.png``. "Beyond seed noise" means the paired (same seed, same
base and experts) difference AIM - control has a mean larger than twice its standard error;
with fewer than two seeds nothing can be called beyond noise.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from benchmarks.quality.skills import SKILLS

HERE = Path(__file__).resolve().parent
METRICS = (*SKILLS, "ppl")
METHOD_ORDER = ("task_arithmetic", "ties", "dare_ties", "dare_linear")


def load_rows(out: Path) -> list[dict[str, Any]]:
    """Every evaluated model of every finished seed (a seed's partial results included)."""
    rows = []
    for path in sorted(out.glob("seed*/results.jsonl")):
        rows += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows


LOWER_IS_BETTER = {"ppl"}
# The short names of the counts' keys: "mean" (mean exact match) counts as "acc".
COUNT_NAMES = {"mean": "acc"}


def mean_skill(row: dict[str, Any], skills: tuple[str, ...] = SKILLS) -> float:
    """Mean exact match over the skills merged in this combination (all of them otherwise)."""
    names = row["combo"].split("+") if row["kind"] == "merge" else list(skills)
    return sum(row[s] for s in names) / len(names)


def msd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def fmt(values: list[float], digits: int = 3) -> str:
    m, s = msd(values)
    return f"{m:.{digits}f}" + (f"±{s:.{digits}f}" if len(values) > 1 else "")


def index(rows: list[dict[str, Any]], skills: tuple[str, ...] = SKILLS) -> dict[tuple[Any, ...], dict[int, dict[str, Any]]]:
    """(method, combo, variant, omega) -> seed -> row, merges only."""
    out: dict[tuple[Any, ...], dict[int, dict[str, Any]]] = defaultdict(dict)
    for r in rows:
        if r["kind"] == "merge":
            out[(r["method"], r["combo"], r["variant"], r["omega"])][r["seed"]] = {**r, "mean": mean_skill(r, skills)}
    return out


def paired(a: dict[int, dict[str, Any]], b: dict[int, dict[str, Any]], metric: str) -> list[float]:
    """Per-seed differences a - b over the seeds both have."""
    return [a[s][metric] - b[s][metric] for s in sorted(set(a) & set(b))]


def beyond_noise(diffs: list[float]) -> int:
    """+1 / -1 when the mean paired difference exceeds twice its standard error, else 0."""
    if len(diffs) < 2:
        return 0
    m, sd = msd(diffs)
    se = sd / math.sqrt(len(diffs))
    if abs(m) > 2 * se and m != 0:
        return 1 if m > 0 else -1
    return 0


def better(metric: str, diff: float) -> bool:
    """Whether a difference (new - old) of ``metric`` is an improvement."""
    return diff < 0 if metric in LOWER_IS_BETTER else diff > 0


def counts(idx: dict[tuple[Any, ...], dict[int, dict[str, Any]]], omega: float,
           metrics: tuple[str, ...] = ("ppl", "mean")) -> dict[str, Any]:
    """Per omega: cells where AIM beats no-AIM per metric, and AIM vs each control beyond noise."""
    cells = sorted({(k[0], k[1]) for k in idx if k[2] == "none"})
    c = defaultdict(int)
    for method, combo in cells:
        none, aim, ctrl, shuf = (idx.get((method, combo, v, w), {}) for v, w in
                                 (("none", None), ("aim", omega), ("uniform", omega), ("shuffled", omega)))
        if not (none and aim and ctrl):
            continue
        c["cells"] += 1
        if shuf:
            c["shuffled_cells"] += 1
        for metric in metrics:
            key = COUNT_NAMES.get(metric, metric)
            c[f"aim_better_{key}"] += better(metric, msd(paired(aim, none, metric))[0])
            c[f"ctrl_better_{key}"] += better(metric, msd(paired(ctrl, none, metric))[0])
            # summed gains over cells: how much of AIM's gain each control gets
            c[f"gain_aim_{metric}"] += msd(paired(aim, none, metric))[0]
            c[f"gain_ctrl_{metric}"] += msd(paired(ctrl, none, metric))[0]
            if shuf:
                c[f"gain_shuf_{metric}"] += msd(paired(shuf, none, metric))[0]
            c[f"aim_vs_ctrl_{key}_mean_better"] += better(metric, msd(paired(aim, ctrl, metric))[0])
            count_beyond_noise(c, aim, ctrl, "ctrl", metric)
            if shuf:
                count_beyond_noise(c, aim, shuf, "shuf", metric)
    return dict(c)


def count_beyond_noise(c: dict[str, int], aim: dict[int, dict[str, Any]], other: dict[int, dict[str, Any]],
                       name: str, metric: str) -> None:
    """Add this cell to the counts of AIM beating ``other`` (and the reverse) beyond seed noise."""
    sign = beyond_noise(paired(aim, other, metric))
    key = COUNT_NAMES.get(metric, metric)
    c[f"aim_beats_{name}_{key}_noise"] += sign != 0 and better(metric, sign)
    c[f"{name}_beats_aim_{key}_noise"] += sign != 0 and not better(metric, sign)


def references(rows: list[dict[str, Any]]) -> list[str]:
    """Base and experts per seed and mean: what every merge should be compared against."""
    lines = ["| model | seeds | " + " | ".join(METRICS) + " |", "|---|---|" + "---|" * len(METRICS)]
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        if r["kind"] != "merge":
            groups["base" if r["kind"] == "base" else f"expert {r['combo']}"].append(r)
    for name, rs in groups.items():
        lines.append(f"| {name} | {len(rs)} | " + " | ".join(
            fmt([r[m] for r in rs], 2 if m == "ppl" else 3) for m in METRICS) + " |")
    seeds = sorted({r["seed"] for r in rows if r["kind"] == "base"})
    lines.append("")
    lines.append("Per seed (add / rev / sort / ppl):")
    lines.append("")
    for s in seeds:
        parts = [f"{name}: " + " / ".join(f"{r[m]:.2f}" for m in METRICS)
                 for name, rs in groups.items() for r in rs if r["seed"] == s]
        lines.append(f"- seed {s}: " + "; ".join(parts))
    return lines


def headline_table(idx: dict[tuple[Any, ...], dict[int, dict[str, Any]]], omega: float,
                   cols: tuple[str, ...] = (*SKILLS, "mean", "ppl")) -> list[str]:
    """Paper-style: rows method x combination; cells 'no AIM / +AIM / uniform / shuffled' (seed means)."""
    lines = ["| method | experts | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for method, combo in sorted({(k[0], k[1]) for k in idx if k[2] == "none"}, key=lambda x: (x[0], len(x[1]), x[1])):
        trio = [idx.get((method, combo, v, w), {}) for v, w in
                (("none", None), ("aim", omega), ("uniform", omega), ("shuffled", omega))]
        if not trio[-1]:
            trio = trio[:-1]
        if not all(trio):
            continue
        common = set.intersection(*(set(t) for t in trio))  # same seeds for every variant: paired
        if not common:
            continue
        cells = []
        for col in cols:
            if any(col not in t[seed] for t in trio for seed in common):  # a skill this cell did not merge
                cells.append("-")
                continue
            vals = [msd([t[seed][col] for seed in sorted(common)])[0] for t in trio]
            d = 2
            best = min(vals) if col in LOWER_IS_BETTER else max(vals)
            cells.append(" / ".join(f"**{v:.{d}f}**" if v == best and vals.count(best) == 1 else f"{v:.{d}f}"
                                    for v in vals))
        lines.append(f"| {method} | {combo} ({len(common)}) | " + " | ".join(cells) + " |")
    return lines


def full_table(idx: dict[tuple[Any, ...], dict[int, dict[str, Any]]],
               cols: tuple[str, ...] = (*SKILLS, "mean", "ppl")) -> list[str]:
    """Every variant, mean ± std over seeds."""
    lines = ["| method | experts | variant | omega | seeds | " + " | ".join(cols) + " |",
             "|---|---|---|---|---|" + "---|" * len(cols)]
    order = {"none": 0, "aim": 1, "uniform": 2, "shuffled": 3}
    for key in sorted(idx, key=lambda k: (k[0], len(k[1]), k[1], k[3] or 0, order[k[2]])):
        rs = list(idx[key].values())
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {key[3] if key[3] is not None else '-'} | {len(rs)} | "
                     + " | ".join(fmt([r[c] for r in rs], 2 if c == "ppl" else 3) if all(c in r for r in rs) else "-"
                                  for c in cols) + " |")
    return lines


def diagnostics(out: Path) -> list[str]:
    """Heavy-tailedness of the base's channel statistics, by module kind, averaged over seeds/layers."""
    kinds: dict[str, list[dict[str, float]]] = defaultdict(list)
    for path in sorted(out.glob("seed*/aim_diagnostics.json")):
        for name, d in json.loads(path.read_text()).items():
            kinds[name.split(".")[-1] if "layers" in name or name.endswith("norm") else name].append(d)
    lines = ["| module kind | n | max/median (median, max) | top-1% channels' share of Σa | r_min at ω=0.4 | "
             "std(r)/mean(r) at ω=0.4 |", "|---|---|---|---|---|---|"]
    for kind, ds in sorted(kinds.items()):
        mom = sorted(d["max_over_median"] for d in ds)
        lines.append(f"| {kind} | {len(ds)} | {statistics.median(mom):.1f} ({mom[-1]:.1f}) | "
                     f"{statistics.fmean(d['top1pct_share'] for d in ds):.3f} | "
                     f"{statistics.fmean(d['r_min'] for d in ds):.2f} | {statistics.fmean(d['r_rel_std'] for d in ds):.3f} |")
    return lines


def plot(idx: dict[tuple[Any, ...], dict[int, dict[str, Any]]], path: Path, omegas: tuple[float, ...]) -> bool:
    """Change vs the same seed's no-AIM merge, per method, averaged over combinations.

    Paired differences, because the seeds' bases differ in perplexity by more than any merge
    variant does: unpaired error bars would hide every effect.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    present = {k[0] for k in idx}
    methods = [m for m in METHOD_ORDER if m in present] + sorted(present - set(METHOD_ORDER))
    fig, axes = plt.subplots(2, len(methods), figsize=(4 * len(methods), 6.5), squeeze=False)
    labels = {"aim": "AIM", "uniform": "uniform control", "shuffled": "shuffled-channel control"}
    for j, method in enumerate(methods):
        combos = sorted({k[1] for k in idx if k[0] == method})
        for i, metric in enumerate(("mean", "ppl")):
            ax = axes[i][j]
            for k, (variant, style) in enumerate((("aim", "o-"), ("uniform", "s--"), ("shuffled", "^:"))):
                xs, ys, es = [], [], []
                for w in omegas:
                    per_seed: dict[int, list[float]] = defaultdict(list)
                    for c in combos:
                        none = idx.get((method, c, "none", None), {})
                        for s, r in idx.get((method, c, variant, w), {}).items():
                            if s in none:
                                per_seed[s].append(r[metric] - none[s][metric])
                    vals = [statistics.fmean(v) for v in per_seed.values() if len(v) == len(combos)]
                    if vals:
                        m, sd = msd(vals)
                        xs.append(w + (k - 1) * 0.012)
                        ys.append(m)
                        es.append(sd)
                if xs:
                    ax.errorbar(xs, ys, yerr=es, fmt=style, capsize=3, label=labels[variant])
            ax.axhline(0.0, color="gray", ls=":", lw=1)
            ax.set_title(method if i == 0 else "")
            ax.set_xlabel("omega")
            ax.set_ylabel("Δ mean exact match vs no AIM" if metric == "mean" else "Δ perplexity vs no AIM")
            ax.grid(alpha=0.3)
            if i == 0 and j == 0:
                ax.legend(fontsize=8)
    fig.suptitle("Change vs the same seed's merge without AIM, mean over the 4 expert combinations "
                 "(error bars: std over seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(out: Path, dest: Path = HERE) -> dict[str, Any]:
    """Write the tables, counts and plot; returns the counts per omega."""
    rows = load_rows(out)
    idx = index(rows)
    omegas = tuple(sorted({k[3] for k in idx if k[3] is not None}))
    seeds = sorted({r["seed"] for r in rows})
    all_counts = {w: counts(idx, w) for w in omegas}
    lines = [f"Seeds: {seeds}. Cells are method x expert combination; 'mean' is the mean exact match over the",
             "skills merged in that cell. Each table cell: no AIM / +AIM / uniform control / shuffled control",
             "(the shuffled control where it was run: omega 0.4 by default; means over the seeds that have",
             "every variant, their number in brackets; bold = best of the row).", ""]
    lines += ["### Base and experts", ""] + references(rows) + [""]
    for w in omegas:
        lines += [f"### omega = {w}", ""] + headline_table(idx, w) + [""]
    lines += ["### Counts (of cells with all three variants)", "",
              "| omega | cells | AIM better ppl | AIM better mean acc | control better ppl | control better mean acc | "
              "AIM < control ppl (mean) | AIM > control acc (mean) | AIM beats control beyond noise: ppl / acc | "
              "control beats AIM beyond noise: ppl / acc | AIM beats shuffled beyond noise: ppl / acc | "
              "shuffled beats AIM beyond noise: ppl / acc |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for w, c in all_counts.items():
        lines.append(f"| {w} | {c.get('cells', 0)} | {c.get('aim_better_ppl', 0)} | {c.get('aim_better_acc', 0)} | "
                     f"{c.get('ctrl_better_ppl', 0)} | {c.get('ctrl_better_acc', 0)} | "
                     f"{c.get('aim_vs_ctrl_ppl_mean_better', 0)} | {c.get('aim_vs_ctrl_acc_mean_better', 0)} | "
                     f"{c.get('aim_beats_ctrl_ppl_noise', 0)} / {c.get('aim_beats_ctrl_acc_noise', 0)} | "
                     f"{c.get('ctrl_beats_aim_ppl_noise', 0)} / {c.get('ctrl_beats_aim_acc_noise', 0)} | "
                     + (f"{c.get('aim_beats_shuf_ppl_noise', 0)} / {c.get('aim_beats_shuf_acc_noise', 0)} | "
                        f"{c.get('shuf_beats_aim_ppl_noise', 0)} / {c.get('shuf_beats_aim_acc_noise', 0)} |"
                        if c.get("shuffled_cells") else "- | - |"))
    lines += ["", "Gain over the no-AIM merge, averaged over cells (ppl: lower is better; acc: mean exact match):", "",
              "| omega | Δppl AIM | Δppl uniform | Δppl shuffled | Δacc AIM | Δacc uniform | Δacc shuffled |",
              "|---|---|---|---|---|---|---|"]
    for w, c in all_counts.items():
        n = max(1, c.get("cells", 0))
        lines.append(f"| {w} | " + " | ".join(
            f"{c[f'gain_{v}_{m}'] / n:+.4f}" if f"gain_{v}_{m}" in c else "-"
            for m in ("ppl", "mean") for v in ("aim", "ctrl", "shuf")) + " |")
    lines += ["", "### Base model's per-channel statistics (AIM's input)", ""] + diagnostics(out)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "summary.md").write_text("\n".join(lines) + "\n")
    (dest / "results_table.md").write_text("# AIM quality: every variant (mean ± std over seeds)\n\n"
                                           + "\n".join(full_table(idx)) + "\n")
    plotted = plot(idx, dest / "aim_quality.png", omegas)
    (dest / "counts.json").write_text(json.dumps({str(w): c for w, c in all_counts.items()}, indent=1))
    return {"seeds": seeds, "counts": all_counts, "plot": plotted}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("benchmarks/_work/quality"))
    p.add_argument("--dest", type=Path, default=HERE, help="where the tables and plot go")
    args = p.parse_args(argv)
    print(json.dumps(write_report(args.out, args.dest), indent=1, default=str))


if __name__ == "__main__":
    main()
