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
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import (
    BeforeValidator,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from ._declared import DeclaredTask
from ._schema import Bool, Float, Int, OptionalInt, Strict, format_error, show
from ._yamlfile import read_yaml
from .budget import Budget
from .errors import BudgetError, ConfigError
from .profile import ModelProfile
from .pruning import IMPORTANCE_NAMES
from .sparsity._rules import DEFAULT_RATIOS, mode_conflict

__all__ = [
    "SearchSpace",
    "GroupSelection",
    "EvaluationSettings",
    "StrategySettings",
    "RLSettings",
    "LatencySpec",
    "load_space",
    "find_space",
    "validate_task",
    "STRATEGIES",
    "SAMPLERS",
    "AGENTS",
]

STRATEGIES = ("optuna", "rl", "random", "uniform", "global", "lamp")
SAMPLERS = ("tpe", "gp", "cmaes", "random", "qmc", "nsga2")
AGENTS = ("ddpg", "td3", "sac")
OBJECTIVES = ("score", "pareto")
REWARDS = ("error", "flops")
SEED_MAX = 2**32 - 1  # numpy, torch and stable-baselines3 all take 32-bit unsigned seeds


class GroupSelection(Strict):
    """Which groups are searched (globs over group names) and their ratio range (``None``: the
    mode's default, [0, 0.8] of a group's channels, or [0, 0.99] of a tensor's weights)."""

    include: list[str] = Field(default_factory=lambda: ["*"])
    exclude: list[str] = Field(default_factory=list)
    ratio: Optional[tuple[Float, Float]] = None
    round_to: Int = Field(default=1, ge=1)

    @field_validator("ratio")
    @classmethod
    def _ratio_in_range(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is None:
            return v
        lo, hi = v
        if not (0.0 <= lo <= hi < 1.0):
            raise ValueError(
                f"ratio [{lo}, {hi}] must satisfy 0 <= low <= high < 1 (fraction of channels removed; of weights "
                "in mode: sparsity)"
            )
        return v

    def ratio_range(self, mode: str = "channels") -> tuple[float, float]:
        """The ratio range of searched groups: as given, or the mode's default."""
        return self.ratio if self.ratio is not None else DEFAULT_RATIOS[mode]

    def bounds(self, profile: ModelProfile, *, source: str = "search space") -> dict[str, tuple[float, float]]:
        """Ratio range per group; groups not selected are fixed at 0 (never pruned)."""
        names = profile.names
        for pattern in self.include + self.exclude:
            if not fnmatch.filter(names, pattern):
                raise ConfigError(
                    f"{source}: key 'groups': the glob {pattern!r} matches no group of task "
                    f"{profile.task!r}; its groups are: {', '.join(names)}."
                )
        # A transformer's residual stream is searched only when an include pattern other than
        # the catch-all "*" names it: its width is left whole unless asked.
        embedding = {g.name for g in profile.groups if g.embedding}
        selected = [
            n for n in names
            if any(fnmatch.fnmatchcase(n, p) and (p != "*" or n not in embedding) for p in self.include)
            and not any(fnmatch.fnmatchcase(n, p) for p in self.exclude)
        ]
        if not selected:
            raise ConfigError(f"{source}: key 'groups': include/exclude leave no group to prune.")
        ratio = self.ratio_range(profile.mode)
        if self.round_to > 1 and ratio[1] > 0:
            channels = {g.name: g.channels for g in profile.groups}
            largest = max(selected, key=lambda n: channels[n])
            if self.round_to >= channels[largest]:
                raise ConfigError(
                    f"{source}: key 'groups.round_to': round_to={self.round_to} leaves no group prunable: a "
                    f"group keeps a multiple of round_to below its channel count, and the largest searched "
                    f"group, {largest!r}, has {channels[largest]} channels. Use a round_to below "
                    f"{channels[largest]} (8 or 16 match the vector units of GPUs and CPUs)."
                )
        return {n: (tuple(ratio) if n in selected else (0.0, 0.0)) for n in names}  # type: ignore[misc]


STOPPERS = ("none", "median", "successive_halving", "hyperband")
PRECISIONS = ("auto", "fp32", "bf16")


class FidelitySettings(Strict):
    """Multi-fidelity candidate evaluation (see :class:`autoprune.evaluate.Fidelity`).

    ``rungs`` are cumulative SGD steps (batches of 64 training images) after which a trial
    reports its validation score, ascending; rung 0 is adaptive BN alone, the last rung's score is
    the trial's. ``pruner`` is the Optuna pruner that stops unpromising trials at a rung (the
    trial ends PRUNED); ``reduction_factor`` is its eta (successive halving keeps the best 1/eta
    at each rung). ``lr`` is the peak learning rate of the fine-tuning, cosine-decayed over the last
    rung; ``distill`` learns from the dense model's logits at ``temperature``, weighted ``alpha``.
    """

    rungs: list[Int] = Field(default_factory=lambda: [0, 200, 800], min_length=1)
    pruner: Literal["none", "median", "successive_halving", "hyperband"] = "successive_halving"
    reduction_factor: Int = Field(default=3, ge=2)
    lr: Float = Field(default=0.01, gt=0)
    distill: Bool = True
    temperature: Float = Field(default=4.0, gt=0)
    alpha: Float = Field(default=0.9, ge=0, le=1)

    @field_validator("rungs")
    @classmethod
    def _ascending(cls, v: list[int]) -> list[int]:
        if any(step < 0 for step in v) or any(b <= a for a, b in zip(v, v[1:])):
            raise ValueError(f"rungs {v} must be SGD step counts >= 0 in strictly ascending order, e.g. [0, 200, 800]")
        return v

    @model_validator(mode="after")
    def _enough_rungs(self) -> FidelitySettings:
        if self.pruner != "none" and len(self.rungs) < 2:
            raise ValueError(f"pruner {self.pruner!r} stops trials between rungs; give at least two rungs")
        return self


class EvaluationSettings(Strict):
    """How a candidate is scored (see :class:`autoprune.Evaluator`).

    ``precision``: ``fp32``, ``bf16`` (autocast, where the device has bf16 instructions) or
    ``auto`` (bf16 only where timed faster for this model on this device).
    """

    calibration_batches: Int = Field(default=16, ge=0)
    val_samples: OptionalInt = Field(default=2000, ge=1)
    finetune_steps: Int = Field(default=0, ge=0)
    importance: str = "l1"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    fidelity: FidelitySettings | None = None

    @model_validator(mode="after")
    def _one_way_to_finetune(self) -> EvaluationSettings:
        if self.fidelity is not None and self.finetune_steps:
            raise ValueError("finetune_steps and fidelity both fine-tune candidates; give the steps as fidelity.rungs "
                             "(e.g. rungs: [0, 50]) and set finetune_steps to 0")
        return self

    @field_validator("importance")
    @classmethod
    def _known_importance(cls, v: str) -> str:
        if v not in IMPORTANCE_NAMES:
            raise ValueError(f"unknown importance {v!r}; allowed: {', '.join(IMPORTANCE_NAMES)}")
        return v


class RLSettings(Strict):
    """AMC agent settings: DDPG by default, as in He et al. (2018).

    ``noise_sigma`` is the exploration noise's standard deviation in action units (actions span
    [-1, 1], so 1.0 is AMC's 0.5 on its [0, 1] scale); it shrinks by ``noise_decay`` after every
    episode past the warm-up (0.97 keeps exploring through a search of about 100 episodes).
    ``start_from_baselines`` plays the uniform and global plans as the first episodes (counted in
    the warm-up), as Optuna studies start from them; AMC itself starts from random actions.
    """

    agent: Literal["ddpg", "td3", "sac"] = "ddpg"
    warmup_episodes: Int = Field(default=10, ge=0)
    noise_sigma: Float = Field(default=1.0, gt=0)
    noise_decay: Float = Field(default=0.97, gt=0, le=1)
    buffer_episodes: Int = Field(default=200, ge=1)
    learning_rate_actor: Float = Field(default=1e-4, gt=0)
    learning_rate_critic: Float = Field(default=1e-3, gt=0)
    tau: Float = Field(default=0.01, gt=0, le=1)
    batch_size: Int = Field(default=64, ge=1)
    gradient_steps_per_episode: Int = Field(default=20, ge=1)
    reward: Literal["error", "flops"] = "error"
    start_from_baselines: Bool = True


class LatencySpec(Strict):
    """How latency is measured on the target device (see :class:`autoprune.latency.LatencySettings`)."""

    batch_size: Int = Field(default=1, ge=1)
    threads: Int = Field(default=1, ge=1)
    repeats: Int = Field(default=30, ge=1)
    device: Literal["cpu", "cuda"] = "cpu"
    tolerance: Float = Field(default=0.05, ge=0, lt=1)


class StrategySettings(Strict):
    name: Literal["optuna", "rl", "random", "uniform", "global", "lamp"] = "optuna"
    sampler: Literal["tpe", "gp", "cmaes", "random", "qmc", "nsga2"] = "tpe"
    trials: Int = Field(default=40, ge=1)
    seed: Int = 0
    objective: Literal["score", "pareto"] = "score"
    rl: RLSettings = Field(default_factory=RLSettings)

    @field_validator("seed")
    @classmethod
    def _seed_in_range(cls, v: int) -> int:
        if not 0 <= v <= SEED_MAX:
            raise ValueError(f"seed {v} is out of range; allowed: an integer in 0..{SEED_MAX} (2**32 - 1)")
        return v


def _task_form(value: Any) -> Any:
    if not isinstance(value, (str, Mapping, DeclaredTask)):
        raise ValueError(
            f"must be a built-in task name (digits-cnn), 'package.module:function', or a mapping that declares the "
            f"task (keys {', '.join(DeclaredTask.model_fields)}), got {show(value)}"
        )
    return value


# A name or import path, or a declared task; the tag tells pydantic which, so a bad mapping's
# errors name its keys instead of also saying that it is not a string.
TaskSpec = Annotated[
    Union[Annotated[str, Tag("spec")], Annotated[DeclaredTask, Tag("declared")]],
    Discriminator(lambda v: "spec" if isinstance(v, str) else "declared"),
    BeforeValidator(_task_form),
]
_TASK_TAGS = ("spec", "declared")


class SearchSpace(Strict):
    """A validated search space file.

    ``mode`` is ``channels`` (groups lose whole channels; the default) or ``sparsity`` (each weight
    tensor loses single weights, placed by ``pattern``: ``unstructured`` or ``2:4``); ``mode`` and
    ``pattern`` are read first so that every later section is checked against them.
    """

    task: TaskSpec = "digits-cnn"
    mode: Literal["channels", "sparsity"] = "channels"
    pattern: Literal["unstructured", "2:4"] = "unstructured"
    budget: dict[str, Any] = Field(default_factory=lambda: {"flops": 0.5})
    groups: GroupSelection = Field(default_factory=GroupSelection)
    evaluation: EvaluationSettings = Field(default_factory=EvaluationSettings)
    strategy: StrategySettings = Field(default_factory=StrategySettings)
    latency: LatencySpec | None = None
    name: str | None = None

    @field_validator("budget")
    @classmethod
    def _budget_valid(cls, v: dict[str, Any]) -> dict[str, float]:
        try:
            return Budget.from_dict(v).to_dict()
        except BudgetError as exc:
            raise ValueError(str(exc).rstrip(".")) from None

    @field_validator("pattern", "budget", "groups", "evaluation", "strategy", "latency")
    @classmethod
    def _fits_mode(cls, v: Any, info: ValidationInfo) -> Any:
        problem = mode_conflict(str(info.field_name), v, info.data.get("mode"), info.data.get("pattern"))
        if problem:
            raise ValueError(problem)
        return v

    @property
    def budget_obj(self) -> Budget:
        return Budget.from_dict(self.budget)

    @property
    def measures_latency(self) -> bool:
        """Whether trials are timed: a latency budget, or a ``latency:`` section."""
        return self.latency is not None or self.budget_obj.is_latency

    @property
    def task_label(self) -> str:
        """The task as studies, experiments and reports name it."""
        return self.task if isinstance(self.task, str) else self.task.name

    @property
    def task_spec(self) -> str | dict[str, Any]:
        """The task as a plan's ``provenance.task_spec`` records it, for :func:`autoprune.load_task`:
        the name or import path, or the declaration with absolute paths."""
        return self.task if isinstance(self.task, str) else self.task.model_dump(mode="json")

    @property
    def display_name(self) -> str:
        return self.name or self.task_label

    def fingerprint(self) -> str:
        """sha256 of what defines the search's dimensions and objective (not its trial count or seed)."""
        groups = {**self.groups.model_dump(mode="json"), "ratio": list(self.groups.ratio_range(self.mode))}
        defining = {"task": self.task_spec, "budget": self.budget, "groups": groups,
                    "evaluation": self.evaluation.model_dump(mode="json"),
                    "objective": self.strategy.objective,
                    "latency": self.latency.model_dump(mode="json") if self.latency else None}
        if self.mode != "channels":  # a channel space's fingerprint stays what it was before modes
            defining.update(mode=self.mode, pattern=self.pattern)
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
                if not isinstance(node.get(p), dict):
                    raise ConfigError(f"Cannot set {dotted!r}: the search space has no {p!r} section.")
                node = node[p]
            node[leaf] = value
        return _validate(data, source=f"Search space {self.display_name!r} with the command-line options",
                         flags=_CLI_FLAGS)


_CLI_FLAGS = {
    "task": "--task", "strategy.name": "--strategy", "strategy.sampler": "--sampler", "strategy.rl.agent": "--agent",
    "strategy.trials": "--trials", "strategy.seed": "--seed", "strategy.objective": "--objective", "budget": "--budget",
    "mode": "--mode", "pattern": "--pattern",
}


def _format_error(source: str, exc: ValidationError, flags: Mapping[str, str] | None = None) -> str:
    return format_error(source, exc, root=SearchSpace, flags=flags, union_tags={"task": _TASK_TAGS})


def _validate(data: Any, *, source: str, flags: Mapping[str, str] | None = None) -> SearchSpace:
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{source} must be a YAML mapping of keys (task, mode, pattern, budget, groups, evaluation, strategy, "
            f"latency, name), got {show(data)}. See search_spaces/default.yaml for an example."
        )
    try:
        return SearchSpace.model_validate(dict(data))
    except ValidationError as exc:
        raise ConfigError(_format_error(source, exc, flags)) from None


_EXAMPLE = "search_spaces/default.yaml"


def find_space(name_or_path: str | os.PathLike[str]) -> Path:
    """A space file by path, or by name in ``./search_spaces`` or the ones installed with autoprune
    (``autoprune/search_spaces``, which the repository's top-level ``search_spaces`` links to)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    if path.is_dir():
        raise ConfigError(
            f"Search space {str(name_or_path)!r} is a directory; a search space is a YAML file "
            f"(e.g. {_EXAMPLE}), given by its path or by its name in search_spaces/."
        )
    if path.exists():
        raise ConfigError(f"Search space {str(name_or_path)!r} is not a regular file; a search space is a YAML file.")
    stem = path.name if path.suffix in (".yaml", ".yml") else f"{path.name}.yaml"
    candidates = list(dict.fromkeys(
        [Path.cwd() / "search_spaces" / stem, Path(__file__).resolve().parent / "search_spaces" / stem]))
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
    data = read_yaml(path)
    source = f"Search space file {path}"
    if data is None:
        raise ConfigError(
            f"{source} is empty (or holds only comments); a search space needs at least `task:` (a built-in "
            f"task such as digits-cnn, package.module:function, or a mapping declaring a model and its data), "
            f"usually with budget: and strategy:. "
            f"See {_EXAMPLE} for a complete example."
        )
    space = _validate(data, source=source)
    if "task" not in data:
        raise ConfigError(
            f"{source} names no task; a search space needs at least `task:` (a built-in task such as "
            f"digits-cnn, package.module:function, or a mapping declaring a model and its data, as in "
            f"examples/declared.yaml). See {_EXAMPLE} for a complete example."
        )
    if isinstance(space.task, DeclaredTask):
        # The declaration's files are where the space file says, wherever the search runs from;
        # stored absolute, so plans made from it apply anywhere on this machine.
        declared = space.task.resolved(path.resolve().parent)
        missing = declared.missing_path()
        if missing:
            raise ConfigError(f"{source}: {missing} (relative paths are read from the file's directory, "
                              f"{path.resolve().parent}).")
        space = space.model_copy(update={"task": declared})
    if space.name is None:
        space = space.model_copy(update={"name": path.stem if path.stem != "default" else space.task_label})
    return space


def validate_task(spec: Mapping[str, Any], *, source: str) -> DeclaredTask:
    """A ``task:`` mapping (as a plan's provenance stores it) validated as a space file's would be."""
    task = _validate({"task": dict(spec)}, source=source).task
    if not isinstance(task, DeclaredTask):  # pragma: no cover - a mapping always validates as a declaration
        raise ConfigError(f"{source} is not a task declaration.")
    return task
