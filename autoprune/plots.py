"""Figures of a search, drawn with matplotlib's Agg backend (no display needed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

__all__ = ["score_vs_macs", "plan_ratios", "history", "pareto_indices", "close"]


def pareto_indices(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of points (macs_ratio, score) not dominated by lower MACs and higher score."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], float("-inf")
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def score_vs_macs(
    points: Sequence[tuple[float, float]],
    *,
    baselines: Mapping[str, tuple[float, float]],
    budget_fraction: float | None,
    title: str,
) -> Figure:
    """Validation score against MACs ratio of every trial, the Pareto front, and the baselines."""
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    if points:
        ax.scatter([p[0] for p in points], [p[1] for p in points], s=14, alpha=0.6, label="trials")
        front = [points[i] for i in pareto_indices(points)]
        ax.plot([p[0] for p in front], [p[1] for p in front], "-o", color="tab:red", ms=4, label="Pareto front")
    markers = {"uniform": "s", "global": "D"}
    for name, (x, y) in baselines.items():
        ax.scatter([x], [y], marker=markers.get(name, "*"), s=80, edgecolor="black", zorder=5, label=f"{name} baseline")
    if budget_fraction is not None:
        ax.axvline(budget_fraction, color="gray", ls="--", lw=1, label="budget")
    return _labelled(fig, ax, "MACs of pruned / dense model", "validation score", title)


def _labelled(fig: Figure, ax: plt.Axes, xlabel: str, ylabel: str, title: str) -> Figure:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plan_ratios(ratios: Mapping[str, float], *, title: str) -> Figure:
    """Fraction of channels removed per group of one plan, in network order."""
    names = list(ratios)
    fig, ax = plt.subplots(figsize=(max(6.4, 0.28 * len(names) + 2), 4.0))
    ax.bar(range(len(names)), [ratios[n] for n in names], color="tab:blue")
    ax.set_xticks(range(len(names)), names, rotation=75, ha="right", fontsize=7)
    ax.set_ylabel("fraction of channels removed")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def history(numbers: Sequence[int], scores: Sequence[float], *, title: str) -> Figure:
    """Each trial's score and the best so far, by trial number."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    ax.scatter(numbers, scores, s=12, alpha=0.6, label="trial")
    best, running = [], float("-inf")
    for s in scores:
        running = max(running, s)
        best.append(running)
    ax.step(numbers, best, where="post", color="tab:red", label="best so far")
    return _labelled(fig, ax, "trial", "validation score", title)


def close(fig: Figure) -> None:
    plt.close(fig)
