"""A search's settings: the search space file with the command line applied, checked before any work.

:func:`resolve_settings` is the one place where the options of ``autoprune search`` (and
:func:`autoprune.search`) meet the space file; everything after it reads a frozen
:class:`SearchSettings`, which worker processes receive whole.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ._declared import DeclaredTask
from ._workdir import resolve_workdir
from .budget import Budget
from .errors import ConfigError, redact
from .latency import LatencySettings
from .profile import ModelProfile
from .space import LatencySpec, SearchSpace, load_space
from .strategies import make_sampler, strategy_class
from .study import check_storage_url, check_study_name, default_storage_url, study_name_from
from .tracking import check_tracking_uri, default_tracking_uri

if TYPE_CHECKING:
    from .task import Task

__all__ = ["SearchSettings", "resolve_settings", "latency_settings", "strategy_label", "searched_in_memory"]


def strategy_label(space: SearchSpace) -> str:
    """How trials name what proposed them: ``optuna/tpe``, ``rl/ddpg``, ``random``, ``uniform``..."""
    s = space.strategy
    return f"optuna/{s.sampler}" if s.name == "optuna" else (f"rl/{s.rl.agent}" if s.name == "rl" else s.name)


@dataclass(frozen=True)
class SearchSettings:
    """Everything a search (and each of its worker processes) needs, after CLI overrides.

    Attributes:
        space: the validated search space, flags applied.
        study_name: the Optuna study (and MLflow parent run) name; the same name resumes.
        storage_url: the Optuna storage (an SQLAlchemy URL).
        tracking_uri: the MLflow tracking store.
        workdir: where the run writes (absolute).
        data_root: where datasets that do not ship offline live, if given.
        workers: processes evaluating trials on this machine.
        threads_per_worker: torch threads of each of them.
        task_object: the task itself when the search was given an ``ap.Task`` built in Python (a
            notebook) rather than a name; ``space.task`` is then its name. It cannot be stored or
            sent to worker processes, so the stored settings only say that there was one.
    """

    space: SearchSpace
    study_name: str
    storage_url: str
    tracking_uri: str
    workdir: Path
    data_root: str | None
    workers: int
    threads_per_worker: int
    task_object: Task | None = field(default=None, compare=False, repr=False)

    @property
    def strategy_label(self) -> str:
        return strategy_label(self.space)

    @property
    def n_trials(self) -> int:
        """Finished trials the study should end with (1 for strategies that run one plan)."""
        return self.space.strategy.trials if strategy_class(self.space.strategy.name).uses_trial_budget else 1

    def to_dict(self, *, redacted: bool = False) -> dict[str, Any]:
        """The settings as JSON-able data; ``redacted`` masks the URLs' passwords, for anything
        stored or shown (worker processes get the full settings in memory)."""
        hide = redact if redacted else str
        return {
            "space": self.space.model_dump(mode="json"), "study_name": self.study_name,
            "storage_url": hide(self.storage_url), "tracking_uri": hide(self.tracking_uri), "workdir": str(self.workdir),
            "data_root": self.data_root, "workers": self.workers, "threads_per_worker": self.threads_per_worker,
            "in_memory_task": self.task_object is not None,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SearchSettings:
        """Settings stored by :meth:`to_dict`; an in-memory task is not among them (see
        :func:`searched_in_memory`)."""
        rest = {k: v for k, v in data.items() if k != "in_memory_task"}
        return cls(**{**rest, "space": SearchSpace.model_validate(data["space"]), "workdir": Path(data["workdir"])})

    @property
    def task_spec(self) -> str | dict[str, Any]:
        """The task as plans record it (``provenance.task_spec``) so that ``apply`` can load it again:
        a name or ``package.module:function``, a YAML declaration, or ``{"in_memory": name}`` for a
        task object, which only Python code holding that object can apply."""
        if self.task_object is not None:
            return {"in_memory": self.task_object.name}
        return self.space.task_spec

    def tracking_params(self, profile: ModelProfile) -> dict[str, Any]:
        """The search's settings as its MLflow parent run records them (no passwords)."""
        space = self.space
        return {
            "task": space.task_label, "budget": space.budget, "strategy": self.strategy_label,
            "objective": space.strategy.objective, "trials": space.strategy.trials, "seed": space.strategy.seed,
            "workers": self.workers, "study": self.study_name, "storage": redact(self.storage_url),
            "groups": {**space.groups.model_dump(mode="json"), "ratio": list(space.groups.ratio_range(space.mode))},
            "evaluation": space.evaluation.model_dump(mode="json"),
            "dense_macs": profile.macs, "dense_params": profile.params,
            **({"mode": space.mode, "pattern": space.pattern} if space.mode != "channels" else {}),
        }


def _positive_int(value: Any, flag: str, what: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{flag} must be a positive integer ({what}), got {value!r}.")


def searched_in_memory(stored: Mapping[str, Any]) -> bool:
    """Whether stored settings (:meth:`SearchSettings.to_dict`) come from a search of a task object."""
    return bool(stored.get("in_memory_task"))


def resolve_settings(
    space: str | os.PathLike[str] | SearchSpace = "default",
    *,
    task: str | Task | None = None,
    strategy: str | None = None,
    sampler: str | None = None,
    agent: str | None = None,
    n_trials: int | None = None,
    seed: int | None = None,
    budget: str | Budget | None = None,
    objective: str | None = None,
    mode: str | None = None,
    pattern: str | None = None,
    study: str | None = None,
    storage: str | None = None,
    tracking_uri: str | None = None,
    workers: int = 1,
    workdir: str | os.PathLike[str] | None = None,
    data_root: str | os.PathLike[str] | None = None,
    threads: int | None = None,
) -> SearchSettings:
    """Load the space file and apply overrides; everything is checked here, before any work.

    ``task`` replaces the space's task: a built-in name, ``"package.module:function"``, or an
    :class:`~autoprune.Task` object (searched in this process only: ``workers`` must be 1).
    ``mode`` (``channels`` or ``sparsity``) and ``pattern`` (``unstructured`` or ``2:4``) replace the
    space's; a sparsity search needs a ``nonzeros=`` or ``size=`` budget.
    """
    from .task import Task

    _positive_int(workers, "--workers", "worker processes")
    loaded = space if isinstance(space, SearchSpace) else load_space(space)
    task_object = None
    if isinstance(task, Task):
        task_object, task = task, task.name
        if workers != 1:
            raise ConfigError(
                f"workers={workers} needs a task that worker processes can load themselves; the ap.Task object "
                f"{task_object.name!r} lives in this process only. Search it with workers=1, or give the task as "
                "'package.module:function' (a function returning it) or declare it in the space file's task: "
                "mapping, which every worker loads."
            )
    elif task is not None and not isinstance(task, str):
        raise ConfigError(f"task must be a task name, 'package.module:function' or an ap.Task, got "
                          f"{type(task).__name__}.")
    if task is not None:
        # Another task: the space's own name (which named its task) no longer applies.
        loaded = loaded.with_overrides(task=task).model_copy(update={"name": None})
    if isinstance(loaded.task, DeclaredTask):
        # A space built in Python: its relative paths are the working directory's, stored absolute
        # (a space file's already are) so that export, apply and workers find the same files.
        loaded = loaded.model_copy(update={"task": loaded.task.resolved(Path.cwd())})
    budget_dict = None
    if budget is not None:
        budget_dict = (budget if isinstance(budget, Budget) else Budget.parse(str(budget))).to_dict()
    loaded = loaded.with_overrides(**{
        "strategy.name": strategy, "strategy.sampler": sampler, "strategy.rl.agent": agent,
        "strategy.trials": n_trials, "strategy.seed": seed, "strategy.objective": objective, "budget": budget_dict,
        "mode": mode, "pattern": pattern,
    })
    if threads is not None:
        _positive_int(threads, "--threads", "torch threads per worker")
    for value, check in ((study, check_study_name), (storage, check_storage_url), (tracking_uri, check_tracking_uri)):
        if value is not None:
            check(value)
    chosen = strategy_class(loaded.strategy.name)
    if workers > 1 and not chosen.supports_workers:
        raise ConfigError(f"Strategy {loaded.strategy.name!r} runs in one worker; use --workers 1.")
    if loaded.strategy.objective == "pareto":
        if not chosen.supports_pareto:
            raise ConfigError("objective 'pareto' needs strategy optuna or random (a sampler proposes the budget too).")
        make_sampler(loaded.strategy.sampler if loaded.strategy.name == "optuna" else "random", seed=0,
                     pareto=True)  # refuses single-objective samplers now
    home = resolve_workdir(workdir)
    label = loaded.strategy.name if loaded.strategy.name != "optuna" else f"optuna-{loaded.strategy.sampler}"
    budget_tag = "-".join(f"{k}{v:g}" for k, v in loaded.budget.items())
    pareto = "-pareto" if loaded.strategy.objective == "pareto" else ""
    pattern_tag = f"-{loaded.pattern}" if loaded.mode == "sparsity" and loaded.pattern != "unstructured" else ""
    name = study or study_name_from(f"{loaded.display_name}-{label}-{budget_tag}{pattern_tag}{pareto}")
    # One worker keeps the caller's torch thread count (torch's default is every core); several
    # share the cores.
    per_worker = threads or (torch.get_num_threads() if workers == 1 else max(1, (os.cpu_count() or 1) // workers))
    return SearchSettings(
        space=loaded, study_name=name, storage_url=storage or default_storage_url(home),
        tracking_uri=tracking_uri or default_tracking_uri(home), workdir=home,
        data_root=str(data_root) if data_root is not None else None, workers=workers,
        threads_per_worker=per_worker, task_object=task_object,
    )


def latency_settings(space: SearchSpace) -> LatencySettings:
    """How the search's latency is measured (the ``latency:`` section, or its defaults)."""
    spec = space.latency or LatencySpec()
    return LatencySettings(batch_size=spec.batch_size, threads=spec.threads, repeats=spec.repeats, device=spec.device)
