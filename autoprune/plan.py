"""Pruning plans: how many channels each group keeps, with where the plan came from.

A plan is immutable and versioned (schema ``autoprune.plan/1``). Its ratios are the fraction of
channels *removed* per group, exactly as realized after channel rounding; ``channels`` holds the
dense and kept counts. The model fingerprint ties a plan to the group structure it was made for.

A weight-sparsity plan (``mode: sparsity``) has the same shape, with weight tensors for groups:
its ratio is the fraction of a tensor's weights set to zero and its counts are weights. It is
written as schema ``autoprune.plan/2`` (``mode``, ``pattern`` and ``counts`` in place of
``channels``), so that an autoprune that knows only channel plans refuses it instead of cutting
channels by weight counts; channel plans are still written, and read, as ``/1``.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import BudgetError, PlanError, PlanMismatchError
from .profile import ModelProfile, fingerprint_of

__all__ = ["Plan", "PLAN_SCHEMA", "StaleBatchNormWarning", "apply_plan", "check_plan_matches", "write_atomic"]

PLAN_SCHEMA = "autoprune.plan/1"
#: The schema of plans with a ``mode`` (weight-sparsity plans are written with it).
PLAN_SCHEMA_MODES = "autoprune.plan/2"
_PLAN_KEYS = ("schema", "task", "model_fingerprint", "input_shape", "budget", "ratios", "channels", "metrics",
              "provenance")
_PLAN_KEYS_2 = ("schema", "mode", "pattern", "task", "model_fingerprint", "input_shape", "budget", "ratios", "counts",
                "metrics", "provenance")
_PATTERNS = ("unstructured", "2:4")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _kind(value: Any) -> str:
    """A JSON value as a message shows it."""
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "an object"
    text = repr(list(value) if isinstance(value, tuple) else value)
    if isinstance(value, (list, tuple)) and (len(text) > 60 or re.search(r"\[[A-Za-z#@/]", text)):
        # long, or read as markup by a terminal renderer ([True, 1] would vanish in rich's output)
        return f"a list of {len(value)} item{'' if len(value) == 1 else 's'}"
    return text if len(text) <= 60 else text[:57] + "..."


class _DuplicateKey(ValueError):
    pass


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


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
        provenance: strategy, study, trial, MLflow run id, seed, versions, task_spec (the task as the
            search loaded it: a built-in name or a user task's module:function).
        mode: ``channels`` (groups lose channels) or ``sparsity`` (groups are weight tensors: ratios
            are the fraction of weights zeroed, ``channels`` holds (dense, kept) weight counts).
        pattern: where a sparsity plan's zeros may go, ``unstructured`` or ``2:4``; None for channels.
    """

    ratios: Mapping[str, float]
    channels: Mapping[str, tuple[int, int]]
    model_fingerprint: str
    input_shape: tuple[int, ...]
    task: str | None = None
    budget: Mapping[str, float] | None = None
    metrics: Mapping[str, float] = field(default_factory=dict)
    provenance: Mapping[str, Any] = field(default_factory=dict)
    mode: str = "channels"
    pattern: str | None = None

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
        """The plan keeping ``kept[name]`` channels per group (missing groups stay dense); for a
        sparsity profile, weights per tensor."""
        unit = "weights" if profile.mode == "sparsity" else "channels"
        channels = {g.name: (g.channels, int(kept.get(g.name, g.channels))) for g in profile.groups}
        for name, (dense, keep) in channels.items():
            if not 1 <= keep <= dense:
                raise PlanError(f"Group {name!r} would keep {keep} of {dense} {unit}; allowed: 1..{dense}.")
        unknown = sorted(set(kept) - set(channels))
        if unknown:
            raise PlanError(f"Unknown groups {', '.join(unknown)}; the model's groups: {', '.join(channels)}.")
        ratios = {name: (dense - keep) / dense for name, (dense, keep) in channels.items()}
        macs, params = profile.macs_of(kept), profile.params_of(kept)
        base_metrics = {
            "flops": macs, "flops_ratio": macs / profile.macs,
            "params": params, "params_ratio": params / profile.params,
        }
        pattern = None
        if profile.mode == "sparsity":
            # MACs and params above count what touches a nonzero weight; a sparsity budget is one of these.
            nonzeros, size = profile.nonzeros_of(kept), profile.size_of(kept)  # type: ignore[attr-defined]
            base_metrics.update(nonzeros=nonzeros, nonzeros_ratio=nonzeros / profile.nonzeros,  # type: ignore[attr-defined]
                                sparsity=1 - nonzeros / profile.nonzeros,  # type: ignore[attr-defined]
                                size_bytes=size, size_ratio=size / profile.dense_bytes)  # type: ignore[attr-defined]
            pattern = profile.pattern  # type: ignore[attr-defined]
        return cls(
            ratios=ratios, channels=channels, model_fingerprint=profile.fingerprint,
            input_shape=tuple(profile.input_shape), task=profile.task,
            budget=dict(budget) if budget is not None else None,
            metrics={**base_metrics, **(metrics or {})}, provenance=dict(provenance or {}),
            mode=profile.mode, pattern=pattern,
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
        if self.mode != "channels":
            return {
                "schema": PLAN_SCHEMA_MODES, "mode": self.mode, "pattern": self.pattern, "task": self.task,
                "model_fingerprint": self.model_fingerprint, "input_shape": list(self.input_shape),
                "budget": dict(self.budget) if self.budget is not None else None, "ratios": dict(self.ratios),
                "counts": {k: list(v) for k, v in self.channels.items()}, "metrics": dict(self.metrics),
                "provenance": dict(self.provenance),
            }
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
        """A plan from its JSON form, every field checked (types, ranges, consistency)."""
        if not isinstance(data, dict):
            raise PlanError(f"{source}: a plan is a JSON object, got {_kind(data)}.")
        readable = f"{PLAN_SCHEMA!r} (channel plans) and {PLAN_SCHEMA_MODES!r} (plans with a mode)"
        if "schema" not in data:
            raise PlanError(f"{source}: unknown plan schema (it has no 'schema' key); this autoprune reads {readable}.")
        schema = data.get("schema")
        if schema not in (PLAN_SCHEMA, PLAN_SCHEMA_MODES):
            raise PlanError(f"{source}: unknown plan schema {schema!r:.60}; this autoprune reads {readable}.")
        keys, counts_key = (_PLAN_KEYS, "channels") if schema == PLAN_SCHEMA else (_PLAN_KEYS_2, "counts")
        missing = [k for k in ("model_fingerprint", "ratios", counts_key, "input_shape") + ("mode",) * (schema != PLAN_SCHEMA)
                   if k not in data]
        if missing:
            raise PlanError(f"{source}: missing required keys: {', '.join(missing)}.")
        unknown = [str(k) for k in data if k not in keys]
        if unknown:
            raise PlanError(f"{source}: unknown keys {', '.join(map(repr, unknown[:5]))}; a plan of schema {schema} has: "
                            f"{', '.join(keys)}.")

        def bad(key: str, what: str) -> PlanError:
            return PlanError(f"{source}: key {key!r}: {what}.")

        mode, pattern = str(data.get("mode", "channels")), data.get("pattern")
        if mode not in ("channels", "sparsity"):
            raise bad("mode", f"must be 'channels' or 'sparsity', got {_kind(data.get('mode'))}")
        if mode == "sparsity" and pattern not in _PATTERNS:
            raise bad("pattern", f"must be one of {', '.join(_PATTERNS)} for a sparsity plan, got {_kind(pattern)}")
        if mode == "channels" and pattern is not None:
            raise bad("pattern", f"applies to sparsity plans only (this plan's mode is channels), got {_kind(pattern)}")

        fingerprint = data["model_fingerprint"]
        if not isinstance(fingerprint, str):
            raise bad("model_fingerprint", f"must be a string (sha256 hex digest), got {_kind(fingerprint)}")
        task = data.get("task")
        if task is not None and not isinstance(task, str):
            raise bad("task", f"must be a task name or null, got {_kind(task)}")
        shape = data["input_shape"]
        if not isinstance(shape, (list, tuple)) or not shape or not all(_is_int(d) and d >= 1 for d in shape):
            raise bad("input_shape", f"must be a list of positive integers such as [1, 3, 32, 32], got {_kind(shape)}")
        input_shape = tuple(int(d) for d in shape)
        unit = "weights" if mode == "sparsity" else "channels"
        raw_channels, raw_ratios = data[counts_key], data["ratios"]
        if not isinstance(raw_channels, dict):
            raise bad(counts_key, f"must map group names to (dense, kept) {unit[:-1]} counts, got {_kind(raw_channels)}")
        if not isinstance(raw_ratios, dict):
            raise bad("ratios", f"must map group names to the fraction of {unit} removed, got {_kind(raw_ratios)}")
        channels: dict[str, tuple[int, int]] = {}
        for name, counts in raw_channels.items():
            if not (isinstance(counts, (list, tuple)) and len(counts) == 2 and all(_is_int(c) for c in counts)):
                raise bad(counts_key, f"group {name!r} must be a pair of integers (dense {unit}, kept {unit}), "
                                      f"got {_kind(counts)}")
            channels[str(name)] = (int(counts[0]), int(counts[1]))
        ratios: dict[str, float] = {}
        for name, ratio in raw_ratios.items():
            if not _is_number(ratio) or not math.isfinite(ratio) or not 0 <= ratio < 1:
                raise bad("ratios", f"group {name!r} has ratio {_kind(ratio)}; allowed: a number in [0, 1) "
                                    "(the fraction of channels removed)")
            ratios[str(name)] = float(ratio)
        extra = [n for n in ratios if n not in channels] + [n for n in channels if n not in ratios]
        if extra:
            raise PlanError(f"{source}: 'ratios' and {counts_key!r} name different groups (first: {extra[0]!r}).")
        for name, (dense, keep) in channels.items():
            if dense < 1:
                raise bad(counts_key, f"group {name!r} has {dense} dense {unit}; a group has at least one")
            if not 1 <= keep <= dense:
                raise PlanError(f"{source}: group {name!r} keeps {keep} of {dense} {unit}; allowed 1..{dense}.")
            if not math.isclose(ratios[name], (dense - keep) / dense, abs_tol=1e-6):
                raise PlanError(
                    f"{source}: group {name!r} has ratio {ratios[name]} but {unit} {dense}->{keep} "
                    f"(ratio {(dense - keep) / dense:.6f}); ratios are the fraction of {unit} removed."
                )
        budget = data.get("budget")
        if budget is not None:
            if not isinstance(budget, dict):
                raise bad("budget", f"must be an object such as {{\"flops\": 0.5}} or null, got {_kind(budget)}")
            from .budget import Budget  # budget imports this module

            try:
                Budget.from_dict(budget)
            except BudgetError as exc:
                raise bad("budget", str(exc).rstrip(".")) from None
        metrics = data.get("metrics")
        if metrics is None:
            metrics = {}
        if not isinstance(metrics, dict):
            raise bad("metrics", f"must be an object of numbers, got {_kind(metrics)}")
        for name, value in metrics.items():
            if value is not None and not _is_number(value):
                raise bad("metrics", f"{name!r} must be a number, got {_kind(value)}")
        provenance = data.get("provenance")
        if provenance is None:
            provenance = {}
        if not isinstance(provenance, dict):
            raise bad("provenance", f"must be an object, got {_kind(provenance)}")
        return cls(
            ratios=ratios, channels=channels, model_fingerprint=fingerprint,
            input_shape=input_shape, task=task, budget=dict(budget) if budget is not None else None,
            metrics=dict(metrics), provenance=dict(provenance), mode=mode, pattern=pattern,
        )

    @classmethod
    def from_json(cls, text: str, *, source: str = "plan") -> Plan:
        try:
            data = json.loads(text, object_pairs_hook=_no_duplicate_keys)
        except json.JSONDecodeError as exc:
            raise PlanError(
                f"{source} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); "
                "it may be truncated. Plans are written by `autoprune export` or Plan.save()."
            ) from None
        except _DuplicateKey as exc:
            raise PlanError(f"{source}: key {exc.args[0]!r} appears twice in one object; each key may be given once.") from None
        except RecursionError:
            raise PlanError(f"{source} is not a plan: its JSON nests too deeply.") from None
        return cls.from_dict(data, source=source)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the plan as JSON atomically (a reader never sees half a file)."""
        return write_atomic(Path(path), self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Plan:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise PlanError(f"Plan file {path} does not exist.") from None
        except IsADirectoryError:
            raise PlanError(f"Plan file {path} is a directory; a plan is a JSON file (plan.json of `autoprune export`).") from None
        except UnicodeDecodeError as exc:
            raise PlanError(
                f"Plan file {path} is not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start}); "
                "a plan is a JSON file written by `autoprune export` or Plan.save()."
            ) from None
        except OSError as exc:
            raise PlanError(f"Plan file {path} cannot be read ({exc}).") from None
        return cls.from_json(text, source=f"plan file {path}")


def write_atomic(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def check_plan_matches(
    plan: Plan,
    groups: list[tuple[str, int]],
    *,
    what: str = "the model",
    input_shape: tuple[int, ...] | torch.Size | None = None,
) -> None:
    """Refuse a plan that does not fit a model, naming the first difference.

    ``groups`` are the model's (name, dense channels) in profile order; ``input_shape`` its example
    input's shape, when known. Every field is checked, not only the plan's fingerprint (a plan
    file can be edited): group names and their order, dense channel counts, kept counts within
    1..dense, ratios consistent with the counts, the input shape (batch size aside: it does not
    change the pruned architecture) and the fingerprint.
    """
    groups = [(str(name), int(dense)) for name, dense in groups]
    task = f" (made for task {plan.task!r})" if plan.task else ""

    def refuse(detail: str, error: type[PlanError] = PlanMismatchError) -> PlanError:
        return error(
            f"The plan{task} does not fit {what}: {detail}. Use a plan exported for this model, or run a search on it."
        )

    try:
        planned = [(str(name), dense, keep) for name, (dense, keep) in plan.channels.items()]
    except (TypeError, ValueError, AttributeError):
        raise refuse("its 'channels' are not (dense, kept) pairs per group", PlanError) from None
    model_groups = dict(groups)
    differences = []
    for name, dense, _ in planned:
        if name not in model_groups:
            differences.append(f"{name!r} ({dense} channels) is not a group of {what}")
        elif model_groups[name] != dense:
            differences.append(f"{name!r} has {model_groups[name]} channels in {what} but {dense} in the plan")
    planned_names = {name for name, _, _ in planned}
    for name, dense in groups:
        if name not in planned_names:
            differences.append(f"{what} has group {name!r} ({dense} channels) that the plan lacks")
    if differences:
        raise refuse("; ".join(differences[:3]) + (f"; and {len(differences) - 3} more" if len(differences) > 3 else ""))
    order = [name for name, _, _ in planned]
    if order != [name for name, _ in groups]:
        at = next(i for i, (a, (b, _)) in enumerate(zip(order, groups)) if a != b)
        raise refuse(f"the groups are the same but listed in another order (position {at}: {order[at]!r} in the "
                     f"plan, {groups[at][0]!r} in {what})")
    for name, dense, keep in planned:
        if isinstance(keep, bool) or not isinstance(keep, (int, np.integer)) or not 1 <= keep <= dense:
            raise refuse(f"group {name!r} keeps {keep!r} of {dense} channels; allowed: an integer in 1..{dense}", PlanError)
    for name, dense, keep in planned:
        ratio = plan.ratios.get(name) if isinstance(plan.ratios, Mapping) else None
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio):
            raise refuse(f"group {name!r} has ratio {ratio!r}; a ratio is the fraction of channels removed", PlanError)
        if not math.isclose(ratio, (dense - keep) / dense, abs_tol=1e-6):
            raise refuse(f"group {name!r} has ratio {ratio} but channels {dense}->{keep} (ratio "
                         f"{(dense - keep) / dense:.6f})", PlanError)
    extra = sorted(set(plan.ratios) - planned_names)
    if extra:
        raise refuse(f"its ratios name {extra[0]!r}, which has no channel counts in the plan", PlanError)
    if input_shape is not None:
        expected = tuple(int(d) for d in input_shape)
        given = tuple(plan.input_shape)
        if len(given) != len(expected) or given[1:] != expected[1:]:
            raise refuse(f"the plan was made for inputs of shape {given} but {what} takes {expected}")
    fingerprint = fingerprint_of(groups)
    if plan.model_fingerprint != fingerprint:
        raise refuse(f"its model_fingerprint {str(plan.model_fingerprint)[:16]!r}... is not the fingerprint of "
                     f"these groups ({fingerprint[:16]}...); the plan file was edited or corrupted")


class StaleBatchNormWarning(UserWarning):
    """A pruned model's BatchNorm layers still hold the dense model's running statistics."""


# Applying a plan to a model is its own module; imported here, after Plan exists, so that
# ``from autoprune.plan import apply_plan`` keeps working.
from ._apply import apply_plan  # noqa: E402
