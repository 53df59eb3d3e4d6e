"""The machinery of projection onto a budget: the lattice of allowed kept counts, the budget's
cost, the heuristics that close the gap to the limit, and one bisection all searches share.

:mod:`autoprune.budget` states the algorithm (shift, snap, fill, exchange); this module holds its
parts, each replaceable alone: a dimension of weights instead of channels changes the lattice's
step, a latency budget changes the cost.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import ConfigError, InfeasibleBudgetError
from .plan import Plan
from .profile import ModelProfile

if TYPE_CHECKING:
    from .budget import Bounds, Budget, LatencyModel

__all__ = ["Lattice", "Cost", "Grid", "bisect", "fill", "exchange"]


class Lattice:
    """The kept counts allowed in each dimension: the multiples of the dimension's step inside
    its ratio range, plus the dense count when the range starts at 0 (leaving a group whole is
    always allowed then).

    Each dimension is an arithmetic range (first, step, count) rather than a list, so a
    dimension of a million weights costs what one of 64 channels does.
    """

    def __init__(self, names: list[str], dense: np.ndarray, lo: np.ndarray, hi: np.ndarray,
                 steps: list[int]) -> None:
        self.names = names
        self.dense = dense
        self.steps = np.array(steps, dtype=np.float64)
        self.first = np.empty_like(dense)
        self.count = np.zeros(len(dense), dtype=np.int64)  # aligned values; the dense extra comes after
        self.dense_extra = np.zeros(len(dense), dtype=bool)
        for i, (name, n, low, high, step) in enumerate(zip(names, dense.astype(int), lo, hi, steps)):
            kmin = max(1, math.ceil(n * (1 - high) - 1e-9))
            kmax = math.floor(n * (1 - low) + 1e-9)
            first, last = math.ceil(kmin / step) * step, (kmax // step) * step
            self.first[i] = first
            self.count[i] = (last - first) // step + 1 if last >= first else 0
            self.dense_extra[i] = low == 0.0 and n % step != 0
            if self.size(i) == 0:
                raise ConfigError(
                    f"Group {name!r} ({n} channels) has no channel count that is a multiple of "
                    f"{step} (round_to, and the group's channel blocks) with a ratio in [{low}, {high}]; "
                    "widen the ratio range or lower round_to."
                )

    def size(self, d: int) -> int:
        return int(self.count[d] + self.dense_extra[d])

    def value(self, d: int, index: int) -> float:
        """The ``index``-th allowed kept count of dimension ``d``, ascending."""
        if index >= self.count[d]:
            return float(self.dense[d])
        return float(self.first[d] + index * self.steps[d])

    def index_at_or_below(self, d: int, target: float) -> int:
        """The largest index whose count does not exceed ``target`` (0 when none does)."""
        if self.dense_extra[d] and target >= self.dense[d]:
            return int(self.count[d])
        if target < self.first[d]:
            return 0
        return int(max(0, min(self.count[d] - 1, math.floor((target - self.first[d]) / self.steps[d]))))

    def index_of(self, d: int, kept: float) -> int:
        """The index of an allowed count (the first at or above it, for one that is not)."""
        if self.dense_extra[d] and kept >= self.dense[d]:
            return int(self.count[d])
        return int(min(self.count[d], max(0, math.ceil((kept - self.first[d]) / self.steps[d] - 1e-9))))

    def snap_down(self, ratios: np.ndarray) -> np.ndarray:
        """Largest allowed kept count not above the continuous one (prunes at least as much)."""
        target = self.dense * (1 - ratios) + 1e-9
        return np.array([self.value(d, self.index_at_or_below(d, t)) for d, t in enumerate(target)])

    def extremes(self) -> tuple[np.ndarray, np.ndarray]:
        return (np.array([self.value(d, 0) for d in range(len(self.dense))]),
                np.array([self.value(d, self.size(d) - 1) for d in range(len(self.dense))]))


class Cost:
    """What a budget measures of a kept vector (profile order): MACs or parameters from the
    profile's analytic cost model, milliseconds from a latency predictor, or (sparsity mode) the
    nonzero weights or the compressed bytes, both linear in the weights kept."""

    def __init__(self, profile: ModelProfile, budget: Budget, latency: LatencyModel | None) -> None:
        self.budget = budget
        self.limit = budget.limit(profile, latency)
        self.dense_value = budget.dense_value(profile, latency)
        dense = np.array([g.channels for g in profile.groups], dtype=np.float64)
        if budget.is_latency:
            assert latency is not None  # dense_value refused a latency budget without a predictor
            self._cost: Any = latency.predict_kept
        elif budget.metric == "nonzeros":
            self._cost = lambda kept: float(np.sum(kept))
        elif budget.metric == "size":
            self._cost = profile.size_of_vector  # type: ignore[attr-defined]  # a SparsityProfile (check_mode)
        else:
            removed_cost = profile.cost.macs if budget.metric == "flops" else profile.cost.params
            self._cost = lambda kept: removed_cost(dense - kept)

    def __call__(self, kept: np.ndarray) -> float:
        return self._cost(kept)

    def fits(self, kept: np.ndarray) -> bool:
        return self._cost(kept) <= self.limit

    @property
    def unit(self) -> str:
        return {"flops": "MACs", "params": "parameters", "nonzeros": "nonzero weights",
                "size": "bytes"}.get(self.budget.metric, "ms")


def bisect(holds: Any, low: Any, high: Any, *, iterations: int = 50) -> Any:
    """The smallest ``x`` in [low, high] for which ``holds(x)``, for a ``holds`` that is False up to
    some point and True after it, and True at ``high``. Integers are searched exactly, floats by
    ``iterations`` halvings (2**-50 of a ratio is far below one channel)."""
    if holds(low):
        return low
    if isinstance(low, int) and isinstance(high, int):
        while low < high:
            mid = (low + high) // 2
            low, high = (low, mid) if holds(mid) else (mid + 1, high)
        return high
    for _ in range(iterations):
        mid = 0.5 * (low + high)
        low, high = (low, mid) if holds(mid) else (mid, high)
    return high


class Grid:
    """One projection problem: the lattice of allowed kept counts, the budget's cost, the profile."""

    def __init__(
        self, profile: ModelProfile, budget: Budget, bounds: Bounds | None, round_to: int,
        latency: LatencyModel | None = None,
    ) -> None:
        if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
            raise ConfigError(f"round_to must be a positive integer, got {round_to!r}.")
        budget.check_mode(profile.mode)
        self.round_to = round_to
        self.profile = profile
        self.budget = budget
        from .budget import resolve_bounds

        self.bounds = resolve_bounds(profile, bounds)
        self.names = profile.names
        self.dense = np.array([g.channels for g in profile.groups], dtype=np.float64)
        self.lo = np.array([self.bounds[n][0] for n in self.names])
        self.hi = np.array([self.bounds[n][1] for n in self.names])
        # Each kept count of a channel group is a multiple of round_to and of its blocks (grouped
        # convolutions lose channels evenly from every block); a head group steps by one head, a
        # weight tensor by one weight (by half the tensor under the 2:4 pattern: dense or 2:4).
        steps = [g.step if g.kind in ("heads", "weights") else math.lcm(round_to, g.step) for g in profile.groups]
        self.lattice = Lattice(self.names, self.dense, self.lo, self.hi, steps)
        self.latency = latency
        self.cost = Cost(profile, budget, latency)
        self.limit = self.cost.limit

    def check_feasible(self) -> None:
        smallest, largest = self.lattice.extremes()
        low, high = self.cost(smallest), self.cost(largest)
        if low > self.limit * (1 + 1e-12):
            dense = self.cost.dense_value
            raise InfeasibleBudgetError(
                f"Budget {self.budget} ({self.limit:.4g} {self.cost.unit}) cannot be met: with the allowed "
                f"ratio ranges the model reaches {self.budget.metric} between {low / dense:.4f} and "
                f"{high / dense:.4f} of dense ({low:.4g} to {high:.4g}). Raise the budget or widen the "
                "ratio ranges (groups.ratio, groups.include)." + self._round_to_note()
            )

    def _round_to_note(self) -> str:
        """Why rounding leaves groups dense, when it does: their ranges allow pruning, but no
        multiple of round_to below their channel count is inside them."""
        if self.round_to == 1:
            return ""
        lattice = self.lattice
        stuck = [(name, int(n)) for d, (name, n, hi) in enumerate(zip(self.names, self.dense, self.hi))
                 if hi > 0 and lattice.size(d) == 1 and lattice.value(d, 0) == n]
        if not stuck:
            return ""
        prunable = len(self.names) - len(stuck)
        largest = max(int(n) for n in self.dense)
        listed = ", ".join(f"{name} ({n})" for name, n in stuck[:6]) + (f" and {len(stuck) - 6} more" if len(stuck) > 6 else "")
        return (
            f" round_to={self.round_to} (groups.round_to in a search space) leaves {len(stuck)} of "
            f"{len(self.names)} groups unprunable, as no multiple of {self.round_to} below their channel count "
            f"is inside their ratio range: {listed}"
            + (f"; the largest group has {largest} channels, so round_to must be below {largest} for any "
               "group to be pruned" if prunable == 0 and self.round_to >= largest else "")
            + ". Lower round_to (8 or 16 match vector units)."
        )

    def plan(self, kept: np.ndarray, provenance: Mapping[str, Any]) -> Plan:
        metrics = {"latency_ms": self.latency.predict_kept(kept)} if self.latency is not None else None
        return Plan.from_kept(
            self.profile,
            {n: int(k) for n, k in zip(self.names, kept)},
            budget=self.budget.to_dict(),
            metrics=metrics,
            provenance=provenance,
        )


def fill(lattice: Lattice, cost: Cost, kept: np.ndarray, target_ratios: np.ndarray) -> np.ndarray:
    """Give back single lattice steps to the most over-pruned groups while the budget still holds."""
    kept = kept.copy()
    position = [lattice.index_of(d, k) for d, k in enumerate(kept)]
    while True:
        best, best_excess = -1, -np.inf
        for d in range(len(kept)):
            if position[d] + 1 >= lattice.size(d):
                continue
            excess = (1 - kept[d] / lattice.dense[d]) - target_ratios[d]
            if excess <= best_excess:
                continue
            trial = kept.copy()
            trial[d] = lattice.value(d, position[d] + 1)
            if cost.fits(trial):
                best, best_excess = d, excess
        if best < 0:
            return kept
        position[best] += 1
        kept[best] = lattice.value(best, position[best])


def exchange(lattice: Lattice, cost: Cost, kept: np.ndarray, tolerance: float = 1e-3) -> np.ndarray:
    """Close a gap the single steps of :func:`fill` cannot: one coarse step back in one group,
    paid for by the fewest fine steps out of another, while that brings the cost closer to the
    limit. Needed on small models whose groups move MACs in steps of several percent."""
    kept = kept.copy()
    current = cost(kept)
    n = len(kept)
    for _ in range(2 * n):
        if current >= cost.limit * (1 - tolerance):
            break
        best: tuple[float, np.ndarray] | None = None
        position = [lattice.index_of(d, k) for d, k in enumerate(kept)]
        for i in range(n):
            if position[i] + 1 >= lattice.size(i):
                continue
            up = kept.copy()
            up[i] = lattice.value(i, position[i] + 1)
            for j in range(n):
                if j == i or position[j] == 0:
                    continue

                def down(steps: int, j: int = j) -> np.ndarray:
                    trial = up.copy()
                    trial[j] = lattice.value(j, position[j] - steps)
                    return trial

                if not cost.fits(down(position[j])):
                    continue
                trial = down(bisect(lambda steps: cost.fits(down(steps)), 1, position[j]))  # fewest steps down
                value = cost(trial)
                if value > current and (best is None or value > best[0]):
                    best = (value, trial)
        if best is None:
            break
        current, kept = best
    return kept
