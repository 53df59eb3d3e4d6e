"""Pruning plans: how many channels each group keeps, with where the plan came from.

A plan is immutable and versioned (schema ``autoprune.plan/1``). Its ratios are the fraction of
channels *removed* per group, exactly as realized after channel rounding; ``channels`` holds the
dense and kept counts. The model fingerprint ties a plan to the group structure it was made for.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import pruning
from .errors import PlanError, PlanMismatchError
from .profile import ModelProfile, fingerprint_of

__all__ = ["Plan", "PLAN_SCHEMA", "apply_plan", "check_plan_matches", "write_atomic"]

PLAN_SCHEMA = "autoprune.plan/1"


@dataclass(frozen=True)
class Plan:
    """Channels to keep per group of one model.

    Attributes:
        ratios: group name -> fraction of its channels removed, in [0, 1).
        channels: group name -> (dense channels, kept channels).
        model_fingerprint: sha256 of the dense model's group names and channel counts.
        input_shape: the traced input shape (batch 1), needed to rebuild the dependency graph.
        task: the task the plan was made for, if known.
        budget: the budget it was projected onto, e.g. ``{"flops": 0.5}``.
        metrics: measured or analytic numbers (``flops`` = MACs, ``flops_ratio``, ``params``, ``val_score``...).
        provenance: strategy, study, trial, MLflow run id, seed, versions.
    """

    ratios: Mapping[str, float]
    channels: Mapping[str, tuple[int, int]]
    model_fingerprint: str
    input_shape: tuple[int, ...]
    task: str | None = None
    budget: Mapping[str, float] | None = None
    metrics: Mapping[str, float] = field(default_factory=dict)
    provenance: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_kept(
        cls,
        profile: ModelProfile,
        kept: Mapping[str, int],
        *,
        budget: Mapping[str, float] | None = None,
        metrics: Mapping[str, float] | None = None,
        provenance: Mapping[str, Any] | None = None,
    ) -> Plan:
        """The plan keeping ``kept[name]`` channels per group (missing groups stay dense)."""
        channels = {g.name: (g.channels, int(kept.get(g.name, g.channels))) for g in profile.groups}
        for name, (dense, keep) in channels.items():
            if not 1 <= keep <= dense:
                raise PlanError(f"Group {name!r} would keep {keep} of {dense} channels; allowed: 1..{dense}.")
        unknown = sorted(set(kept) - set(channels))
        if unknown:
            raise PlanError(f"Unknown groups {', '.join(unknown)}; the model's groups: {', '.join(channels)}.")
        ratios = {name: (dense - keep) / dense for name, (dense, keep) in channels.items()}
        macs, params = profile.macs_of(kept), profile.params_of(kept)
        base_metrics = {
            "flops": macs, "flops_ratio": macs / profile.macs,
            "params": params, "params_ratio": params / profile.params,
        }
        return cls(
            ratios=ratios, channels=channels, model_fingerprint=profile.fingerprint,
            input_shape=tuple(profile.input_shape), task=profile.task,
            budget=dict(budget) if budget is not None else None,
            metrics={**base_metrics, **(metrics or {})}, provenance=dict(provenance or {}),
        )

    @property
    def kept(self) -> dict[str, int]:
        """Group name -> channels kept."""
        return {name: keep for name, (_, keep) in self.channels.items()}

    def with_metrics(self, **metrics: float) -> Plan:
        return replace(self, metrics={**self.metrics, **metrics})

    def with_provenance(self, **provenance: Any) -> Plan:
        return replace(self, provenance={**self.provenance, **provenance})

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": PLAN_SCHEMA,
            "task": self.task,
            "model_fingerprint": self.model_fingerprint,
            "input_shape": list(self.input_shape),
            "budget": dict(self.budget) if self.budget is not None else None,
            "ratios": dict(self.ratios),
            "channels": {k: list(v) for k, v in self.channels.items()},
            "metrics": dict(self.metrics),
            "provenance": dict(self.provenance),
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=False)

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "plan") -> Plan:
        if not isinstance(data, dict):
            raise PlanError(f"{source}: a plan is a JSON object, got {type(data).__name__}.")
        schema = data.get("schema")
        if schema != PLAN_SCHEMA:
            raise PlanError(f"{source}: unknown plan schema {schema!r}; this autoprune reads {PLAN_SCHEMA!r}.")
        missing = [k for k in ("model_fingerprint", "ratios", "channels", "input_shape") if k not in data]
        if missing:
            raise PlanError(f"{source}: missing required keys: {', '.join(missing)}.")
        try:
            channels = {str(k): (int(v[0]), int(v[1])) for k, v in data["channels"].items()}
            ratios = {str(k): float(v) for k, v in data["ratios"].items()}
            input_shape = tuple(int(d) for d in data["input_shape"])
        except (TypeError, ValueError, IndexError, AttributeError) as exc:
            raise PlanError(f"{source}: malformed ratios/channels/input_shape ({exc}).") from None
        if set(ratios) != set(channels):
            raise PlanError(f"{source}: 'ratios' and 'channels' name different groups.")
        for name, (dense, keep) in channels.items():
            if not 1 <= keep <= dense:
                raise PlanError(f"{source}: group {name!r} keeps {keep} of {dense} channels; allowed 1..{dense}.")
            if not math.isclose(ratios[name], (dense - keep) / dense, abs_tol=1e-6):
                raise PlanError(
                    f"{source}: group {name!r} has ratio {ratios[name]} but channels {dense}->{keep} "
                    f"(ratio {(dense - keep) / dense:.6f}); ratios are the fraction of channels removed."
                )
        return cls(
            ratios=ratios, channels=channels, model_fingerprint=str(data["model_fingerprint"]),
            input_shape=input_shape, task=data.get("task"), budget=data.get("budget"),
            metrics=dict(data.get("metrics") or {}), provenance=dict(data.get("provenance") or {}),
        )

    @classmethod
    def from_json(cls, text: str, *, source: str = "plan") -> Plan:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PlanError(
                f"{source} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); "
                "it may be truncated. Plans are written by `autoprune export` or Plan.save()."
            ) from None
        return cls.from_dict(data, source=source)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the plan as JSON atomically (a reader never sees half a file)."""
        return write_atomic(Path(path), self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Plan:
        path = Path(path)
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise PlanError(f"Plan file {path} does not exist.") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise PlanError(f"Plan file {path} cannot be read ({exc}).") from None
        return cls.from_json(text, source=f"plan file {path}")


def write_atomic(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def check_plan_matches(plan: Plan, groups: list[tuple[str, int]], *, what: str = "the model") -> None:
    """Refuse a plan made for another group structure, naming the first groups that differ."""
    if plan.model_fingerprint == fingerprint_of(groups):
        return
    planned = [(name, dense) for name, (dense, _) in plan.channels.items()]
    differences = []
    model_groups = dict(groups)
    for name, dense in planned:
        if name not in model_groups:
            differences.append(f"{name!r} ({dense} channels) is not a group of {what}")
        elif model_groups[name] != dense:
            differences.append(f"{name!r} has {model_groups[name]} channels in {what} but {dense} in the plan")
    for name, dense in groups:
        if name not in plan.channels:
            differences.append(f"{what} has group {name!r} ({dense} channels) that the plan lacks")
    if not differences:
        differences.append("the groups are the same but listed in another order")
    task = f" (made for task {plan.task!r})" if plan.task else ""
    raise PlanMismatchError(
        f"The plan{task} does not fit {what}: " + "; ".join(differences[:3])
        + (f"; and {len(differences) - 3} more" if len(differences) > 3 else "")
        + ". Use a plan exported for this model, or run a search on it."
    )


def apply_plan(
    model: nn.Module,
    plan: Plan,
    *,
    example_input: torch.Tensor | None = None,
    importance: str | pruning.ChannelImportance = "l1",
    scores: Mapping[str, np.ndarray] | None = None,
    ignored_layers: tuple[str, ...] = (),
    batches: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> nn.Module:
    """A new, physically smaller copy of ``model`` with the plan's channel counts.

    The removed channels are the least important by ``importance`` (``l1`` by default; ``taylor``
    needs ``batches``). ``model`` is not modified. The plan is refused if it was made for a model
    with other groups. ``example_input`` defaults to zeros of the plan's input shape.
    """
    if example_input is None:
        example_input = torch.zeros(plan.input_shape)
    try:
        groups = pruning.find_groups(model, example_input, ignored_layers)
    except RuntimeError as exc:
        raise PlanMismatchError(
            f"The plan's input shape {tuple(example_input.shape)} does not fit the model "
            f"({str(exc).splitlines()[0][:200]}); the plan was made for another model."
        ) from None
    check_plan_matches(plan, [(g.name, g.channels) for g in groups])
    if scores is None:
        criterion = pruning.make_importance(importance)
        scores = pruning.channel_scores(
            model, example_input, criterion, ignored_layers=ignored_layers, batches=batches or ()
        )
    return pruning.prune_copy(model, example_input, plan.kept, scores)
