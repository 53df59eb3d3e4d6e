"""Figures of a search, drawn on matplotlib's Agg canvas (no display needed).

The figures are not pyplot's: pyplot's backend and list of open figures belong to the user. A
figure pyplot knew of would be shown a second time at the end of a notebook cell that returns it,
and choosing a backend here would stop the user's own plots from showing inline.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.axis import Axis
    from matplotlib.figure import Figure

__all__ = ["score_vs_macs", "score_vs_latency", "plan_ratios", "history", "pareto_indices", "close", "Figure"]

#: A point to mark: (x, score, trial number).
Marked = tuple[float, float, int]


def __getattr__(name: str) -> Any:
    # matplotlib is imported on first drawing, not with autoprune: it adds ~0.8 s to every CLI
    # command, most of which draw nothing.
    if name == "Figure":
        from matplotlib.figure import Figure

        return Figure
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
    chosen: Marked | None = None,
    chosen_label: str = "chosen",
) -> Figure:
    """Validation score against MACs ratio of every trial, the Pareto front, the baselines, and the
    ``chosen`` trial (x, score, number), labelled ``chosen_label (trial n)``."""
    fig, ax = _score_vs_cost(points, baselines)
    xs = [p[0] for p in points] + [x for x, _ in baselines.values()]
    if budget_fraction is not None:
        ax.axvline(budget_fraction, color="gray", ls="--", lw=1, label="budget")
        xs.append(budget_fraction)
    _mark_chosen(ax, chosen, chosen_label)
    # Every trial of a budgeted search sits just under the budget: a 0.1-wide window keeps the
    # ticks to a few short labels instead of offsets and five-decimal ones on top of each other.
    _readable(ax.xaxis, ax.set_xlim, xs, min_span=0.1)
    _readable(ax.yaxis, ax.set_ylim, [p[1] for p in points] + [y for _, y in baselines.values()], min_span=0.02)
    return _labelled(fig, ax, "MACs of pruned / dense model", "validation score (before fine-tuning)", title)


def score_vs_latency(
    points: Sequence[tuple[float, float]],
    *,
    measured: Sequence[tuple[float, float, float]],
    baselines: Mapping[str, tuple[float, float]],
    limit_ms: float | None,
    tolerance: float,
    dense_ms: float,
    chosen: Marked | None,
    chosen_met: bool,
    title: str,
) -> Figure:
    """Validation score against latency (ms): every trial at its predicted latency, the trials timed
    after the search at their measured latency (an arrow from the prediction), the budget with its
    timing tolerance, and the ``chosen`` trial at its measured latency."""
    fig, ax = _score_vs_cost(points, baselines)
    for predicted, real, score in measured:
        ax.annotate("", xy=(real, score), xytext=(predicted, score),
                    arrowprops={"arrowstyle": "->", "color": "gray", "lw": 0.8})
    if measured:
        ax.scatter([m[1] for m in measured], [m[2] for m in measured], s=30, facecolor="none", edgecolor="black",
                   zorder=4, label="measured after the search")
    xs = [p[0] for p in points] + [m[1] for m in measured] + [x for x, _ in baselines.values()]
    if limit_ms is not None:
        ax.axvline(limit_ms, color="gray", ls="--", lw=1, label=f"budget {limit_ms:.3f} ms")
        ax.axvspan(limit_ms, limit_ms * (1 + tolerance), color="gray", alpha=0.15,
                   label=f"timing tolerance {tolerance:.1%}")
        xs += [limit_ms, limit_ms * (1 + tolerance)]
    _mark_chosen(ax, chosen, "chosen" if chosen_met else "handed on, OVER BUDGET")
    _readable(ax.xaxis, ax.set_xlim, xs, min_span=0.1 * max(xs, default=dense_ms))
    _readable(ax.yaxis, ax.set_ylim, [p[1] for p in points] + [m[2] for m in measured], min_span=0.02)
    return _labelled(fig, ax, f"latency, ms per batch (dense model: {dense_ms:.3f} ms)",
                     "validation score (before fine-tuning)", title)


def _new_figure(width: float, height: float) -> tuple[Figure, Axes]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)  # draws and saves without pyplot
    return fig, fig.subplots()


def _score_vs_cost(points: Sequence[tuple[float, float]],
                   baselines: Mapping[str, tuple[float, float]]) -> tuple[Figure, Axes]:
    fig, ax = _new_figure(6.4, 4.4)
    if points:
        ax.scatter([p[0] for p in points], [p[1] for p in points], s=14, alpha=0.6, label="trials")
        front = [points[i] for i in pareto_indices(points)]
        ax.plot([p[0] for p in front], [p[1] for p in front], "-o", color="tab:red", ms=4, label="Pareto front")
    markers = {"uniform": "s", "global": "D"}
    for name, (x, y) in baselines.items():
        ax.scatter([x], [y], marker=markers.get(name, "*"), s=80, edgecolor="black", zorder=5, label=f"{name} baseline")
    return fig, ax


def _mark_chosen(ax: Axes, chosen: Marked | None, label: str) -> None:
    if chosen is not None:
        x, y, number = chosen
        ax.scatter([x], [y], marker="*", s=260, color="gold", edgecolor="black", zorder=6,
                   label=f"{label} (trial {number})", gid="chosen")


def _readable(axis: Axis, set_limits: Callable[[float, float], object], values: Sequence[float | None], *,
              min_span: float) -> None:
    """Limits at least ``min_span`` wide around ``values`` and at most seven plain tick labels
    (no offset, no scientific notation), however close together the values are."""
    from matplotlib.ticker import MaxNLocator, ScalarFormatter

    known = [v for v in values if v is not None]
    if not known:
        return
    low, high = min(known), max(known)
    if high - low < min_span:
        middle = (low + high) / 2
        low, high = middle - min_span / 2, middle + min_span / 2
    pad = 0.05 * (high - low)
    set_limits(low - pad, high + pad)
    axis.set_major_locator(MaxNLocator(nbins=6))
    formatter = ScalarFormatter(useOffset=False)
    formatter.set_scientific(False)
    axis.set_major_formatter(formatter)


def _labelled(fig: Figure, ax: Axes, xlabel: str, ylabel: str, title: str) -> Figure:
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
    fig, ax = _new_figure(max(6.4, 0.28 * len(names) + 2), 4.0)
    ax.bar(range(len(names)), [ratios[n] for n in names], color="tab:blue")
    ax.set_xticks(range(len(names)), names, rotation=75, ha="right", fontsize=7)
    ax.set_ylabel("fraction of channels removed")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def history(numbers: Sequence[int], scores: Sequence[float], *, title: str) -> Figure:
    """Each trial's score and the best so far, by trial number."""
    fig, ax = _new_figure(6.4, 4.0)
    ax.scatter(numbers, scores, s=12, alpha=0.6, label="trial")
    best, running = [], float("-inf")
    for s in scores:
        running = max(running, s)
        best.append(running)
    ax.step(numbers, best, where="post", color="tab:red", label="best so far")
    return _labelled(fig, ax, "trial", "validation score", title)


def close(fig: Figure) -> None:
    """Free a figure's drawing now."""
    fig.clear()
