"""The AMC reinforcement-learning strategy: a gymnasium environment and a stable-baselines3 agent.

Importing this package registers the environment ``autoprune/Pruning-v0`` with gymnasium (by an
entry-point string, so nothing heavy is imported). :class:`RLStrategy` lives in ``agent.py``, which
with its checkpoint store ``_checkpoint.py`` are the only modules that import stable-baselines3;
it is loaded on first access so that ``import autoprune`` stays free of it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import gymnasium

if TYPE_CHECKING:
    from .agent import RLStrategy

__all__ = ["ENV_ID", "RLStrategy"]

ENV_ID = "autoprune/Pruning-v0"  # the same string as env.ENV_ID; env.py is not imported here

if ENV_ID not in gymnasium.registry:  # re-imports (importlib.reload) must not re-register
    gymnasium.register(id=ENV_ID, entry_point="autoprune.strategies.rl.env:PruningEnv")


def __getattr__(name: str) -> Any:
    if name == "RLStrategy":
        from .agent import RLStrategy

        return RLStrategy
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
