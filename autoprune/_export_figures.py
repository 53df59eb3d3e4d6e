"""The figures an export writes beside its report: where the exported plan sits among the study's
trials (score against MACs, and against latency for a latency search) and what it removes from
each group. Drawn by :mod:`autoprune.plots`, as the search's own figures are."""

from __future__ import annotations

from pathlib import Path

import optuna

from . import plots
from ._finish import _latency_figure
from ._latency_check import LatencyCheck
from .evaluate import TrialResult
from .plan import Plan
from .study import StoredTrial, read_record, stored_trials

__all__ = ["write_export_figures", "CAPTIONS"]

#: What each figure file shows, as report.md and report.json caption it.
CAPTIONS = {
    "score_vs_macs.png": "validation score (before fine-tuning) against MACs of the study's trials, the exported "
                         "plan marked",
    "score_vs_latency.png": "validation score against latency of the study's trials, predicted and measured "
                            "after the search",
    "plan_ratios.png": "fraction of channels the exported plan removes from each group",
}


def write_export_figures(folder: Path, study: optuna.Study, chosen: StoredTrial, *, plan: Plan, exported: str,
                         budget_fraction: float | None, title: str) -> dict[str, str]:
    """Write the figures into ``folder``; returns their file names, each with what it shows.

    ``chosen`` is the trial export picked; ``exported`` says whether its plan (``searched``) or the
    uniform plan (``uniform``, ``--choose val``) was written. ``budget_fraction`` draws the MACs
    budget (the search's, or export's ``--budget``) when it is a fraction of the dense model.
    """
    trials = stored_trials(study)
    record = read_record(study)
    baselines = {k: TrialResult.from_dict(v) for k, v in record.baseline_scores.items()}
    figures = {"score_vs_macs.png": plots.score_vs_macs(
        [(t.result.macs_ratio, t.result.val_score) for t in trials],
        baselines={k: (v.macs_ratio, v.val_score) for k, v in baselines.items()}, budget_fraction=budget_fraction,
        chosen=(chosen.result.macs_ratio, chosen.result.val_score, chosen.number), title=title,
        chosen_label="exported" if exported == "searched" else "searched, not exported (uniform was)")}
    if record.latency_check is not None:
        figures["score_vs_latency.png"] = _latency_figure(LatencyCheck.from_dict(record.latency_check), trials,
                                                          baselines, title)
    which = f"trial {chosen.number}" if exported == "searched" else "the uniform plan"
    figures["plan_ratios.png"] = plots.plan_ratios(plan.ratios, title=f"exported plan ({which}): fraction of "
                                                   "channels removed per group")
    for name, fig in figures.items():
        try:
            fig.savefig(folder / name, dpi=100)
        finally:
            plots.close(fig)
    return {name: CAPTIONS[name] for name in figures}
