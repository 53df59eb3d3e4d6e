"""A budget-constrained search, as its stages: resolve the settings, prepare the task, open the
study and its MLflow parent run, run the trials (in this process or in worker processes), finish.

Each stage is a function of its own module (:mod:`autoprune.settings`, :mod:`autoprune._trials`,
:mod:`autoprune._workers`, :mod:`autoprune._finish`); this module wires them, and is the only
place that does.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import optuna
import torch
from optuna.trial import TrialState

from ._finish import SearchResult, finish, result_of
from ._progress import note, progress_bar
from ._trials import TrialRunner
from ._workers import Stop, forward_interrupt, start_workers, stop_workers, wait_for_workers
from .budget import Budget, global_plan, project, reachable_range, uniform_plan
from .errors import StorageError, redact, short
from .evaluate import Evaluator
from .latency import LatencyPredictor, build_predictor, save_predictor, with_check
from .plan import Plan
from .profile import ModelProfile
from .settings import SearchSettings, latency_settings, resolve_settings
from .space import SearchSpace
from .sparsity import SparsityProfile, global_magnitude_plan, lamp_plan, profile_for
from .strategies import TrialOutcome, make_sampler, make_stopper, make_strategy
from .study import (
    best_trial,
    completed_trials,
    create_or_resume_study,
    failed_trials,
    open_storage,
    read_record,
    reap_dead_local_trials,
    update_record,
)
from .task import Task, load_task
from .tracking import Tracker, check_server

__all__ = ["search", "SearchResult", "SearchSettings", "resolve_settings", "latency_settings", "run_worker"]


@dataclass(frozen=True)
class _Prepared:
    task: Task
    profile: ModelProfile
    evaluator: Evaluator
    baselines: dict[str, Plan]
    latency: LatencyPredictor | None = None


def search(
    space: str | os.PathLike[str] | SearchSpace = "default",
    *,
    show_progress: bool = True,
    on_trial: Callable[[TrialOutcome | None], None] | None = None,
    **overrides: Any,
) -> SearchResult:
    """Run (or resume) a budget-constrained search; see :func:`resolve_settings` for overrides.

    ``task`` replaces the space's task: a name, ``"package.module:function"``, or an
    :class:`~autoprune.Task` built in Python (a notebook), searched in this process; a study of a
    task object is exported with the same object, ``ap.export_study(name, out, task=task)``.

    Example::

        result = ap.search("search_spaces/default.yaml", strategy="optuna", n_trials=50)
        result.best_plan.save("best.json")
        result = ap.search("default", task=my_task, n_trials=20)   # my_task: an ap.Task
    """
    settings = resolve_settings(space, **overrides)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads_per_worker)
    try:
        _check_remote_stores(settings)
        prepared = _prepare(settings)
        study, resumed = _open_study(settings)
        tracker = _tracker(settings)
        parent_run_id = _open_parent_run(settings, study, tracker, prepared)
        if resumed:
            note(_resumed_at(settings, study), enabled=show_progress)
        stop, failed = Stop(), False
        with progress_bar(f"search {settings.study_name}", total=settings.n_trials, enabled=show_progress) as advance:
            runner = _runner(settings, prepared, study, tracker, parent_run_id, stop, new_study=not resumed,
                             on_trial=_progress_reporter(study, advance, on_trial))
            runner.enqueue_initial_trials()
            done = len(completed_trials(study))
            advance(min(done, settings.n_trials), "resumed" if resumed and done else "")
            processes = start_workers(settings, parent_run_id)
            try:
                with stop.installed(on_first=lambda: forward_interrupt(processes)):
                    if processes:
                        wait_for_workers(processes, study, settings.n_trials, advance)
                    else:
                        runner.strategy.search(runner)
            except BaseException:
                failed = True
                raise
            finally:
                stop_workers(processes)
                finish(settings, study, tracker, parent_run_id, task=prepared.task, profile=prepared.profile,
                       evaluator=prepared.evaluator, baselines=prepared.baselines, latency=prepared.latency,
                       failed=failed, stopped=stop.event.is_set())
        return result_of(settings, study, parent_run_id, prepared.evaluator.dense_score, stop.event.is_set())
    finally:
        torch.set_num_threads(previous_threads)


def run_worker(settings: SearchSettings, parent_run_id: str, stop: Stop) -> None:
    """What a worker process of a ``--workers N`` search runs: the strategy's loop on the shared study."""
    prepared = _prepare(settings)
    study, _ = _open_study(settings)
    runner = _runner(settings, prepared, study, _tracker(settings), parent_run_id, stop)
    runner.strategy.search(runner)


def _runner(settings: SearchSettings, prepared: _Prepared, study: optuna.Study, tracker: Tracker, parent_run_id: str,
            stop: Stop, *, new_study: bool = False,
            on_trial: Callable[[TrialOutcome | None], None] | None = None) -> TrialRunner:
    s = settings.space.strategy
    return TrialRunner(settings, profile=prepared.profile, evaluator=prepared.evaluator, study=study, tracker=tracker,
                       parent_run_id=parent_run_id, baselines=prepared.baselines, stop=stop,
                       strategy=make_strategy(s.name, sampler=s.sampler, rl_settings=s.rl), on_trial=on_trial,
                       new_study=new_study)


def _progress_reporter(study: optuna.Study, advance: Callable[[int, str], None],
                       on_trial: Callable[[TrialOutcome | None], None] | None) -> Callable[[TrialOutcome | None], None]:
    def report(outcome: TrialOutcome | None) -> None:
        best = best_trial(study)
        status = "" if best is None else f"best {best.result.val_score:.4f} at " + (
            f"MACs {best.result.macs_ratio:.3f}" if best.result.nonzeros_ratio is None
            else f"nonzeros {best.result.nonzeros_ratio:.3f}")
        advance(1 if outcome is not None else 0, status)
        if on_trial:
            on_trial(outcome)

    return report


def _resumed_at(settings: SearchSettings, study: optuna.Study) -> str:
    """Where a resumed study stands: its finished, stopped and failed trials and the next trial's number."""
    trials = study.get_trials(deepcopy=False)
    finished = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    stopped = sum(t.state == TrialState.PRUNED for t in trials)
    failed = len(failed_trials(study))
    counts = [f"{stopped} stopped early"] * bool(stopped) + [f"{failed} failed"] * bool(failed)
    line = f"resuming study {settings.study_name}: {finished} of {settings.n_trials} trials finished" + (
        f" ({', '.join(counts)})" if counts else "")
    if finished >= settings.n_trials:
        return line + "; nothing left to run (raise --trials to search further)"
    # A re-queued trial (a dead worker's candidate, retried) runs before any new one.
    waiting = [t.number for t in trials if t.state == TrialState.WAITING]
    return line + f", continuing from trial {min(waiting, default=len(trials))}"


def _check_remote_stores(settings: SearchSettings) -> None:
    """Refuse unreachable remote storage/tracking before any work (local SQLite files are made on use)."""
    if not settings.storage_url.startswith("sqlite:"):
        storage = open_storage(settings.storage_url)
        try:
            storage.get_all_studies()
        except Exception as exc:
            raise StorageError(f"Cannot read the Optuna storage {redact(settings.storage_url)}: {short(exc)}") from None
    if settings.tracking_uri.startswith(("http://", "https://")):
        check_server(settings.tracking_uri)


def _prepare(settings: SearchSettings) -> _Prepared:
    """Load the task, profile it and check the budget: everything that can refuse bad input."""
    space = settings.space
    if settings.task_object is not None:
        task = settings.task_object
        task.model.eval()  # as load_task leaves a user task's model
    else:
        task = load_task(space.task_spec, data_root=settings.data_root, workdir=settings.workdir,
                         seed=space.strategy.seed)
    profile = profile_for(task, mode=space.mode, pattern=space.pattern)
    bounds = space.groups.bounds(profile, source=f"search space {space.display_name!r}")
    budget = space.budget_obj
    latency = _latency_predictor(settings, task, profile, bounds) if space.measures_latency else None
    # uniform_plan refuses an infeasible budget, before any search work.
    uniform = uniform_plan(profile, budget, bounds=bounds, round_to=space.groups.round_to, latency=latency)
    evaluator = Evaluator.from_settings(task, space.evaluation, seed=space.strategy.seed, profile=profile,
                                        latency=latency, cache_dir=settings.workdir / "precision")
    if isinstance(profile, SparsityProfile):
        # Weight sparsity's baselines: global magnitude and LAMP rank the evaluator's weight scores.
        baselines = {"uniform": uniform, "global": global_magnitude_plan(profile, budget, evaluator.scores, bounds=bounds),
                     "lamp": lamp_plan(profile, budget, evaluator.scores, bounds=bounds)}
    else:
        baselines = {"uniform": uniform, "global": global_plan(profile, budget, evaluator.scores, bounds=bounds,
                                                               round_to=space.groups.round_to, latency=latency)}
    evaluator.dense_score  # noqa: B018 - scores the task once now: a broken score function fails before any write
    return _Prepared(task, profile, evaluator, baselines, latency)


def _latency_predictor(settings: SearchSettings, task: Task, profile: ModelProfile,
                       bounds: Mapping[str, tuple[float, float]]) -> LatencyPredictor:
    """The per-layer latency table of the task's model (cached under the workdir), with its
    prediction error measured on a few plans spread over the reachable MACs range."""
    predictor = build_predictor(task.model, task.example_input, profile, latency_settings(settings.space),
                                cache_dir=settings.workdir / "latency")
    if predictor.check is None:
        rng = np.random.default_rng(0)
        round_to = settings.space.groups.round_to
        lowest = reachable_range(profile, bounds=bounds, round_to=round_to)[0]
        plans = [project(profile, {n: float(rng.uniform(lo, hi)) for n, (lo, hi) in bounds.items()},
                         Budget(flops=f), bounds=bounds, round_to=round_to).kept
                 for f in (0.8, 0.65, 0.5, 0.35, 0.25) if f >= lowest]
        predictor = with_check(predictor, task.model, task.example_input, plans)
        save_predictor(predictor, settings.workdir / "latency", profile)
    return predictor


def _open_study(settings: SearchSettings) -> tuple[optuna.Study, bool]:
    space = settings.space
    strategy = space.strategy
    sampler = None
    if strategy.name in ("optuna", "random"):
        sampler = make_sampler(strategy.sampler if strategy.name == "optuna" else "random", seed=strategy.seed,
                               pareto=strategy.objective == "pareto")
    fidelity = space.evaluation.fidelity
    stopper = None if fidelity is None else make_stopper(fidelity.pruner, rungs=len(fidelity.rungs),
                                                         reduction_factor=fidelity.reduction_factor)
    storage = open_storage(settings.storage_url, heartbeat=True, retry_failed=strategy.name != "rl")
    directions = ["maximize", "minimize"] if strategy.objective == "pareto" else ["maximize"]
    return create_or_resume_study(
        storage, settings.study_name, directions=directions, sampler=sampler, pruner=stopper,
        # A task object and a loadable task of the same name are different searches.
        space_fingerprint=space.fingerprint() + f"/{strategy.name}" + ("/in-memory" if settings.task_object else ""),
        settings=settings.to_dict(redacted=True),
    )


def _tracker(settings: SearchSettings) -> Tracker:
    return Tracker(settings.tracking_uri, settings.space.display_name, artifact_root=settings.workdir / "mlartifacts")


def _open_parent_run(settings: SearchSettings, study: optuna.Study, tracker: Tracker, prepared: _Prepared) -> str:
    """The search's MLflow parent run (reopened when resuming), and the study's record of it;
    trials of this machine's dead workers are failed (and retried) first."""
    parent_run_id = tracker.start_search(
        settings.study_name, settings.tracking_params(prepared.profile),
        resume_run_id=read_record(study).mlflow_run_id,
        search_key=f"{redact(settings.storage_url)}#{settings.study_name}",
    )
    update_record(study, mlflow_run_id=parent_run_id, tracking_uri=redact(settings.tracking_uri),
                  experiment=settings.space.display_name,
                  latency_verified_trial=None)  # re-verified when this run finishes
    reaped = reap_dead_local_trials(study, retry=settings.space.strategy.name != "rl")
    tracker.fail_running_trials(parent_run_id, {t.number for t in reaped})
    tracker.log_metrics(parent_run_id, {"dense_val_score": prepared.evaluator.dense_score})
    return parent_run_id
