"""The sparsity baselines that rank weights across the whole model: global magnitude and LAMP.

Both remove the lowest-ranked weights model-wide until the budget holds; they differ in the score
that ranks them. Raw magnitudes (global magnitude pruning) compare weights of different layers
directly, so layers with small weights empty first; LAMP's scores are normalized within each layer
so that every layer keeps its largest weight and high sparsities stay trainable. The uniform
baseline needs no ranking: :func:`autoprune.budget.uniform_plan` serves it unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from .._lattice import Grid, bisect, exchange, fill
from ..budget import Bounds, Budget
from ..errors import ConfigError
from ..plan import Plan
from ._mask import lamp_scores
from ._profile import SparsityProfile

__all__ = ["ranked_plan", "global_magnitude_plan", "lamp_plan"]


def ranked_plan(profile: SparsityProfile, budget: Budget, scores: Mapping[str, np.ndarray], *,
                bounds: Bounds | None = None, strategy: str = "global") -> Plan:
    """The plan that removes the fewest lowest-scored weights, model-wide, that meet ``budget``.

    ``scores`` hold one score per weight of every tensor (comparable across tensors). Each tensor
    removes at least what its lower ratio bound forces and at most what its upper bound allows; the
    kept counts are then snapped to the pattern's lattice and topped up to the budget as the
    projection does, so the plan meets it as tightly.
    """
    grid = Grid(profile, budget, bounds, 1)
    missing = [n for n in grid.names if n not in scores]
    if missing:
        raise ConfigError(f"A ranked sparsity plan needs scores for every weight tensor; missing: {', '.join(missing)}.")
    grid.check_feasible()
    lattice, cost = grid.lattice, grid.cost
    smallest, largest = lattice.extremes()
    values, owners = [], []
    for i, name in enumerate(grid.names):
        removable = int(grid.dense[i] - smallest[i])
        lowest = np.sort(np.asarray(scores[name], dtype=np.float64))[:removable]
        values.append(lowest)
        owners.append(np.full(removable, i, dtype=np.int64))
    value = np.concatenate(values) if values else np.zeros(0)
    owner = np.concatenate(owners)[np.argsort(value, kind="stable")] if values else np.zeros(0, dtype=np.int64)
    forced = grid.dense - largest  # weights the lower bounds already remove

    def kept_after(m: int) -> np.ndarray:
        removed = np.maximum(np.bincount(owner[:m], minlength=len(grid.names)).astype(np.float64), forced)
        return lattice.snap_down(removed / grid.dense)

    # The fewest lowest-ranked weights whose removal meets the budget; bisection over the ranking.
    kept = kept_after(bisect(lambda m: cost.fits(kept_after(m)), 0, len(owner)))
    kept = exchange(lattice, cost, fill(lattice, cost, kept, 1 - kept / grid.dense))
    return grid.plan(kept, {"strategy": strategy, "ranking": strategy})


def global_magnitude_plan(profile: SparsityProfile, budget: Budget, scores: Mapping[str, np.ndarray], *,
                          bounds: Bounds | None = None) -> Plan:
    """Global magnitude pruning: one threshold on the criterion's raw scores (|w| by default)."""
    return ranked_plan(profile, budget, scores, bounds=bounds, strategy="global")


def lamp_plan(profile: SparsityProfile, budget: Budget, scores: Mapping[str, np.ndarray], *,
              bounds: Bounds | None = None) -> Plan:
    """LAMP (layer-adaptive magnitude pruning, Lee et al., ICLR 2021): one threshold on LAMP scores."""
    return ranked_plan(profile, budget, lamp_scores(scores), bounds=bounds, strategy="lamp")
