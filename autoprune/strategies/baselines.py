"""The two baselines that need no search: one trial each, tracked like any other."""

from __future__ import annotations

from .base import BaseStrategy, SearchContext

__all__ = ["UniformStrategy", "GlobalStrategy"]


class _FixedPlanStrategy(BaseStrategy):
    uses_trial_budget = False
    supports_workers = False

    def search(self, context: SearchContext) -> None:
        trial = context.ask()
        if trial is not None:
            context.run_trial(trial, plan=context.baselines[self.name])


class UniformStrategy(_FixedPlanStrategy):
    """The same ratio in every group, meeting the budget."""

    name = "uniform"


class GlobalStrategy(_FixedPlanStrategy):
    """Torch-Pruning's global ranking of channel importance, cut at the budget."""

    name = "global"
