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
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from ._workdir import exclusive_lock, pid_alive, sqlite_path
from .errors import ConfigError, StorageError, StudyError, redact, short

__all__ = [
    "redact",
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
    "best_trial",
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

optuna.logging.set_verbosity(optuna.logging.WARNING)
# Heartbeats and the retry callback are marked experimental, and Optuna warns that heartbeats are
# meant for Study.optimize; autoprune drives ask/tell and refreshes heartbeats itself (search.py).
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")


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


_STORAGE_SCHEMES = ("sqlite", "postgresql", "mysql", "mariadb", "mssql", "oracle")


def check_storage_url(url: str) -> str:
    """``url`` if it names a database Optuna can store studies in (an SQLAlchemy URL)."""
    scheme = url.split("://", 1)[0].split("+", 1)[0].lower() if "://" in url else ""
    if scheme not in _STORAGE_SCHEMES:
        raise ConfigError(
            f"--storage {redact(url)!r} is not a database URL; use sqlite:///path/to/optuna.db (a file) or "
            "postgresql+psycopg://user:password@host/db (several machines); schemes allowed: "
            + ", ".join(_STORAGE_SCHEMES) + "."
        )
    return url


def default_storage_url(workdir: Path) -> str:
    return f"sqlite:///{workdir / 'optuna.db'}"


def _host() -> str:
    # Containers on several machines can share a hostname; AUTOPRUNE_WORKER_HOST tells them apart.
    return os.environ.get("AUTOPRUNE_WORKER_HOST") or socket.gethostname()


def worker_id() -> str:
    """``host:pid`` of this process, recorded on each trial so a dead local worker is recognized."""
    return f"{_host()}:{os.getpid()}"


def _heartbeat_setting(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    if not value:
        return default
    if not value.isdigit() or int(value) < 1:
        raise ConfigError(f"{name}={value!r} must be a positive number of seconds.")
    return int(value)


def _grace_seconds() -> int:
    """Silence after which another worker takes a running trial's worker for dead."""
    return _heartbeat_setting("AUTOPRUNE_HEARTBEAT_GRACE", 60)


def open_storage(url: str, *, heartbeat: bool = False, retry_failed: bool = True) -> optuna.storages.BaseStorage:
    """An Optuna RDB storage for ``url``, with a clear error when it cannot be reached.

    With ``heartbeat`` each running trial is refreshed every 10 s (``AUTOPRUNE_HEARTBEAT_INTERVAL``),
    and a trial whose worker has been silent for 60 s (``AUTOPRUNE_HEARTBEAT_GRACE``) is failed by
    the next worker that looks; with ``retry_failed`` its candidate is enqueued again.
    """
    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite:"):
        # Several worker processes share one file; wait for the write lock instead of failing.
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60}}
    if heartbeat:
        kwargs.update(heartbeat_interval=_heartbeat_setting("AUTOPRUNE_HEARTBEAT_INTERVAL", 10),
                      grace_period=_grace_seconds())
        if retry_failed:
            kwargs["heartbeat_stale_trial_callback"] = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3)
    database = sqlite_path(url)
    attempts = 5
    for attempt in range(attempts):
        try:
            if database is None:
                return optuna.storages.RDBStorage(url, **kwargs)
            with exclusive_lock(database.with_name(database.name + ".lock")):
                return optuna.storages.RDBStorage(url, **kwargs)
        except Exception as exc:
            # Workers starting together race to create the schema; the loser sees a duplicate
            # table or key, and the schema exists a moment later.
            racing = "IntegrityError" in type(exc).__name__ or "already exists" in str(exc)
            if racing and attempt < attempts - 1:
                time.sleep(0.5 * (attempt + 1))
                continue
            raise StorageError(
                f"Cannot open the Optuna storage {redact(url)!r}: {type(exc).__name__}: "
                f"{short(exc)}. Check the URL (sqlite:///path/to/file.db or "
                "postgresql://user:pass@host/db), that the server is up and reachable, and that the database exists."
            ) from None
    raise AssertionError("unreachable")


def create_or_resume_study(
    storage: optuna.storages.BaseStorage,
    name: str,
    *,
    directions: list[str],
    sampler: optuna.samplers.BaseSampler | None,
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
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler)
        previous = study.user_attrs.get("space_fingerprint")
        if previous is not None and previous != space_fingerprint:
            differences = _space_differences(study.user_attrs.get("settings", {}), settings)
            raise StudyError(
                f"Study {name!r} exists and was made for another search space ("
                + ("; ".join(differences) or "its search space fingerprint differs")
                + "). A resumed study must keep its space and strategy; pick a new --study name to search this one."
            )
        if [d.name.lower() for d in study.directions] != directions:
            raise StudyError(f"Study {name!r} has objective directions {study.directions}; this search needs {directions}.")
        return study, True
    try:
        study = optuna.create_study(storage=storage, study_name=name, sampler=sampler, directions=directions)
    except optuna.exceptions.DuplicatedStudyError:
        # Another worker created it between our look and our create: resume theirs.
        return optuna.load_study(study_name=name, storage=storage, sampler=sampler), True
    study.set_user_attr("space_fingerprint", space_fingerprint)
    study.set_user_attr("settings", json.loads(json.dumps(settings, default=str)))
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


def heartbeat_interval(study: optuna.Study) -> float | None:
    """Seconds between heartbeats, or None when the storage has them off (Optuna wraps RDB
    storages in a cache that forwards the heartbeat methods, not the attributes)."""
    get = getattr(study._storage, "get_heartbeat_interval", None)
    interval = get() if callable(get) else None
    return float(interval) if interval else None


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
    grace = _grace_seconds()
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
    """Hands out trials so that exactly ``n_trials`` finish, however many workers share the study."""

    _COUNTED = (TrialState.COMPLETE, TrialState.RUNNING)

    def __init__(self, study: optuna.Study, n_trials: int) -> None:
        self.study = study
        self.n_trials = n_trials

    def finished(self) -> int:
        return len(self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))

    def remaining(self) -> int:
        return max(0, self.n_trials - len(self.study.get_trials(deepcopy=False, states=self._COUNTED)))

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
            t for t in self.study.get_trials(deepcopy=False, states=self._COUNTED) if t.number < trial.number
        ]
        if len(before) >= self.n_trials:
            self.give_back(trial, "the study already had its trials when this worker asked")
            return None
        return trial

    def give_back(self, trial: optuna.Trial, reason: str) -> None:
        """End ``trial`` unevaluated (failed, marked skipped, never counted or retried)."""
        trial.set_user_attr(ATTR_SKIPPED, reason)
        self.study.tell(trial, state=TrialState.FAIL)


def completed_trials(study: optuna.Study) -> list[FrozenTrial]:
    """Finished trials that carry an evaluated plan, in trial-number order."""
    return [
        t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if ATTR_RESULT in t.user_attrs and ATTR_PLAN in t.user_attrs
    ]


def best_trial(study: optuna.Study, *, max_macs_ratio: float | None = None) -> FrozenTrial | None:
    """The finished trial with the highest val_score (fewer MACs break ties).

    After a latency search verified its best plan by measurement, that trial. With ``max_macs_ratio`` only trials at or below that MACs ratio count: how a Pareto search
    picks the best plan for any budget.
    """
    candidates = completed_trials(study)
    verified = study.user_attrs.get(ATTR_LATENCY_VERIFIED)
    if max_macs_ratio is None and verified is not None:
        # A latency search's best is the best trial whose *measured* latency meets the budget.
        return next((t for t in candidates if t.number == verified), None)
    if max_macs_ratio is not None:
        candidates = [t for t in candidates if t.user_attrs[ATTR_RESULT]["macs_ratio"] <= max_macs_ratio + 1e-12]
    if not candidates:
        return None
    return max(candidates, key=lambda t: (t.user_attrs[ATTR_RESULT]["val_score"], -t.user_attrs[ATTR_RESULT]["macs"]))
