"""The search runner: the one place that wires space, task, budget, evaluator, study, tracker
and strategy together.

``search()`` validates everything before any work (bad space, unknown task, infeasible budget),
opens or resumes the study, opens or resumes the MLflow parent run, then lets the strategy propose
trials in one process or several worker processes sharing the study. Every trial is projected
onto the budget, evaluated, stored in the study and logged as an MLflow child run.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch
from optuna.trial import TrialState
from rich.console import Console

from . import plots
from ._progress import progress_bar
from ._workdir import resolve_workdir
from .budget import Budget, global_plan, project, reachable_range, uniform_plan
from .errors import AutopruneError, ConfigError, StorageError, short
from .evaluate import Evaluator, TrialResult
from .plan import Plan
from .profile import ModelProfile, profile_model
from .latency import LatencyPredictor, LatencySettings, build_predictor, measure_many, save_predictor, with_check
from .space import LatencySpec, SearchSpace, load_space
from .strategies import PARETO_TARGET, BaseStrategy, SearchContext, TrialOutcome, make_sampler, make_strategy
from .study import (
    ATTR_BASELINE,
    ATTR_LATENCY_VERIFIED,
    ATTR_MEASURED_LATENCY,
    ATTR_MLFLOW_RUN,
    ATTR_PLAN,
    ATTR_RAW,
    ATTR_RESULT,
    ATTR_SKIPPED,
    TrialSlots,
    best_trial,
    check_storage_url,
    check_study_name,
    completed_trials,
    create_or_resume_study,
    default_storage_url,
    fail_stale_trials,
    heartbeat_interval,
    open_storage,
    reap_dead_local_trials,
    redact,
    study_name_from,
)
from .task import Task, load_task
from .tracking import Tracker, check_server, check_tracking_uri, default_tracking_uri

__all__ = ["search", "SearchResult", "SearchSettings", "resolve_settings"]

_MAX_CONSECUTIVE_FAILURES = 3
_WAIT_FOR_OTHERS_SECONDS = 2.0
_console = Console(stderr=True)


@dataclass(frozen=True)
class SearchSettings:
    """Everything a search (and each of its worker processes) needs, after CLI overrides."""

    space: SearchSpace
    study_name: str
    storage_url: str
    tracking_uri: str
    workdir: Path
    data_root: str | None
    workers: int
    threads_per_worker: int

    @property
    def strategy_label(self) -> str:
        s = self.space.strategy
        return f"optuna/{s.sampler}" if s.name == "optuna" else (f"rl/{s.rl.agent}" if s.name == "rl" else s.name)

    def to_dict(self, *, redacted: bool = False) -> dict[str, Any]:
        """The settings as JSON-able data; ``redacted`` masks the URLs' passwords, for anything
        stored or shown (worker processes get the full settings in memory)."""
        hide = redact if redacted else str
        return {
            "space": self.space.model_dump(mode="json"), "study_name": self.study_name,
            "storage_url": hide(self.storage_url), "tracking_uri": hide(self.tracking_uri), "workdir": str(self.workdir),
            "data_root": self.data_root, "workers": self.workers, "threads_per_worker": self.threads_per_worker,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SearchSettings:
        return cls(**{**data, "space": SearchSpace.model_validate(data["space"]), "workdir": Path(data["workdir"])})


@dataclass(frozen=True)
class SearchResult:
    """The outcome of a search.

    ``best_plan``/``best_result`` are the finished trial with the highest validation score (all
    trials meet the budget); ``pareto`` holds the non-dominated (MACs, score) trials, the whole
    answer of a Pareto search; ``baselines`` maps ``uniform``/``global`` to their val scores.
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


def resolve_settings(
    space: str | os.PathLike[str] | SearchSpace = "default",
    *,
    strategy: str | None = None,
    sampler: str | None = None,
    agent: str | None = None,
    n_trials: int | None = None,
    seed: int | None = None,
    budget: str | Budget | None = None,
    objective: str | None = None,
    study: str | None = None,
    storage: str | None = None,
    tracking_uri: str | None = None,
    workers: int = 1,
    workdir: str | os.PathLike[str] | None = None,
    data_root: str | os.PathLike[str] | None = None,
    threads: int | None = None,
) -> SearchSettings:
    """Load the space file and apply overrides; everything is checked here, before any work."""
    loaded = space if isinstance(space, SearchSpace) else load_space(space)
    budget_dict = None
    if budget is not None:
        budget_dict = (budget if isinstance(budget, Budget) else Budget.parse(str(budget))).to_dict()
    loaded = loaded.with_overrides(**{
        "strategy.name": strategy, "strategy.sampler": sampler, "strategy.rl.agent": agent,
        "strategy.trials": n_trials, "strategy.seed": seed, "strategy.objective": objective, "budget": budget_dict,
    })
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise ConfigError(f"--workers must be a positive integer, got {workers!r}.")
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
        raise ConfigError(f"--threads must be a positive integer (torch threads per worker), got {threads!r}.")
    if study is not None:
        check_study_name(study)
    if storage is not None:
        check_storage_url(storage)
    if tracking_uri is not None:
        check_tracking_uri(tracking_uri)
    if loaded.strategy.name in ("rl", "uniform", "global") and workers > 1:
        raise ConfigError(f"Strategy {loaded.strategy.name!r} runs in one worker; use --workers 1.")
    if loaded.strategy.objective == "pareto" and loaded.strategy.name not in ("optuna", "random"):
        raise ConfigError("objective 'pareto' needs strategy optuna or random (a sampler proposes the budget too).")
    if loaded.strategy.name == "optuna" and loaded.strategy.objective == "pareto":
        make_sampler(loaded.strategy.sampler, seed=0, pareto=True)  # refuses single-objective samplers now
    home = resolve_workdir(workdir)
    label = loaded.strategy.name if loaded.strategy.name != "optuna" else f"optuna-{loaded.strategy.sampler}"
    budget_tag = "-".join(f"{k}{v:g}" for k, v in loaded.budget.items())
    name = study or study_name_from(
        f"{loaded.display_name}-{label}-{budget_tag}" + ("-pareto" if loaded.strategy.objective == "pareto" else ""))
    cores = os.cpu_count() or 1
    per_worker = threads or max(1, cores // workers)
    return SearchSettings(
        space=loaded, study_name=name, storage_url=storage or default_storage_url(home),
        tracking_uri=tracking_uri or default_tracking_uri(home), workdir=home,
        data_root=str(data_root) if data_root is not None else None, workers=workers,
        threads_per_worker=per_worker,
    )


class _Stop:
    """Set by the first Ctrl-C: the search finishes its current trial and stops."""

    def __init__(self) -> None:
        self.event = threading.Event()

    @contextmanager
    def installed(self, on_first: Callable[[], None] | None = None) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum: int, frame: object) -> None:
            if self.event.is_set():
                signal.signal(signal.SIGINT, signal.default_int_handler)
                raise KeyboardInterrupt
            self.event.set()
            if on_first:
                on_first()

        previous = signal.signal(signal.SIGINT, handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)


class _Heartbeat:
    """Refreshes a running trial's heartbeat so other workers do not take it for dead."""

    def __init__(self, study: optuna.Study, trial_id: int) -> None:
        self.storage = study._storage
        self.trial_id = trial_id
        self.interval = heartbeat_interval(study)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> _Heartbeat:
        if self.interval:
            self.storage.record_heartbeat(self.trial_id)
            self._thread = threading.Thread(target=self._beat, daemon=True)
            self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.storage.record_heartbeat(self.trial_id)
            except Exception:
                pass

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1.0)


class _Session(SearchContext):
    """The running search as strategies see it, in one process."""

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
        seed: int,
        stop: _Stop,
        on_trial: Callable[[TrialOutcome | None], None] | None = None,
    ) -> None:
        space = settings.space
        self.settings = settings
        self.profile = profile
        self.budget = space.budget_obj
        self.bounds = space.groups.bounds(profile)
        self.round_to = space.groups.round_to
        self.seed = seed
        self.baselines = baselines
        self.evaluator = evaluator
        self.latency = evaluator.latency
        self.tracker = tracker
        self.parent_run_id = parent_run_id
        self._study = study
        self._slots = TrialSlots(study, space.strategy.trials if _counts_trials(space) else 1)
        self._stop = stop
        self._on_trial = on_trial
        self._pareto = space.strategy.objective == "pareto"
        self.dimensions = {n: b for n, b in self.bounds.items() if b[1] > b[0]}
        if self._pareto:
            fraction = self.budget.fraction(profile, self.latency)
            low, _ = reachable_range(profile, self.budget.metric, bounds=self.bounds, round_to=self.round_to,
                                     latency=self.latency)
            self.dimensions[PARETO_TARGET] = (min(fraction, low * 1.001), fraction)
        self._consecutive_failures = 0

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
            if trial is not None and _is_repeated_baseline(self._study, trial):
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
            self._stop.event.wait(_WAIT_FOR_OTHERS_SECONDS)
        return None

    def enqueue_initial_trials(self, strategy: BaseStrategy, *, new_study: bool) -> None:
        """The strategy's baseline candidates, once: in the process that created the study, and
        after that only those a resumed study with a larger trial count never had."""
        planned = strategy.initial_trials(self.baselines, self.dimensions)
        if not planned:
            return
        have = {t.user_attrs.get(ATTR_BASELINE) for t in self._study.get_trials(deepcopy=False)}
        room = self._slots.n_trials - len(self._study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
        if not new_study:
            planned = [(label, params) for label, params in planned if label not in have]
        for label, params in planned[:max(0, room)]:
            self._study.enqueue_trial(params, user_attrs={ATTR_BASELINE: label})

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self.tracker.log_metrics(self.parent_run_id, metrics, step=step)

    @property
    def state_dir(self) -> Path:
        # Study names are checked (check_study_name): no separators or '..', so this stays inside.
        path = self.settings.workdir / "strategy-state" / check_study_name(self.settings.study_name)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def project(self, raw: Mapping[str, float], budget: Budget | None = None) -> Plan:
        return project(self.profile, raw, budget or self.budget, bounds=self.bounds, round_to=self.round_to,
                       latency=self.latency)

    def _plan_for(self, trial: optuna.Trial, raw: Mapping[str, float] | None, plan: Plan | None) -> Plan:
        baseline = trial.user_attrs.get(ATTR_BASELINE)
        if baseline in self.baselines:
            return self.baselines[baseline]
        if plan is not None:
            return plan
        if raw is None:
            raise ValueError("run_trial needs raw ratios or a plan")
        ratios = {k: v for k, v in raw.items() if k != PARETO_TARGET}
        budget = self.budget
        if PARETO_TARGET in raw:
            budget = Budget(**{"latency" if budget.is_latency else budget.metric: raw[PARETO_TARGET]})
        return self.project(ratios, budget)

    def run_trial(
        self, trial: optuna.Trial, *, raw: Mapping[str, float] | None = None, plan: Plan | None = None
    ) -> TrialOutcome | None:
        run_id = self.tracker.start_trial(self.parent_run_id, trial.number, {"autoprune.strategy": self.settings.strategy_label})
        trial.set_user_attr(ATTR_MLFLOW_RUN, run_id)
        try:
            with _Heartbeat(self._study, trial._trial_id):
                chosen = self._plan_for(trial, raw, plan)
                chosen = chosen.with_provenance(
                    strategy=trial.user_attrs.get(ATTR_BASELINE) or self.settings.strategy_label,
                    study=self.settings.study_name, trial=trial.number, mlflow_run_id=run_id, seed=self.seed,
                    versions=_versions(), **({"raw_ratios": dict(raw)} if raw is not None else {}),
                )
                result = self.evaluator.evaluate(chosen)
                chosen = chosen.with_metrics(val_score=result.val_score)
                trial.set_user_attr(ATTR_PLAN, chosen.to_dict())
                trial.set_user_attr(ATTR_RESULT, result.to_dict())
                if raw is not None:
                    trial.set_user_attr(ATTR_RAW, dict(raw))
                metrics = {**result.to_dict(), "flops": result.macs, "flops_ratio": result.macs_ratio}
                self.tracker.finish_trial(
                    run_id, ratios=chosen.ratios, metrics=metrics, plan_json=chosen.to_json(),
                    raw_ratios={k: v for k, v in raw.items() if k != PARETO_TARGET} if raw is not None else None,
                )
                values: float | list[float] = (
                    [result.val_score, result.macs_ratio] if self._pareto else result.val_score
                )
                self._study.tell(trial, values)
        except BaseException as exc:
            self._fail(trial, run_id, exc)
            if isinstance(exc, (AutopruneError, KeyboardInterrupt, SystemExit)):
                raise
            self._consecutive_failures += 1
            if self._consecutive_failures >= _MAX_CONSECUTIVE_FAILURES:
                raise
            if self._on_trial:
                self._on_trial(None)
            return None
        self._consecutive_failures = 0
        outcome = TrialOutcome(trial.number, chosen, result, dict(raw) if raw is not None else None)
        self._log_best_so_far(trial.number)
        if self._on_trial:
            self._on_trial(outcome)
        return outcome

    def _fail(self, trial: optuna.Trial, run_id: str, exc: BaseException) -> None:
        message = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        try:
            self.tracker.fail_trial(run_id, message)
        finally:
            try:
                self._study.tell(trial, state=TrialState.FAIL)
            except Exception:
                pass

    def _log_best_so_far(self, step: int) -> None:
        best = best_trial(self._study)
        if best is not None:
            res = best.user_attrs[ATTR_RESULT]
            self.tracker.log_metrics(self.parent_run_id, {"best_val_score": res["val_score"],
                                                          "best_macs_ratio": res["macs_ratio"]}, step=step)


def _is_repeated_baseline(study: optuna.Study, trial: optuna.Trial) -> bool:
    label = trial.user_attrs.get(ATTR_BASELINE)
    if label is None:
        return False
    return any(t.user_attrs.get(ATTR_BASELINE) == label and t.number < trial.number
               for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING)))


def _counts_trials(space: SearchSpace) -> bool:
    return space.strategy.name not in ("uniform", "global")


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    out = {"torch": torch.__version__}
    for name in ("autoprune", "torch-pruning", "optuna"):
        try:
            out[name] = version(name)
        except Exception:
            pass
    return out


@dataclass
class _Prepared:
    task: Task
    profile: ModelProfile
    evaluator: Evaluator
    baselines: dict[str, Plan]
    latency: LatencyPredictor | None = None


def _prepare(settings: SearchSettings) -> _Prepared:
    """Load the task, profile it and check the budget: everything that can refuse bad input."""
    space = settings.space
    task = load_task(space.task, data_root=settings.data_root, workdir=settings.workdir, seed=space.strategy.seed)
    profile = profile_model(task)
    bounds = space.groups.bounds(profile, source=f"search space {space.display_name!r}")
    budget = space.budget_obj
    latency = _latency_predictor(settings, task, profile, bounds) if space.measures_latency else None
    # uniform_plan refuses an infeasible budget, before any search work.
    uniform = uniform_plan(profile, budget, bounds=bounds, round_to=space.groups.round_to, latency=latency)
    ev = space.evaluation
    evaluator = Evaluator(
        task, calibration_batches=ev.calibration_batches, val_samples=ev.val_samples,
        finetune_steps=ev.finetune_steps, importance=ev.importance, seed=space.strategy.seed, profile=profile,
        latency=latency,
    )
    glob = global_plan(profile, budget, evaluator.scores, bounds=bounds, round_to=space.groups.round_to,
                       latency=latency)
    evaluator.dense_score  # noqa: B018 - scores the task once now: a broken score function fails before any write
    return _Prepared(task, profile, evaluator, {"uniform": uniform, "global": glob}, latency)


def latency_settings(space: SearchSpace) -> LatencySettings:
    spec = space.latency or LatencySpec()
    return LatencySettings(batch_size=spec.batch_size, threads=spec.threads, repeats=spec.repeats, device=spec.device)


def _latency_predictor(settings: SearchSettings, task: Task, profile: ModelProfile,
                       bounds: Mapping[str, tuple[float, float]]) -> LatencyPredictor:
    """The per-layer latency table of the task's model (cached under the workdir), with its
    prediction error measured on a few plans spread over the reachable MACs range."""
    predictor = build_predictor(task.model, task.example_input, profile, latency_settings(settings.space),
                                cache_dir=settings.workdir / "latency")
    if predictor.check is None:
        rng = np.random.default_rng(0)
        plans = [project(profile, {n: float(rng.uniform(lo, hi)) for n, (lo, hi) in bounds.items()},
                         Budget(flops=f), bounds=bounds, round_to=settings.space.groups.round_to).kept
                 for f in (0.8, 0.65, 0.5, 0.35, 0.25)
                 if f >= reachable_range(profile, bounds=bounds, round_to=settings.space.groups.round_to)[0]]
        predictor = with_check(predictor, task.model, task.example_input, plans)
        save_predictor(predictor, settings.workdir / "latency", profile)
    return predictor


def _open_study(settings: SearchSettings, seed: int) -> tuple[optuna.Study, bool]:
    space = settings.space
    strategy = space.strategy
    sampler = None
    if strategy.name in ("optuna", "random"):
        sampler = make_sampler(strategy.sampler if strategy.name == "optuna" else "random", seed=seed,
                               pareto=strategy.objective == "pareto")
    storage = open_storage(settings.storage_url, heartbeat=True, retry_failed=strategy.name != "rl")
    directions = ["maximize", "minimize"] if strategy.objective == "pareto" else ["maximize"]
    return create_or_resume_study(
        storage, settings.study_name, directions=directions, sampler=sampler,
        space_fingerprint=space.fingerprint() + f"/{strategy.name}", settings=settings.to_dict(redacted=True),
    )


def _tracker(settings: SearchSettings) -> Tracker:
    return Tracker(settings.tracking_uri, settings.space.display_name, artifact_root=settings.workdir / "mlartifacts")


def _worker_main(settings_data: dict[str, Any], parent_run_id: str, coordinator: int) -> None:
    """Entry point of an extra worker process (spawned): same search, shared study."""
    _exit_with_parent(coordinator)
    settings = SearchSettings.from_dict(settings_data)
    torch.set_num_threads(settings.threads_per_worker)
    stop = _Stop()
    with stop.installed():
        prepared = _prepare(settings)
        # Optuna samplers draw each trial's stream from (seed, trial number), so workers share
        # the seed; the RL agent, which keeps its own stream, does not run in workers.
        seed = settings.space.strategy.seed
        study, _ = _open_study(settings, seed)
        session = _Session(settings, profile=prepared.profile, evaluator=prepared.evaluator, study=study,
                           tracker=_tracker(settings), parent_run_id=parent_run_id, baselines=prepared.baselines,
                           seed=seed, stop=stop)
        _strategy_for(settings).search(session)


def _exit_with_parent(parent: int, poll_seconds: float = 1.0) -> None:
    """End this worker process when its coordinator ``parent`` dies, even by SIGKILL (which cannot
    forward a stop): the orphan would go on evaluating trials nobody waits for. Its running trial
    is then reaped and retried by the next search on this machine, as after any kill. The pid comes
    from the coordinator: one that died while this process was still importing has already
    handed it to another parent."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_seconds)
        os._exit(70)

    threading.Thread(target=watch, name="autoprune-parent-watch", daemon=True).start()


def _strategy_for(settings: SearchSettings):  # noqa: ANN202 - BaseStrategy
    s = settings.space.strategy
    return make_strategy(s.name, sampler=s.sampler, rl_settings=s.rl)


def search(
    space: str | os.PathLike[str] | SearchSpace = "default",
    *,
    show_progress: bool = True,
    on_trial: Callable[[TrialOutcome | None], None] | None = None,
    **overrides: Any,
) -> SearchResult:
    """Run (or resume) a budget-constrained search; see :func:`resolve_settings` for overrides.

    Example::

        result = ap.search("search_spaces/default.yaml", strategy="optuna", n_trials=50)
        result.best_plan.save("best.json")
    """
    settings = resolve_settings(space, **overrides)
    space_ = settings.space
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads_per_worker)
    try:
        _check_remote_stores(settings)
        prepared = _prepare(settings)
        seed = space_.strategy.seed
        study, resumed = _open_study(settings, seed)
        tracker = _tracker(settings)
        parent_run_id = tracker.start_search(
            settings.study_name,
            {"task": space_.task, "budget": space_.budget, "strategy": settings.strategy_label,
             "objective": space_.strategy.objective, "trials": space_.strategy.trials, "seed": seed,
             "workers": settings.workers, "study": settings.study_name, "storage": redact(settings.storage_url),
             "groups": space_.groups.model_dump(mode="json"), "evaluation": space_.evaluation.model_dump(mode="json"),
             "dense_macs": prepared.profile.macs, "dense_params": prepared.profile.params},
            resume_run_id=study.user_attrs.get(ATTR_MLFLOW_RUN),
            search_key=f"{redact(settings.storage_url)}#{settings.study_name}",
        )
        study.set_user_attr(ATTR_MLFLOW_RUN, parent_run_id)
        study.set_user_attr(ATTR_LATENCY_VERIFIED, None)  # re-verified when this run finishes
        study.set_user_attr("tracking_uri", redact(settings.tracking_uri))
        study.set_user_attr("experiment", space_.display_name)
        reaped = reap_dead_local_trials(study, retry=space_.strategy.name != "rl")
        tracker.fail_running_trials(parent_run_id, {t.number for t in reaped})
        dense_score = prepared.evaluator.dense_score
        tracker.log_metrics(parent_run_id, {"dense_val_score": dense_score})

        stop = _Stop()
        target = space_.strategy.trials if _counts_trials(space_) else 1
        failed = False
        with progress_bar(f"search {settings.study_name}", total=target, enabled=show_progress) as advance:
            done = len(completed_trials(study))
            advance(min(done, target), "resumed" if resumed and done else "")

            def report(outcome: TrialOutcome | None) -> None:
                best = best_trial(study)
                status = ""
                if best is not None:
                    res = best.user_attrs[ATTR_RESULT]
                    status = f"best {res['val_score']:.4f} at MACs {res['macs_ratio']:.3f}"
                advance(1 if outcome is not None else 0, status)
                if on_trial:
                    on_trial(outcome)

            session = _Session(settings, profile=prepared.profile, evaluator=prepared.evaluator, study=study,
                               tracker=tracker, parent_run_id=parent_run_id, baselines=prepared.baselines,
                               seed=seed, stop=stop, on_trial=report)
            strategy = _strategy_for(settings)
            session.enqueue_initial_trials(strategy, new_study=not resumed)
            processes = _start_workers(settings, parent_run_id)
            try:
                with stop.installed(on_first=lambda: _forward_interrupt(processes)):
                    if processes:
                        _wait_for_workers(processes, study, target, advance)
                    else:
                        strategy.search(session)
            except BaseException:
                failed = True
                raise
            finally:
                _stop_workers(processes)
                _finish(settings, study, tracker, parent_run_id, prepared, failed=failed,
                        stopped=stop.event.is_set())
        return _result(settings, study, parent_run_id, dense_score, stop.event.is_set())
    finally:
        torch.set_num_threads(previous_threads)


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


def _start_workers(settings: SearchSettings, parent_run_id: str) -> list[multiprocessing.process.BaseProcess]:
    """With several workers, this process only coordinates: each worker is a spawned process
    (evaluation is CPU-bound; threads would share one interpreter lock) with its own seed."""
    if settings.workers <= 1:
        return []
    ctx = multiprocessing.get_context("spawn")
    processes = []
    for _ in range(settings.workers):
        proc = ctx.Process(target=_worker_main, args=(settings.to_dict(), parent_run_id, os.getpid()),
                           daemon=False)
        proc.start()
        processes.append(proc)
    return processes


def _wait_for_workers(processes: list, study: optuna.Study, target: int, advance: Callable[[int, str], None]) -> None:
    shown = len(completed_trials(study))
    while any(p.is_alive() for p in processes):
        time.sleep(1.0)
        done = len(completed_trials(study))
        if done > shown:
            advance(min(done, target) - min(shown, target), "")
            shown = done
    bad = [p.exitcode for p in processes if p.exitcode not in (0, None)]
    if bad:
        raise AutopruneError(f"{len(bad)} worker process(es) failed (exit codes {bad}); see their output above.")


def _forward_interrupt(processes: list) -> None:
    for p in processes:
        if p.is_alive() and p.pid:
            try:
                os.kill(p.pid, signal.SIGINT)
            except ProcessLookupError:
                pass


def _stop_workers(processes: list) -> None:
    for p in processes:
        p.join(timeout=60)
        if p.is_alive():
            p.terminate()
            p.join(timeout=10)


def _trial_points(study: optuna.Study) -> list[tuple[float, float, int]]:
    return [(t.user_attrs[ATTR_RESULT]["macs_ratio"], t.user_attrs[ATTR_RESULT]["val_score"], t.number)
            for t in completed_trials(study)]


def _baseline_scores(study: optuna.Study, prepared: _Prepared) -> dict[str, tuple[float, float]]:
    """(macs_ratio, val_score) of the uniform and global plans: from the study when it has them."""
    found: dict[str, tuple[float, float]] = {}
    for t in completed_trials(study):
        label = t.user_attrs.get(ATTR_BASELINE)
        if label in prepared.baselines and label not in found:
            res = t.user_attrs[ATTR_RESULT]
            found[label] = (res["macs_ratio"], res["val_score"])
    for label, plan in prepared.baselines.items():
        if label not in found:
            res = prepared.evaluator.evaluate(plan)
            found[label] = (res.macs_ratio, res.val_score)
    return found


def _finish(settings: SearchSettings, study: optuna.Study, tracker: Tracker, parent_run_id: str,
            prepared: _Prepared, *, failed: bool, stopped: bool = False) -> None:
    """Best plan, baselines and plots onto the parent run; it ends FINISHED, FAILED, or KILLED
    when the user stopped the search (resuming sets it RUNNING again)."""
    try:
        dead = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))}
        tracker.fail_running_trials(parent_run_id, dead)  # trials failed by heartbeat or reaping
        points = _trial_points(study)
        baselines = _baseline_scores(study, prepared) if not failed else {}
        tracker.log_metrics(parent_run_id, {f"{k}_val_score": v[1] for k, v in baselines.items()})
        if not failed and prepared.latency is not None:
            _verify_latency(settings, study, tracker, parent_run_id, prepared)
        best = best_trial(study)
        title = f"{settings.space.display_name} ({settings.strategy_label}, budget {settings.space.budget_obj})"
        if best is not None:
            plan = Plan.from_dict(best.user_attrs[ATTR_PLAN])
            tracker.log_text(parent_run_id, plan.to_json(), "best_plan.json")
            res = best.user_attrs[ATTR_RESULT]
            tracker.log_metrics(parent_run_id, {"final_best_val_score": res["val_score"],
                                                "final_best_macs_ratio": res["macs_ratio"],
                                                "finished_trials": len(points)})
            fig = plots.plan_ratios(plan.ratios, title=f"best plan: trial {best.number}, val {res['val_score']:.4f}")
            tracker.log_figure(parent_run_id, fig, "plots/best_plan_ratios.png")
            plots.close(fig)
        budget = settings.space.budget_obj
        if points:
            fig = plots.score_vs_macs([(m, s) for m, s, _ in points], baselines=baselines,
                                      budget_fraction=budget.value if budget.metric == "flops" and budget.is_fraction
                                      else None, title=title)
            tracker.log_figure(parent_run_id, fig, "plots/score_vs_macs.png")
            plots.close(fig)
            fig = plots.history([n for *_, n in points], [s for _, s, _ in points], title=title)
            tracker.log_figure(parent_run_id, fig, "plots/history.png")
            plots.close(fig)
    finally:
        tracker.end_search(parent_run_id, status="FAILED" if failed else ("KILLED" if stopped else "FINISHED"))


def _verify_latency(settings: SearchSettings, study: optuna.Study, tracker: Tracker, parent_run_id: str,
                    prepared: _Prepared) -> None:
    """Measure the best plans' real latency; the best plan must meet a latency budget as measured.

    Measured latencies are relative to the dense model timed alongside, expressed in the dense
    latency the predictor was calibrated on. Trials are ranked by validation score; the first whose measured latency is within the budget
    (plus the stated tolerance for timing noise) becomes the search's best. Where prediction and
    measurement disagree by more than the tolerance the search says so.
    """
    predictor = prepared.latency
    assert predictor is not None
    budget = settings.space.budget_obj
    tolerance = (settings.space.latency or LatencySpec()).tolerance
    limit = budget.limit(prepared.profile, predictor) if budget.is_latency else None
    measured: dict[str, float] = dict(study.user_attrs.get(ATTR_MEASURED_LATENCY, {}))
    ranked = sorted(completed_trials(study), key=lambda t: (-t.user_attrs[ATTR_RESULT]["val_score"],
                                                             t.user_attrs[ATTR_RESULT]["macs"]))
    chosen = None
    for trial in ranked[:10]:
        key = str(trial.number)
        if key not in measured:
            model = prepared.evaluator.build(Plan.from_dict(trial.user_attrs[ATTR_PLAN]))
            # Timed round-robin with the dense model and rescaled to the dense latency the table
            # was calibrated on, so the machine's momentary speed does not decide the verdict.
            dense_now, pruned = measure_many([prepared.task.model, model], prepared.task.example_input,
                                             predictor.settings)
            measured[key] = pruned.median_ms * predictor.dense_ms / dense_now.median_ms
        predicted = trial.user_attrs[ATTR_RESULT]["latency_ms"]
        error = abs(predicted - measured[key]) / measured[key]
        if error > tolerance:
            _console.print(f"[yellow]latency of trial {trial.number}: predicted {predicted:.3f} ms, measured "
                           f"{measured[key]:.3f} ms ({error:.0%} apart, tolerance {tolerance:.0%})[/yellow]")
        if limit is None or measured[key] <= limit * (1 + tolerance):
            chosen = trial
            break
    study.set_user_attr(ATTR_MEASURED_LATENCY, measured)
    if chosen is None:
        _console.print(f"[red]none of the {min(len(ranked), 10)} best trials measures within the latency budget "
                       f"{budget} ({limit:.3f} ms + {tolerance:.0%}); the predictor underestimates this device[/red]")
        return
    study.set_user_attr(ATTR_LATENCY_VERIFIED, chosen.number)
    predicted = chosen.user_attrs[ATTR_RESULT]["latency_ms"]
    tracker.log_metrics(parent_run_id, {
        "best_latency_ms_measured": measured[str(chosen.number)], "best_latency_ms_predicted": predicted,
        "dense_latency_ms": predictor.dense_ms, "latency_limit_ms": limit,
        "latency_predictor_median_error": predictor.check.median_abs_error if predictor.check else None,
    })


def _result(settings: SearchSettings, study: optuna.Study, parent_run_id: str, dense_score: float,
            stopped: bool) -> SearchResult:
    best = best_trial(study)
    best_plan = Plan.from_dict(best.user_attrs[ATTR_PLAN]) if best else None
    best_result = TrialResult(**best.user_attrs[ATTR_RESULT]) if best else None
    trials = completed_trials(study)
    points = [(t.user_attrs[ATTR_RESULT]["macs_ratio"], t.user_attrs[ATTR_RESULT]["val_score"]) for t in trials]
    front = [trials[i] for i in plots.pareto_indices(points)]
    failures = [t for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)) if ATTR_SKIPPED not in t.user_attrs]
    baselines = {}
    for t in trials:
        label = t.user_attrs.get("baseline")
        if label:
            baselines[label] = t.user_attrs[ATTR_RESULT]["val_score"]
    return SearchResult(
        study_name=settings.study_name, storage_url=settings.storage_url, tracking_uri=settings.tracking_uri,
        experiment=settings.space.display_name, mlflow_run_id=parent_run_id, best_plan=best_plan,
        best_result=best_result, n_finished=len(trials),
        pareto=tuple((Plan.from_dict(t.user_attrs[ATTR_PLAN]), TrialResult(**t.user_attrs[ATTR_RESULT])) for t in front),
        baselines=baselines, dense_score=dense_score, workdir=settings.workdir, stopped_early=stopped,
        failed_trials=len(failures), settings=settings.to_dict(redacted=True),
        measured_latency_ms={int(k): v for k, v in study.user_attrs.get(ATTR_MEASURED_LATENCY, {}).items()},
    )
