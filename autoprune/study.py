"""The Optuna study that stores every trial of a search, whatever strategy proposes them.

One study per search, in the workdir's SQLite file by default or any Optuna storage URL
(PostgreSQL for many machines). The study is the source of truth for resuming: finished trials
are kept, trials of dead workers are failed and their candidates retried, and a worker asks for a
new trial only while fewer than the requested number are finished or running.
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from ._storage import (
    Heartbeat,
    check_storage_url,
    default_storage_url,
    grace_seconds,
    heartbeat_interval,
    open_storage,
)
from ._workdir import pid_alive
from .errors import ConfigError, StorageError, StudyError, redact, short
from .evaluate import TrialResult
from .plan import Plan

__all__ = [
    "redact",
    "check_storage_url",
    "heartbeat_interval",
    "check_study_name",
    "study_name_from",
    "default_storage_url",
    "open_storage",
    "create_or_resume_study",
    "load_study",
    "TrialSlots",
    "worker_id",
    "reap_dead_local_trials",
    "completed_trials",
    "failed_trials",
    "best_trial",
    "StoredTrial",
    "stored_trials",
    "SearchRecord",
    "read_record",
    "update_record",
    "record_mlflow_run",
    "record_evaluation",
    "baseline_of",
    "enqueue_baselines",
    "is_repeated_baseline",
    "mark_baseline",
    "Heartbeat",
    "ATTR_PLAN",
    "ATTR_RESULT",
    "ATTR_RAW",
    "ATTR_BASELINE",
    "ATTR_WORKER",
    "ATTR_MLFLOW_RUN",
    "ATTR_MEASURED_LATENCY",
    "ATTR_LATENCY_VERIFIED",
    "ATTR_SKIPPED",
]

ATTR_PLAN = "plan"
ATTR_RESULT = "result"
ATTR_RAW = "raw_ratios"
ATTR_BASELINE = "baseline"
ATTR_WORKER = "worker"
ATTR_MLFLOW_RUN = "mlflow_run_id"
ATTR_RETRY_OF = "retry_of"
ATTR_SKIPPED = "skipped"  # a trial given back unevaluated (a surplus or repeated trial)
ATTR_MEASURED_LATENCY = "measured_latency_ms"  # study attr: trial number -> measured ms
ATTR_LATENCY_VERIFIED = "latency_verified_trial"  # study attr: best trial that measures within a latency budget
ATTR_LATENCY_CHECK = "latency_check"  # study attr: the after-search timing of the best trials (LatencyCheck)
ATTR_BASELINE_SCORES = "baseline_scores"  # study attr: label -> TrialResult of the uniform/global plans
ATTR_SETTINGS = "settings"
ATTR_FINGERPRINT = "space_fingerprint"

_STUDY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:+=@-]{0,199}")
STUDY_NAME_RULE = ("1 to 200 characters: letters, digits and . _ : + = @ -, starting with a letter or digit, "
                   "without '..'")


def check_study_name(name: str, *, flag: str = "--study") -> str:
    """``name`` if it is a valid study name; studies name directories under the workdir, so a name
    never holds a path separator, a quote or ``..``."""
    if not isinstance(name, str) or not _STUDY_NAME.fullmatch(name) or ".." in name:
        raise ConfigError(f"{flag} {name!r} is not a valid study name; a study name is {STUDY_NAME_RULE}.")
    return name


def study_name_from(text: str) -> str:
    """A valid study name made from ``text`` (a task or space name), for studies not named by the user."""
    name = re.sub(r"[^A-Za-z0-9._:+=@-]+", "-", text).strip("-.") or "study"
    return re.sub(r"\.{2,}", ".", name)[:200]


def _host() -> str:
    # Containers on several machines can share a hostname; AUTOPRUNE_WORKER_HOST tells them apart.
    return os.environ.get("AUTOPRUNE_WORKER_HOST") or socket.gethostname()


def worker_id() -> str:
    """``host:pid`` of this process, recorded on each trial so a dead local worker is recognized."""
    return f"{_host()}:{os.getpid()}"


def create_or_resume_study(
    storage: optuna.storages.BaseStorage,
    name: str,
    *,
    directions: list[str],
    sampler: optuna.samplers.BaseSampler | None,
    pruner: optuna.pruners.BasePruner | None = None,
    space_fingerprint: str,
    settings: Mapping[str, Any],
) -> tuple[optuna.Study, bool]:
    """Create the study, or resume it when it exists and was made for the same search space.

    Returns (study, resumed). A study of the same name made for another space is refused.
    """
    try:
        existing = {s.study_name: s for s in optuna.get_all_study_summaries(storage, include_best_trial=False)}
    except Exception as exc:
        raise StorageError(f"Cannot read studies from the storage: {short(exc)}") from None
    if name in existing:
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)
        previous = read_record(study).space_fingerprint
        if previous is not None and previous != space_fingerprint:
            differences = _space_differences(read_record(study).settings or {}, settings)
            raise StudyError(
                f"Study {name!r} exists and was made for another search space ("
                + ("; ".join(differences) or "its search space fingerprint differs")
                + "). A resumed study must keep its space and strategy; pick a new --study name to search this one."
            )
        if [d.name.lower() for d in study.directions] != directions:
            raise StudyError(f"Study {name!r} has objective directions {study.directions}; this search needs {directions}.")
        return study, True
    try:
        study = optuna.create_study(storage=storage, study_name=name, sampler=sampler, pruner=pruner,
                                    directions=directions)
    except optuna.exceptions.DuplicatedStudyError:
        # Another worker created it between our look and our create: resume theirs.
        return optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner), True
    update_record(study, space_fingerprint=space_fingerprint, settings=json.loads(json.dumps(settings, default=str)))
    return study, False


def _space_differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """What defines a study's search and differs between its stored settings and ``new``, in words."""
    def pick(settings: Mapping[str, Any]) -> dict[str, Any]:
        space = settings.get("space") or {}
        strategy = space.get("strategy") or {}
        return {"task": space.get("task"), "budget": space.get("budget"), "groups": space.get("groups"),
                "evaluation": space.get("evaluation"), "latency": space.get("latency"),
                "strategy": strategy.get("name"), "objective": strategy.get("objective")}

    before, now = pick(old), pick(json.loads(json.dumps(new, default=str)))
    return [f"{key}: {before[key]!r} in the study, {now[key]!r} now" for key in before if before[key] != now[key]]


def load_study(name: str, storage_url: str) -> optuna.Study:
    """Load an existing study for reading, naming the studies that exist when it does not."""
    check_study_name(name)
    storage = open_storage(storage_url)
    try:
        names = [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)]
    except Exception as exc:
        raise StorageError(f"Cannot read studies from {redact(storage_url)!r}: {short(exc)}") from None
    if name not in names:
        raise StudyError(
            f"No study named {name!r} in {redact(storage_url)}; studies there: {', '.join(names) or 'none'}. "
            "Pass the --study and --storage the search used."
        )
    return optuna.load_study(study_name=name, storage=storage)


def fail_stale_trials(study: optuna.Study) -> None:
    """Fail trials of dead workers elsewhere: Optuna's heartbeat check, plus the trials it misses.

    Optuna only judges trials that have a heartbeat; a worker killed between creating its trial
    and its first heartbeat leaves a trial RUNNING forever, and holding a slot. :meth:`TrialSlots.ask`
    records the first heartbeat, then names the worker; a RUNNING trial with no worker, older
    than the grace period (``AUTOPRUNE_HEARTBEAT_GRACE``, by the trial's start time, so clocks
    of the machines must agree to well within it) never had a heartbeat and is failed too, with
    the storage's retry callback like any stale trial.
    """
    if not heartbeat_interval(study):
        return
    optuna.storages.fail_stale_trials(study)
    storage = study._storage
    grace = grace_seconds()
    now = datetime.datetime.now()
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if ATTR_WORKER in trial.user_attrs or trial.datetime_start is None:
            continue
        if (now - trial.datetime_start).total_seconds() <= grace:
            continue
        try:
            if storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL):
                failed.append(trial._trial_id)
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # another worker failed it first
    callback = storage.get_heartbeat_stale_trial_callback()
    if callback is not None:
        for trial_id in failed:
            callback(study, copy.deepcopy(storage.get_trial(trial_id)))


def reap_dead_local_trials(study: optuna.Study, *, retry: bool = True) -> list[FrozenTrial]:
    """Fail RUNNING trials whose worker process on this host is gone; re-enqueue their candidates.

    A search killed with SIGKILL leaves its trial RUNNING; the next search on the same machine
    finds it here instead of waiting for a heartbeat to expire. Strategies that replay their own
    state (the RL agent) pass ``retry=False``.
    """
    host = _host()
    reaped = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = str(trial.user_attrs.get(ATTR_WORKER, ""))
        worker_host, _, pid = worker.rpartition(":")
        if worker_host != host or not pid.isdigit() or pid_alive(int(pid)):
            continue
        try:
            study._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
        except Exception:
            continue  # another process reaped it first
        if retry:
            retry_attrs = {k: v for k, v in trial.user_attrs.items() if k == ATTR_BASELINE}
            study.enqueue_trial(trial.params, user_attrs={**retry_attrs, ATTR_RETRY_OF: trial.number})
        reaped.append(trial)
    return reaped


class TrialSlots:
    """Hands out trials so that exactly ``n_trials`` finish, however many workers share the study.

    A trial stopped early by the study's stopper (PRUNED) counts as finished, as in Optuna's
    ``n_trials``: ``--trials`` is the number of candidates a search looks at.
    """

    COUNTED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)

    def __init__(self, study: optuna.Study, n_trials: int) -> None:
        self.study = study
        self.n_trials = n_trials

    def finished(self) -> int:
        return len(self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))

    def remaining(self) -> int:
        return max(0, self.n_trials - len(self.study.get_trials(deepcopy=False, states=self.COUNTED)))

    def ask(self, fixed_params: Mapping[str, Any] | None = None,
            distributions: Mapping[str, optuna.distributions.BaseDistribution] | None = None) -> optuna.Trial | None:
        """A new trial, or None when the study already has ``n_trials`` finished or running ones.

        Workers can race between counting and asking; the trial is then checked against the
        trials numbered before it, and given back (failed, never evaluated) if it is one too many.
        """
        if self.remaining() <= 0:
            return None
        if fixed_params is not None:
            self.study.enqueue_trial(dict(fixed_params))
        trial = self.study.ask(dict(distributions) if distributions else None)
        if heartbeat_interval(self.study):  # before anything else: see fail_stale_trials
            self.study._storage.record_heartbeat(trial._trial_id)
        trial.set_user_attr(ATTR_WORKER, worker_id())
        before = [
            t for t in self.study.get_trials(deepcopy=False, states=self.COUNTED) if t.number < trial.number
        ]
        if len(before) >= self.n_trials:
            self.give_back(trial, "the study already had its trials when this worker asked")
            return None
        return trial

    def give_back(self, trial: optuna.Trial, reason: str) -> None:
        """End ``trial`` unevaluated (failed, marked skipped, never counted or retried)."""
        trial.set_user_attr(ATTR_SKIPPED, reason)
        self.study.tell(trial, state=TrialState.FAIL)


# -- the stored-trial codec: the only place that reads or writes trial and study attributes --------


@dataclass(frozen=True)
class StoredTrial:
    """One trial of a search as the study stores it, decoded.

    Attributes:
        number: the trial's number in the study.
        state: Optuna's state: COMPLETE (evaluated), PRUNED (stopped early by the study's stopper),
            FAIL, RUNNING or WAITING.
        plan: the plan evaluated (None before its evaluation was recorded).
        result: what the evaluation measured (for a stopped trial: at the step it stopped).
        raw: the strategy's raw ratios before projection, when it proposed ratios.
        baseline: ``uniform`` or ``global`` for the baseline trials, else None.
        intermediate: fine-tuning step -> validation score reported on the way (multi-fidelity).
        params: the trial's Optuna parameters.
        skipped: given back unevaluated (a surplus or repeated trial), never counted.
    """

    number: int
    state: TrialState
    plan: Plan | None
    result: TrialResult | None
    raw: Mapping[str, float] | None
    baseline: str | None
    intermediate: Mapping[int, float]
    params: Mapping[str, Any]
    skipped: bool = False

    @classmethod
    def decode(cls, trial: FrozenTrial) -> StoredTrial:
        attrs = trial.user_attrs
        plan = attrs.get(ATTR_PLAN)
        result = attrs.get(ATTR_RESULT)
        return cls(
            number=trial.number, state=trial.state,
            plan=Plan.from_dict(plan, source=f"trial {trial.number}") if plan is not None else None,
            result=TrialResult.from_dict(result) if result is not None else None,
            raw=attrs.get(ATTR_RAW), baseline=attrs.get(ATTR_BASELINE),
            intermediate=dict(trial.intermediate_values), params=dict(trial.params),
            skipped=ATTR_SKIPPED in attrs,
        )


def stored_trials(study: optuna.Study, states: tuple[TrialState, ...] = (TrialState.COMPLETE,)) -> list[StoredTrial]:
    """The study's trials in ``states`` that carry an evaluated plan, decoded, in number order."""
    return [StoredTrial.decode(t) for t in study.get_trials(deepcopy=False, states=states)
            if ATTR_RESULT in t.user_attrs and ATTR_PLAN in t.user_attrs]


def completed_trials(study: optuna.Study) -> list[FrozenTrial]:
    """Finished trials that carry an evaluated plan, in trial-number order (Optuna's objects)."""
    return [
        t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if ATTR_RESULT in t.user_attrs and ATTR_PLAN in t.user_attrs
    ]


def failed_trials(study: optuna.Study) -> list[FrozenTrial]:
    """Trials whose evaluation failed (not those given back unevaluated)."""
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)) if ATTR_SKIPPED not in t.user_attrs]


def best_trial(study: optuna.Study, *, max_macs_ratio: float | None = None) -> StoredTrial | None:
    """The finished trial with the highest val_score (fewer MACs break ties).

    After a latency search verified its best plan by measurement, that trial. With
    ``max_macs_ratio`` only trials at or below that MACs ratio count: how a Pareto search picks the
    best plan for any budget.
    """
    candidates = stored_trials(study)
    verified = read_record(study).latency_verified_trial
    if max_macs_ratio is None and verified is not None:
        # A latency search's best is the best trial whose *measured* latency meets the budget.
        return next((t for t in candidates if t.number == verified), None)
    if max_macs_ratio is not None:
        candidates = [t for t in candidates if t.result.macs_ratio <= max_macs_ratio + 1e-12]
    if not candidates:
        return None
    return max(candidates, key=lambda t: (t.result.val_score, -t.result.macs))


def record_mlflow_run(trial: optuna.Trial, run_id: str) -> None:
    """Name the MLflow child run of ``trial``; a running trial that has one is evaluating."""
    trial.set_user_attr(ATTR_MLFLOW_RUN, run_id)


def record_evaluation(trial: optuna.Trial, plan: Plan, result: TrialResult,
                      raw: Mapping[str, float] | None) -> None:
    """Store what ``trial`` evaluated and measured (before it is told finished or stopped)."""
    trial.set_user_attr(ATTR_PLAN, plan.to_dict())
    trial.set_user_attr(ATTR_RESULT, result.to_dict())
    if raw is not None:
        trial.set_user_attr(ATTR_RAW, dict(raw))


def baseline_of(trial: optuna.Trial | FrozenTrial) -> str | None:
    """``uniform``/``global`` for a baseline trial, else None."""
    return trial.user_attrs.get(ATTR_BASELINE)


def mark_baseline(trial: optuna.Trial, label: str) -> None:
    """Label ``trial`` as the evaluation of baseline ``label`` (a strategy that proposed that plan itself)."""
    trial.set_user_attr(ATTR_BASELINE, label)


def enqueue_baselines(study: optuna.Study, planned: list[tuple[str, dict[str, float]]], *, n_trials: int,
                      new_study: bool) -> None:
    """Enqueue baseline candidates (label, params) that fit in ``n_trials``.

    In the process that created the study all of them; in a resumed study only those it never
    had (a study made with fewer trials than baselines gets the rest when asked for more).
    """
    trials = study.get_trials(deepcopy=False)
    if not new_study:
        have = {baseline_of(t) for t in trials}
        planned = [(label, params) for label, params in planned if label not in have]
    done = len([t for t in trials if t.state in TrialSlots.COUNTED and t.state != TrialState.RUNNING])
    for label, params in planned[: max(0, n_trials - done)]:
        study.enqueue_trial(params, user_attrs={ATTR_BASELINE: label})


def is_repeated_baseline(study: optuna.Study, trial: optuna.Trial) -> bool:
    """Whether ``trial`` is a baseline that an earlier trial already evaluated or is evaluating."""
    label = baseline_of(trial)
    if label is None:
        return False
    return any(baseline_of(t) == label and t.number < trial.number
               for t in study.get_trials(deepcopy=False, states=(*TrialSlots.COUNTED,)))


@dataclass(frozen=True)
class SearchRecord:
    """What a study stores about its search as a whole.

    Attributes:
        settings: the search settings it was created with (passwords masked).
        space_fingerprint: what the search's dimensions and objective were made from.
        tracking_uri: the MLflow tracking URI it logged to (password masked).
        experiment: the MLflow experiment name.
        mlflow_run_id: the search's MLflow parent run.
        measured_latency_ms: trial number -> latency measured after the search, in ms.
        latency_verified_trial: the best trial whose measured latency meets a latency budget.
        latency_check: the after-search timing of the best trials, as ``LatencyCheck.to_dict``.
        baseline_scores: ``uniform``/``global`` -> their ``TrialResult.to_dict`` at the search's
            budget, whether the strategy evaluated them as trials or the search did afterwards (RL).
    """

    settings: Mapping[str, Any] | None = None
    space_fingerprint: str | None = None
    tracking_uri: str | None = None
    experiment: str | None = None
    mlflow_run_id: str | None = None
    measured_latency_ms: Mapping[int, float] = field(default_factory=dict)
    latency_verified_trial: int | None = None
    latency_check: Mapping[str, Any] | None = None
    baseline_scores: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


_RECORD_ATTRS = {
    "settings": ATTR_SETTINGS, "space_fingerprint": ATTR_FINGERPRINT, "tracking_uri": "tracking_uri",
    "experiment": "experiment", "mlflow_run_id": ATTR_MLFLOW_RUN, "measured_latency_ms": ATTR_MEASURED_LATENCY,
    "latency_verified_trial": ATTR_LATENCY_VERIFIED, "latency_check": ATTR_LATENCY_CHECK,
    "baseline_scores": ATTR_BASELINE_SCORES,
}


def read_record(study: optuna.Study) -> SearchRecord:
    attrs = study.user_attrs
    values = {name: attrs.get(key) for name, key in _RECORD_ATTRS.items()}
    values["measured_latency_ms"] = {int(k): float(v) for k, v in (values["measured_latency_ms"] or {}).items()}
    values["baseline_scores"] = values["baseline_scores"] or {}
    return SearchRecord(**values)


def update_record(study: optuna.Study, **fields: Any) -> None:
    """Store the given :class:`SearchRecord` fields (``None`` clears one)."""
    for name, value in fields.items():
        if name not in _RECORD_ATTRS:
            raise TypeError(f"SearchRecord has no field {name!r}")
        if name == "measured_latency_ms":
            value = {str(k): v for k, v in value.items()}
        study.set_user_attr(_RECORD_ATTRS[name], value)
