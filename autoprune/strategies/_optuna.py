"""Optuna samplers as a strategy: one dimension per searchable group."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution
from optuna.trial import FrozenTrial, TrialState

from ..errors import ConfigError
from ..plan import Plan
from .base import PARETO_TARGET, BaseStrategy, SearchContext

__all__ = ["OptunaStrategy", "RandomSearchStrategy", "make_sampler", "make_stopper", "stopper_step", "SAMPLER_NAMES",
           "STOPPER_NAMES", "trial_seed"]

SAMPLER_NAMES = ("tpe", "gp", "cmaes", "random", "qmc", "nsga2")
_SINGLE_OBJECTIVE_ONLY = ("cmaes",)
# QMC's points are indexed by a counter kept in the study, and its scrambling must keep one seed
# for the whole sequence to stay low-discrepancy; it does not replay on resume as it is.
_STUDY_INDEXED = ("qmc",)


def trial_seed(seed: int, number: int) -> int:
    """The random stream of trial ``number`` of a search seeded with ``seed`` (0 <= result < 2**32)."""
    return int(np.random.SeedSequence([seed, number]).generate_state(1)[0])


class _TrialSeededSampler(optuna.samplers.BaseSampler):
    """An Optuna sampler whose randomness is drawn afresh for each trial from (seed, trial number).

    A sampler seeded once per process replays its stream whenever the process starts again: a
    resumed search re-proposed the candidates of the trials it already had, and two workers with
    one seed proposed the same pairs. Trial numbers are unique in a study, so a stream per trial
    number never repeats across resumes or workers, while an uninterrupted search stays a fixed
    function of the seed. Optuna's samplers keep their model of the search in the study (TPE, GP
    and NSGA-II refit on its trials each time; CMA-ES restores its state from them), so a fresh
    instance per trial loses nothing but a warm-start cache.
    """

    def __init__(self, make: Callable[[int], optuna.samplers.BaseSampler], seed: int) -> None:
        self._make = make
        self._seed = seed
        self._by_trial: dict[int, optuna.samplers.BaseSampler] = {}

    def _for(self, trial: FrozenTrial) -> optuna.samplers.BaseSampler:
        sampler = self._by_trial.get(trial.number)
        if sampler is None:
            if len(self._by_trial) > 16:  # trials failed by other workers never reach after_trial
                self._by_trial.pop(next(iter(self._by_trial)))
            sampler = self._by_trial[trial.number] = self._make(trial_seed(self._seed, trial.number))
        return sampler

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return self._for(trial).infer_relative_search_space(study, trial)

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        return self._for(trial).sample_relative(study, trial, search_space)

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        return self._for(trial).sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self._for(trial).before_trial(study, trial)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState,
                    values: Sequence[float] | None) -> None:
        self._for(trial).after_trial(study, trial, state, values)
        self._by_trial.pop(trial.number, None)

    def reseed_rng(self) -> None:  # the streams are fixed by (seed, trial number) by design
        pass


def make_sampler(name: str, *, seed: int, pareto: bool = False) -> optuna.samplers.BaseSampler:
    """A seeded Optuna sampler by name.

    The same seed proposes the same sequence in an uninterrupted search, and no trial of a
    resumed search or of another worker sharing the study replays another's random stream.
    """
    if pareto and name in _SINGLE_OBJECTIVE_ONLY:
        raise ConfigError(
            f"Sampler {name!r} optimizes one objective; with objective 'pareto' use tpe, gp, nsga2, random or qmc."
        )
    if name not in SAMPLER_NAMES:
        raise ConfigError(f"Unknown sampler {name!r}; allowed: {', '.join(SAMPLER_NAMES)}.")
    if name in _STUDY_INDEXED:
        return _base_sampler(name, seed)
    return _TrialSeededSampler(lambda trial_seed_: _base_sampler(name, trial_seed_), seed)


def _base_sampler(name: str, seed: int) -> optuna.samplers.BaseSampler:
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
    raise AssertionError(name)


STOPPER_NAMES = ("none", "median", "successive_halving", "hyperband")


def stopper_step(rung: int, reduction_factor: int) -> int:
    """The step a trial reports its score at after fine-tuning rung ``rung`` (0: recalibration).

    Optuna's successive halving and Hyperband place rung ``k`` at step ``min_resource * eta**k``;
    reporting rung ``k`` at ``eta**k`` makes every fidelity rung of the search space one of
    theirs, whatever its number of SGD steps, with rung 0 (adaptive BN alone, the cheapest
    filter) the first decision point.
    """
    return reduction_factor**rung


def make_stopper(name: str, *, rungs: int, reduction_factor: int = 3) -> optuna.pruners.BasePruner:
    """The study's stopper (an Optuna pruner) over ``rungs`` fidelity rungs, by name.

    ``successive_halving`` keeps the best ``1/reduction_factor`` of the trials that reached a
    rung; ``hyperband`` runs several such brackets; ``median`` stops a trial below the median of
    earlier trials at the same rung; ``none`` never stops one.
    """
    if name == "none":
        return optuna.pruners.NopPruner()
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=0)
    if name == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=reduction_factor,
                                                      min_early_stopping_rate=0)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=stopper_step(rungs - 1, reduction_factor),
                                              reduction_factor=reduction_factor)
    raise ConfigError(f"Unknown stopper (fidelity.pruner) {name!r}; allowed: {', '.join(STOPPER_NAMES)}.")


class OptunaStrategy(BaseStrategy):
    """Sample raw ratios with an Optuna sampler, starting from the uniform and global baselines.

    The baselines are the first trials of a new study (see :meth:`initial_trials`), so the search
    starts where the baselines are and its best can only match or beat them.
    """

    name = "optuna"
    supports_pareto = True

    def __init__(self, *, sampler: str = "tpe", enqueue_baselines: bool = True) -> None:
        self.sampler = sampler
        self.enqueue_baselines = enqueue_baselines

    def initial_trials(self, baselines: Mapping[str, Plan],
                       dimensions: Mapping[str, tuple[float, float]]) -> list[tuple[str, dict[str, float]]]:
        if not self.enqueue_baselines:
            return []
        trials = []
        for label, plan in baselines.items():
            params = {n: plan.ratios[n] for n in dimensions if n != PARETO_TARGET}
            if PARETO_TARGET in dimensions:
                params[PARETO_TARGET] = dimensions[PARETO_TARGET][1]
            trials.append((label, params))
        return trials

    def search(self, context: SearchContext) -> None:
        while (trial := context.ask()) is not None:
            raw = {name: trial.suggest_float(name, lo, hi) for name, (lo, hi) in context.dimensions.items()}
            context.run_trial(trial, raw=raw)


class RandomSearchStrategy(OptunaStrategy):
    """Uniformly random raw ratios: the search baseline, without the uniform/global head start."""

    name = "random"

    def __init__(self) -> None:
        super().__init__(sampler="random", enqueue_baselines=False)
