"""autoprune: search per-group structured-pruning ratios under a FLOPs, size or latency budget.

The public API (README.md walks through it)::

    import autoprune as ap
    task = ap.load_task("digits-cnn")
    prof = ap.profile_model(task)
    plan = ap.project(prof, {g.name: 0.4 for g in prof.groups}, ap.Budget(flops=0.5))
    result = ap.Evaluator(task).evaluate(plan)
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from . import _progress  # noqa: F401  first: it imports tqdm.auto quietly, before Optuna does (see there)
from .budget import Budget, global_plan, project, uniform_plan
from .errors import (
    AutopruneError,
    BudgetError,
    CheckpointError,
    ConfigError,
    DataNotFoundError,
    InfeasibleBudgetError,
    PlanError,
    PlanMismatchError,
    StorageError,
    StudyError,
    TaskError,
    UnsupportedModelError,
)
from .evaluate import Evaluator, TrialResult, recalibrate_batchnorm
from .export import ExportReport, export_study, load_pruned, save_pruned
from .plan import Plan, StaleBatchNormWarning, apply_plan
from .profile import GroupInfo, ModelProfile, profile_model
from .pruning import IMPORTANCE_NAMES, channel_scores, count_macs_params
from .search import SearchResult, search
from .space import SearchSpace, load_space
from .strategies import rl as _rl  # noqa: F401  registers gymnasium's autoprune/Pruning-v0
from .task import Task, builtin_task_names, load_task
from .train import TrainRecipe

try:
    __version__ = version("autoprune")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0"

__all__ = [
    "AutopruneError",
    "Budget",
    "BudgetError",
    "CheckpointError",
    "ConfigError",
    "DataNotFoundError",
    "Evaluator",
    "ExportReport",
    "GroupInfo",
    "IMPORTANCE_NAMES",
    "InfeasibleBudgetError",
    "ModelProfile",
    "Plan",
    "SearchResult",
    "SearchSpace",
    "PlanError",
    "PlanMismatchError",
    "StorageError",
    "StaleBatchNormWarning",
    "StudyError",
    "Task",
    "TaskError",
    "UnsupportedModelError",
    "TrainRecipe",
    "TrialResult",
    "apply_plan",
    "builtin_task_names",
    "channel_scores",
    "count_macs_params",
    "export_study",
    "global_plan",
    "load_pruned",
    "load_space",
    "load_task",
    "profile_model",
    "project",
    "recalibrate_batchnorm",
    "save_pruned",
    "search",
    "uniform_plan",
]
