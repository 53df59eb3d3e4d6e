"""Strategies that propose pruning plans: Optuna samplers, the AMC agent, and the baselines.

Strategies are registered by name (``{cls.name: cls}``); what a strategy can do (share a study
with other workers, search a Pareto front, use the trial count) is declared on its class, so
the settings, the CLI and the runner ask the class instead of matching names.
"""

from __future__ import annotations

from ..errors import ConfigError
from ._optuna import SAMPLER_NAMES, OptunaStrategy, RandomSearchStrategy, make_sampler, make_stopper, trial_seed
from .base import PARETO_TARGET, BaseStrategy, SearchContext, TrialOutcome, TrialStopped
from .baselines import GlobalStrategy, LampStrategy, UniformStrategy

__all__ = [
    "BaseStrategy",
    "SearchContext",
    "TrialOutcome",
    "TrialStopped",
    "OptunaStrategy",
    "RandomSearchStrategy",
    "UniformStrategy",
    "GlobalStrategy",
    "LampStrategy",
    "make_strategy",
    "strategy_class",
    "make_sampler",
    "make_stopper",
    "trial_seed",
    "STRATEGY_NAMES",
    "SAMPLER_NAMES",
    "PARETO_TARGET",
]

_STRATEGIES: dict[str, type[BaseStrategy]] = {
    cls.name: cls for cls in (OptunaStrategy, RandomSearchStrategy, UniformStrategy, GlobalStrategy, LampStrategy)
}
STRATEGY_NAMES = ("optuna", "rl", "random", "uniform", "global", "lamp")


def strategy_class(name: str) -> type[BaseStrategy]:
    """The strategy class registered as ``name``; the error lists the valid names.

    The RL strategy is imported on first use: it brings stable-baselines3.
    """
    if name == "rl":
        from .rl import RLStrategy

        return RLStrategy
    try:
        return _STRATEGIES[name]
    except KeyError:
        raise ConfigError(f"Unknown strategy {name!r}; allowed: {', '.join(STRATEGY_NAMES)}.") from None


def make_strategy(name: str, *, sampler: str = "tpe", rl_settings: object | None = None) -> BaseStrategy:
    """A strategy by name, configured from the search space's strategy section."""
    cls = strategy_class(name)
    if cls is OptunaStrategy:
        return OptunaStrategy(sampler=sampler)
    if name == "rl":
        return cls(rl_settings)  # type: ignore[call-arg]
    return cls()
