"""Several worker processes on one machine sharing one search, and stopping them.

With ``--workers N`` the process that runs :func:`autoprune.search` only coordinates: each worker
is a spawned process (evaluation is CPU-bound; threads would share one interpreter lock) that
opens the same study and runs the strategy's loop. The first Ctrl-C asks every process to stop
after its current trial; a worker ends itself when its coordinator dies.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import optuna
import torch

from .errors import AutopruneError
from .settings import SearchSettings
from .study import completed_trials

__all__ = ["Stop", "start_workers", "wait_for_workers", "forward_interrupt", "stop_workers"]


class Stop:
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


def _worker_main(settings_data: dict[str, Any], parent_run_id: str, coordinator: int) -> None:
    """Entry point of an extra worker process (spawned): same search, shared study."""
    from .search import run_worker

    _exit_with_parent(coordinator)
    settings = SearchSettings.from_dict(settings_data)
    torch.set_num_threads(settings.threads_per_worker)
    stop = Stop()
    with stop.installed():
        run_worker(settings, parent_run_id, stop)


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


def start_workers(settings: SearchSettings, parent_run_id: str) -> list[multiprocessing.process.BaseProcess]:
    """Spawn ``settings.workers`` worker processes (none for a single worker: it runs in-process)."""
    if settings.workers <= 1:
        return []
    ctx = multiprocessing.get_context("spawn")
    processes = []
    for _ in range(settings.workers):
        proc = ctx.Process(target=_worker_main, args=(settings.to_dict(), parent_run_id, os.getpid()), daemon=False)
        proc.start()
        processes.append(proc)
    return processes


def wait_for_workers(processes: list, study: optuna.Study, target: int, advance: Callable[[int, str], None]) -> None:
    """Show the study's progress until every worker has exited; a worker that failed fails the search."""
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


def forward_interrupt(processes: list) -> None:
    for p in processes:
        if p.is_alive() and p.pid:
            try:
                os.kill(p.pid, signal.SIGINT)
            except ProcessLookupError:
                pass


def stop_workers(processes: list) -> None:
    for p in processes:
        p.join(timeout=60)
        if p.is_alive():
            p.terminate()
            p.join(timeout=10)
