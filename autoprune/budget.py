"""Budgets, and the projection of any raw ratio vector onto a plan that meets one.

Every candidate a strategy proposes is projected before it is evaluated, so each trial meets the
budget by construction rather than being rejected after the fact. Projection shifts the whole raw
vector by one offset (keeping its shape: which groups are pruned more than which), snaps channel
counts to the allowed grid, then gives back single channel steps to the groups most over-pruned
relative to the shifted vector while the budget still holds. Costs come from the profile's
analytic cost model, exact for what Torch-Pruning counts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from ._lattice import Grid, bisect, exchange, fill
from .errors import BudgetError, ConfigError
from .plan import Plan
from .profile import ModelProfile

__all__ = [
    "Budget",
    "Bounds",
    "LatencyModel",
    "DEFAULT_RATIO_RANGE",
    "DEFAULT_RATIO_RANGES",
    "resolve_bounds",
    "project",
    "reachable_range",
    "uniform_plan",
    "global_plan",
]

DEFAULT_RATIO_RANGE: tuple[float, float] = (0.0, 0.8)
#: Default ratio range per mode: a channel group keeps at least a fifth of its channels; a weight
#: tensor may lose 99% of its weights (high sparsities need some layers sparser than the target).
DEFAULT_RATIO_RANGES: Mapping[str, tuple[float, float]] = {"channels": DEFAULT_RATIO_RANGE, "sparsity": (0.0, 0.99)}
Bounds = Mapping[str, tuple[float, float]]
_METRICS = ("flops", "params", "latency_ms", "latency", "nonzeros", "size")
#: What each mode's budgets may limit: channel pruning shrinks compute, weight sparsity storage.
MODE_METRICS = {"channels": ("flops", "params", "latency_ms", "latency"), "sparsity": ("nonzeros", "size")}


class LatencyModel(Protocol):
    """What budgets need of a latency predictor (see :class:`autoprune.latency.LatencyPredictor`)."""

    dense_ms: float

    def predict_kept(self, kept: np.ndarray) -> float: ...


@dataclass(frozen=True)
class Budget:
    """A limit on the pruned model's MACs, parameters or latency. Give exactly one:

    - ``flops``: multiply-accumulates as Torch-Pruning counts them (the convention of AMC and
      most pruning papers), as a fraction in (0, 1) of the dense model or an absolute count >= 1.
    - ``params``: parameters, as a fraction or an absolute count.
    - ``latency_ms``: measured milliseconds per batch on the target device (absolute).
    - ``latency``: a fraction in (0, 1) of the dense model's measured latency.
    - ``nonzeros`` (sparsity mode): nonzero weights of the prunable weight tensors, as a fraction
      in (0, 1) of their dense count or an absolute count >= 1.
    - ``size`` (sparsity mode): bytes of the compressed model's tensors (bitmask + nonzero values
      per weight tensor, the rest dense), as a fraction in (0, 1) of the dense model's bytes or an
      absolute byte count.
    """

    flops: float | None = None
    params: float | None = None
    latency_ms: float | None = None
    latency: float | None = None
    nonzeros: float | None = None
    size: float | None = None

    def __post_init__(self) -> None:
        given = [(k, getattr(self, k)) for k in _METRICS if getattr(self, k) is not None]
        if len(given) != 1:
            raise BudgetError(
                "A budget limits exactly one of flops=, params= (a fraction in (0, 1) of the dense "
                "model, or an absolute count >= 1), latency_ms= (milliseconds) or latency= (a fraction "
                "of the dense model's latency), or in sparsity mode nonzeros= or size= (a fraction of the "
                f"dense model's weights or bytes, or an absolute count); got {dict(given) or 'none'}."
            )
        key, value = given[0]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise BudgetError(f"Budget {key}={value!r} is not allowed: it must be a positive number.")
        if key == "latency" and value >= 1:
            raise BudgetError(f"Budget latency={value} must be a fraction in (0, 1); for milliseconds use latency_ms=.")

    @property
    def metric(self) -> str:
        """``flops``, ``params``, ``latency_ms``, ``latency``, ``nonzeros`` or ``size``."""
        return next(k for k in _METRICS if getattr(self, k) is not None)

    @property
    def value(self) -> float:
        return float(getattr(self, self.metric))

    @property
    def is_latency(self) -> bool:
        return self.metric in ("latency_ms", "latency")

    @property
    def is_fraction(self) -> bool:
        return self.metric == "latency" or (self.metric != "latency_ms" and self.value < 1)

    @property
    def mode(self) -> str:
        """The search mode whose plans this budget can limit: ``channels`` or ``sparsity``."""
        return "sparsity" if self.metric in MODE_METRICS["sparsity"] else "channels"

    def check_mode(self, mode: str) -> None:
        """Refuse a budget that the search mode cannot limit, naming the mode and what it allows."""
        if mode not in MODE_METRICS:
            raise BudgetError(f"Unknown mode {mode!r}; allowed: {', '.join(MODE_METRICS)}.")
        if self.metric not in MODE_METRICS[mode]:
            allowed = ", ".join(m + "=" for m in MODE_METRICS[mode])
            why = ("weight sparsity zeroes weights inside dense tensors, so MACs, parameters and latency of dense "
                   "kernels do not shrink; it limits the nonzero weights or the compressed size"
                   if mode == "sparsity" else
                   "channel pruning limits compute; nonzeros= and size= limit a sparsity search (mode: sparsity)")
            raise BudgetError(f"Budget {self} is not allowed in mode: {mode} ({why}); allowed: {allowed}.")

    def dense_value(self, profile: ModelProfile, latency: LatencyModel | None = None) -> float:
        """The dense model's MACs, parameters or latency (ms), whichever this budget limits."""
        if self.metric == "flops":
            return profile.macs
        if self.metric == "params":
            return profile.params
        if self.metric in ("nonzeros", "size"):
            if profile.mode != "sparsity":
                self.check_mode(profile.mode)  # names the mode and what it allows
            return profile.nonzeros if self.metric == "nonzeros" else profile.dense_bytes  # type: ignore[attr-defined]
        if latency is None:
            raise BudgetError(
                f"Budget {self} limits latency, which needs a latency predictor measured on the target "
                "device (autoprune.latency.build_predictor; in a search space, the latency: section)."
            )
        return latency.dense_ms

    def limit(self, profile: ModelProfile, latency: LatencyModel | None = None) -> float:
        """The absolute limit (MACs, parameters or ms) for this profile's dense model."""
        dense = self.dense_value(profile, latency)
        return self.value * dense if self.is_fraction else self.value

    def fraction(self, profile: ModelProfile, latency: LatencyModel | None = None) -> float:
        return self.limit(profile, latency) / self.dense_value(profile, latency)

    def to_dict(self) -> dict[str, float]:
        return {self.metric: self.value}

    def __str__(self) -> str:
        return f"{self.metric}={self.value:g}"

    def metric_key(self) -> str:
        """The plan/trial metric this budget limits: flops, params, latency_ms, nonzeros or size_bytes."""
        return "latency_ms" if self.is_latency else ("size_bytes" if self.metric == "size" else self.metric)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Budget:
        """A budget from ``{"flops": 0.5}``: one metric, its value a number (not a string or a boolean)."""
        if not isinstance(data, Mapping):
            raise BudgetError(
                f"A budget is one 'metric: value' pair such as {{flops: 0.5}}, with metric one of "
                f"{', '.join(_METRICS)}; got {type(data).__name__} {data!r:.60}."
            )
        if len(data) != 1:
            named = ", ".join(str(k) for k in data) or "none"
            raise BudgetError(
                f"A budget limits one metric at a time, got {len(data)} ({named}); give exactly one of "
                f"{', '.join(_METRICS)}, e.g. {{flops: 0.5}}."
            )
        ((key, value),) = data.items()
        if key not in _METRICS:
            raise BudgetError(f"Unknown budget metric {key!r}; allowed: {', '.join(_METRICS)}.")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise BudgetError(
                f"Budget {key}={value!r:.60} is not allowed: its value must be a number (a fraction in (0, 1) "
                "of the dense model, or an absolute value), not "
                + ("a boolean." if isinstance(value, bool) else f"{type(value).__name__}.")
            )
        return cls(**{key: float(value)})

    @classmethod
    def parse(cls, text: str) -> Budget:
        """Parse ``flops=0.5`` / ``params=120000`` / ``latency_ms=3`` as given on the command line."""
        key, sep, value = text.partition("=")
        key, value = key.strip(), value.strip()
        if not sep:
            raise BudgetError(f"--budget {text!r} must look like flops=0.5, params=0.4, latency_ms=3.0 or latency=0.5 "
                              "(in sparsity mode nonzeros=0.1 or size=0.2).")
        if any(c in value for c in "=,;") or len(value.split()) > 1:
            raise BudgetError(
                f"--budget {text!r} names more than one metric; one budget metric at a time is allowed: "
                f"one of {', '.join(m + '=' for m in _METRICS)} (e.g. --budget flops=0.5)."
            )
        if key not in _METRICS:
            raise BudgetError(f"Unknown budget metric {key!r} in --budget {text!r}; allowed: {', '.join(_METRICS)}.")
        try:
            number = float(value)
        except ValueError:
            raise BudgetError(
                f"--budget {text!r}: {value!r} is not a number; use e.g. {key}=0.5."
            ) from None
        try:
            return cls.from_dict({key: number})
        except BudgetError as exc:
            raise BudgetError(f"--budget {text!r}: {exc}") from None


def resolve_bounds(
    profile: ModelProfile, bounds: Bounds | None = None, default: tuple[float, float] | None = None
) -> dict[str, tuple[float, float]]:
    """Ratio range per group: ``bounds`` where given, ``default`` for the rest (by default the
    profile's mode's range, :data:`DEFAULT_RATIO_RANGES`); checked.

    A transformer's residual stream (``GroupInfo.embedding``) defaults to [0, 0]: its width is
    left whole unless ``bounds`` names it."""
    bounds = dict(bounds) if bounds is not None else {}
    default = default or DEFAULT_RATIO_RANGES[profile.mode]
    unknown = sorted(set(bounds) - set(profile.names))
    if unknown:
        raise ConfigError(f"Bounds name unknown groups {', '.join(unknown)}; groups: {', '.join(profile.names)}.")
    resolved = {}
    for group in profile.groups:
        name = group.name
        lo, hi = bounds.get(name, (0.0, 0.0) if group.embedding else default)
        if not (0.0 <= lo <= hi < 1.0):
            raise ConfigError(
                f"Ratio range of group {name!r} is [{lo}, {hi}]; it must satisfy 0 <= low <= high < 1 "
                "(ratios are the fraction of channels removed)."
            )
        resolved[name] = (float(lo), float(hi))
    return resolved


def reachable_range(
    profile: ModelProfile, metric: str = "flops", *, bounds: Bounds | None = None, round_to: int = 1,
    latency: LatencyModel | None = None,
) -> tuple[float, float]:
    """(lowest, highest) fraction of the dense model's ``metric`` that plans within ``bounds`` reach."""
    key = "latency" if metric in ("latency", "latency_ms") else metric
    grid = Grid(profile, Budget(**{key: 0.5}), bounds, round_to, latency)
    smallest, largest = grid.lattice.extremes()
    return grid.cost(smallest) / grid.cost.dense_value, grid.cost(largest) / grid.cost.dense_value


def project(
    profile: ModelProfile,
    raw: Mapping[str, float],
    budget: Budget,
    *,
    bounds: Bounds | None = None,
    round_to: int = 1,
    provenance: Mapping[str, Any] | None = None,
    latency: LatencyModel | None = None,
) -> Plan:
    """Map raw ratios (fraction removed per group, inside ``bounds``) onto a plan meeting ``budget``.

    Groups missing from ``raw`` start at their lower bound. The returned plan's MACs (or params)
    never exceed the budget and are as close below it as the channel grid allows; the budget is
    refused before any work when even the largest allowed ratios cannot meet it. Channel ratios
    move by one shift; in sparsity mode each tensor's density (1 - ratio) by one factor.
    """
    grid = Grid(profile, budget, bounds, round_to, latency)
    unknown = sorted(set(raw) - set(grid.names))
    if unknown:
        raise ConfigError(f"Raw ratios name unknown groups {', '.join(unknown)}; groups: {', '.join(grid.names)}.")
    r = np.array([float(raw.get(n, grid.bounds[n][0])) for n in grid.names])
    outside = [
        f"{n}={v:g} not in [{lo:g}, {hi:g}]"
        for n, v, lo, hi in zip(grid.names, r, grid.lo, grid.hi)
        if not (lo - 1e-9 <= v <= hi + 1e-9)
    ]
    if outside:
        raise ConfigError("Raw ratios outside their allowed ranges: " + "; ".join(outside[:5]) + ".")
    return _shift_project(grid, r, provenance or {})


def _shift_project(grid: Grid, r: np.ndarray, provenance: Mapping[str, Any]) -> Plan:
    grid.check_feasible()
    lattice, cost = grid.lattice, grid.cost
    if grid.profile.mode == "sparsity":
        # Weight tensors are shifted in log density (each keeps the same factor more or fewer of
        # its weights), not in ratio: at 90% sparsity an additive shift pins every tensor whose
        # raw ratio is above average at the 0.99 bound and leaves the rest far denser, a plan
        # that scores far below the proportional allocations (global magnitude, LAMP).
        log_density = np.log1p(-r)
        span = float(np.max(np.log1p(-grid.lo) - np.log1p(-grid.hi))) + 1e-9

        def ratios_at(shift: float) -> np.ndarray:
            return np.clip(-np.expm1(log_density - shift * span), grid.lo, grid.hi)
    else:
        def ratios_at(shift: float) -> np.ndarray:
            return np.clip(r + shift, grid.lo, grid.hi)

    # At -1 every group sits at its lower bound, at +1 at its upper bound (which meets the budget).
    shift = bisect(lambda s: cost.fits(lattice.snap_down(ratios_at(s))), -1.0, 1.0)
    target = ratios_at(shift)
    kept = exchange(lattice, cost, fill(lattice, cost, lattice.snap_down(target), target))
    return grid.plan(kept, {"projection_shift": float(shift), **provenance})


def uniform_plan(
    profile: ModelProfile, budget: Budget, *, bounds: Bounds | None = None, round_to: int = 1,
    latency: LatencyModel | None = None,
) -> Plan:
    """The same ratio for every group (clipped to each group's range, and as far as channel
    rounding allows), meeting ``budget``."""
    grid = Grid(profile, budget, bounds, round_to, latency)
    return _shift_project(grid, np.zeros(len(grid.names)), {"strategy": "uniform"})


def global_plan(
    profile: ModelProfile,
    budget: Budget,
    scores: Mapping[str, np.ndarray],
    *,
    bounds: Bounds | None = None,
    round_to: int = 1,
    latency: LatencyModel | None = None,
) -> Plan:
    """Torch-Pruning's global ranking: remove the least important channels model-wide.

    ``scores`` are the per-group channel importances normalized within each group (as
    :func:`autoprune.pruning.channel_scores` returns them), so one threshold ranks all groups.
    """
    grid = Grid(profile, budget, bounds, round_to, latency)
    missing = [n for n in grid.names if n not in scores]
    if missing:
        raise ConfigError(f"global_plan needs channel scores for every group; missing: {', '.join(missing)}.")
    grid.check_feasible()
    lattice, cost = grid.lattice, grid.cost
    smallest, largest = lattice.extremes()
    entries = []  # (score, group index) of each removable channel, lowest first within its group
    for i, name in enumerate(grid.names):
        ordered = np.sort(np.asarray(scores[name], dtype=np.float64))
        removable = int(grid.dense[i] - smallest[i])
        entries += [(float(s), i) for s in ordered[:removable]]
    entries.sort(key=lambda e: e[0])
    forced = grid.dense - largest  # channels the lower bounds already remove

    def kept_after(m: int) -> np.ndarray:
        removed = np.zeros_like(grid.dense)
        for _, i in entries[:m]:
            removed[i] += 1
        removed = np.maximum(removed, forced)
        return lattice.snap_down(removed / grid.dense)

    # The fewest least-important channels whose removal meets the budget.
    kept = kept_after(bisect(lambda m: cost.fits(kept_after(m)), 0, len(entries)))
    kept = exchange(lattice, cost, fill(lattice, cost, kept, 1 - kept / grid.dense))
    return grid.plan(kept, {"strategy": "global", "ranking": "global"})
