"""The RL agent's checkpoints: data only (tensors, arrays, JSON), so loading one never runs code.

:class:`_CheckpointStore` saves an SB3 agent and its replay buffer into a study's state directory
after every episode, and loads the latest back into a fresh agent that the caller builds (agent.py
passes a factory over its ``_new_model``; this module does not import agent.py). Loading reads the
pointer JSON into a checked :class:`_CheckpointMeta` first, then :meth:`_CheckpointStore._restore`
copies the saved state, checked against the fresh agent's shapes, into that agent.
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
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from stable_baselines3.common.buffers import ReplayBuffer
from stable_baselines3.common.noise import NormalActionNoise
from stable_baselines3.common.off_policy_algorithm import OffPolicyAlgorithm

from ...errors import CheckpointError, ConfigError
from ...space import RLSettings

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

#: Builds a fresh agent whose replay buffer holds the given number of episodes (the checkpoint's
#: capacity), with the search's other settings; the saved state is copied into it.
ModelFactory = Callable[[int], OffPolicyAlgorithm]


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


@dataclass(frozen=True)
class _CheckpointMeta:
    """The pointer JSON of a checkpoint, read and checked field by field (nothing here is trusted
    beyond these types and signs).

    Attributes:
        schema: always ``_SCHEMA`` (another schema is refused before the fields are read).
        checkpoint: the checkpoint directory's name, beside the pointer (``rl-checkpoint-...``).
        agent: the SB3 algorithm that made it (``ddpg``, ``td3``, ``sac``).
        steps_per_episode: the environment's steps per episode (searched groups).
        buffer_episodes: the saved replay buffer's capacity, in episodes (>= 1).
        episodes: finished episodes the agent had learned from.
        noise_sigma: the exploration noise's standard deviation, in action units (>= 0).
        num_timesteps: SB3's timestep count (environment steps, a stopped partial episode's included).
        n_updates: SB3's count of gradient updates.
        episode_num: SB3's episode count.
        ep_info_buffer: SB3's last episodes' statistics (Monitor's reward "r", length "l", seconds "t").
        ep_success_buffer: SB3's last episodes' success flags.
    """

    schema: str
    checkpoint: str
    agent: str
    steps_per_episode: int
    buffer_episodes: int
    episodes: int
    noise_sigma: float
    num_timesteps: int
    n_updates: int
    episode_num: int
    ep_info_buffer: tuple[dict[str, int | float], ...]
    ep_success_buffer: tuple[bool, ...]


@runtime_checkable
class _EpisodeSlots(Protocol):
    """What a checkpoint uses of agent.py's ``_EpisodeBuffer`` besides the arrays it reads by name
    (``_BUFFER_ARRAYS``); a protocol because this module does not import agent.py."""

    buffer_size: int
    pos: int
    full: bool
    complete: np.ndarray
    open_episode: list[int]


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

    Loading builds a fresh agent with the caller's :data:`ModelFactory` (agent.py's ``_new_model``)
    and copies the state in after checking it against that agent's shapes: tensors are read with
    ``torch.load(weights_only=True)`` and arrays with ``np.load(allow_pickle=False)``, and SB3's
    pickled files of schema 1 are refused.
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

    def load(self, make_model: ModelFactory, settings: RLSettings, steps_per_episode: int,
             seed: int) -> tuple[OffPolicyAlgorithm, AgentState] | None:
        """The latest checkpoint restored into a fresh agent, and its progress; None without one.

        Args:
            make_model: builds the fresh agent for a replay buffer of the checkpoint's capacity.
            settings: this run's settings (the agent must be the checkpoint's).
            steps_per_episode: this search's steps per episode (must be the checkpoint's).
            seed: the search's seed; the resumed agent reseeds from it and its episode count.
        """
        meta = self._read_meta()
        if meta is None:
            return None
        if meta.agent != settings.agent:
            raise ConfigError(
                f"This study's RL agent is {meta.agent!r} (checkpoint {self.pointer}), but the settings ask for "
                f"{settings.agent!r}; resume with strategy.rl.agent: {meta.agent}, or start a new --study."
            )
        if meta.steps_per_episode != steps_per_episode:
            raise CheckpointError(
                f"The RL checkpoint {self.pointer} was made for {meta.steps_per_episode} steps per episode, "
                f"this search has {steps_per_episode}; start a new --study."
            )
        folder = self.root / meta.checkpoint
        if not (folder / _AGENT_FILE).is_file() or not (folder / _BUFFER_FILE).is_file():
            raise CheckpointError(f"The RL checkpoint {folder} is incomplete; delete {self.root} to start afresh.")
        # A fresh agent (networks, optimizers, an empty buffer of the checkpoint's capacity) whose
        # shapes the saved state must match; the state is copied into it, nothing is unpickled.
        model = make_model(meta.buffer_episodes)
        return model, self._restore(meta, model, settings, seed)

    def _read_meta(self) -> _CheckpointMeta | None:
        """The pointer JSON, checked field by field; None if there is none.

        The checks run in this order: the JSON parses and names a checkpoint directory beside
        it; that directory holds no pickled SB3 save of schema 1; the schema is this one; every
        counter has its type and sign.
        """
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
            checked = _CheckpointMeta(
                schema=_SCHEMA, checkpoint=name,
                agent=str(meta["agent"]), steps_per_episode=int(meta["steps_per_episode"]),
                episodes=int(meta["episodes"]), noise_sigma=float(meta["noise_sigma"]),
                buffer_episodes=int(meta["buffer_episodes"]), num_timesteps=int(meta["num_timesteps"]),
                n_updates=int(meta["n_updates"]), episode_num=int(meta["episode_num"]),
                ep_info_buffer=tuple({str(k): _json_number(v) for k, v in dict(info).items()}
                                     for info in meta["ep_info_buffer"]),
                ep_success_buffer=tuple(_json_bool(v) for v in meta["ep_success_buffer"]),
            )
            if (min(checked.episodes, checked.buffer_episodes - 1, checked.num_timesteps, checked.n_updates,
                    checked.episode_num) < 0 or not checked.noise_sigma >= 0):
                raise ValueError("a counter or the noise sigma is negative")
        except (ValueError, KeyError, TypeError) as exc:
            raise self._unreadable(exc) from None
        return checked

    def _restore(self, meta: _CheckpointMeta, model: OffPolicyAlgorithm, settings: RLSettings,
                 seed: int) -> AgentState:
        """Copy the checkpoint ``meta`` names into the fresh ``model`` and set its counters; its progress."""
        folder = self.root / meta.checkpoint
        self._load_agent(folder / _AGENT_FILE, model)
        buffer = _episode_buffer(model)
        self._load_buffer(folder / _BUFFER_FILE, buffer)
        buffer.open_episode = []  # a stopped run's unfinished episode stays unsampled
        model.num_timesteps, model._n_updates, model._episode_num = meta.num_timesteps, meta.n_updates, meta.episode_num
        # learn(reset_num_timesteps=False) keeps these instead of starting empty ones.
        model.ep_info_buffer = deque((dict(info) for info in meta.ep_info_buffer), maxlen=model._stats_window_size)
        model.ep_success_buffer = deque(meta.ep_success_buffer, maxlen=model._stats_window_size)
        # Warm-up counts episodes, and a stopped run's partial episode advanced the timestep count:
        # the random phase lasts for the warm-up episodes this agent has not played yet.
        model.learning_starts = (max(0, settings.warmup_episodes - meta.episodes) * meta.steps_per_episode
                                 + model.num_timesteps)
        if model.action_noise is not None:
            model.action_noise = NormalActionNoise(mean=np.zeros(1), sigma=np.full(1, meta.noise_sigma))
        # A resumed run must not replay the random stream the first run already used.
        model.set_random_seed(seed + meta.episodes)
        return AgentState(episodes=meta.episodes, noise_sigma=meta.noise_sigma, resumed=True)

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

    def _load_buffer(self, path: Path, buffer: _EpisodeSlots) -> None:
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


def _episode_buffer(model: OffPolicyAlgorithm) -> _EpisodeSlots:
    buffer = model.replay_buffer
    assert isinstance(buffer, ReplayBuffer) and isinstance(buffer, _EpisodeSlots), (
        "_new_model builds every agent with an _EpisodeBuffer")
    return buffer


def _agent_tensors(model: OffPolicyAlgorithm) -> dict[str, Any]:
    """What SB3's own ``save`` writes with torch, keyed by SB3's names.

    ``get_parameters`` gives the state dicts of ``policy`` (actor, critic, targets),
    ``actor.optimizer``, ``critic.optimizer`` and SAC's ``ent_coef_optimizer``; SAC's learned
    ``log_ent_coef`` is a bare tensor beside them (a fixed entropy coefficient comes from the
    settings, so a fresh agent already has it). The rest of SB3's pickled ``data`` is rebuilt by
    the :data:`ModelFactory` (agent.py's ``_new_model``) or held in the pointer JSON.
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
