"""The searches a storage holds, summarized for ``autoprune studies``."""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

import optuna

from ._storage import open_storage
from .study import best_trial, read_record, stored_trials

__all__ = ["StudySummary", "list_studies"]


@dataclass(frozen=True)
class StudySummary:
    """One stored search.

    Attributes:
        name: the study name (``--study`` of search and export).
        task, strategy, budget: as the search was started (None for studies autoprune did not create).
        trials: finished (evaluated) trials; ``planned`` the ``--trials`` it was asked for.
        best_val_score: the best finished trial's validation score before fine-tuning, and its MACs ratio.
        mode: ``channels`` or ``sparsity`` (the space's ``mode``); a sparsity search's best trial is
            also given by its nonzeros ratio (of the prunable weights), the size a sparsity budget counts.
        started, last_finished: when the first trial started and the last one finished (UTC).
    """

    name: str
    task: str | None
    strategy: str | None
    budget: dict[str, Any] | None
    trials: int
    planned: int | None
    best_val_score: float | None
    best_macs_ratio: float | None
    started: datetime.datetime | None
    last_finished: datetime.datetime | None
    mode: str = "channels"
    best_nonzeros_ratio: float | None = None


def list_studies(storage_url: str) -> list[StudySummary]:
    """Every study of ``storage_url``, oldest first."""
    storage = open_storage(storage_url)
    summaries = []
    for summary in optuna.get_all_study_summaries(storage, include_best_trial=False):
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        settings = read_record(study).settings or {}
        space = settings.get("space") or {}
        strategy = space.get("strategy") or {}
        finished = stored_trials(study)
        best = best_trial(study)
        done = [t.datetime_complete for t in study.get_trials(deepcopy=False) if t.datetime_complete]
        label = strategy.get("name")
        if label == "optuna":
            label = f"optuna/{strategy.get('sampler', 'tpe')}"
        elif label == "rl":
            label = f"rl/{(strategy.get('rl') or {}).get('agent', 'ddpg')}"
        summaries.append(StudySummary(
            name=summary.study_name, task=_task_name(space.get("task")), strategy=label, budget=space.get("budget"),
            trials=len(finished), planned=strategy.get("trials"),
            best_val_score=best.result.val_score if best else None,
            best_macs_ratio=best.result.macs_ratio if best else None,
            started=summary.datetime_start, last_finished=max(done) if done else None,
            mode=space.get("mode") or "channels",
            best_nonzeros_ratio=best.result.nonzeros_ratio if best else None,
        ))
    return sorted(summaries, key=lambda s: (s.started is None, s.started or datetime.datetime.min))


def _task_name(task: Any) -> str | None:
    """A task name or import path as stored, or the name of a task declared in the space file."""
    return task.get("name") if isinstance(task, dict) else task
