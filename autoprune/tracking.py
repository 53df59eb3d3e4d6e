"""MLflow tracking: one experiment per search space, a parent run per search, a child run per trial.

The only module that imports MLflow. Runs are explicit (``MlflowClient``, never the fluent API's
global active run), so several worker processes can log children of one parent run, and a
trial that crashes ends its run FAILED rather than leaving it RUNNING.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

from ._workdir import exclusive_lock, sqlite_path
from .errors import ConfigError, StorageError, redact, short

_F = TypeVar("_F", bound=Callable[..., Any])

__all__ = ["Tracker", "default_tracking_uri", "check_server", "check_tracking_uri", "TRACKING_PARAM_LIMIT"]

TRACKING_PARAM_LIMIT = 100  # more groups than this are logged in plan.json only, not as params
_MLFLOW_BATCH = 100  # MLflow's limit of params per log_batch call

#: How a run ends: FINISHED, FAILED, or KILLED (stopped by the user, or a trial stopped early).
RunStatus = Literal["FINISHED", "FAILED", "KILLED"]


def _quiet_mlflow() -> None:
    """Silence what MLflow prints per run; done when a tracker is made, not on import."""
    # Each ended run would otherwise print two "View run at" lines (and fetch the run again) on a
    # tracking server; one search ends hundreds of runs.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    for noisy in ("alembic", "mlflow.store.db.utils", "mlflow.tracking", "mlflow.store"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@contextlib.contextmanager
def _mlflow_errors(tracking_uri: str, doing: str) -> Iterator[None]:
    """Turn what MLflow raises into :class:`StorageError`, the one boundary where its errors
    (server unreachable, database locked or corrupt, a run deleted under us) become autoprune's."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except (MlflowException, OSError) as exc:
        raise StorageError(
            f"MLflow tracking store {redact(tracking_uri)} failed while {doing}: {type(exc).__name__}: {short(exc)}. "
            "Check that the store is reachable and writable (sqlite:///path/mlflow.db or a running `mlflow server`)."
        ) from None


def _translated(doing: str) -> Callable[[_F], _F]:
    """Decorate a :class:`Tracker` method so MLflow errors leave it as :class:`StorageError`."""
    def wrap(method: _F) -> _F:
        @functools.wraps(method)
        def call(self: Tracker, *args: Any, **kwargs: Any) -> Any:
            with _mlflow_errors(self.tracking_uri, doing):
                return method(self, *args, **kwargs)
        return call  # type: ignore[return-value]
    return wrap


def default_tracking_uri(workdir: Path) -> str:
    """SQLite backend under the workdir; MLflow's file store is deprecated and not used."""
    return f"sqlite:///{workdir / 'mlflow.db'}"


def _now_ms() -> int:
    return int(time.time() * 1000)



#: The experiment tag MLflow 3's UI reads to choose between its GenAI and model-training views.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"

class Tracker:
    """Logs a search and its trials to an MLflow tracking store.

    Args:
        tracking_uri: ``sqlite:///...`` or ``http(s)://`` tracking server.
        experiment: experiment name (the search space or task name).
        artifact_root: where a new experiment's artifacts go for a local backend; ignored by servers.
    """

    def __init__(self, tracking_uri: str, experiment: str, *, artifact_root: Path | None = None) -> None:
        from mlflow import MlflowClient

        _quiet_mlflow()
        if tracking_uri.startswith(("http://", "https://")):
            check_server(tracking_uri)
        self.tracking_uri = tracking_uri
        database = sqlite_path(tracking_uri)
        lock = exclusive_lock(database.with_name(database.name + ".lock")) if database else contextlib.nullcontext()
        with lock:
            self.experiment_id = self._open_experiment(MlflowClient, experiment, artifact_root)
        self.experiment = experiment

    def _open_experiment(self, client_class: Any, experiment: str, artifact_root: Path | None) -> str:
        tracking_uri = self.tracking_uri
        try:
            self.client = client_class(tracking_uri=tracking_uri)
            found = self.client.get_experiment_by_name(experiment)
            if found is None:
                location = artifact_root.resolve().as_uri() if artifact_root and not tracking_uri.startswith("http") else None
                try:
                    # MLflow 3 opens an untagged experiment in its GenAI view, whose first screen
                    # says nothing was logged; this tag makes it open as model training (its runs).
                    return self.client.create_experiment(experiment, artifact_location=location,
                                                         tags={EXPERIMENT_KIND_TAG: "custom_model_development"})
                except Exception:
                    # another worker created it a moment ago
                    found = self.client.get_experiment_by_name(experiment)
                    if found is None:
                        raise
            return found.experiment_id
        except Exception as exc:
            raise StorageError(
                f"Cannot reach the MLflow tracking store {redact(tracking_uri)!r}: {type(exc).__name__}: "
                f"{short(exc)}. Use sqlite:///path/mlflow.db or the http:// address "
                "of a running `mlflow server`."
            ) from None

    # -- runs ------------------------------------------------------------------------------

    @_translated("opening the search's parent run")
    def start_search(
        self, name: str, settings: Mapping[str, Any], *, resume_run_id: str | None = None, search_key: str | None = None
    ) -> str:
        """The parent run of a search: reopened when resuming, shared by workers of one study.

        Workers on several machines may start the same search at once; each looks for the parent
        run tagged with ``search_key`` (storage and study), and if two create one concurrently,
        the earlier survives and the later is deleted.
        """
        from mlflow.entities import Param

        if resume_run_id and self._reopen(resume_run_id):
            return resume_run_id
        if search_key:
            existing = self._parents(search_key)
            if existing and self._reopen(existing[0]):
                return existing[0]
        tags = {"autoprune.kind": "search", **({"autoprune.search_key": search_key} if search_key else {})}
        run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
        run_id = run.info.run_id
        if search_key:
            existing = self._parents(search_key)
            if existing and existing[0] != run_id:
                self.client.delete_run(run_id)
                return existing[0]
        params = [Param(k, _param_value(v)) for k, v in _flatten(settings).items()]
        for i in range(0, len(params), _MLFLOW_BATCH):
            self.client.log_batch(run_id, params=params[i : i + _MLFLOW_BATCH])
        return run_id

    def _parents(self, search_key: str) -> list[str]:
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`autoprune.search_key` = {_quoted(search_key)} and tags.`autoprune.kind` = 'search'",
            order_by=["attributes.start_time ASC"], max_results=10,
        )
        return [r.info.run_id for r in sorted(runs, key=lambda r: (r.info.start_time, r.info.run_id))]

    def _reopen(self, run_id: str) -> bool:
        try:
            run = self.client.get_run(run_id)
        except Exception:
            return False  # the tracking store was reset: start a new parent run
        if run.info.lifecycle_stage != "active":
            return False
        if run.info.status != "RUNNING":
            self.client.update_run(run_id, status="RUNNING")
        return True

    @_translated("ending the search's parent run")
    def end_search(self, run_id: str, *, status: RunStatus = "FINISHED") -> None:
        """End the parent run: FINISHED, FAILED, or KILLED (stopped by the user)."""
        self.client.set_terminated(run_id, status=status)

    @_translated("starting a trial's run")
    def start_trial(self, parent_run_id: str, number: int, tags: Mapping[str, str] | None = None) -> str:
        run = self.client.create_run(
            self.experiment_id, run_name=f"trial-{number:04d}",
            tags={"mlflow.parentRunId": parent_run_id, "autoprune.kind": "trial", "autoprune.trial": str(number),
                  **(tags or {})},
        )
        return run.info.run_id

    @_translated("logging a finished trial")
    def finish_trial(
        self,
        run_id: str,
        *,
        ratios: Mapping[str, float],
        metrics: Mapping[str, float | None],
        plan_json: str,
        raw_ratios: Mapping[str, float] | None = None,
    ) -> None:
        """Log a finished trial's ratios (params), metrics and plan, and end its run FINISHED."""
        self._log_trial(run_id, ratios=ratios, metrics=metrics, plan_json=plan_json, raw_ratios=raw_ratios)
        self.client.set_terminated(run_id, status="FINISHED")

    @_translated("logging a stopped trial")
    def stop_trial(
        self,
        run_id: str,
        *,
        ratios: Mapping[str, float],
        metrics: Mapping[str, float | None],
        plan_json: str,
        raw_ratios: Mapping[str, float] | None = None,
    ) -> None:
        """Log a trial the study's stopper ended early (Optuna: PRUNED): its run ends KILLED,
        tagged ``autoprune.state=stopped``, with the metrics it had when it stopped."""
        self._log_trial(run_id, ratios=ratios, metrics=metrics, plan_json=plan_json, raw_ratios=raw_ratios)
        self.client.set_tag(run_id, "autoprune.state", "stopped")
        self.client.set_terminated(run_id, status="KILLED")

    def _log_trial(self, run_id: str, *, ratios: Mapping[str, float], metrics: Mapping[str, float | None],
                   plan_json: str, raw_ratios: Mapping[str, float] | None) -> None:
        from mlflow.entities import Metric, Param

        now = _now_ms()
        params = [Param(f"ratio.{k}", f"{v:.6g}") for k, v in list(ratios.items())[:TRACKING_PARAM_LIMIT]]
        if raw_ratios is not None:
            params += [Param(f"raw.{k}", f"{v:.6g}") for k, v in list(raw_ratios.items())[:TRACKING_PARAM_LIMIT]]
        values = [Metric(k, float(v), now, 0) for k, v in metrics.items() if v is not None and math.isfinite(v)]
        for i in range(0, len(params), _MLFLOW_BATCH):
            self.client.log_batch(run_id, params=params[i : i + _MLFLOW_BATCH], metrics=values if i == 0 else ())
        if not params:
            self.client.log_batch(run_id, metrics=values)
        self.client.log_text(run_id, plan_json, "plan.json")

    @_translated("marking a trial's run failed")
    def fail_trial(self, run_id: str, error: str) -> None:
        self.client.set_tag(run_id, "autoprune.error", error[:5000])
        self.client.set_terminated(run_id, status="FAILED")

    @_translated("failing the runs of dead workers' trials")
    def fail_running_trials(self, parent_run_id: str, trial_numbers: set[int]) -> int:
        """End as FAILED the RUNNING child runs of the given trials (their workers died)."""
        if not trial_numbers:
            return 0
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}' and attributes.status = 'RUNNING'",
            max_results=1000,
        )
        failed = 0
        for run in runs:
            if int(run.data.tags.get("autoprune.trial", -1)) in trial_numbers:
                self.fail_trial(run.info.run_id, "the worker running this trial died (killed or crashed)")
                failed += 1
        return failed

    # -- parent run ------------------------------------------------------------------------

    @_translated("logging metrics")
    def log_metrics(self, run_id: str, metrics: Mapping[str, float | None], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = _now_ms()
        values = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None and math.isfinite(v)]
        if values:
            self.client.log_batch(run_id, metrics=values)

    @_translated("logging a text artifact")
    def log_text(self, run_id: str, text: str, name: str) -> None:
        self.client.log_text(run_id, text, name)

    @_translated("logging a figure")
    def log_figure(self, run_id: str, figure: Any, name: str) -> None:
        self.client.log_figure(run_id, figure, name)

    @_translated("logging a file")
    def log_file(self, run_id: str, path: Path, artifact_dir: str | None = None) -> None:
        self.client.log_artifact(run_id, str(path), artifact_dir)

    @_translated("listing a run's artifacts")
    def artifact_folders(self, run_id: str, path: str) -> list[str]:
        """The folders directly under ``path`` in a run's artifacts (none when it has no ``path``)."""
        return [a.path for a in self.client.list_artifacts(run_id, path) if a.is_dir]

    @_translated("tagging a run")
    def set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_tag(run_id, k, v)

    @_translated("listing a search's trial runs")
    def child_runs(self, parent_run_id: str) -> list[Any]:
        return list(
            self.client.search_runs([self.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
                                    max_results=5000)
        )


_TRACKING_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks")


def check_tracking_uri(uri: str) -> str:
    """``uri`` if MLflow can track into it: a database backend or a tracking server.

    A plain path (MLflow's file store) is refused: it is deprecated, and one search writes
    hundreds of runs that it handles slowly.
    """
    scheme = uri.split(":", 1)[0].split("+", 1)[0].lower() if ":" in uri else ""
    if scheme not in _TRACKING_SCHEMES or (scheme != "databricks" and "://" not in uri):
        raise ConfigError(
            f"--tracking-uri {redact(uri)!r} is not an MLflow tracking URI autoprune accepts; use "
            "sqlite:///path/to/mlflow.db (the default is one under the workdir) or the http(s):// address of "
            "a running `mlflow server`; schemes allowed: " + ", ".join(_TRACKING_SCHEMES) + ". MLflow's file "
            "store (a plain path or file:) is deprecated and not used."
        )
    return uri


def check_server(tracking_uri: str, timeout: float = 5.0) -> None:
    """Fail fast, with a clear message, when an MLflow tracking server does not answer.

    MLflow's client retries with backoff for minutes before giving up on a dead server.
    """
    import urllib.error
    import urllib.request

    url = tracking_uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            if response.status == 200:
                return
            problem = f"HTTP {response.status}"
    except urllib.error.HTTPError as exc:
        problem = f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        problem = str(getattr(exc, "reason", exc))
    raise StorageError(
        f"The MLflow tracking server {redact(tracking_uri)} does not answer ({redact(problem)} from {redact(url)}). Start it "
        "(mlflow server --host 127.0.0.1 --port 5000 --backend-store-uri sqlite:///mlflow.db) or fix "
        "--tracking-uri; without a server, leave --tracking-uri out to log to the workdir's SQLite file."
    )


def _quoted(value: str) -> str:
    """``value`` as a string literal of MLflow's search filter syntax, which has no escapes: single
    quotes, or double quotes around a value that holds a single quote."""
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise StorageError(f"The value {value!r} holds both quote characters and cannot be searched for in MLflow.")


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, prefix=f"{name}."))
        else:
            flat[name] = value
    return flat


def _param_value(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 500 else text[:497] + "..."


def list_experiments(tracking_uri: str) -> list[tuple[str, str]]:
    """(name, id) of every active experiment in a tracking store, newest first; [] when the store
    cannot be read (the UI that lists them still starts)."""
    from mlflow.tracking import MlflowClient

    try:
        experiments = MlflowClient(tracking_uri=tracking_uri).search_experiments(order_by=["creation_time DESC"])
    except Exception:
        return []
    return [(e.name, e.experiment_id) for e in experiments if e.name != "Default"]

