"""What every strategy implements, and what it sees of the running search.

A strategy proposes candidates; it never tracks, exports or counts trials itself. It asks the
search context for a trial, turns its proposal (raw ratios, or a ready plan) into a trial with
:meth:`SearchContext.run_trial`, and stops when :meth:`SearchContext.ask` returns ``None``.
The lifecycle of one trial is documented once, on :class:`SearchContext`.
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

__all__ = ["BaseStrategy", "SearchContext", "TrialOutcome", "TrialStopped", "PARETO_TARGET"]

# Extra dimension of a Pareto search: the budget fraction each trial is projected onto.
PARETO_TARGET = "_budget_fraction"


@dataclass(frozen=True)
class TrialOutcome:
    """A finished trial: its number, the plan evaluated and what the evaluation measured.

    ``stopped`` trials were ended early by the study's stopper (Optuna: PRUNED) after
    ``result.finetune_steps`` fine-tuning steps; their score is the one they stopped at, a
    lower-fidelity number than a complete trial's.
    """

    number: int
    plan: Plan
    result: TrialResult
    raw_ratios: Mapping[str, float] | None = None
    stopped: bool = False


class TrialStopped(Exception):
    """Raised inside a trial's evaluation when the study's stopper ends it at an intermediate step.

    Attributes:
        step: fine-tuning steps done when it stopped (0: after BatchNorm recalibration alone).
        score: the validation score reported at that step.
    """

    def __init__(self, step: int, score: float) -> None:
        super().__init__(f"stopped after {step} fine-tuning steps at validation score {score:.4f}")
        self.step = step
        self.score = score


class SearchContext(abc.ABC):
    """The search as a strategy sees it.

    The lifecycle of a trial, in order:

    1. :meth:`ask` hands out a trial, or ``None`` when the study has its trials (finished or
       running elsewhere) or the user stopped the search;
    2. :meth:`run_trial` chooses the plan (projects the raw ratios onto the budget), evaluates
       it, and records it in the study and in MLflow;
    3. during the evaluation, a multi-fidelity search reports the validation score after each
       fine-tuning rung, and the study's stopper may end the trial there (stopped);
    4. the outcome is sorted into complete, stopped or failed before anything acts on it; the
       strategy's :meth:`BaseStrategy.after_trial` then sees it (``None`` for a failed trial).

    Attributes:
        profile: the dense model's groups and cost model.
        budget: the budget every candidate is projected onto.
        dimensions: search dimension name -> (low, high); group names map to ratio ranges. In a
            Pareto search it also holds :data:`PARETO_TARGET`, the budget fraction of the trial.
        bounds: ratio range of every group (non-searched groups are (0, 0)).
        round_to: channel-count multiple.
        seed: the search's seed (a worker's seed when several workers share the study).
        baselines: the uniform and global plans at the budget (in sparsity mode also ``lamp``).
        latency: the latency predictor of a search that measures latency (else None); a latency
            budget's costs come from it.
        is_new_study: whether this process created the study (nothing of an earlier search under
            its name, such as a strategy's saved state, belongs to it).
    """

    profile: ModelProfile
    budget: Budget
    dimensions: dict[str, tuple[float, float]]
    bounds: dict[str, tuple[float, float]]
    round_to: int
    seed: int
    baselines: dict[str, Plan]
    latency: LatencyModel | None = None
    is_new_study: bool = False

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
        """Project ``raw`` onto the budget (or take ``plan``), evaluate, record; None if it failed.

        A stopped trial returns its outcome with ``stopped=True``.
        """

    @abc.abstractmethod
    def project(self, raw: Mapping[str, float]) -> Plan:
        """The plan ``raw`` maps to under the search's budget, bounds and rounding."""

    @abc.abstractmethod
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Record strategy-level metrics (e.g. an agent's losses) on the search's parent run."""

    def trials_left(self) -> bool:
        """Whether the search still wants trials: False once the study has its trials or the
        search was asked to stop (then :meth:`ask` returns ``None``). Asks for no trial."""
        return True

    @property
    @abc.abstractmethod
    def state_dir(self) -> Path:
        """A directory private to this study where a strategy keeps state to resume from."""


class BaseStrategy(abc.ABC):
    """Proposes candidates until the context says the search is done."""

    name: ClassVar[str]
    #: False for strategies that run a single trial whatever the requested trial count
    uses_trial_budget: ClassVar[bool] = True
    #: whether several worker processes may share one study with this strategy
    supports_workers: ClassVar[bool] = True
    #: whether it can search the accuracy/MACs front (``objective: pareto``)
    supports_pareto: ClassVar[bool] = False

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

    def after_trial(self, outcome: TrialOutcome | None) -> None:
        """Called by the runner after each trial this strategy ran (``None``: it failed). Does
        nothing by default; a strategy that must learn from stopped trials can override it."""
