"""Search space files (``search_spaces/*.yaml``), validated before any work.

A search space names the task, the budget, which groups may be pruned and how far, how candidates
are evaluated and which strategy searches. A bad file fails with a message naming the file, the
key and the allowed values.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .budget import Budget
from .errors import BudgetError, ConfigError
from .profile import ModelProfile
from .pruning import IMPORTANCE_NAMES

__all__ = [
    "SearchSpace",
    "GroupSelection",
    "EvaluationSettings",
    "StrategySettings",
    "RLSettings",
    "LatencySpec",
    "load_space",
    "find_space",
    "STRATEGIES",
    "SAMPLERS",
    "AGENTS",
]

STRATEGIES = ("optuna", "rl", "random", "uniform", "global")
SAMPLERS = ("tpe", "gp", "cmaes", "random", "qmc", "nsga2")
AGENTS = ("ddpg", "td3", "sac")
OBJECTIVES = ("score", "pareto")
REWARDS = ("error", "flops")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GroupSelection(_Strict):
    """Which groups are searched (globs over group names) and their ratio range."""

    include: list[str] = Field(default_factory=lambda: ["*"])
    exclude: list[str] = Field(default_factory=list)
    ratio: tuple[float, float] = (0.0, 0.8)
    round_to: int = Field(default=1, ge=1)

    @field_validator("ratio")
    @classmethod
    def _ratio_in_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        lo, hi = v
        if not (0.0 <= lo <= hi < 1.0):
            raise ValueError(
                f"ratio [{lo}, {hi}] must satisfy 0 <= low <= high < 1 (fraction of channels removed)"
            )
        return v

    def bounds(self, profile: ModelProfile, *, source: str = "search space") -> dict[str, tuple[float, float]]:
        """Ratio range per group; groups not selected are fixed at 0 (never pruned)."""
        names = profile.names
        for pattern in self.include + self.exclude:
            if not fnmatch.filter(names, pattern):
                raise ConfigError(
                    f"{source}: key 'groups': the glob {pattern!r} matches no group of task "
                    f"{profile.task!r}; its groups are: {', '.join(names)}."
                )
        selected = [
            n for n in names
            if any(fnmatch.fnmatchcase(n, p) for p in self.include)
            and not any(fnmatch.fnmatchcase(n, p) for p in self.exclude)
        ]
        if not selected:
            raise ConfigError(f"{source}: key 'groups': include/exclude leave no group to prune.")
        return {n: (tuple(self.ratio) if n in selected else (0.0, 0.0)) for n in names}  # type: ignore[misc]


class EvaluationSettings(_Strict):
    """How a candidate is scored (see :class:`autoprune.Evaluator`)."""

    calibration_batches: int = Field(default=16, ge=0)
    val_samples: int | None = Field(default=2000, ge=1)
    finetune_steps: int = Field(default=0, ge=0)
    importance: str = "l1"

    @field_validator("importance")
    @classmethod
    def _known_importance(cls, v: str) -> str:
        if v not in IMPORTANCE_NAMES:
            raise ValueError(f"unknown importance {v!r}; allowed: {', '.join(IMPORTANCE_NAMES)}")
        return v


class RLSettings(_Strict):
    """AMC agent settings: DDPG by default, as in He et al. (2018).

    ``noise_sigma`` is the exploration noise's standard deviation in action units (actions span
    [-1, 1], so 1.0 is AMC's 0.5 on its [0, 1] scale); it shrinks by ``noise_decay`` after every
    episode past the warm-up (0.97 keeps exploring through a search of about 100 episodes).
    """

    agent: Literal["ddpg", "td3", "sac"] = "ddpg"
    warmup_episodes: int = Field(default=10, ge=0)
    noise_sigma: float = Field(default=1.0, gt=0)
    noise_decay: float = Field(default=0.97, gt=0, le=1)
    buffer_episodes: int = Field(default=200, ge=1)
    learning_rate_actor: float = Field(default=1e-4, gt=0)
    learning_rate_critic: float = Field(default=1e-3, gt=0)
    tau: float = Field(default=0.01, gt=0, le=1)
    batch_size: int = Field(default=64, ge=1)
    gradient_steps_per_episode: int = Field(default=20, ge=1)
    reward: Literal["error", "flops"] = "error"


class LatencySpec(_Strict):
    """How latency is measured on the target device (see :class:`autoprune.latency.LatencySettings`)."""

    batch_size: int = Field(default=1, ge=1)
    threads: int = Field(default=1, ge=1)
    repeats: int = Field(default=30, ge=1)
    device: Literal["cpu", "cuda"] = "cpu"
    tolerance: float = Field(default=0.05, ge=0, lt=1)


class StrategySettings(_Strict):
    name: Literal["optuna", "rl", "random", "uniform", "global"] = "optuna"
    sampler: Literal["tpe", "gp", "cmaes", "random", "qmc", "nsga2"] = "tpe"
    trials: int = Field(default=40, ge=1)
    seed: int = 0
    objective: Literal["score", "pareto"] = "score"
    rl: RLSettings = Field(default_factory=RLSettings)


class SearchSpace(_Strict):
    """A validated search space file."""

    task: str = "digits-cnn"
    budget: dict[str, float] = Field(default_factory=lambda: {"flops": 0.5})
    groups: GroupSelection = Field(default_factory=GroupSelection)
    evaluation: EvaluationSettings = Field(default_factory=EvaluationSettings)
    strategy: StrategySettings = Field(default_factory=StrategySettings)
    latency: LatencySpec | None = None
    name: str | None = None

    @model_validator(mode="after")
    def _budget_valid(self) -> SearchSpace:
        try:
            Budget.from_dict(self.budget)
        except BudgetError as exc:
            raise ValueError(str(exc)) from None
        return self

    @property
    def budget_obj(self) -> Budget:
        return Budget.from_dict(self.budget)

    @property
    def measures_latency(self) -> bool:
        """Whether trials are timed: a latency budget, or a ``latency:`` section."""
        return self.latency is not None or self.budget_obj.is_latency

    @property
    def display_name(self) -> str:
        return self.name or self.task

    def fingerprint(self) -> str:
        """sha256 of what defines the search's dimensions and objective (not its trial count or seed)."""
        defining = {"task": self.task, "budget": self.budget, "groups": self.groups.model_dump(mode="json"),
                    "evaluation": self.evaluation.model_dump(mode="json"),
                    "objective": self.strategy.objective,
                    "latency": self.latency.model_dump(mode="json") if self.latency else None}
        return hashlib.sha256(json.dumps(defining, sort_keys=True).encode()).hexdigest()[:16]

    def with_overrides(self, **overrides: Any) -> SearchSpace:
        """A copy with CLI flags applied (``None`` values are ignored); revalidated."""
        data = self.model_dump(mode="json")
        for dotted, value in overrides.items():
            if value is None:
                continue
            *parents, leaf = dotted.split(".")
            node = data
            for p in parents:
                node = node[p]
            node[leaf] = value
        return _validate(data, source=f"Search space {self.display_name!r} with the command-line options",
                         flags=_CLI_FLAGS)


_CLI_FLAGS = {
    "strategy.name": "--strategy", "strategy.sampler": "--sampler", "strategy.rl.agent": "--agent",
    "strategy.trials": "--trials", "strategy.seed": "--seed", "strategy.objective": "--objective", "budget": "--budget",
}


def _format_error(source: str, exc: ValidationError, flags: Mapping[str, str] | None = None) -> str:
    parts = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        label = f"key '{key}'" + (f" (option {flags[key]})" if flags and key in flags else "")
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            parent = err["loc"][:-1]
            allowed = _allowed_keys(parent)
            msg = f"unknown key; allowed keys here: {', '.join(allowed)}"
        elif err["type"] == "literal_error":
            msg = f"value {err.get('input')!r} is not allowed; {msg[0].lower() + msg[1:]}"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        parts.append(f"{label}: {msg}")
    return f"{source} is not a valid search space: " + "; ".join(parts) + "."


def _allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    model: type[BaseModel] = SearchSpace
    for part in loc:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def _validate(data: Any, *, source: str, flags: Mapping[str, str] | None = None) -> SearchSpace:
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source} must be a YAML mapping of keys (task, budget, groups, evaluation, strategy).")
    try:
        return SearchSpace.model_validate(dict(data))
    except ValidationError as exc:
        raise ConfigError(_format_error(source, exc, flags)) from None


def find_space(name_or_path: str | os.PathLike[str]) -> Path:
    """A space file by path, or by name in ``./search_spaces`` or autoprune's own ``search_spaces``."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    stem = path.name if path.suffix in (".yaml", ".yml") else f"{path.name}.yaml"
    candidates = list(dict.fromkeys(
        [Path.cwd() / "search_spaces" / stem, Path(__file__).resolve().parent.parent / "search_spaces" / stem]))
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ConfigError(
        f"Search space {str(name_or_path)!r} not found; looked at {path} and "
        + ", ".join(str(c) for c in candidates) + "."
    )


def load_space(name_or_path: str | os.PathLike[str]) -> SearchSpace:
    """Load and validate a search space YAML file (path, or name such as ``default``)."""
    path = find_space(name_or_path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"Search space file {path} is not valid YAML: {exc}") from None
    space = _validate(data, source=f"Search space file {path}")
    if space.name is None:
        space = space.model_copy(update={"name": path.stem if path.stem != "default" else space.task})
    return space
