"""The baselines that need no search: one trial each, tracked like any other. ``uniform`` and
``global`` serve both modes (in sparsity mode ``global`` is global magnitude pruning); ``lamp``
(layer-adaptive magnitude scores) is a sparsity-mode baseline."""

from __future__ import annotations

from .base import BaseStrategy, SearchContext

__all__ = ["UniformStrategy", "GlobalStrategy", "LampStrategy"]


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
    """Torch-Pruning's global ranking of channel importance, cut at the budget (sparsity mode:
    global magnitude ranking of single weights)."""

    name = "global"


class LampStrategy(_FixedPlanStrategy):
    """LAMP's layer-adaptive ranking of single weights, cut at the budget (sparsity mode only)."""

    name = "lamp"
