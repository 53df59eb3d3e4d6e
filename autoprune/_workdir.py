"""Where runs write: ``--workdir``, else ``$AUTOPRUNE_HOME``, else ``./autoprune-runs``."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .errors import ConfigError

__all__ = ["resolve_workdir", "DEFAULT_WORKDIR"]

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
