"""What a search space may combine with ``mode: sparsity`` (and ``mode: channels``), as messages.

:class:`autoprune.space.SearchSpace` asks :func:`mode_conflict` about each section after ``mode``
and ``pattern`` are read, so a file that mixes the modes fails naming the key, the mode and what
the mode allows, before any work.
"""

from __future__ import annotations

from typing import Any

from ..budget import DEFAULT_RATIO_RANGES as DEFAULT_RATIOS
from ..budget import Budget
from ..errors import BudgetError

__all__ = ["DEFAULT_RATIOS", "mode_conflict"]


def mode_conflict(key: str, value: Any, mode: str | None, pattern: str | None) -> str | None:
    """Why section ``key`` (its validated ``value``) does not fit ``mode``, or None when it does."""
    if mode is None:
        return None  # the mode itself was refused; that error is reported
    if key == "pattern":
        if mode == "channels" and value != "unstructured":
            return (f"pattern {value!r} places the zeros of weight sparsity and needs mode: sparsity; channel "
                    "pruning (mode: channels) removes whole channels and takes no pattern")
        return None
    if key == "budget":
        try:
            Budget.from_dict(value).check_mode(mode)
        except BudgetError as exc:
            return str(exc).rstrip(".")
        return None
    if key == "strategy":
        if mode == "channels" and value.name == "lamp":
            return ("strategy 'lamp' ranks single weights by layer-adaptive magnitude scores and needs mode: "
                    "sparsity; channel searches take optuna, rl, random, uniform or global")
        if mode == "sparsity" and value.objective == "pareto":
            return ("objective 'pareto' trades the val score against MACs, which mode: sparsity does not shrink; a "
                    "sparsity search maximizes the val score under its nonzeros= or size= budget (objective: score)")
        return None
    if mode != "sparsity":
        return None
    if key == "groups":
        if value.round_to != 1:
            return (f"round_to={value.round_to} rounds channel counts; in mode: sparsity a layer loses single "
                    "weights, so round_to must stay 1")
        lo, hi = value.ratio if value.ratio is not None else DEFAULT_RATIOS[mode]
        if pattern == "2:4" and not lo <= 0.5 <= hi:
            return (f"pattern '2:4' zeroes half of a layer's weights or none, so the ratio range [{lo}, {hi}] must "
                    "include 0.5")
        return None
    if key == "evaluation" and value.importance == "bn_scale":
        return ("importance 'bn_scale' ranks channels by their BatchNorm scale; in mode: sparsity single weights are "
                "ranked: use l1 (magnitude), l2, taylor or random")
    if key == "latency" and value is not None:
        return ("a latency: section times candidates, whose zeros run on dense kernels as fast as the dense model "
                "in mode: sparsity; remove it (export measures the dense and the sparse model's latency)")
    return None
