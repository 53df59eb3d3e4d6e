"""The search's figures read (#16 item 11): plain tick labels when every trial sits at the budget,
latency searches plotted against milliseconds, and the chosen trial marked."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from autoprune import plots
from autoprune._finish import _latency_figure
from autoprune._latency_check import LatencyCheck, MeasuredTrial


def tick_labels(fig, axis: str = "x") -> list:
    """The visible tick labels of the figure's axis, drawn, with their extents on the canvas."""
    fig.canvas.draw()
    ax = fig.axes[0]
    renderer = fig.canvas.get_renderer()
    low, high = ax.get_xlim() if axis == "x" else ax.get_ylim()
    ticks = ax.get_xticks() if axis == "x" else ax.get_yticks()
    labels = ax.get_xticklabels() if axis == "x" else ax.get_yticklabels()
    return [(label.get_text(), label.get_window_extent(renderer))
            for label, tick in zip(labels, ticks) if low <= tick <= high and label.get_text()]


def chosen_marker(fig):
    return next((c for c in fig.axes[0].collections if c.get_gid() == "chosen"), None)


def test_score_vs_macs_has_plain_ticks_when_every_trial_sits_at_the_budget():
    rng = np.random.default_rng(0)
    # A budgeted search's trials are projected onto the budget: their MACs ratios differ by 1e-6.
    points = [(0.5 - float(rng.uniform(0, 1e-6)), float(rng.uniform(0.93, 0.97))) for _ in range(40)]
    fig = plots.score_vs_macs(points, baselines={"uniform": (0.4999995, 0.94), "global": (0.4999991, 0.95)},
                              budget_fraction=0.5, title="digits-cnn", chosen=(points[3][0], points[3][1], 3))
    ax = fig.axes[0]
    labels = tick_labels(fig)
    texts = [text.replace("\u2212", "-") for text, _ in labels]
    assert ax.xaxis.get_offset_text().get_text() == ""  # no "1e-5+4.999e-1" above the axis
    assert 3 <= len(texts) <= 7 and len(set(texts)) == len(texts)
    assert all(len(text.split(".")[-1]) <= 3 for text in texts), texts  # 0.48, not 0.499995
    assert not any(a.overlaps(b) for (_, a), (_, b) in itertools.combinations(labels, 2))
    low, high = ax.get_xlim()
    assert low < 0.5 < high and high - low >= 0.1
    assert ax.get_ylabel() == "validation score (before fine-tuning)"
    marker = chosen_marker(fig)
    assert marker is not None and tuple(marker.get_offsets()[0]) == pytest.approx(points[3])
    assert "chosen (trial 3)" in [t.get_text() for t in ax.get_legend().get_texts()]
    plots.close(fig)


def latency_check(chosen: int | None) -> LatencyCheck:
    measured = (MeasuredTrial(4, 0.97, predicted_ms=2.0, measured_ms=2.6),
                MeasuredTrial(7, 0.96, predicted_ms=2.05, measured_ms=2.1))
    return LatencyCheck(budget="latency=0.7", limit_ms=2.1, tolerance=0.05, dense_ms=3.0, timing="batch 32, 1 thread(s), cpu",
                        measured=measured if chosen else measured[:1] + (MeasuredTrial(7, 0.96, 2.05, 2.4),),
                        chosen=chosen)


class _Trial:  # the two fields of a StoredTrial the figure reads
    def __init__(self, latency_ms: float, val_score: float) -> None:
        self.result = type("R", (), {"latency_ms": latency_ms, "val_score": val_score})()


@pytest.mark.parametrize("chosen, label", [(7, "chosen (trial 7)"), (None, "handed on, OVER BUDGET (trial 4)")])
def test_a_latency_search_plots_score_against_milliseconds_with_its_choice(chosen, label):
    check = latency_check(chosen)
    trials = [_Trial(2.0 + 0.01 * i, 0.95 + 0.002 * i) for i in range(10)]
    fig = _latency_figure(check, trials, {}, "digits-cnn")
    ax = fig.axes[0]
    assert ax.get_xlabel() == "latency, ms per batch (dense model: 3.000 ms)"
    assert "batch 32, 1 thread(s), cpu" in ax.get_title()
    handed = check.handed_on
    marker = chosen_marker(fig)
    assert tuple(marker.get_offsets()[0]) == pytest.approx((handed.measured_ms, handed.val_score))  # measured, not predicted
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert label in legend and "budget 2.100 ms" in legend and "measured after the search" in legend
    assert any(list(line.get_xdata()) == [2.1, 2.1] for line in ax.get_lines())  # the limit
    texts = [text for text, _ in tick_labels(fig)]
    assert ax.xaxis.get_offset_text().get_text() == "" and len(set(texts)) == len(texts) <= 7
    plots.close(fig)
