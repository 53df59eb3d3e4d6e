"""AMC's pruning environment: one step per prunable group, one episode per candidate plan.

The agent walks the model's groups in network order. At each step it sees the group's layer
embedding (He et al., 2018, "AMC: AutoML for Model Compression", section 3.2) and answers with one
action in [-1, 1] that becomes the group's ratio (the fraction of channels *removed*).

The action maps linearly onto the group's ratio range [lo, hi] (-1 prunes least, +1 most). AMC's
action clipping then raises the ratio if needed: never so little that the budget could no longer
be met with every later group pruned as far as it may (costs from the profile's exact analytic
cost model, or the latency predictor for a latency budget). Plans that undershoot the budget are
filled back up by the projection below.

At the last step the chosen ratios are projected onto the budget (:func:`autoprune.budget.project`:
same shape, tight to the limit, snapped to the channel grid), the plan is evaluated and the episode
ends with AMC's reward. Intermediate steps earn 0 (the agent's replay buffer credits the final
reward to every step of the episode, as AMC does).

Groups whose ratio range is a single value (``(0, 0)``: not searched) are not stepped: an action
there could change nothing. They keep that ratio in every plan and still count in the budget.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from typing import Any

import gymnasium as gym
import numpy as np

from ..._lattice import Grid
from ...budget import Budget, LatencyModel, project, resolve_bounds
from ...errors import ConfigError
from ...evaluate import Evaluator, TrialResult
from ...plan import Plan
from ...profile import ModelProfile, profile_model
from ...space import REWARDS, EvaluationSettings
from ...sparsity import profile_weights
from ...task import Task, load_task

__all__ = ["PruningEnv", "EvaluateFn", "TrialFailed", "ENV_ID", "FEATURES", "action_to_ratio", "ratio_to_action"]

ENV_ID = "autoprune/Pruning-v0"

#: AMC's layer embedding, in observation order; every feature is normalized to [0, 1].
FEATURES = (
    "index",  # step number / (steps - 1)
    "channels",  # group's output channels / max over the searched groups
    "in_channels",  # root layer's input channels (features) / max
    "height",  # root layer's output feature-map height / max (1 for linear layers)
    "width",  # ... width / max
    "stride",  # root layer's stride / max
    "kernel_size",  # root layer's kernel area (9 for 3x3) / max
    "macs",  # MACs the group owns / dense model MACs
    "macs_removed",  # MACs removed by the ratios chosen so far / dense MACs
    "macs_rest",  # MACs owned by the searched groups still to come / dense MACs
    "previous_ratio",  # ratio chosen at the previous step (0 at the first)
)

#: ``evaluate_fn(plan, raw)``: score one episode's plan; ``raw`` maps each stepped group to the
#: ratio the agent chose (after clipping). ``None`` means the search is over.
EvaluateFn = Callable[[Plan, dict[str, float]], "TrialResult | None"]

# Bisection iterations of the clipping bound; 2**-40 of a ratio range is far below one channel.
_BISECTION_STEPS = 40


class TrialFailed(Exception):
    """Raised by an ``evaluate_fn`` when a candidate could not be evaluated (its trial failed).

    The episode then ends as if the pruned model scored 0: the agent learns to avoid the plan
    instead of the search stopping.
    """


def action_to_ratio(action: float, low: float, high: float) -> float:
    """Map an action in [-1, 1] linearly onto the ratio range [low, high] (fraction removed)."""
    a = min(max(float(action), -1.0), 1.0)
    return low + (a + 1.0) * 0.5 * (high - low)


def ratio_to_action(ratio: float, low: float, high: float) -> float:
    """The action in [-1, 1] that :func:`action_to_ratio` maps onto ``ratio`` (clamped to the range)."""
    if high <= low:
        return -1.0
    return min(max(2.0 * (float(ratio) - low) / (high - low) - 1.0, -1.0), 1.0)


class PruningEnv(gym.Env[np.ndarray, np.ndarray]):
    """AMC's environment over one model and budget (registered as ``autoprune/Pruning-v0``).

    Args:
        task: a built-in task name, ``"package.module:function"``, or an :class:`autoprune.Task`.
            Optional when ``profile`` and ``evaluate_fn`` are given (the search runner's case).
        budget: ``{"flops": 0.5}``, ``"flops=0.5"`` or a :class:`autoprune.Budget`.
        profile: the task's profile, to skip profiling it again (by default its channel groups, or
            for a ``nonzeros``/``size`` budget its weight tensors, unstructured).
        bounds: ratio range per group name (default (0, 0.8) for every group).
        round_to: channel-count multiple of the plans.
        reward: ``"error"`` (AMC's resource-constrained ``-error``) or ``"flops"``
            (``-error * log(MACs)``); error is ``1 - val_score``.
        latency: the latency predictor a ``latency``/``latency_ms`` budget is measured with.
        evaluate_fn: scores an episode's plan (see :data:`EvaluateFn`); by default an
            :class:`autoprune.Evaluator` over ``task`` with the search-space defaults.
        data_root, workdir, pretrained, seed: passed to :func:`autoprune.load_task`.

    Observation: float32 array of shape (11,), the features in :data:`FEATURES`, each in [0, 1].
    Action: float32 array of shape (1,) in [-1, 1]; -1 prunes the group least, +1 most.
    ``info`` of the last step holds ``plan`` (the projected :class:`autoprune.Plan`), ``result``
    (the :class:`autoprune.TrialResult`), ``raw`` (the chosen ratios); or ``stopped=True`` when
    ``evaluate_fn`` returned ``None`` (reward 0), or ``failed=True`` when it raised
    :class:`TrialFailed`.
    """

    metadata: dict[str, Any] = {"render_modes": []}

    def __init__(
        self,
        *,
        task: str | Task | None = None,
        budget: Budget | Mapping[str, float] | str | None = None,
        profile: ModelProfile | None = None,
        bounds: Mapping[str, tuple[float, float]] | None = None,
        round_to: int = 1,
        reward: str = "error",
        evaluate_fn: EvaluateFn | None = None,
        latency: LatencyModel | None = None,
        data_root: str | os.PathLike[str] | None = None,
        workdir: str | os.PathLike[str] | None = None,
        pretrained: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if reward not in REWARDS:
            raise ConfigError(f"PruningEnv reward {reward!r} is not allowed; allowed: {', '.join(REWARDS)}.")
        if budget is None:
            raise ConfigError("PruningEnv needs budget=, e.g. {'flops': 0.5} or 'params=0.4'.")
        self.budget = _as_budget(budget)
        if isinstance(task, str):
            task = load_task(task, data_root=data_root, workdir=workdir, pretrained=pretrained, seed=seed)
        if task is not None and not isinstance(task, Task):
            raise ConfigError(f"PruningEnv task must be a task name or an autoprune.Task, got {type(task).__name__}.")
        if profile is None:
            if task is None:
                raise ConfigError("PruningEnv needs task= (a name or an autoprune.Task) or profile=.")
            # A nonzeros= or size= budget searches weight sparsity: its dimensions are weight tensors.
            profile = profile_weights(task) if self.budget.mode == "sparsity" else profile_model(task)
        if evaluate_fn is None and task is None:
            raise ConfigError("PruningEnv needs task= to evaluate plans, or evaluate_fn=.")
        self.task = task
        self.profile = profile
        self.reward_kind = reward
        self.round_to = round_to
        self.bounds = resolve_bounds(profile, bounds)
        self._seed = seed
        self._evaluate_fn = evaluate_fn
        self._evaluator: Evaluator | None = None

        # The grid refuses a bad round_to and gives the channel options each group may take.
        self.latency = latency
        grid = Grid(profile, self.budget, self.bounds, round_to, latency)
        grid.check_feasible()  # an infeasible budget fails here, before any episode
        self._names = profile.names
        self._dense = grid.dense  # (G,) dense channels per group
        self._low = grid.lo  # (G,) ratio ranges
        self._high = grid.hi
        smallest, _ = grid.lattice.extremes()
        self._max_removed = grid.dense - smallest  # (G,) most channels each group may remove
        self._limit = grid.limit
        # Clipping needs the budget's metric as a function of the (continuous) channels removed: the
        # projection's own cost (MACs, parameters, predicted latency, or in sparsity mode nonzero
        # weights and compressed bytes, all of which take fractional counts).
        cost = grid.cost
        self._metric_cost: Callable[[np.ndarray], float] = lambda removed: cost(self._dense - removed)
        self._steps = [i for i in range(len(self._names)) if self._high[i] > self._low[i]]
        if not self._steps:
            raise ConfigError("PruningEnv has no group to search: every group's ratio range is a single value.")
        self.stepped_names = [self._names[i] for i in self._steps]
        self._static = self._static_features()
        self._rest_macs = np.array(
            [sum(profile.groups[j].macs for j in self._steps[t + 1:]) for t in range(len(self._steps))]
        ) / profile.macs

        self.observation_space = gym.spaces.Box(0.0, 1.0, shape=(len(FEATURES),), dtype=np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, shape=(1,), dtype=np.float32)
        self._ratios = self._low.copy()
        self._t = 0
        self._done = True
        self.episodes = 0  # finished (evaluated or failed) episodes of this env

    # ----------------------------------------------------------------------------------------
    @property
    def steps_per_episode(self) -> int:
        """Number of steps of every episode: one per searched group."""
        return len(self._steps)

    def actions_for(self, ratios: Mapping[str, float]) -> np.ndarray:
        """The actions, one per step (shape (steps,), in [-1, 1]), of an episode that chooses ``ratios``.

        Played as an episode, a plan already on the budget (the uniform or global plan) comes out
        of the clipping and the projection as itself: its ratios meet the budget, so no clipping
        bound exceeds them, and projecting a plan that is tight to the budget leaves it there.
        """
        return np.array([ratio_to_action(ratios[self._names[i]], self._low[i], self._high[i]) for i in self._steps],
                        dtype=np.float32)

    def _static_features(self) -> np.ndarray:
        """(steps, 8): index, channels, in_channels, height, width, stride, kernel, MACs; normalized."""
        groups = [self.profile.groups[i] for i in self._steps]
        n = len(groups)
        columns = [
            [t / (n - 1) if n > 1 else 0.0 for t in range(n)],
            *(_scaled([float(getattr(g, attr)) for g in groups])
              for attr in ("channels", "in_channels", "height", "width", "stride", "kernel_size")),
            [g.macs / self.profile.macs for g in groups],
        ]
        return np.clip(np.array(columns, dtype=np.float64).T, 0.0, 1.0)

    def _removed(self, ratios: np.ndarray) -> np.ndarray:
        """Channels removed per group (G,), continuous: ``ratio * channels``."""
        return ratios * self._dense

    def _observation(self) -> np.ndarray:
        t = self._t
        decided = self._ratios.copy()
        for i in self._steps[t:]:
            decided[i] = 0.0  # the current and later groups have not chosen yet
        removed = (self.profile.macs - self.profile.cost.macs(self._removed(decided))) / self.profile.macs
        previous = self._ratios[self._steps[t - 1]] if t > 0 else 0.0
        obs = np.concatenate([self._static[t], [removed, self._rest_macs[t], previous]])
        return np.clip(obs, 0.0, 1.0).astype(np.float32)

    def min_ratio(self, step: int) -> float:
        """AMC's clipping bound: the smallest ratio of the group at ``step`` after which the budget
        can still be met, with the earlier groups' ratios as chosen and every later group at its
        largest removal. The budget metric falls as the ratio rises, so bisection finds it."""
        i = self._steps[step]
        low, high = float(self._low[i]), float(self._high[i])
        removed_base = self._removed(self._ratios)
        for j in self._steps[step + 1:]:
            removed_base[j] = self._max_removed[j]

        def meets(ratio: float) -> bool:
            removed = removed_base.copy()
            removed[i] = ratio * self._dense[i]
            return self._metric_cost(removed) <= self._limit

        if meets(low):
            return low
        if not meets(high):
            return high  # only channel rounding keeps the budget out of reach; the projection closes it
        lo, hi = low, high
        for _ in range(_BISECTION_STEPS):
            mid = 0.5 * (lo + hi)
            lo, hi = (lo, mid) if meets(mid) else (mid, hi)
        return hi

    # ----------------------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        self._ratios = self._low.copy()
        self._t = 0
        self._done = False
        return self._observation(), {}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        if self._done:
            raise RuntimeError("PruningEnv.step called after the episode ended; call reset() first.")
        value = float(np.asarray(action, dtype=np.float64).reshape(-1)[0])
        if not math.isfinite(value):
            raise ValueError(f"PruningEnv action must be a finite number in [-1, 1], got {value}.")
        i = self._steps[self._t]
        wanted = action_to_ratio(value, self._low[i], self._high[i])
        bound = self.min_ratio(self._t)
        ratio = max(wanted, bound)  # AMC's clipping: the budget must stay reachable
        self._ratios[i] = ratio
        info: dict[str, Any] = {"group": self._names[i], "ratio": ratio, "wanted": wanted, "min_ratio": bound}
        self._t += 1
        if self._t < len(self._steps):
            return self._observation(), 0.0, False, False, info
        self._done = True
        obs = np.zeros(self.observation_space.shape, dtype=np.float32)  # terminal; never acted on
        raw = {self._names[j]: float(self._ratios[j]) for j in self._steps}
        chosen = {name: float(r) for name, r in zip(self._names, self._ratios)}
        plan = project(self.profile, chosen, self.budget, bounds=self.bounds, round_to=self.round_to,
                       provenance={"strategy": "rl"}, latency=self.latency)
        info.update(plan=plan, raw=raw)
        try:
            result = self._evaluate(plan, raw)
        except TrialFailed as exc:
            self.episodes += 1
            info.update(failed=True, error=str(exc))
            return obs, self._reward(0.0, plan.metrics["flops"]), True, False, info
        if result is None:
            info["stopped"] = True
            return obs, 0.0, True, False, info
        self.episodes += 1
        info["result"] = result
        return obs, self._reward(result.val_score, result.macs), True, False, info

    def _reward(self, score: float, macs: float) -> float:
        """AMC's rewards: ``-error`` (resource-constrained) or ``-error * log(MACs)``."""
        error = 1.0 - score
        if self.reward_kind == "flops":
            return float(-error * math.log(max(macs, 1.0)))
        return float(-error)

    def _evaluate(self, plan: Plan, raw: dict[str, float]) -> TrialResult | None:
        if self._evaluate_fn is not None:
            return self._evaluate_fn(plan, raw)
        if self._evaluator is None:
            # Built on first use so that constructing the env (and the checkers) stays cheap.
            ev = EvaluationSettings()
            if self.task is None:  # __init__ refuses this; kept for type checkers
                raise ConfigError("PruningEnv needs task= to evaluate plans, or evaluate_fn=.")
            self._evaluator = Evaluator.from_settings(self.task, ev, seed=self._seed, profile=self.profile,
                                                      latency=self.latency)
        return self._evaluator.evaluate(plan)


def _scaled(values: list[float]) -> list[float]:
    top = max(values) if values else 0.0
    return [v / top if top > 0 else 0.0 for v in values]


def _as_budget(budget: Budget | Mapping[str, float] | str) -> Budget:
    if isinstance(budget, Budget):
        return budget
    if isinstance(budget, str):
        return Budget.parse(budget)
    if isinstance(budget, Mapping):
        return Budget.from_dict(budget)
    raise ConfigError(f"PruningEnv budget must be a Budget, a mapping like {{'flops': 0.5}} or 'flops=0.5'; got {budget!r}.")
