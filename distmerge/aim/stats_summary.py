"""What a set of AIM statistics says, before any merge: how peaked each module is, and where.

AIM differs from shrinking the merge delta uniformly only where a few input channels carry
most of the base model's activation; these numbers say how much of that a model has. Pure
functions of the statistics (vectors in, numbers and text out); the plot is optional
(matplotlib), everything else needs nothing beyond torch.
"""

from __future__ import annotations

import re
import statistics as pystats
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from distmerge.aim.relax import relaxation_factors

# Written into a plot's PNG text chunk, so that a later --plot may replace it and nothing else.
PLOT_MARKER = b"distmerge AIM statistics"
_LAYER = re.compile(r"\.(?:layers|h|blocks|layer)\.(\d+)\.")


@dataclass(frozen=True)
class ModuleStatistic:
    """One module's channel statistic summarized at one omega.

    ``max_over_median``: how far the most active input channel is above the median one;
    ``top1pct_share``: the share of the summed statistic held by the top 1% of channels;
    ``protected``: channels with ``s = a / max(a) >= 0.5`` (AIM keeps at most
    ``1 - (1 - omega) / 2`` of their delta); ``r_mean``/``r_min``: the mean and smallest factor;
    ``r_rel_std``: std/mean of the factors, the most the activation information can change
    a delta beyond a uniform shrink by ``r_mean``.
    """

    name: str
    layer: int | None
    kind: str
    channels: int
    max_over_median: float
    top1pct_share: float
    protected: int
    top_channels: tuple[int, ...]
    r_mean: float
    r_min: float
    r_rel_std: float


def summarize(stats: dict[str, torch.Tensor], omega: float = 0.4) -> list[ModuleStatistic]:
    """One :class:`ModuleStatistic` per module, in layer then name order."""
    out = []
    for name, vec in stats.items():
        a = vec.detach().double()
        median = float(a.median())
        peak = float(a.max())
        order = torch.argsort(a, descending=True)
        k = max(1, a.numel() // 100)
        total = float(a.sum())
        r = relaxation_factors(a, omega).double()
        match = _LAYER.search(f".{name}.")
        out.append(ModuleStatistic(
            name=name, layer=int(match.group(1)) if match else None,
            kind=name.rsplit(".", 1)[-1] if match else name,
            channels=a.numel(),
            max_over_median=peak / median if median > 0 else float("inf"),
            top1pct_share=float(a[order[:k]].sum()) / total if total > 0 else 0.0,
            protected=int((a >= 0.5 * peak).sum()) if peak > 0 else 0,
            top_channels=tuple(int(i) for i in order[:3]),
            r_mean=float(r.mean()), r_min=float(r.min()),
            r_rel_std=float(r.std() / r.mean()) if a.numel() > 1 else 0.0,
        ))
    return sorted(out, key=lambda m: (m.layer if m.layer is not None else 1 << 30, m.name))


def _fmt_ratio(x: float) -> str:
    return "inf" if x == float("inf") else f"{x:.1f}"


def format_table(summary: list[ModuleStatistic], omega: float, top: int = 5) -> str:
    """A compact text table per module kind, then the modules AIM changes most."""
    by_kind: dict[str, list[ModuleStatistic]] = defaultdict(list)
    for m in summary:
        by_kind[m.kind].append(m)
    lines = [f"AIM statistics: {len(summary)} modules; factors at omega {omega}",
             f"{'module':<26} {'n':>4} {'max/median med (min..max)':>26} {'top1% share':>11} "
             f"{'s>=0.5':>7} {'mean r':>7} {'most peaked':>12}"]
    for kind, ms in by_kind.items():
        ratios = sorted(m.max_over_median for m in ms)
        peaked = max(ms, key=lambda m: m.max_over_median)
        where = f"layer {peaked.layer}" if peaked.layer is not None else "-"
        lines.append(f"{kind:<26} {len(ms):>4} {_fmt_ratio(pystats.median(ratios)):>10} "
                     f"({_fmt_ratio(ratios[0])}..{_fmt_ratio(ratios[-1])}){'':>3} "
                     f"{pystats.fmean(m.top1pct_share for m in ms):>11.3f} "
                     f"{pystats.fmean(m.protected / m.channels for m in ms):>6.1%} "
                     f"{pystats.fmean(m.r_mean for m in ms):>7.3f} {where:>12}")
    lines.append("most peaked modules (AIM differs most from a uniform shrink there; top channels by a):")
    for m in sorted(summary, key=lambda m: -m.max_over_median)[:top]:
        lines.append(f"  {m.name}: max/median {_fmt_ratio(m.max_over_median)}, {m.protected} of {m.channels} "
                     f"channels with s >= 0.5, top channels {list(m.top_channels)}, factors {m.r_min:.2f}..1 "
                     f"(mean {m.r_mean:.3f})")
    return "\n".join(lines)


def require_matplotlib() -> None:
    """Raise ImportError saying what to install when matplotlib is missing (checked before work)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        raise ImportError("plotting AIM statistics needs matplotlib: pip install 'distmerge[plot]'") from e


def plot(summary: list[ModuleStatistic], path: Path, title: str = "") -> None:
    """Per decoder layer and module kind: max/median (log) and the top 1% channels' share."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    by_kind: dict[str, list[ModuleStatistic]] = defaultdict(list)
    for m in summary:
        if m.layer is not None:
            by_kind[m.kind].append(m)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for kind, ms in by_kind.items():
        ms = sorted(ms, key=lambda m: m.layer or 0)
        layers = [m.layer for m in ms]
        axes[0].plot(layers, [m.max_over_median for m in ms], marker=".", label=kind)
        axes[1].plot(layers, [m.top1pct_share for m in ms], marker=".", label=kind)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("largest channel / median channel")
    axes[1].set_ylabel("share of the statistic in the top 1% of channels")
    for ax in axes:
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle(title or "AIM per-input-channel activation statistics", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, metadata={"Software": PLOT_MARKER.decode()})
    plt.close(fig)
