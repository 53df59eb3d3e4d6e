"""Exceptions for mistakes a user can fix.

Every error autoprune raises for bad input derives from :class:`AutopruneError`; the CLI prints
its message (what was wrong, what is allowed, how to fix it) and exits non-zero without a
traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import re

__all__ = [
    "short",
    "redact",
    "AutopruneError",
    "ConfigError",
    "TaskError",
    "DataNotFoundError",
    "CheckpointError",
    "BudgetError",
    "InfeasibleBudgetError",
    "PlanError",
    "PlanMismatchError",
    "StudyError",
    "StorageError",
    "UnsupportedModelError",
]


class AutopruneError(Exception):
    """Base class of every user-facing autoprune error."""


class ConfigError(AutopruneError, ValueError):
    """A search space file, CLI flag or argument has a value that is not allowed."""


class TaskError(AutopruneError, ValueError):
    """A task name is unknown, or a user task could not be built or misbehaves."""


class DataNotFoundError(TaskError, FileNotFoundError):
    """A dataset a task needs is not where autoprune looks for it."""


class CheckpointError(AutopruneError):
    """A checkpoint is missing, corrupt, or not a plain state dict."""


class BudgetError(AutopruneError, ValueError):
    """A budget is malformed (unknown metric, non-positive value, several metrics)."""


class InfeasibleBudgetError(BudgetError):
    """No plan inside the allowed ratio ranges can meet the budget."""


class PlanError(AutopruneError, ValueError):
    """A plan file is malformed, truncated or of an unknown schema."""


class PlanMismatchError(PlanError):
    """A plan was made for a model other than the one it is applied to."""


class StudyError(AutopruneError):
    """A study cannot be created, resumed or exported as asked."""


class StorageError(AutopruneError):
    """An Optuna storage or MLflow tracking URI cannot be reached or written."""


class UnsupportedModelError(AutopruneError):
    """A model autoprune cannot prune: found when it is profiled, before any search work."""


_CREDENTIALS = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^:/@\s'\"]*):(?P<secret>[^@\s'\"]*)@")


def redact(text: str) -> str:
    """``text`` with the password of every ``scheme://user:password@host`` URL in it masked.

    Storage and tracking URLs may carry credentials; they are shown, logged and stored only
    through this.
    """
    return _CREDENTIALS.sub(lambda m: f"{m.group('head')}:***@", text)


def short(exc: BaseException, limit: int = 300) -> str:
    """One line that says what went wrong in ``exc``, for a message: its first non-empty line,
    cut to ``limit`` characters, credentials masked; the exception's type when it says nothing."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = redact(lines[0]) if lines else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
