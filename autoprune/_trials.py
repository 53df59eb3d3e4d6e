"""One trial at a time: the runner that strategies see as their :class:`SearchContext`.

A trial is asked for, its plan chosen (the strategy's raw ratios projected onto the budget, or a
ready plan), evaluated with intermediate scores reported to the study's stopper, and recorded in
the study and in MLflow. Its outcome is sorted into complete, stopped or failed first, the way
Optuna's ``_run_trial`` does, and only then told, logged and passed on.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import optuna
import torch
from optuna.trial import TrialState

from .budget import Budget, project, reachable_range
from .errors import AutopruneError
from .evaluate import Evaluator, TrialResult
from .plan import Plan
from .profile import ModelProfile
from .settings import SearchSettings
from .strategies import PARETO_TARGET, BaseStrategy, SearchContext, TrialOutcome, TrialStopped
from .strategies._optuna import stopper_step
from .study import (
    Heartbeat,
    TrialSlots,
    baseline_of,
    best_trial,
    check_study_name,
    enqueue_baselines,
    fail_stale_trials,
    is_repeated_baseline,
    reap_dead_local_trials,
    record_evaluation,
    record_mlflow_run,
)
from .tracking import TRACKING_PARAM_LIMIT, Tracker

if TYPE_CHECKING:
    from ._workers import Stop

__all__ = ["TrialRunner", "FailurePolicy", "Settled"]

#: Seconds between looks at a study that is full only because of trials running elsewhere.
WAIT_FOR_OTHERS_SECONDS = 2.0

Settled = Literal["complete", "stopped", "failed"]


@dataclass(frozen=True)
class FailurePolicy:
    """Which evaluation errors fail one trial and let the search go on (Optuna's ``catch``).

    ``AutopruneError`` (a user mistake), ``KeyboardInterrupt`` and ``SystemExit`` always end the
    search; other exceptions fail the trial, until ``max_consecutive_failures`` in a row, which
    means something is broken for every candidate.
    """

    catch: tuple[type[BaseException], ...] = (Exception,)
    never_catch: tuple[type[BaseException], ...] = (AutopruneError, KeyboardInterrupt, SystemExit)
    max_consecutive_failures: int = 3

    def settle(self, exc: BaseException) -> Settled:
        """The state a trial ends in when its evaluation raised ``exc`` (a stopper's
        :class:`TrialStopped`: stopped); re-raises what must end the search instead."""
        if isinstance(exc, TrialStopped):
            return "stopped"
        if isinstance(exc, self.never_catch) or not isinstance(exc, self.catch):
            raise exc
        return "failed"


class TrialRunner(SearchContext):
    """The running search as strategies see it, in one process.

    Args:
        settings: the search's settings.
        profile, evaluator: the dense model's profile and the candidate evaluator.
        study: the study that stores the trials.
        tracker, parent_run_id: where trials are logged (MLflow child runs of that run).
        baselines: the uniform and global plans at the budget.
        stop: set when the user asked the search to stop (after the current trial).
        strategy: the strategy that drives the trials (``runner.strategy.search(runner)``); its
            ``after_trial`` sees each outcome.
        on_trial: called after every trial with its outcome (``None`` for a failed trial).
        policy: which evaluation errors fail a trial instead of the search.
        new_study: whether this process created the study.
    """

    def __init__(
        self,
        settings: SearchSettings,
        *,
        profile: ModelProfile,
        evaluator: Evaluator,
        study: optuna.Study,
        tracker: Tracker,
        parent_run_id: str,
        baselines: dict[str, Plan],
        stop: Stop,
        strategy: BaseStrategy,
        on_trial: Callable[[TrialOutcome | None], None] | None = None,
        policy: FailurePolicy = FailurePolicy(),
        new_study: bool = False,
    ) -> None:
        space = settings.space
        self.settings = settings
        self.profile = profile
        self.budget = space.budget_obj
        self.bounds = space.groups.bounds(profile)
        self.round_to = space.groups.round_to
        self.seed = space.strategy.seed
        self.baselines = baselines
        self.evaluator = evaluator
        self.latency = evaluator.latency
        self.tracker = tracker
        self.parent_run_id = parent_run_id
        self._study = study
        self._slots = TrialSlots(study, settings.n_trials)
        self._stop = stop
        self.strategy = strategy
        self.is_new_study = new_study
        self._on_trial = on_trial
        self._policy = policy
        self._pareto = space.strategy.objective == "pareto"
        fidelity = space.evaluation.fidelity
        self._reduction_factor = fidelity.reduction_factor if fidelity is not None else 1
        self._rung_index = {step: i for i, step in enumerate(evaluator.fidelity.rungs)}
        self.dimensions = {n: b for n, b in self.bounds.items() if b[1] > b[0]}
        if self._pareto:
            fraction = self.budget.fraction(profile, self.latency)
            low, _ = reachable_range(profile, self.budget.metric, bounds=self.bounds, round_to=self.round_to,
                                     latency=self.latency)
            self.dimensions[PARETO_TARGET] = (min(fraction, low * 1.001), fraction)
        self._consecutive_failures = 0

    # -- SearchContext -------------------------------------------------------------------------

    @property
    def study(self) -> optuna.Study:
        return self._study

    def ask(self, fixed_params: Mapping[str, float] | None = None) -> optuna.Trial | None:
        values = None
        if fixed_params is not None:
            values = {n: min(max(float(fixed_params[n]), lo), hi) for n, (lo, hi) in self.dimensions.items()}
        while not self._stop.event.is_set():
            fail_stale_trials(self._study)
            trial = self._slots.ask(values)
            if trial is not None and is_repeated_baseline(self._study, trial):
                # Two processes resuming one study may both enqueue a missing baseline; the
                # later copy is given back unevaluated.
                self._slots.give_back(trial, "this baseline was already evaluated or is running")
                continue
            if trial is not None:
                if values is not None:
                    for name, (lo, hi) in self.dimensions.items():
                        trial.suggest_float(name, lo, hi)  # returns the enqueued value; stores it as the trial's param
                return trial
            if self._slots.finished() >= self._slots.n_trials:
                return None
            # The study is full only because of trials running elsewhere: wait until they finish,
            # or until their workers' heartbeats go stale and their candidates come back for retry,
            # so the study ends with exactly the requested number of finished trials.
            reap_dead_local_trials(self._study, retry=self.settings.space.strategy.name != "rl")
            self._stop.event.wait(WAIT_FOR_OTHERS_SECONDS)
        return None

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self.tracker.log_metrics(self.parent_run_id, metrics, step=step)

    def trials_left(self) -> bool:
        return not self._stop.event.is_set() and self._slots.remaining() > 0

    @property
    def state_dir(self) -> Path:
        # Study names are checked (check_study_name): no separators or '..', so this stays inside.
        path = self.settings.workdir / "strategy-state" / check_study_name(self.settings.study_name)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def project(self, raw: Mapping[str, float], budget: Budget | None = None) -> Plan:
        return project(self.profile, raw, budget or self.budget, bounds=self.bounds, round_to=self.round_to,
                       latency=self.latency)

    def enqueue_initial_trials(self) -> None:
        """The strategy's baseline candidates, enqueued once (see :func:`autoprune.study.enqueue_baselines`)."""
        planned = self.strategy.initial_trials(self.baselines, self.dimensions)
        if planned:
            enqueue_baselines(self._study, planned, n_trials=self._slots.n_trials, new_study=self.is_new_study)

    # -- one trial -------------------------------------------------------------------------------

    def run_trial(
        self, trial: optuna.Trial, *, raw: Mapping[str, float] | None = None, plan: Plan | None = None
    ) -> TrialOutcome | None:
        run_id = self.tracker.start_trial(self.parent_run_id, trial.number,
                                          {"autoprune.strategy": self.settings.strategy_label})
        record_mlflow_run(trial, run_id)
        start = time.perf_counter()
        try:
            with Heartbeat(self._study, trial._trial_id):
                chosen = self._choose_plan(trial, raw, plan, run_id)
                try:
                    result, state = self._evaluate(trial, chosen, run_id), "complete"
                except TrialStopped as stopped:
                    result = self.evaluator.result_of(chosen, stopped.score, seconds=time.perf_counter() - start,
                                                      finetune_steps=stopped.step)
                    state = "stopped"
                return self._record(trial, chosen.with_metrics(val_score=result.val_score), result, raw, run_id,
                                    state)
        except BaseException as exc:
            return self._failed(trial, run_id, exc)

    def _choose_plan(self, trial: optuna.Trial, raw: Mapping[str, float] | None, plan: Plan | None,
                     run_id: str) -> Plan:
        baseline = baseline_of(trial)
        if baseline in self.baselines:
            chosen = self.baselines[baseline]
        elif plan is not None:
            chosen = plan
        elif raw is None:
            raise ValueError("run_trial needs raw ratios or a plan")
        else:
            ratios = {k: v for k, v in raw.items() if k != PARETO_TARGET}
            budget = self.budget
            if PARETO_TARGET in raw:
                budget = Budget(**{"latency" if budget.is_latency else budget.metric: raw[PARETO_TARGET]})
            chosen = self.project(ratios, budget)
        return chosen.with_provenance(
            strategy=baseline or self.settings.strategy_label, study=self.settings.study_name, trial=trial.number,
            mlflow_run_id=run_id, seed=self.seed, versions=_versions(), task_spec=self.settings.task_spec,
            **({"raw_ratios": dict(raw)} if raw is not None else {}),
        )

    def _evaluate(self, trial: optuna.Trial, plan: Plan, run_id: str) -> TrialResult:
        """Evaluate ``plan``, reporting each fidelity rung's score to the study (and MLflow); the
        study's stopper may end the trial at a rung by raising :class:`TrialStopped`."""

        def on_step(step: int, score: float) -> None:
            self.tracker.log_metrics(run_id, {"val_score_rung": score}, step=step)
            if self._pareto:  # Optuna's stoppers judge single-objective studies only
                return
            trial.report(score, stopper_step(self._rung_index[step], self._reduction_factor))
            if step != self.evaluator.fidelity.rungs[-1] and trial.should_prune():
                raise TrialStopped(step, score)

        fidelity_steps = len(self.evaluator.fidelity.rungs) > 1
        return self.evaluator.evaluate(plan, on_step=on_step if fidelity_steps else None)

    def _record(self, trial: optuna.Trial, plan: Plan, result: TrialResult, raw: Mapping[str, float] | None,
                run_id: str, state: Settled) -> TrialOutcome:
        record_evaluation(trial, plan, result, raw)
        metrics = {**result.to_dict(), "flops": result.macs, "flops_ratio": result.macs_ratio}
        if plan.mode == "sparsity":
            # The fraction of each tensor's weights zeroed, as metrics MLflow can chart and compare
            # across trials (the ratio.* params hold the same numbers as text).
            metrics.update({f"sparsity.{name}": ratio for name, ratio in list(plan.ratios.items())[:TRACKING_PARAM_LIMIT]})
        raw_ratios = {k: v for k, v in raw.items() if k != PARETO_TARGET} if raw is not None else None
        if state == "stopped":
            self.tracker.stop_trial(run_id, ratios=plan.ratios, metrics=metrics, plan_json=plan.to_json(),
                                    raw_ratios=raw_ratios)
            self._study.tell(trial, state=TrialState.PRUNED)
        else:
            self.tracker.finish_trial(run_id, ratios=plan.ratios, metrics=metrics, plan_json=plan.to_json(),
                                      raw_ratios=raw_ratios)
            self._study.tell(trial, [result.val_score, result.macs_ratio] if self._pareto else result.val_score)
        self._consecutive_failures = 0
        outcome = TrialOutcome(trial.number, plan, result, dict(raw) if raw is not None else None,
                               stopped=state == "stopped")
        self._log_best_so_far(trial.number)
        self._announce(outcome)
        return outcome

    def _failed(self, trial: optuna.Trial, run_id: str, exc: BaseException) -> None:
        """Record the trial FAILED, then let the policy decide whether the search goes on."""
        self._fail_quietly(trial, run_id, "".join(traceback.format_exception_only(type(exc), exc)).strip())
        self._policy.settle(exc)  # re-raises what must end the search
        self._consecutive_failures += 1
        if self._consecutive_failures >= self._policy.max_consecutive_failures:
            raise exc
        self._announce(None)
        return None

    def _fail_quietly(self, trial: optuna.Trial, run_id: str, message: str) -> None:
        try:
            self.tracker.fail_trial(run_id, message)
        finally:
            try:
                self._study.tell(trial, state=TrialState.FAIL)
            except Exception:
                pass  # already told, or the storage is gone: the next search reaps it

    def _announce(self, outcome: TrialOutcome | None) -> None:
        self.strategy.after_trial(outcome)
        if self._on_trial:
            self._on_trial(outcome)

    def _log_best_so_far(self, step: int) -> None:
        best = best_trial(self._study)
        if best is not None:
            self.tracker.log_metrics(self.parent_run_id, {"best_val_score": best.result.val_score,
                                                          "best_macs_ratio": best.result.macs_ratio}, step=step)


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    out = {"torch": torch.__version__}
    for name in ("autoprune", "torch-pruning", "optuna"):
        try:
            out[name] = version(name)
        except Exception:
            pass
    return out
