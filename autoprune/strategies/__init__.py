"""Strategies that propose pruning plans: Optuna samplers, the AMC agent, and the baselines."""

from __future__ import annotations

from ..errors import ConfigError
from ._optuna import SAMPLER_NAMES, OptunaStrategy, RandomSearchStrategy, make_sampler
from .base import PARETO_TARGET, BaseStrategy, SearchContext, TrialOutcome
from .baselines import GlobalStrategy, UniformStrategy

__all__ = [
    "BaseStrategy",
    "SearchContext",
    "TrialOutcome",
    "OptunaStrategy",
    "RandomSearchStrategy",
    "UniformStrategy",
    "GlobalStrategy",
    "make_strategy",
    "make_sampler",
    "STRATEGY_NAMES",
    "SAMPLER_NAMES",
    "PARETO_TARGET",
]

STRATEGY_NAMES = ("optuna", "rl", "random", "uniform", "global")


def make_strategy(name: str, *, sampler: str = "tpe", rl_settings: object | None = None) -> BaseStrategy:
    """A strategy by name; the error lists the valid names."""
    if name == "optuna":
        return OptunaStrategy(sampler=sampler)
    if name == "random":
        return RandomSearchStrategy()
    if name == "uniform":
        return UniformStrategy()
    if name == "global":
        return GlobalStrategy()
    if name == "rl":
        from .rl import RLStrategy

        return RLStrategy(rl_settings)
    raise ConfigError(f"Unknown strategy {name!r}; allowed: {', '.join(STRATEGY_NAMES)}.")
