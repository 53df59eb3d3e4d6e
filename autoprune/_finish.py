"""After the trials: the baselines' scores, the latency check of the best plans, the plots on the
parent run, and the :class:`SearchResult` handed back to the caller."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna

from . import plots
from .evaluate import Evaluator, TrialResult
from .latency import LatencyPredictor, measure_relative
from .plan import Plan
from .profile import ModelProfile
from .settings import SearchSettings
from .space import LatencySpec
from .study import (
    StoredTrial,
    best_trial,
    failed_trials,
    read_record,
    stored_trials,
    update_record,
)
from .task import Task
from .tracking import Tracker

__all__ = ["SearchResult", "finish", "result_of", "pick_verified", "LatencyBudgetWarning"]

#: How many of the best trials are measured when the predictor's best misses a latency budget.
_VERIFIED_CANDIDATES = 10


class LatencyBudgetWarning(UserWarning):
    """A latency search's prediction and measurement disagree, or no top plan measures within budget."""


@dataclass(frozen=True)
class SearchResult:
    """The outcome of a search.

    ``best_plan``/``best_result`` are the finished trial with the highest validation score (all
    trials meet the budget); ``pareto`` holds the non-dominated (MACs, score) trials, the whole
    answer of a Pareto search; ``baselines`` maps ``uniform``/``global`` to their val scores.
    ``stopped_trials`` counts the trials the study's stopper ended early (multi-fidelity).
    """

    study_name: str
    storage_url: str
    tracking_uri: str
    experiment: str
    mlflow_run_id: str
    best_plan: Plan | None
    best_result: TrialResult | None
    n_finished: int
    pareto: tuple[tuple[Plan, TrialResult], ...]
    baselines: Mapping[str, float]
    dense_score: float
    workdir: Path
    stopped_early: bool = False
    failed_trials: int = 0
    settings: Mapping[str, Any] = field(default_factory=dict)
    measured_latency_ms: Mapping[int, float] = field(default_factory=dict)
    stopped_trials: int = 0


def _baseline_scores(trials: Sequence[StoredTrial], baselines: Mapping[str, Plan],
                     evaluator: Evaluator) -> dict[str, tuple[float, float]]:
    """(macs_ratio, val_score) of the uniform and global plans: from the study when it has them."""
    found: dict[str, tuple[float, float]] = {}
    for t in trials:
        if t.baseline in baselines and t.baseline not in found:
            found[t.baseline] = (t.result.macs_ratio, t.result.val_score)
    for label, plan in baselines.items():
        if label not in found:
            res = evaluator.evaluate(plan)
            found[label] = (res.macs_ratio, res.val_score)
    return found


def finish(settings: SearchSettings, study: optuna.Study, tracker: Tracker, parent_run_id: str, *,
           task: Task, profile: ModelProfile, evaluator: Evaluator, baselines: Mapping[str, Plan],
           latency: LatencyPredictor | None, failed: bool, stopped: bool = False) -> None:
    """Best plan, baselines and plots onto the parent run; it ends FINISHED, FAILED, or KILLED
    when the user stopped the search (resuming sets it RUNNING again)."""
    try:
        dead = {t.number for t in failed_trials(study)}
        tracker.fail_running_trials(parent_run_id, dead)  # trials failed by heartbeat or reaping
        trials = stored_trials(study)
        scores = _baseline_scores(trials, baselines, evaluator) if not failed else {}
        tracker.log_metrics(parent_run_id, {f"{k}_val_score": v[1] for k, v in scores.items()})
        if not failed and latency is not None:
            _verify_latency(settings, study, tracker, parent_run_id, task=task, profile=profile,
                            evaluator=evaluator, predictor=latency)
        _log_plots(settings, study, tracker, parent_run_id, trials, scores)
    finally:
        tracker.end_search(parent_run_id, status="FAILED" if failed else ("KILLED" if stopped else "FINISHED"))


def _log_plots(settings: SearchSettings, study: optuna.Study, tracker: Tracker, parent_run_id: str,
               trials: Sequence[StoredTrial], scores: Mapping[str, tuple[float, float]]) -> None:
    best = best_trial(study)
    title = f"{settings.space.display_name} ({settings.strategy_label}, budget {settings.space.budget_obj})"
    if best is not None:
        tracker.log_text(parent_run_id, best.plan.to_json(), "best_plan.json")
        tracker.log_metrics(parent_run_id, {"final_best_val_score": best.result.val_score,
                                            "final_best_macs_ratio": best.result.macs_ratio,
                                            "finished_trials": len(trials)})
        fig = plots.plan_ratios(best.plan.ratios,
                                title=f"best plan: trial {best.number}, val {best.result.val_score:.4f}")
        tracker.log_figure(parent_run_id, fig, "plots/best_plan_ratios.png")
        plots.close(fig)
    budget = settings.space.budget_obj
    if trials:
        points = [(t.result.macs_ratio, t.result.val_score) for t in trials]
        fig = plots.score_vs_macs(points, baselines=scores,
                                  budget_fraction=budget.value if budget.metric == "flops" and budget.is_fraction
                                  else None, title=title)
        tracker.log_figure(parent_run_id, fig, "plots/score_vs_macs.png")
        plots.close(fig)
        fig = plots.history([t.number for t in trials], [s for _, s in points], title=title)
        tracker.log_figure(parent_run_id, fig, "plots/history.png")
        plots.close(fig)


def pick_verified(ranked: Sequence[int], measured_ms: Mapping[int, float], limit_ms: float | None,
                  tolerance: float) -> int | None:
    """The first of ``ranked`` trial numbers whose measured latency is within ``limit_ms`` plus the
    relative ``tolerance`` for timing noise (any, without a limit); None when none is."""
    for number in ranked:
        if number in measured_ms and (limit_ms is None or measured_ms[number] <= limit_ms * (1 + tolerance)):
            return number
    return None


def _verify_latency(settings: SearchSettings, study: optuna.Study, tracker: Tracker, parent_run_id: str, *,
                    task: Task, profile: ModelProfile, evaluator: Evaluator, predictor: LatencyPredictor) -> None:
    """Measure the best plans' real latency; the best plan must meet a latency budget as measured.

    Trials are ranked by validation score; the first whose measured latency is within the budget
    (plus the stated tolerance) becomes the search's best. Where prediction and measurement
    disagree by more than the tolerance the search warns.
    """
    budget = settings.space.budget_obj
    tolerance = (settings.space.latency or LatencySpec()).tolerance
    limit = budget.limit(profile, predictor) if budget.is_latency else None
    measured = dict(read_record(study).measured_latency_ms)
    ranked = sorted(stored_trials(study), key=lambda t: (-t.result.val_score, t.result.macs))[:_VERIFIED_CANDIDATES]
    chosen = None
    for t in ranked:  # measured one at a time: usually the first fits, and each costs a timing run
        if t.number not in measured:
            measured[t.number], = measure_relative([evaluator.build(t.plan)], task.model, task.example_input,
                                                   predictor)
        error = abs(t.result.latency_ms - measured[t.number]) / measured[t.number]
        if error > tolerance:
            warnings.warn(f"latency of trial {t.number}: predicted {t.result.latency_ms:.3f} ms, measured "
                          f"{measured[t.number]:.3f} ms ({error:.1%} apart, tolerance {tolerance:.0%})",
                          LatencyBudgetWarning, stacklevel=2)
        chosen = pick_verified([t.number], measured, limit, tolerance)
        if chosen is not None:
            break
    update_record(study, measured_latency_ms=measured)
    if chosen is None:
        warnings.warn(f"none of the {len(ranked)} best trials measures within the latency budget {budget} "
                      f"({limit:.3f} ms + {tolerance:.0%}); the predictor underestimates this device",
                      LatencyBudgetWarning, stacklevel=2)
        return
    update_record(study, latency_verified_trial=chosen)
    predicted = next(t.result.latency_ms for t in ranked if t.number == chosen)
    tracker.log_metrics(parent_run_id, {
        "best_latency_ms_measured": measured[chosen], "best_latency_ms_predicted": predicted,
        "dense_latency_ms": predictor.dense_ms, "latency_limit_ms": limit,
        "latency_predictor_median_error": predictor.check.median_abs_error if predictor.check else None,
    })


def result_of(settings: SearchSettings, study: optuna.Study, parent_run_id: str, dense_score: float,
              stopped: bool) -> SearchResult:
    """The :class:`SearchResult` of the study as it stands."""
    best = best_trial(study)
    trials = stored_trials(study)
    front = [trials[i] for i in plots.pareto_indices([(t.result.macs_ratio, t.result.val_score) for t in trials])]
    n_stopped = len(stored_trials(study, states=(optuna.trial.TrialState.PRUNED,)))
    return SearchResult(
        study_name=settings.study_name, storage_url=settings.storage_url, tracking_uri=settings.tracking_uri,
        experiment=settings.space.display_name, mlflow_run_id=parent_run_id,
        best_plan=best.plan if best else None, best_result=best.result if best else None,
        n_finished=len(trials) + n_stopped, pareto=tuple((t.plan, t.result) for t in front),
        baselines={t.baseline: t.result.val_score for t in trials if t.baseline},
        dense_score=dense_score, workdir=settings.workdir, stopped_early=stopped,
        failed_trials=len(failed_trials(study)), settings=settings.to_dict(redacted=True),
        measured_latency_ms=read_record(study).measured_latency_ms, stopped_trials=n_stopped,
    )
