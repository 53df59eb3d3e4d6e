"""Which weights a sparsity plan zeroes, and models that hold those zeros.

Weights are ranked within their tensor by a criterion (magnitude by default); a plan's kept count
per tensor keeps the highest-ranked ones, or under the 2:4 pattern the two highest of every four
consecutive weights along the input dimension. A candidate is a *masked copy* of the dense model:
no surgery, every shape stays, so BatchNorm recalibration, scoring and fine-tuning run as they
do on the dense model. While a masked model trains, a gradient hook zeroes the gradient of every
masked weight, so SGD (momentum and weight decay included: both are 0 for a weight that is 0 with
0 gradient) never moves it off zero.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError, PlanError
from ._profile import SparsityProfile

__all__ = ["WEIGHT_CRITERIA", "weight_scores", "lamp_scores", "WeightMasker", "apply_masks", "hold_masks",
           "measured_sparsity", "masks_at"]

#: Criteria that rank single weights: magnitude (``l1``; ``l2`` ranks alike), first-order Taylor
#: (``taylor``: (w * dL/dw)^2 averaged over training batches, Molchanov et al., 2019), ``random``.
WEIGHT_CRITERIA = ("l1", "l2", "taylor", "random")


def _weights(model: nn.Module, profile: SparsityProfile) -> dict[str, torch.Tensor]:
    modules = dict(model.named_modules())
    missing = [g.name for g in profile.groups if g.name not in modules]
    if missing:
        raise PlanError(f"The model has no layer {missing[0]!r} of the sparsity profile; it is not the profiled model.")
    return {g.name: modules[g.name].weight for g in profile.groups}  # type: ignore[misc]


def weight_scores(model: nn.Module, profile: SparsityProfile, criterion: str = "l1", *,
                  batches: Sequence[tuple[torch.Tensor, torch.Tensor]] = (), seed: int = 0) -> dict[str, np.ndarray]:
    """One score per weight of every profiled tensor (flattened, float64); the lowest go first.

    ``taylor`` needs ``batches`` of (inputs, targets) and computes gradients on a copy."""
    if criterion not in WEIGHT_CRITERIA:
        raise ConfigError(
            f"importance {criterion!r} does not rank single weights; in sparsity mode use one of "
            f"{', '.join(WEIGHT_CRITERIA)} (bn_scale ranks channels, for mode: channels)."
        )
    if criterion == "random":
        rng = np.random.default_rng(seed)
        return {g.name: rng.random(g.channels) for g in profile.groups}
    if criterion in ("l1", "l2"):
        return {name: w.detach().abs().flatten().double().numpy() for name, w in _weights(model, profile).items()}
    if not batches:
        raise ConfigError("importance 'taylor' needs training batches to compute gradients on.")
    probe = copy.deepcopy(model).train()
    weights = _weights(probe, profile)
    totals = {name: torch.zeros_like(w, dtype=torch.float64) for name, w in weights.items()}
    for x, y in batches:
        probe.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(probe(x).float(), y).backward()
        for name, w in weights.items():
            if w.grad is not None:
                totals[name] += (w.detach().double() * w.grad.double()) ** 2
    return {name: (t / len(batches)).flatten().numpy() for name, t in totals.items()}


def lamp_scores(scores: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """LAMP scores (Lee et al., 2021): a weight's squared score over the sum of the squared scores
    of the weights of its tensor that rank at or above it. The largest weight of every tensor scores
    1, so one global threshold keeps every layer alive and prunes layers adaptively."""
    out = {}
    for name, s in scores.items():
        squared = np.asarray(s, dtype=np.float64) ** 2
        order = np.argsort(squared, kind="stable")
        ranked = squared[order]
        suffix = np.cumsum(ranked[::-1])[::-1]  # sum over this weight and every larger one
        lamp = np.empty_like(squared)
        lamp[order] = np.divide(ranked, suffix, out=np.zeros_like(ranked), where=suffix > 0)
        out[name] = lamp
    return out


def _two_of_four(scores: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The 2:4 mask of a weight tensor: in every four consecutive weights of a row (output channel,
    flattened over input channels and kernel), the two highest-scored are kept."""
    quads = scores.reshape(shape[0], -1, 4)
    top = np.argsort(-quads, axis=-1, kind="stable")[..., :2]
    mask = np.zeros(quads.shape, dtype=bool)
    np.put_along_axis(mask, top, True, axis=-1)
    return mask.reshape(-1)


def masks_at(profile: SparsityProfile, scores: Mapping[str, np.ndarray], kept: Mapping[str, int],
             pattern: str | None = None) -> dict[str, torch.Tensor]:
    """The boolean keep-mask (flattened) of every tensor that keeps fewer weights than it has."""
    pattern = pattern or profile.pattern
    masks = {}
    for g in profile.groups:
        k = int(kept.get(g.name, g.channels))
        if k >= g.channels:
            continue
        s = np.asarray(scores[g.name], dtype=np.float64)
        if pattern == "2:4":
            if 2 * k != g.channels:
                raise PlanError(f"Layer {g.name!r} keeps {k} of {g.channels} weights; under the 2:4 pattern a layer "
                                f"keeps all of them or half ({g.channels // 2}).")
            row = profile.row_length(g.name)
            keep = _two_of_four(s, (g.channels // row, row))
        else:
            keep = np.zeros(g.channels, dtype=bool)
            keep[np.argsort(-s, kind="stable")[:k]] = True
        masks[g.name] = torch.from_numpy(keep)
    return masks


class WeightMasker:
    """Masked copies of one dense model, for many plans: scores ranked once, each copy a deepcopy
    with the plan's zeros written in (and gradient hooks that hold them).

    Args:
        model: the dense model (not modified).
        profile: its sparsity profile.
        scores: per-weight scores (see :func:`weight_scores`).
    """

    def __init__(self, model: nn.Module, *, profile: SparsityProfile, scores: Mapping[str, np.ndarray]) -> None:
        self.model = model
        self.profile = profile
        self.scores = dict(scores)
        # Ranked once: the evaluator cuts hundreds of candidates from the same scores.
        self._order = {g.name: torch.from_numpy(np.argsort(-np.asarray(scores[g.name]), kind="stable").copy())
                       for g in profile.groups}
        self._two_four: dict[str, torch.Tensor] = {}

    def masks(self, kept: Mapping[str, int]) -> dict[str, torch.Tensor]:
        """Keep-masks (bool, the weight's shape) of the tensors ``kept`` sparsifies."""
        out = {}
        for g in self.profile.groups:
            k = int(kept.get(g.name, g.channels))
            if k >= g.channels:
                continue
            if self.profile.pattern == "2:4":
                if g.name not in self._two_four:
                    self._two_four[g.name] = masks_at(self.profile, self.scores, {g.name: g.channels // 2})[g.name]
                if 2 * k != g.channels:
                    masks_at(self.profile, self.scores, {g.name: k})  # raises the pattern's message
                keep = self._two_four[g.name]
            else:
                keep = torch.zeros(g.channels, dtype=torch.bool)
                keep[self._order[g.name][:k]] = True
            out[g.name] = keep
        return out

    def copy(self, kept: Mapping[str, int], *, hold: bool = True) -> nn.Module:
        """A deep copy of the dense model with the weights ``kept`` drops set to zero; with
        ``hold``, gradient hooks keep them zero through fine-tuning."""
        model = copy.deepcopy(self.model)
        apply_masks(model, self.profile, self.masks(kept), hold=hold)
        return model.eval()


def apply_masks(model: nn.Module, profile: SparsityProfile, masks: Mapping[str, torch.Tensor], *,
                hold: bool = True) -> list[Any]:
    """Zero ``model``'s masked weights in place; with ``hold``, register the gradient hooks that
    keep them zero and return their handles."""
    weights = _weights(model, profile)
    handles = []
    with torch.no_grad():
        for name, keep in masks.items():
            w = weights[name]
            factor = keep.reshape(w.shape).to(w.dtype)
            w.mul_(factor)
            if hold:
                handles.append(w.register_hook(lambda grad, factor=factor: grad * factor))
    return handles


@contextmanager
def hold_masks(model: nn.Module, profile: SparsityProfile, masks: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Zero the masked weights and hold them at zero while the block trains the model."""
    handles = apply_masks(model, profile, masks, hold=True)
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def measured_sparsity(model: nn.Module, profile: SparsityProfile) -> dict[str, float]:
    """The fraction of exactly-zero weights in every profiled tensor of ``model``, as it is."""
    return {name: float((w.detach() == 0).sum()) / w.numel() for name, w in _weights(model, profile).items()}
