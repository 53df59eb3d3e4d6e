"""Optuna samplers as a strategy: one dimension per searchable group."""

from __future__ import annotations

import optuna

from ..errors import ConfigError
from ..study import ATTR_BASELINE
from .base import PARETO_TARGET, BaseStrategy, SearchContext

__all__ = ["OptunaStrategy", "RandomSearchStrategy", "make_sampler", "SAMPLER_NAMES"]

SAMPLER_NAMES = ("tpe", "gp", "cmaes", "random", "qmc", "nsga2")
_SINGLE_OBJECTIVE_ONLY = ("cmaes",)


def make_sampler(name: str, *, seed: int, pareto: bool = False) -> optuna.samplers.BaseSampler:
    """A seeded Optuna sampler by name; the same seed proposes the same sequence."""
    if pareto and name in _SINGLE_OBJECTIVE_ONLY:
        raise ConfigError(
            f"Sampler {name!r} optimizes one objective; with objective 'pareto' use tpe, gp, nsga2, random or qmc."
        )
    if name == "tpe":
        # Multivariate TPE models the ratios jointly: which groups to prune depends on the others.
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=10)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed, deterministic_objective=True)
    if name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "qmc":
        return optuna.samplers.QMCSampler(seed=seed, scramble=True, warn_independent_sampling=False)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    raise ConfigError(f"Unknown sampler {name!r}; allowed: {', '.join(SAMPLER_NAMES)}.")


class OptunaStrategy(BaseStrategy):
    """Sample raw ratios with an Optuna sampler, starting from the uniform and global baselines.

    The baselines are enqueued as the first trials of a new study, so the search starts where the
    baselines are and its best can only match or beat them.
    """

    name = "optuna"

    def __init__(self, *, sampler: str = "tpe", enqueue_baselines: bool = True) -> None:
        self.sampler = sampler
        self.enqueue_baselines = enqueue_baselines

    def search(self, context: SearchContext) -> None:
        study = context.study
        if self.enqueue_baselines and not study.get_trials(deepcopy=False):
            for label, plan in context.baselines.items():
                params = {n: plan.ratios[n] for n in context.dimensions if n != PARETO_TARGET}
                if PARETO_TARGET in context.dimensions:
                    params[PARETO_TARGET] = context.dimensions[PARETO_TARGET][1]
                study.enqueue_trial(params, user_attrs={ATTR_BASELINE: label})
        while (trial := context.ask()) is not None:
            raw = {name: trial.suggest_float(name, lo, hi) for name, (lo, hi) in context.dimensions.items()}
            context.run_trial(trial, raw=raw)


class RandomSearchStrategy(OptunaStrategy):
    """Uniformly random raw ratios: the search baseline, without the uniform/global head start."""

    name = "random"

    def __init__(self) -> None:
        super().__init__(sampler="random", enqueue_baselines=False)
