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
from ._latency_check import LatencyBudgetWarning, LatencyCheck, MeasuredTrial, percent
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


@dataclass(frozen=True)
class SearchResult:
    """The outcome of a search.

    ``best_plan``/``best_result`` are the finished trial with the highest validation score (all
    trials meet the budget; a latency search's is the best that *measured* within it, see
    ``latency``); ``pareto`` holds the non-dominated (MACs, score) trials, the whole answer of a
    Pareto search (``objective == "pareto"``); ``baselines`` maps ``uniform``/``global`` to their
    val scores at the same budget, for every strategy. Val scores are the search's candidate
    scores, before export's fine-tuning. ``stopped_trials`` counts the trials the study's stopper
    ended early (multi-fidelity). ``latency`` is the after-search timing of the best trials when
    the search measures latency: limit, dense and chosen plan's latency, and whether it was met.
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
    latency: LatencyCheck | None = None
    objective: str = "score"


def _baseline_scores(trials: Sequence[StoredTrial], baselines: Mapping[str, Plan],
                     evaluator: Evaluator) -> dict[str, TrialResult]:
    """What the uniform and global plans scored: from the study when it has them (strategies that
    start from the baselines), else evaluated now (random search, an RL agent told not to start from
    them, a search with fewer trials than baselines), so every summary can compare with them."""
    found: dict[str, TrialResult] = {}
    for t in trials:
        if t.baseline in baselines and t.baseline not in found:
            found[t.baseline] = t.result
    for label, plan in baselines.items():
        if label not in found:
            found[label] = evaluator.evaluate(plan)
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
        tracker.log_metrics(parent_run_id, {f"{k}_val_score": v.val_score for k, v in scores.items()})
        if scores:
            update_record(study, baseline_scores={k: v.to_dict() for k, v in scores.items()})
        if not failed and latency is not None:
            _verify_latency(settings, study, tracker, parent_run_id, task=task, profile=profile,
                            evaluator=evaluator, predictor=latency)
        elif failed:
            update_record(study, latency_check=None)  # not re-checked: an old check would mislead
        _log_plots(settings, study, tracker, parent_run_id, trials, scores)
    finally:
        tracker.end_search(parent_run_id, status="FAILED" if failed else ("KILLED" if stopped else "FINISHED"))


def _log_plots(settings: SearchSettings, study: optuna.Study, tracker: Tracker, parent_run_id: str,
               trials: Sequence[StoredTrial], scores: Mapping[str, TrialResult]) -> None:
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
    if not trials:
        return
    budget = settings.space.budget_obj
    fig = plots.score_vs_macs(
        [(t.result.macs_ratio, t.result.val_score) for t in trials],
        baselines={k: (v.macs_ratio, v.val_score) for k, v in scores.items()},
        budget_fraction=budget.value if budget.metric == "flops" and budget.is_fraction else None,
        chosen=(best.result.macs_ratio, best.result.val_score, best.number) if best is not None else None, title=title)
    tracker.log_figure(parent_run_id, fig, "plots/score_vs_macs.png")
    plots.close(fig)
    record = read_record(study)
    if record.latency_check is not None:
        fig = _latency_figure(LatencyCheck.from_dict(record.latency_check), trials, scores, title)
        tracker.log_figure(parent_run_id, fig, "plots/score_vs_latency.png")
        plots.close(fig)
    fig = plots.history([t.number for t in trials], [t.result.val_score for t in trials], title=title)
    tracker.log_figure(parent_run_id, fig, "plots/history.png")
    plots.close(fig)


def _latency_figure(check: LatencyCheck, trials: Sequence[StoredTrial], scores: Mapping[str, TrialResult],
                    title: str) -> plots.Figure:
    """Score against latency: predicted for every trial, measured for those timed after the search."""
    handed = check.handed_on
    return plots.score_vs_latency(
        [(t.result.latency_ms, t.result.val_score) for t in trials if t.result.latency_ms is not None],
        measured=[(m.predicted_ms, m.measured_ms, m.val_score) for m in check.measured],
        baselines={k: (v.latency_ms, v.val_score) for k, v in scores.items() if v.latency_ms is not None},
        limit_ms=check.limit_ms, tolerance=check.tolerance, dense_ms=check.dense_ms,
        chosen=(handed.measured_ms, handed.val_score, handed.number) if handed is not None else None,
        chosen_met=check.met, title=f"{title}\n{check.timing}")


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
    disagree by more than the tolerance the search warns, and where no ranked trial measures
    within the budget it warns that the budget is missed. The check is recorded in the study
    (:class:`LatencyCheck`) for the summary, the plots and the export report.
    """
    budget = settings.space.budget_obj
    tolerance = (settings.space.latency or LatencySpec()).tolerance
    limit = budget.limit(profile, predictor) if budget.is_latency else None
    measured = dict(read_record(study).measured_latency_ms)
    ranked = sorted(stored_trials(study), key=lambda t: (-t.result.val_score, t.result.macs))[:_VERIFIED_CANDIDATES]
    chosen, timed = None, []
    for t in ranked:  # measured one at a time: usually the first fits, and each costs a timing run
        if t.number not in measured:
            measured[t.number], = measure_relative([evaluator.build(t.plan)], task.model, task.example_input,
                                                   predictor)
        error = abs(t.result.latency_ms - measured[t.number]) / measured[t.number]
        if error > tolerance:
            warnings.warn(f"latency of trial {t.number}: predicted {t.result.latency_ms:.3f} ms, measured "
                          f"{measured[t.number]:.3f} ms ({percent(error)} apart, tolerance {percent(tolerance)})",
                          LatencyBudgetWarning, stacklevel=2)
        timed.append(MeasuredTrial(t.number, t.result.val_score, t.result.latency_ms, measured[t.number]))
        chosen = pick_verified([t.number], measured, limit, tolerance)
        if chosen is not None:
            break
    update_record(study, measured_latency_ms=measured)
    timing = predictor.settings
    check = LatencyCheck(budget=str(budget) if budget.is_latency else "", limit_ms=limit, tolerance=tolerance,
                         dense_ms=predictor.dense_ms, measured=tuple(timed), chosen=chosen,
                         timing=f"batch {timing.batch_size}, {timing.threads} thread(s), {timing.device}")
    update_record(study, latency_check=check.to_dict(), latency_verified_trial=chosen)
    if check.miss() is not None:
        warnings.warn(check.miss(), LatencyBudgetWarning, stacklevel=2)
    handed = check.handed_on
    tracker.log_metrics(parent_run_id, {
        "best_latency_ms_measured": handed.measured_ms if handed else None,
        "best_latency_ms_predicted": handed.predicted_ms if handed else None,
        "dense_latency_ms": predictor.dense_ms, "latency_limit_ms": limit,
        "latency_budget_met": float(check.met) if limit is not None else None,
        "latency_predictor_median_error": predictor.check.median_abs_error if predictor.check else None,
    })


def result_of(settings: SearchSettings, study: optuna.Study, parent_run_id: str, dense_score: float,
              stopped: bool) -> SearchResult:
    """The :class:`SearchResult` of the study as it stands."""
    best = best_trial(study)
    trials = stored_trials(study)
    front = [trials[i] for i in plots.pareto_indices([(t.result.macs_ratio, t.result.val_score) for t in trials])]
    n_stopped = len(stored_trials(study, states=(optuna.trial.TrialState.PRUNED,)))
    record = read_record(study)
    baselines = {t.baseline: t.result.val_score for t in trials if t.baseline}
    # A search without baseline trials evaluates them after its trials; the record has them for every strategy.
    baselines.update({k: TrialResult.from_dict(v).val_score for k, v in record.baseline_scores.items()})
    return SearchResult(
        study_name=settings.study_name, storage_url=settings.storage_url, tracking_uri=settings.tracking_uri,
        experiment=settings.space.display_name, mlflow_run_id=parent_run_id,
        best_plan=best.plan if best else None, best_result=best.result if best else None,
        n_finished=len(trials) + n_stopped, pareto=tuple((t.plan, t.result) for t in front),
        baselines=baselines, dense_score=dense_score, workdir=settings.workdir, stopped_early=stopped,
        failed_trials=len(failed_trials(study)), settings=settings.to_dict(redacted=True),
        measured_latency_ms=record.measured_latency_ms, stopped_trials=n_stopped,
        latency=LatencyCheck.from_dict(record.latency_check) if record.latency_check else None,
        objective=settings.space.strategy.objective,
    )
