"""The AMC agent: stable-baselines3 DDPG (or TD3, SAC) acting in :class:`PruningEnv`.

One episode is one trial. The agent follows AMC (He et al., 2018): after the baseline plans,
played as the first episodes (not AMC's: see :class:`RLStrategy`), warm-up episodes of uniformly
random actions fill the replay buffer, then the actor acts with Gaussian exploration noise whose
sigma decays by ``noise_decay`` after every episode; targets follow the networks by soft updates
``tau``; training happens once per episode, ``gradient_steps_per_episode`` minibatch steps of
``batch_size`` transitions. The actor and critic have their own learning rates (AMC: 1e-4 and
1e-3), which SB3 would otherwise share.

The environment pays the reward only at an episode's last step. As in AMC's own code, the replay
buffer stores every step of the episode with that final reward and the critic bootstraps with
discount 1, so a step's value is the final reward times the steps left in the episode: each
action gets the plan's outcome as a direct signal. On digits-cnn this found plans several
times closer to a known optimum than storing the 0 rewards of the intermediate steps, in the
same number of episodes.

The number of finished trials in the study decides when the search ends, not the agent's
timesteps: the environment ends an episode with ``info["stopped"]`` when the search context has
no trial left, and a callback stops ``learn`` there (before that transition is stored).

After every episode the agent, its replay buffer and a small JSON (episodes, noise sigma) are
checkpointed into the study's state directory, so a search interrupted and started again with the
same study continues with the same agent instead of a fresh one. The checkpoint is data only
(tensors, arrays, JSON): resuming builds a fresh agent and copies the state in, and never unpickles
anything from the workdir, so a file planted there cannot run code (``_checkpoint.py``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from optuna.trial import TrialState
from stable_baselines3 import DDPG, SAC, TD3
from stable_baselines3.common.buffers import ReplayBuffer
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.logger import KVWriter, Logger
from stable_baselines3.common.noise import NormalActionNoise
from stable_baselines3.common.off_policy_algorithm import OffPolicyAlgorithm
from stable_baselines3.common.utils import update_learning_rate

from ...errors import ConfigError
from ...evaluate import TrialResult
from ...plan import Plan
from ...space import AGENTS, RLSettings
from ...study import mark_baseline, stored_trials
from ..base import BaseStrategy, SearchContext
from ._checkpoint import CHECKPOINT_FILE, AgentState, ModelFactory, _CheckpointStore
from .env import PruningEnv, TrialFailed

__all__ = ["RLStrategy", "run_agent", "AgentState", "CHECKPOINT_FILE"]

# Effectively "until the callback stops it": the study's trial count ends the search.
_UNBOUNDED_TIMESTEPS = 10**15
#: Episodes in a row that may repeat an evaluated plan without using a trial (see _TrialRunner).
MAX_FREE_REPEATS = 50
# AMC's networks have 300/400 hidden units; 64x64 learns these 11-feature embeddings as well and
# keeps the per-episode gradient steps cheap on a CPU.
_HIDDEN = [64, 64]

MetricsFn = Callable[[Mapping[str, float], int], None]


class _AMCAlgorithm:
    """Mixin over SB3's algorithms: separate actor/critic learning rates, single-threaded updates.

    SB3 updates every optimizer from one schedule at each ``train``; the override of
    ``_update_learning_rate`` keeps AMC's two rates apart (SAC's entropy coefficient follows the
    critic's rate).
    """

    actor_learning_rate: float
    critic_learning_rate: float
    # Episodes whose actions are given, played first (see run_agent): one (steps,) array each,
    # indexed by the episodes already finished, so a resumed agent goes on where it stopped.
    demonstrations: Sequence[np.ndarray] = ()
    agent_state: AgentState | None = None
    demonstration_step = 0

    def _sample_action(self, learning_starts: int, action_noise: Any = None,
                       n_envs: int = 1) -> tuple[np.ndarray, np.ndarray]:
        episode = self.agent_state.episodes if self.agent_state is not None else len(self.demonstrations)
        if episode < len(self.demonstrations):
            # The action space is [-1, 1], so the action stepped and the one stored are the same.
            action = np.full((n_envs, 1), self.demonstrations[episode][self.demonstration_step], dtype=np.float32)
            self.demonstration_step += 1
            return action, action
        return super()._sample_action(learning_starts, action_noise, n_envs)  # type: ignore[misc]

    def train(self, gradient_steps: int, batch_size: int = 100) -> None:
        # The networks are tiny: several intra-op threads cost more in synchronization than they
        # compute, and the search's thread setting is sized for the candidate evaluations.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            super().train(gradient_steps, batch_size)  # type: ignore[misc]
        finally:
            torch.set_num_threads(threads)

    def _update_learning_rate(self, optimizers: list[torch.optim.Optimizer] | torch.optim.Optimizer) -> None:
        self.logger.record("train/learning_rate_actor", self.actor_learning_rate)  # type: ignore[attr-defined]
        self.logger.record("train/learning_rate_critic", self.critic_learning_rate)  # type: ignore[attr-defined]
        for optimizer in optimizers if isinstance(optimizers, list) else [optimizers]:
            actor = optimizer is self.actor.optimizer  # type: ignore[attr-defined]
            update_learning_rate(optimizer, self.actor_learning_rate if actor else self.critic_learning_rate)


class _DDPG(_AMCAlgorithm, DDPG):
    pass


class _TD3(_AMCAlgorithm, TD3):
    pass


class _SAC(_AMCAlgorithm, SAC):
    pass


class _EpisodeBuffer(ReplayBuffer):
    """SB3's replay buffer, with AMC's episode bookkeeping.

    AMC credits the episode's final reward to every transition of the episode (the reward
    arrives only once the whole plan is known), which gives each step's action a direct signal
    instead of one that must be bootstrapped back through the episode. Transitions of an
    episode that never finished (the search stopped in it) are never sampled.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.complete = np.zeros(self.buffer_size, dtype=bool)  # slot holds a finished episode's step
        self.open_episode: list[int] = []  # slots of the episode being played

    def add(self, obs: np.ndarray, next_obs: np.ndarray, action: np.ndarray, reward: np.ndarray,
            done: np.ndarray, infos: list[dict[str, Any]]) -> None:
        slot = self.pos
        super().add(obs, next_obs, action, reward, done, infos)
        self.complete[slot] = False
        self.open_episode.append(slot)
        if bool(np.asarray(done).reshape(-1)[0]):
            final = float(np.asarray(reward).reshape(-1)[0])
            for p in self.open_episode:
                self.rewards[p] = final
                self.complete[p] = True
            self.open_episode = []

    def sample(self, batch_size: int, env: Any = None) -> Any:
        upper = self.buffer_size if self.full else self.pos
        valid = np.flatnonzero(self.complete[:upper])
        if valid.size == 0:
            return super().sample(batch_size, env)
        return self._get_samples(valid[np.random.randint(0, valid.size, size=batch_size)], env=env)


_ALGORITHMS: dict[str, type[OffPolicyAlgorithm]] = {"ddpg": _DDPG, "td3": _TD3, "sac": _SAC}


class _MetricsWriter(KVWriter):
    """Forwards SB3's numeric log values to the search's parent run, once per episode.

    Keys are SB3's with an ``agent/`` prefix: ``agent/train/actor_loss``,
    ``agent/train/critic_loss``, ``agent/rollout/ep_rew_mean``, ``agent/episode/reward``,
    ``agent/episode/noise_sigma``...
    """

    def __init__(self, log_metrics: MetricsFn, state: AgentState) -> None:
        self._log = log_metrics
        self._state = state

    def write(self, key_values: dict[str, Any], key_excluded: dict[str, tuple[str, ...]], step: int = 0) -> None:
        numeric = {
            f"agent/{key}": float(value) for key, value in key_values.items()
            if isinstance(value, (int, float, np.number)) and not isinstance(value, bool)
            and math.isfinite(float(value)) and not key.startswith("time/")  # wall-clock noise; steps are episodes
        }
        if numeric:
            # SB3's step is its timestep count; the search's metrics are indexed by episode.
            self._log(numeric, self._state.episodes)

    def close(self) -> None:
        pass


class _EpisodeCallback(BaseCallback):
    """Counts episodes, decays the exploration noise, checkpoints, and stops at the search's end."""

    def __init__(
        self,
        state: AgentState,
        settings: RLSettings,
        *,
        checkpoint: Callable[[], None] | None,
    ) -> None:
        super().__init__()
        self.state = state
        self.settings = settings
        self._checkpoint = checkpoint
        self._saved_updates = -1

    def _on_step(self) -> bool:
        info = self.locals["infos"][0]
        if info.get("stopped"):
            self.state.stopped = True
            return False  # SB3 returns before storing this transition: it was never a trial
        if not self.locals["dones"][0]:
            return True
        reward = float(self.locals["rewards"][0])
        self.state.episodes += 1
        self.model.demonstration_step = 0  # type: ignore[attr-defined]
        self.state.best_reward = max(self.state.best_reward, reward)
        # Recorded into SB3's logger, which writes them with its own values right after this step.
        self.logger.record("episode/reward", reward)
        self.logger.record("episode/failed", float(bool(info.get("failed"))))
        noise = self.model.action_noise
        if isinstance(noise, NormalActionNoise):  # SAC has none
            # AMC decays the exploration noise after every episode past the warm-up.
            if self.state.episodes > self.settings.warmup_episodes:
                self.state.noise_sigma *= self.settings.noise_decay
            noise._sigma = np.full_like(noise._sigma, self.state.noise_sigma)
            self.logger.record("episode/noise_sigma", self.state.noise_sigma)
        return True

    def _on_training_start(self) -> None:
        self._saved_updates = self.model._n_updates  # a loaded checkpoint is already saved

    def _on_rollout_end(self) -> None:
        # One rollout is one episode: its transitions are in the buffer, so the trial the
        # episode produced is never lost to an interruption after this point.
        self._save()

    def _on_training_end(self) -> None:
        # The gradient steps after the last rollout are not in any checkpoint yet.
        if self.model._n_updates != self._saved_updates:
            self._save()

    def _save(self) -> None:
        if self._checkpoint is not None:
            self._checkpoint()
            self._saved_updates = self.model._n_updates


def run_agent(
    env: PruningEnv,
    settings: RLSettings | None = None,
    *,
    seed: int = 0,
    state_dir: str | os.PathLike[str] | None = None,
    log_metrics: MetricsFn | None = None,
    demonstrations: Sequence[np.ndarray] = (),
) -> AgentState:
    """Train the AMC agent on ``env`` until an episode ends with ``info["stopped"]``.

    Args:
        env: the environment; its ``evaluate_fn`` decides when to stop (returns ``None``).
        settings: the agent's hyperparameters (defaults: :class:`autoprune.space.RLSettings`).
        seed: seeds the networks, the warm-up actions and the noise (SB3 also seeds Python's,
            NumPy's and PyTorch's global generators with it).
        state_dir: where the agent is checkpointed after every episode and resumed from.
        log_metrics: receives the agent's metrics (losses, episode reward, noise) per episode.
        demonstrations: the actions of the first episodes, one array of shape (steps,) in [-1, 1]
            each (:meth:`PruningEnv.actions_for` of the baseline plans): played instead of the
            agent's own, stored in the replay buffer like any episode, before the warm-up's random
            ones. A resumed agent skips those it has played.

    Returns:
        The agent's progress (episodes learned from, noise sigma, whether it resumed).
    """
    settings = settings or RLSettings()
    if settings.agent not in _ALGORITHMS:
        raise ConfigError(f"Unknown RL agent {settings.agent!r}; allowed: {', '.join(AGENTS)}.")
    steps = env.steps_per_episode
    store = _CheckpointStore(Path(state_dir)) if state_dir is not None else None
    loaded = store.load(_model_factory(env, settings, seed), settings, steps, seed) if store is not None else None
    if loaded is not None:
        model, state = loaded
    else:
        model = _new_model(env, settings, seed)
        state = AgentState(episodes=0, noise_sigma=settings.noise_sigma)
    model.demonstrations = [np.asarray(a, dtype=np.float32).reshape(steps) for a in demonstrations]  # type: ignore[attr-defined]
    model.agent_state = state  # type: ignore[attr-defined]
    model.demonstration_step = 0  # type: ignore[attr-defined]
    writers: list[KVWriter] = [_MetricsWriter(log_metrics, state)] if log_metrics is not None else []
    model.set_logger(Logger(folder=None, output_formats=writers))
    checkpoint = (lambda: store.save(model, state, settings, steps)) if store is not None else None
    callback = _EpisodeCallback(state, settings, checkpoint=checkpoint)
    model.learn(
        total_timesteps=_UNBOUNDED_TIMESTEPS, callback=callback, log_interval=1,
        reset_num_timesteps=loaded is None,
    )
    return state


def _new_model(env: PruningEnv, settings: RLSettings, seed: int) -> OffPolicyAlgorithm:
    steps = env.steps_per_episode
    kwargs: dict[str, Any] = dict(
        learning_rate=settings.learning_rate_critic,
        buffer_size=settings.buffer_episodes * steps,
        learning_starts=settings.warmup_episodes * steps,
        batch_size=settings.batch_size,
        tau=settings.tau,
        gamma=1.0,
        train_freq=(1, "episode"),
        gradient_steps=settings.gradient_steps_per_episode,
        policy_kwargs={"net_arch": list(_HIDDEN)},
        replay_buffer_class=_EpisodeBuffer,
        seed=seed,
        device="cpu",
        verbose=0,
    )
    if settings.agent != "sac":
        # SAC explores through its entropy bonus; the deterministic actors need AMC's noise.
        kwargs["action_noise"] = NormalActionNoise(mean=np.zeros(1), sigma=np.full(1, settings.noise_sigma))
    model = _ALGORITHMS[settings.agent]("MlpPolicy", env, **kwargs)
    _apply_settings(model, settings)
    return model


def _model_factory(env: PruningEnv, settings: RLSettings, seed: int) -> ModelFactory:
    """Fresh agents for ``env`` with ``settings``, but a replay buffer of the given episodes.

    What a checkpoint is restored into: its networks, optimizers and empty buffer (of the
    checkpoint's capacity, which a later run's ``buffer_episodes`` does not change) have the shapes
    the saved state must match.
    """

    def make_model(buffer_episodes: int) -> OffPolicyAlgorithm:
        return _new_model(env, settings.model_copy(update={"buffer_episodes": buffer_episodes}), seed)

    return make_model


def _apply_settings(model: OffPolicyAlgorithm, settings: RLSettings) -> None:
    """Settings that may change between runs of one search (a resumed agent takes the new ones)."""
    model.actor_learning_rate = settings.learning_rate_actor  # type: ignore[attr-defined]
    model.critic_learning_rate = settings.learning_rate_critic  # type: ignore[attr-defined]
    model.batch_size = settings.batch_size
    model.tau = settings.tau
    model.gradient_steps = settings.gradient_steps_per_episode


class RLStrategy(BaseStrategy):
    """AMC: an RL agent proposes per-group ratios layer by layer (He et al., 2018).

    Each episode walks the searched groups in network order; the chosen ratios (after AMC's
    action clipping) are recorded as the trial's parameters, projected onto the budget and
    evaluated by the search like any other trial; the reward is ``-error`` (or
    ``-error * log(MACs)`` with ``reward: flops``). Settings: :class:`autoprune.space.RLSettings`
    (``strategy.rl`` in a search space); ``noise_sigma``/``noise_decay`` drive DDPG's and TD3's
    exploration, SAC explores through its entropy bonus instead.

    With ``start_from_baselines`` (the default) the first episodes play the baseline plans
    (uniform, global; LAMP in sparsity mode), as an Optuna study's first trials are those plans:
    the agent's replay buffer starts with them and the search's best can only match or beat them.

    An episode whose plan the study has already evaluated gets the stored result and uses no
    trial (see :class:`_TrialRunner`): the agent plays more episodes than the search has trials,
    and ``agent/repeated_plans`` on the parent run counts the difference.
    """

    name: ClassVar[str] = "rl"
    # One agent learns from every episode in order; a second process would train another agent.
    supports_workers: ClassVar[bool] = False

    def __init__(self, settings: RLSettings | None = None) -> None:
        if settings is not None and not isinstance(settings, RLSettings):
            raise ConfigError(f"RLStrategy takes RLSettings (strategy.rl), got {type(settings).__name__}.")
        self.settings = settings or RLSettings()

    def search(self, context: SearchContext) -> None:
        runner = _TrialRunner(context)
        env = PruningEnv(
            profile=context.profile, budget=context.budget, bounds=context.bounds, round_to=context.round_to,
            reward=self.settings.reward, evaluate_fn=runner, latency=context.latency,
        )
        if context.is_new_study:
            # This process created the study: a checkpoint under its name belongs to a deleted
            # study of the same name. A resumed study keeps its agent.
            _CheckpointStore(context.state_dir).clear()
        demonstrations = ([env.actions_for(plan.ratios) for plan in context.baselines.values()]
                          if self.settings.start_from_baselines else [])
        state = run_agent(env, self.settings, seed=context.seed, state_dir=context.state_dir,
                          log_metrics=context.log_metrics, demonstrations=demonstrations)
        context.log_metrics({"agent/repeated_plans": float(runner.repeats)}, step=state.episodes)


class _TrialRunner:
    """The env's ``evaluate_fn``: one episode's plan becomes one trial of the search.

    AMC's clipping and the projection onto the budget map many action sequences onto one plan (at
    MACs 0.2 on cifar10-resnet20, 26 to 50 of DDPG's 100 trials were plans it had already tried).
    A plan the study has already evaluated is not evaluated again: the episode gets the stored
    result as its reward and uses no trial, so the trials go to distinct candidates. After
    ``MAX_FREE_REPEATS`` such episodes in a row (a policy that has stopped exploring) the next
    repeat is run as a trial, so that the search still ends.

    Attributes:
        repeats: episodes answered from the study in this run.
    """

    def __init__(self, context: SearchContext) -> None:
        self.context = context
        self.repeats = 0
        self._in_a_row = 0
        finished = stored_trials(context.study, states=(TrialState.COMPLETE, TrialState.PRUNED))
        self._known: dict[tuple[Any, ...], TrialResult] = {
            _plan_key(t.plan): t.result for t in finished if t.plan is not None and t.result is not None}

    def __call__(self, plan: Plan, raw: dict[str, float]) -> TrialResult | None:
        key = _plan_key(plan)
        known = self._known.get(key)
        if known is not None and self._in_a_row < MAX_FREE_REPEATS and self.context.trials_left():
            self._in_a_row += 1
            self.repeats += 1
            return known
        self._in_a_row = 0
        # The agent's ratios are the trial's parameters; the plan is what gets evaluated.
        trial = self.context.ask(fixed_params={name: raw[name] for name in self.context.dimensions})
        if trial is None:
            return None
        label = next((name for name, baseline in self.context.baselines.items()
                      if _plan_key(baseline) == key), None)
        if label is not None:
            # The summary and the export compare with the baselines' trials, as in an Optuna study.
            mark_baseline(trial, label)
        outcome = self.context.run_trial(trial, plan=plan, raw=raw)
        if outcome is None:
            raise TrialFailed(f"trial {trial.number} failed; see its MLflow run")
        self._known[key] = outcome.result
        return outcome.result


def _plan_key(plan: Plan) -> tuple[Any, ...]:
    """What makes two plans the same candidate: the mode and every group's kept count."""
    return (plan.mode, tuple(sorted(plan.kept.items())))
