"""Progress display: a live rich bar on a terminal, periodic plain lines otherwise (logs, CI, and
notebooks, where a live display would need ipywidgets)."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

__all__ = ["progress_bar", "note"]

with warnings.catch_warnings():
    # Optuna imports tqdm.auto, which in a Jupyter kernel without ipywidgets warns "IProgress not
    # found" and falls back to text bars. autoprune draws no tqdm bar (its progress is the rich
    # display below, plain lines in a notebook), so the warning would only send users to install
    # ipywidgets for nothing. Imported once here, quietly, tqdm.auto is not imported again.
    warnings.filterwarnings("ignore", message="IProgress not found")
    try:
        import tqdm.auto  # noqa: F401
    except ImportError:  # tqdm comes with Optuna; without it there is nothing to quiet
        pass

_LOG_EVERY_SECONDS = 30.0


def note(message: str, *, enabled: bool = True) -> None:
    """One plain line on stderr, where the progress display goes; nothing unless ``enabled``."""
    if enabled:
        Console(stderr=True).print(message, highlight=False, markup=False, soft_wrap=True)


@contextmanager
def progress_bar(description: str, *, total: int, enabled: bool = True) -> Iterator[Callable[[int, str], None]]:
    """Yield ``advance(n, status)``; draws on stderr when ``enabled``."""
    if not enabled:
        yield lambda n, status="": None
        return
    console = Console(stderr=True)
    if not console.is_terminal:
        state = {"done": 0, "last": time.monotonic(), "start": time.monotonic()}

        def log(n: int, status: str = "") -> None:
            state["done"] += n
            now = time.monotonic()
            if now - state["last"] >= _LOG_EVERY_SECONDS or state["done"] >= total:
                state["last"] = now
                console.print(
                    f"{description}: {int(state['done'])}/{total} ({now - state['start']:.0f} s) {status}",
                    highlight=False,
                )

        yield log
        return
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        task_id = progress.add_task(description, total=total, status="")

        def advance(n: int, status: str = "") -> None:
            progress.update(task_id, advance=n, status=status)

        yield advance
