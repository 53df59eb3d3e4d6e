"""The Optuna storage under every study: opening it, heartbeats of running trials.

Optuna is autoprune's storage backbone (SQLite in the workdir, PostgreSQL for many machines);
this module holds what touches the storage object itself rather than a study's records.
"""

from __future__ import annotations

import os
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import optuna

from ._workdir import exclusive_lock, sqlite_path
from .errors import ConfigError, StorageError, redact, short

__all__ = ["check_storage_url", "default_storage_url", "open_storage", "heartbeat_interval", "grace_seconds",
           "Heartbeat"]

optuna.logging.set_verbosity(optuna.logging.WARNING)
# Heartbeats and the retry callback are marked experimental, and Optuna warns that heartbeats are
# meant for Study.optimize; autoprune drives ask/tell and refreshes heartbeats itself (Heartbeat).
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")


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


def _heartbeat_setting(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    if not value:
        return default
    if not value.isdigit() or int(value) < 1:
        raise ConfigError(f"{name}={value!r} must be a positive number of seconds.")
    return int(value)


def grace_seconds() -> int:
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
                      grace_period=grace_seconds())
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


def heartbeat_interval(study: optuna.Study) -> float | None:
    """Seconds between heartbeats, or None when the storage has them off (Optuna wraps RDB
    storages in a cache that forwards the heartbeat methods, not the attributes)."""
    get = getattr(study._storage, "get_heartbeat_interval", None)
    interval = get() if callable(get) else None
    return float(interval) if interval else None


class Heartbeat:
    """Refreshes a running trial's heartbeat so other workers do not take it for dead."""

    def __init__(self, study: optuna.Study, trial_id: int) -> None:
        self.storage = study._storage
        self.trial_id = trial_id
        self.interval = heartbeat_interval(study)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Heartbeat:
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
