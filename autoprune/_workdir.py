"""Where runs write: ``--workdir``, else ``$AUTOPRUNE_HOME``, else ``./autoprune-runs``."""

from __future__ import annotations

import fcntl
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import ConfigError

__all__ = ["resolve_workdir", "searched_workdir", "DEFAULT_WORKDIR", "sqlite_path", "exclusive_lock", "pid_alive"]

DEFAULT_WORKDIR = "autoprune-runs"


def resolve_workdir(workdir: str | os.PathLike[str] | None = None, *, create: bool = True) -> Path:
    """Return the absolute workdir, created and checked writable when ``create`` is true."""
    chosen = workdir or os.environ.get("AUTOPRUNE_HOME") or DEFAULT_WORKDIR
    path = Path(chosen).expanduser().resolve()
    if not create:
        return path
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-check-"):
            pass
    except OSError as exc:
        raise ConfigError(
            f"The workdir {path} cannot be written ({exc.strerror or exc}). autoprune keeps its "
            "study storage, MLflow database and checkpoints there; pass a writable directory with "
            "--workdir DIR or set AUTOPRUNE_HOME."
        ) from None
    return path


def searched_workdir(workdir: str | os.PathLike[str] | None, *, command: str) -> Path:
    """The workdir, not created, when it holds searches (an ``optuna.db``); else a message naming the
    workdir read and how to point at another.

    Commands that read searches (``export``, ``studies``) run in the wrong directory would otherwise
    create an empty ``./autoprune-runs`` and report that it has no such study.
    """
    path = resolve_workdir(workdir, create=False)
    if not (path / "optuna.db").is_file():
        raise ConfigError(
            f"No searches in {path}: it has no optuna.db. Run `autoprune {command}` where you ran `autoprune "
            "search`, or point --workdir (or AUTOPRUNE_HOME, or --storage) at the search's runs."
        )
    return path


def sqlite_path(url: str) -> Path | None:
    """The database file of a ``sqlite:///path`` URL (``None`` for other URLs or in-memory ones)."""
    if not url.startswith("sqlite:///"):
        return None
    rest = url[len("sqlite:///"):].split("?", 1)[0]
    return Path(rest) if rest and rest != ":memory:" else None


@contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if needed) across processes of this machine.

    Two searches starting together on a fresh workdir both create the SQLite schemas of MLflow and
    Optuna; their migrations are not safe to run concurrently, so their first opening is serialized.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` of this machine still runs (a zombie counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
