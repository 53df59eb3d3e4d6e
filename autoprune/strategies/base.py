"""What every strategy implements, and what it sees of the running search.

A strategy proposes candidates; it never tracks, exports or counts trials itself. It asks the
search context for a trial, turns its proposal (raw ratios, or a ready plan) into a trial with
:meth:`SearchContext.run_trial`, and stops when :meth:`SearchContext.ask` returns ``None``.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from ..budget import Budget, LatencyModel
from ..evaluate import TrialResult
from ..plan import Plan
from ..profile import ModelProfile

if TYPE_CHECKING:
    import optuna

__all__ = ["BaseStrategy", "SearchContext", "TrialOutcome", "PARETO_TARGET"]

# Extra dimension of a Pareto search: the budget fraction each trial is projected onto.
PARETO_TARGET = "_budget_fraction"


@dataclass(frozen=True)
class TrialOutcome:
    """A finished trial: its number, the plan evaluated and what the evaluation measured."""

    number: int
    plan: Plan
    result: TrialResult
    raw_ratios: Mapping[str, float] | None = None


class SearchContext(abc.ABC):
    """The search as a strategy sees it.

    Attributes:
        profile: the dense model's groups and cost model.
        budget: the budget every candidate is projected onto.
        dimensions: search dimension name -> (low, high); group names map to ratio ranges. In a
            Pareto search it also holds :data:`PARETO_TARGET`, the budget fraction of the trial.
        bounds: ratio range of every group (non-searched groups are (0, 0)).
        round_to: channel-count multiple.
        seed: the search's seed (a worker's seed when several workers share the study).
        baselines: the uniform and global plans at the budget.
        latency: the latency predictor of a search that measures latency (else None); a latency
            budget's costs come from it.
    """

    profile: ModelProfile
    budget: Budget
    dimensions: dict[str, tuple[float, float]]
    bounds: dict[str, tuple[float, float]]
    round_to: int
    seed: int
    baselines: dict[str, Plan]
    latency: LatencyModel | None = None

    @property
    @abc.abstractmethod
    def study(self) -> optuna.Study:
        """The Optuna study that stores the trials (Optuna strategies sample from it)."""

    @abc.abstractmethod
    def ask(self, fixed_params: Mapping[str, float] | None = None) -> optuna.Trial | None:
        """A new trial, or ``None`` when the search has its trials or was asked to stop.

        With ``fixed_params`` (values for every name in :attr:`dimensions`) the trial records
        those values as its parameters instead of sampling them: how a strategy with its own
        proposal mechanism (the RL agent) stores what it chose.
        """

    @abc.abstractmethod
    def run_trial(
        self, trial: optuna.Trial, *, raw: Mapping[str, float] | None = None, plan: Plan | None = None
    ) -> TrialOutcome | None:
        """Project ``raw`` onto the budget (or take ``plan``), evaluate, record; None if it failed."""

    @abc.abstractmethod
    def project(self, raw: Mapping[str, float]) -> Plan:
        """The plan ``raw`` maps to under the search's budget, bounds and rounding."""

    @abc.abstractmethod
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Record strategy-level metrics (e.g. an agent's losses) on the search's parent run."""

    @property
    @abc.abstractmethod
    def state_dir(self) -> Path:
        """A directory private to this study where a strategy keeps state to resume from."""


class BaseStrategy(abc.ABC):
    """Proposes candidates until the context says the search is done."""

    name: ClassVar[str]
    #: False for strategies that run a single trial whatever the requested trial count
    uses_trial_budget: ClassVar[bool] = True

    def initial_trials(self, baselines: Mapping[str, Plan],
                       dimensions: Mapping[str, tuple[float, float]]) -> list[tuple[str, dict[str, float]]]:
        """Baseline candidates to put first in a new study, as (baseline label, parameters).

        The runner enqueues them once, in the process that creates the study, so that several
        workers never evaluate a baseline twice. None by default.
        """
        return []

    @abc.abstractmethod
    def search(self, context: SearchContext) -> None:
        """Run trials through ``context`` until :meth:`SearchContext.ask` returns ``None``."""
