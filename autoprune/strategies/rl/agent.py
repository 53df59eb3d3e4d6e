"""The AMC agent: stable-baselines3 DDPG (or TD3, SAC) acting in :class:`PruningEnv`.

One episode is one trial. The agent follows AMC (He et al., 2018): warm-up episodes of uniformly
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
anything from the workdir, so a file planted there cannot run code.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import uuid
import warnings
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from operator import attrgetter
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from stable_baselines3 import DDPG, SAC, TD3
from stable_baselines3.common.buffers import ReplayBuffer
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.logger import KVWriter, Logger
from stable_baselines3.common.noise import NormalActionNoise
from stable_baselines3.common.off_policy_algorithm import OffPolicyAlgorithm
from stable_baselines3.common.utils import update_learning_rate

from ...errors import CheckpointError, ConfigError
from ...evaluate import TrialResult
from ...plan import Plan
from ...space import AGENTS, RLSettings
from ..base import BaseStrategy, SearchContext
from .env import PruningEnv, TrialFailed

__all__ = ["RLStrategy", "run_agent", "AgentState", "CHECKPOINT_FILE"]

#: The JSON that names the latest checkpoint in a state directory; replaced atomically.
CHECKPOINT_FILE = "rl-agent.json"
# 2: tensors (torch.save, loaded weights-only), arrays (.npz, no pickles) and JSON. 1 was SB3's own
# pickled save (agent.zip, replay_buffer.pkl), which is refused rather than unpickled.
_SCHEMA = "autoprune.rl-agent/2"
# A checkpoint's files: the networks' and optimizers' state dicts; the replay buffer's arrays.
_AGENT_FILE = "agent.pt"
_BUFFER_FILE = "replay_buffer.npz"
_LEGACY_FILES = ("agent.zip", "replay_buffer.pkl")
# The replay buffer's per-slot arrays, saved whole (shape (buffer_size, n_envs, ...)).
_BUFFER_ARRAYS = ("observations", "next_observations", "actions", "rewards", "dones", "timeouts", "complete")
# Effectively "until the callback stops it": the study's trial count ends the search.
_UNBOUNDED_TIMESTEPS = 10**15
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


@dataclass
class AgentState:
    """Progress of an agent across runs; what the checkpoint JSON holds besides SB3's counters.

    Attributes:
        episodes: finished episodes (evaluated or failed trials) the agent has learned from.
        noise_sigma: current standard deviation of the exploration noise, in action units
            (actions span [-1, 1]).
        resumed: whether this run started from a checkpoint.
        stopped: whether the run ended because the search had no trial left.
        best_reward: the highest episode reward seen in this run (``-inf`` before any).
    """

    episodes: int
    noise_sigma: float
    resumed: bool = False
    stopped: bool = False
    best_reward: float = -math.inf


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
) -> AgentState:
    """Train the AMC agent on ``env`` until an episode ends with ``info["stopped"]``.

    Args:
        env: the environment; its ``evaluate_fn`` decides when to stop (returns ``None``).
        settings: the agent's hyperparameters (defaults: :class:`autoprune.space.RLSettings`).
        seed: seeds the networks, the warm-up actions and the noise (SB3 also seeds Python's,
            NumPy's and PyTorch's global generators with it).
        state_dir: where the agent is checkpointed after every episode and resumed from.
        log_metrics: receives the agent's metrics (losses, episode reward, noise) per episode.

    Returns:
        The agent's progress (episodes learned from, noise sigma, whether it resumed).
    """
    settings = settings or RLSettings()
    if settings.agent not in _ALGORITHMS:
        raise ConfigError(f"Unknown RL agent {settings.agent!r}; allowed: {', '.join(AGENTS)}.")
    steps = env.steps_per_episode
    store = _CheckpointStore(Path(state_dir)) if state_dir is not None else None
    loaded = store.load(env, settings, seed) if store is not None else None
    if loaded is not None:
        model, state = loaded
    else:
        model = _new_model(env, settings, seed)
        state = AgentState(episodes=0, noise_sigma=settings.noise_sigma)
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


def _apply_settings(model: OffPolicyAlgorithm, settings: RLSettings) -> None:
    """Settings that may change between runs of one search (a resumed agent takes the new ones)."""
    model.actor_learning_rate = settings.learning_rate_actor  # type: ignore[attr-defined]
    model.critic_learning_rate = settings.learning_rate_critic  # type: ignore[attr-defined]
    model.batch_size = settings.batch_size
    model.tau = settings.tau
    model.gradient_steps = settings.gradient_steps_per_episode


class _CheckpointStore:
    """The agent's checkpoints in a state directory; data only, so loading one never runs code.

    Each checkpoint is a fresh directory holding ``agent.pt`` (``torch.save`` of the policy's state
    dict, which covers the actor, the critic and their targets, of the actor's and critic's
    optimizers and, for SAC, of the entropy coefficient and its optimizer: what SB3's own ``save``
    stores with torch) and ``replay_buffer.npz`` (the replay buffer's arrays, its position and the
    finished-episode mask). The JSON :data:`CHECKPOINT_FILE` names the latest and holds the
    counters (timesteps, gradient updates, episodes, noise sigma, SB3's episode statistics); it is
    replaced atomically (temp file + ``os.replace``) only once the directory is complete, so an
    interruption at any point leaves the previous checkpoint whole.

    Loading builds a fresh agent with :func:`_new_model` and copies the state in after checking it
    against that agent's shapes: tensors are read with ``torch.load(weights_only=True)`` and arrays
    with ``np.load(allow_pickle=False)``, and SB3's pickled files of schema 1 are refused.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.pointer = root / CHECKPOINT_FILE

    def save(self, model: OffPolicyAlgorithm, state: AgentState, settings: RLSettings, steps: int) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        name = f"rl-checkpoint-{state.episodes:06d}-{uuid.uuid4().hex[:8]}"
        target = self.root / name
        partial = self.root / f".{name}.partial"
        partial.mkdir()
        with open(partial / _AGENT_FILE, "wb") as f:
            torch.save(_agent_tensors(model), f)
            _sync(f)
        buffer = _episode_buffer(model)
        with open(partial / _BUFFER_FILE, "wb") as f:
            np.savez(f, allow_pickle=False, **{key: getattr(buffer, key) for key in _BUFFER_ARRAYS},
                     pos=np.asarray(buffer.pos, dtype=np.int64), full=np.asarray(buffer.full, dtype=np.bool_))
            _sync(f)
        os.replace(partial, target)
        meta = {
            "schema": _SCHEMA, "checkpoint": name, "agent": settings.agent, "steps_per_episode": steps,
            # The buffer keeps the capacity it was made with when a later run changes buffer_episodes.
            "buffer_episodes": buffer.buffer_size // steps,
            "episodes": state.episodes, "noise_sigma": state.noise_sigma, "num_timesteps": model.num_timesteps,
            "n_updates": model._n_updates, "episode_num": model._episode_num,
            # SB3's last episodes (Monitor's reward "r", length "l", seconds "t"): rollout/ep_rew_mean
            # goes on averaging over them after a resume.
            "ep_info_buffer": [{str(k): _json_number(v) for k, v in info.items()}
                               for info in model.ep_info_buffer or []],
            "ep_success_buffer": [bool(v) for v in model.ep_success_buffer or []],
        }
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".rl-agent-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(meta, f, indent=2)
            _sync(f)
        os.replace(tmp, self.pointer)
        # Older checkpoints, and leftovers of saves a kill interrupted, are no longer referenced.
        for old in [*self.root.glob("rl-checkpoint-*"), *self.root.glob(".rl-checkpoint-*.partial")]:
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)
        for old in self.root.glob(".rl-agent-*.json"):
            old.unlink(missing_ok=True)

    def clear(self) -> None:
        """Forget every checkpoint (the study they belonged to is gone)."""
        self.pointer.unlink(missing_ok=True)
        for old in [*self.root.glob("rl-checkpoint-*"), *self.root.glob(".rl-checkpoint-*.partial")]:
            shutil.rmtree(old, ignore_errors=True)

    def load(self, env: PruningEnv, settings: RLSettings, seed: int) -> tuple[OffPolicyAlgorithm, AgentState] | None:
        if not self.pointer.is_file():
            return None
        try:
            meta = json.loads(self.pointer.read_text())
            name = str(meta["checkpoint"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise self._unreadable(exc) from None
        if Path(name).name != name or not name.startswith("rl-checkpoint-"):
            raise self._unreadable(f"it names {name!r}, not a checkpoint directory beside it")
        folder = self.root / name
        for legacy in _LEGACY_FILES:
            if (folder / legacy).exists():
                raise self._refused(folder / legacy, "is an older autoprune's pickled SB3 save, which loading "
                                    "would have to unpickle (and so run whatever it holds)")
        if meta.get("schema") != _SCHEMA:
            raise self._refused(self.pointer, f"has schema {meta.get('schema')!r}; this autoprune reads {_SCHEMA!r}")
        try:
            agent, steps = str(meta["agent"]), int(meta["steps_per_episode"])
            episodes, sigma = int(meta["episodes"]), float(meta["noise_sigma"])
            buffer_episodes, timesteps = int(meta["buffer_episodes"]), int(meta["num_timesteps"])
            n_updates, episode_num = int(meta["n_updates"]), int(meta["episode_num"])
            ep_info = [{str(k): _json_number(v) for k, v in dict(info).items()} for info in meta["ep_info_buffer"]]
            ep_success = [_json_bool(v) for v in meta["ep_success_buffer"]]
            if min(episodes, buffer_episodes - 1, timesteps, n_updates, episode_num) < 0 or not sigma >= 0:
                raise ValueError("a counter or the noise sigma is negative")
        except (ValueError, KeyError, TypeError) as exc:
            raise self._unreadable(exc) from None
        if agent != settings.agent:
            raise ConfigError(
                f"This study's RL agent is {agent!r} (checkpoint {self.pointer}), but the settings ask for "
                f"{settings.agent!r}; resume with strategy.rl.agent: {agent}, or start a new --study."
            )
        if steps != env.steps_per_episode:
            raise CheckpointError(
                f"The RL checkpoint {self.pointer} was made for {steps} steps per episode, this search has "
                f"{env.steps_per_episode}; start a new --study."
            )
        if not (folder / _AGENT_FILE).is_file() or not (folder / _BUFFER_FILE).is_file():
            raise CheckpointError(f"The RL checkpoint {folder} is incomplete; delete {self.root} to start afresh.")
        # A fresh agent (networks, optimizers, an empty buffer of the checkpoint's capacity) whose
        # shapes the saved state must match; the state is copied into it, nothing is unpickled.
        model = _new_model(env, settings.model_copy(update={"buffer_episodes": buffer_episodes}), seed)
        self._load_agent(folder / _AGENT_FILE, model)
        buffer = _episode_buffer(model)
        self._load_buffer(folder / _BUFFER_FILE, buffer)
        buffer.open_episode = []  # a stopped run's unfinished episode stays unsampled
        model.num_timesteps, model._n_updates, model._episode_num = timesteps, n_updates, episode_num
        # learn(reset_num_timesteps=False) keeps these instead of starting empty ones.
        model.ep_info_buffer = deque(ep_info, maxlen=model._stats_window_size)
        model.ep_success_buffer = deque(ep_success, maxlen=model._stats_window_size)
        # Warm-up counts episodes, and a stopped run's partial episode advanced the timestep count:
        # the random phase lasts for the warm-up episodes this agent has not played yet.
        model.learning_starts = max(0, settings.warmup_episodes - episodes) * steps + model.num_timesteps
        if model.action_noise is not None:
            model.action_noise = NormalActionNoise(mean=np.zeros(1), sigma=np.full(1, sigma))
        # A resumed run must not replay the random stream the first run already used.
        model.set_random_seed(seed + episodes)
        return model, AgentState(episodes=episodes, noise_sigma=sigma, resumed=True)

    def _load_agent(self, path: Path, model: OffPolicyAlgorithm) -> None:
        """Copy ``agent.pt``'s state dicts into ``model``, after checking them against its own."""
        try:
            with warnings.catch_warnings():
                # torch's note on a raw pickle's protocol; such a file is refused below anyway.
                warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
                # Tensors, dicts, lists and numbers only: a pickled object of any other class is refused.
                saved = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # whatever an untrusted file makes the loader raise, it is not loaded
            raise self._refused(path, f"does not load as plain tensors ({type(exc).__name__})") from None
        fresh = _agent_tensors(model)
        if not isinstance(saved, dict) or set(saved) != set(fresh):
            keys = sorted(map(str, saved)) if isinstance(saved, dict) else type(saved).__name__
            raise self._mismatch(path, f"holds {keys}, this agent has {sorted(fresh)}")
        for key, reference in fresh.items():
            if isinstance(reference, torch.Tensor):
                _check_tensor(saved[key], reference, lambda why, key=key: self._mismatch(path, f"{key}: {why}"))
            elif key == "policy":
                _check_state_dict(saved[key], reference, lambda why: self._mismatch(path, f"policy {why}"))
            else:
                _check_optimizer(saved[key], attrgetter(key)(model),
                                 lambda why, key=key: self._mismatch(path, f"{key} {why}"))
        try:
            model.set_parameters({key: saved[key] for key in model.get_parameters()}, exact_match=True, device="cpu")
            if "log_ent_coef" in saved:
                with torch.no_grad():  # in place: SAC's entropy optimizer holds this very tensor
                    model.log_ent_coef.copy_(saved["log_ent_coef"])  # type: ignore[attr-defined]
        except (RuntimeError, ValueError, KeyError, TypeError) as exc:
            raise self._mismatch(path, str(exc)) from None

    def _load_buffer(self, path: Path, buffer: _EpisodeBuffer) -> None:
        """Copy ``replay_buffer.npz``'s arrays into ``buffer``, after checking their shapes and dtypes."""
        try:
            archive = np.load(path, allow_pickle=False)
            if not isinstance(archive, np.lib.npyio.NpzFile):
                raise TypeError("not an .npz archive")
            with archive:
                # Reading an array of Python objects raises here instead of unpickling it.
                arrays = {key: archive[key] for key in archive.files}
        except Exception as exc:  # whatever an untrusted file makes the loader raise, it is not loaded
            raise self._refused(path, f"does not load as plain arrays ({type(exc).__name__})") from None
        expected = {*_BUFFER_ARRAYS, "pos", "full"}
        if set(arrays) != expected:
            raise self._mismatch(path, f"holds {sorted(arrays)}, a replay buffer has {sorted(expected)}")
        for key in _BUFFER_ARRAYS:
            mine, theirs = getattr(buffer, key), arrays[key]
            if theirs.shape != mine.shape or theirs.dtype != mine.dtype:
                raise self._mismatch(path, f"{key} is {theirs.dtype}{list(theirs.shape)}, this agent's replay "
                                     f"buffer has {mine.dtype}{list(mine.shape)}")
        pos, full = arrays["pos"], arrays["full"]
        if pos.shape != () or pos.dtype.kind not in "iu" or not 0 <= int(pos) < buffer.buffer_size:
            raise self._mismatch(path, f"pos is {pos!r}, not a slot of a buffer of {buffer.buffer_size}")
        if full.shape != () or full.dtype != np.bool_:
            raise self._mismatch(path, f"full is {full!r}, not a boolean")
        for key in _BUFFER_ARRAYS:
            np.copyto(getattr(buffer, key), arrays[key])
        buffer.pos, buffer.full = int(pos), bool(full)

    def _unreadable(self, why: object) -> CheckpointError:
        return CheckpointError(
            f"The RL agent's checkpoint {self.pointer} is unreadable ({why}); delete {self.root} to "
            "start the agent afresh (the study's finished trials are kept)."
        )

    def _refused(self, path: Path, why: str) -> CheckpointError:
        return CheckpointError(
            f"The RL agent's checkpoint file {path} {why}; it is not loaded, and never unpickled. Delete "
            f"{self.root} to start the agent afresh (the study's finished trials are kept)."
        )

    def _mismatch(self, path: Path, why: str) -> CheckpointError:
        return CheckpointError(
            f"The RL agent's checkpoint file {path} does not fit this agent ({why}); delete {self.root} to "
            "start the agent afresh (the study's finished trials are kept)."
        )


def _episode_buffer(model: OffPolicyAlgorithm) -> _EpisodeBuffer:
    buffer = model.replay_buffer
    assert isinstance(buffer, _EpisodeBuffer), "_new_model builds every agent with an _EpisodeBuffer"
    return buffer


def _agent_tensors(model: OffPolicyAlgorithm) -> dict[str, Any]:
    """What SB3's own ``save`` writes with torch, keyed by SB3's names.

    ``get_parameters`` gives the state dicts of ``policy`` (actor, critic, targets),
    ``actor.optimizer``, ``critic.optimizer`` and SAC's ``ent_coef_optimizer``; SAC's learned
    ``log_ent_coef`` is a bare tensor beside them (a fixed entropy coefficient comes from the
    settings, so a fresh agent already has it). The rest of SB3's pickled ``data`` is rebuilt by
    :func:`_new_model` or held in the pointer JSON.
    """
    tensors: dict[str, Any] = dict(model.get_parameters())
    if getattr(model, "ent_coef_optimizer", None) is not None:
        tensors["log_ent_coef"] = model.log_ent_coef.detach()  # type: ignore[attr-defined]
    return tensors


def _check_tensor(saved: object, reference: torch.Tensor, fail: Callable[[str], CheckpointError]) -> None:
    if not isinstance(saved, torch.Tensor):
        raise fail(f"is a {type(saved).__name__}, not a tensor")
    if saved.shape != reference.shape or saved.dtype != reference.dtype:
        raise fail(f"is {saved.dtype}{list(saved.shape)}, this agent's is {reference.dtype}{list(reference.shape)}")


def _check_state_dict(saved: object, reference: Mapping[str, torch.Tensor],
                      fail: Callable[[str], CheckpointError]) -> None:
    """``saved`` has exactly ``reference``'s keys, each a tensor of its shape and dtype."""
    if not isinstance(saved, Mapping) or set(saved) != set(reference):
        theirs = sorted(map(str, saved)) if isinstance(saved, Mapping) else type(saved).__name__
        raise fail(f"holds {theirs}, this agent's has {sorted(reference)}")
    for key, tensor in reference.items():
        _check_tensor(saved[key], tensor, lambda why, key=key: fail(f"{key} {why}"))


def _check_optimizer(saved: object, optimizer: torch.optim.Optimizer, fail: Callable[[str], CheckpointError]) -> None:
    """``saved`` is a state dict of ``optimizer``: the same parameter groups, moments of each parameter's shape."""
    fresh_groups = optimizer.state_dict()["param_groups"]
    if not isinstance(saved, Mapping) or set(saved) != {"state", "param_groups"}:
        raise fail("is not an optimizer state dict")
    groups, state = saved["param_groups"], saved["state"]
    if (not isinstance(groups, list) or len(groups) != len(fresh_groups)
            or any(not isinstance(g, Mapping) or g.get("params") != f["params"] for g, f in zip(groups, fresh_groups))):
        raise fail("has other parameter groups than this agent's")
    # The state dict numbers the parameters; the live groups hold them in the same order.
    shapes = {index: param.shape for live, fresh in zip(optimizer.param_groups, fresh_groups)
              for index, param in zip(fresh["params"], live["params"])}
    if not isinstance(state, Mapping) or not set(state) <= set(shapes):
        raise fail("has state for parameters this agent does not have")
    for index, entry in state.items():
        if not isinstance(entry, Mapping):
            raise fail(f"state of parameter {index} is not a dict")
        for key, value in entry.items():
            # Adam keeps its step count as a scalar and its moments in the parameter's shape.
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != shapes[index]:
                raise fail(f"{key} of parameter {index} is {list(value.shape)}, the parameter "
                           f"{list(shapes[index])}")


def _json_number(value: object) -> int | float:
    """A finite-or-not JSON number (SB3's episode statistics); bools and strings are refused."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{value!r} is not a number")
    return int(value) if isinstance(value, (int, np.integer)) else float(value)


def _json_bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{value!r} is not a boolean")
    return value


def _sync(f: Any) -> None:
    """Flush ``f`` to disk: the pointer must never name a checkpoint whose files a crash could lose."""
    f.flush()
    os.fsync(f.fileno())


class RLStrategy(BaseStrategy):
    """AMC: an RL agent proposes per-group ratios layer by layer (He et al., 2018).

    Each episode walks the searched groups in network order; the chosen ratios (after AMC's
    action clipping) are recorded as the trial's parameters, projected onto the budget and
    evaluated by the search like any other trial; the reward is ``-error`` (or
    ``-error * log(MACs)`` with ``reward: flops``). Settings: :class:`autoprune.space.RLSettings`
    (``strategy.rl`` in a search space); ``noise_sigma``/``noise_decay`` drive DDPG's and TD3's
    exploration, SAC explores through its entropy bonus instead.
    """

    name: ClassVar[str] = "rl"

    def __init__(self, settings: RLSettings | None = None) -> None:
        if settings is not None and not isinstance(settings, RLSettings):
            raise ConfigError(f"RLStrategy takes RLSettings (strategy.rl), got {type(settings).__name__}.")
        self.settings = settings or RLSettings()

    def search(self, context: SearchContext) -> None:
        env = PruningEnv(
            profile=context.profile, budget=context.budget, bounds=context.bounds, round_to=context.round_to,
            reward=self.settings.reward, evaluate_fn=_trial_runner(context), latency=context.latency,
        )
        if not context.study.get_trials(deepcopy=False):
            # A new study: a checkpoint under its name belongs to a deleted study of the same name.
            _CheckpointStore(context.state_dir).clear()
        run_agent(env, self.settings, seed=context.seed, state_dir=context.state_dir,
                  log_metrics=context.log_metrics)


def _trial_runner(context: SearchContext) -> Callable[[Plan, dict[str, float]], TrialResult | None]:
    """The env's ``evaluate_fn``: one episode's plan becomes one trial of the search."""

    def evaluate(plan: Plan, raw: dict[str, float]) -> TrialResult | None:
        # The agent's ratios are the trial's parameters; the plan is what gets evaluated.
        trial = context.ask(fixed_params={name: raw[name] for name in context.dimensions})
        if trial is None:
            return None
        outcome = context.run_trial(trial, plan=plan, raw=raw)
        if outcome is None:
            raise TrialFailed(f"trial {trial.number} failed; see its MLflow run")
        return outcome.result

    return evaluate
