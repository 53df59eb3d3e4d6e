"""Applying a plan to a dense model: the pruned copy of a channel plan (physically smaller), or
the masked copy of a sparsity plan (same shapes, the plan's weights zeroed); BatchNorm statistics
re-estimated on calibration batches when given.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from . import pruning
from .errors import PlanError, PlanMismatchError
from .plan import Plan, StaleBatchNormWarning, check_plan_matches
from .profile import profile_model

__all__ = ["apply_plan"]


def apply_plan(
    model: nn.Module,
    plan: Plan,
    *,
    example_input: torch.Tensor | None = None,
    importance: str | pruning.ChannelImportance = "l1",
    scores: Mapping[str, np.ndarray] | None = None,
    ignored_layers: tuple[str, ...] = (),
    batches: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    calibration_batches: Iterable[Any] | None = None,
) -> nn.Module:
    """A new, physically smaller copy of ``model`` with the plan's channel counts.

    The removed channels are the least important by ``importance`` (``l1`` by default; ``taylor``
    needs ``batches``). ``model`` is not modified. The plan is refused if it was made for a model
    with other groups. ``example_input`` defaults to zeros of the plan's input shape.

    Removing channels leaves every BatchNorm's running statistics stale (a pruned ResNet can score
    at chance until they are re-estimated). ``calibration_batches`` (training batches: tensors or
    ``(inputs, targets)`` pairs, e.g. 16 of 64 images) re-estimates them as the search's score
    did; without them a model with BatchNorm gets a warning. Fine-tuning is ``autoprune export``'s.

    A sparsity plan (``plan.mode == "sparsity"``) gives a copy of the same shape instead, with the
    lowest-ranked weights of each tensor set to zero (``importance`` ranks single weights there:
    ``l1`` magnitude, ``l2``, ``taylor`` or ``random``) in the plan's pattern.
    """
    given_input = example_input is not None
    if example_input is None:
        if math.prod(plan.input_shape) > 2**31:
            raise PlanError(f"The plan's input shape {tuple(plan.input_shape)} is too large to trace the model with; "
                            "pass example_input=.")
        try:
            example_input = torch.zeros(plan.input_shape)
        except (RuntimeError, TypeError, ValueError) as exc:
            raise PlanError(f"The plan's input shape {tuple(plan.input_shape)} cannot be built ({exc}).") from None
    if plan.mode == "sparsity":
        pruned = _masked_copy(model, plan, example_input, importance, scores, ignored_layers, batches)
    else:
        pruned = _cut_copy(model, plan, example_input, given_input, importance, scores, ignored_layers, batches)
    has_batchnorm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in pruned.modules())
    if calibration_batches is not None:
        from .evaluate import recalibrate_batchnorm

        inputs = [b[0] if isinstance(b, (tuple, list)) else b for b in calibration_batches]
        recalibrate_batchnorm(pruned, inputs)
    elif has_batchnorm:
        warnings.warn(
            "apply_plan: the pruned model's BatchNorm statistics are those of the dense model and are stale; pass "
            "calibration_batches= (a few training batches) or call ap.recalibrate_batchnorm before using it.",
            StaleBatchNormWarning, stacklevel=2)
    return pruned


def _masked_copy(model: nn.Module, plan: Plan, example_input: torch.Tensor, importance: str | pruning.ChannelImportance,
                 scores: Mapping[str, np.ndarray] | None, ignored_layers: tuple[str, ...],
                 batches: list[tuple[torch.Tensor, torch.Tensor]] | None) -> nn.Module:
    """A sparsity plan's copy of ``model``: same shapes, the plan's weights zeroed."""
    from .sparsity import WeightMasker, profile_weights, weight_scores

    profile = profile_weights(model, example_input[:1], pattern=plan.pattern or "unstructured",
                              ignored_layers=ignored_layers)
    check_plan_matches(plan, [(g.name, g.channels) for g in profile.groups])
    if scores is None:
        criterion = importance if isinstance(importance, str) else importance.name
        scores = weight_scores(model, profile, criterion, batches=batches or ())
    return WeightMasker(model, profile=profile, scores=scores).copy(plan.kept, hold=False)


def _cut_copy(model: nn.Module, plan: Plan, example_input: torch.Tensor, given_input: bool,
              importance: str | pruning.ChannelImportance, scores: Mapping[str, np.ndarray] | None,
              ignored_layers: tuple[str, ...], batches: list[tuple[torch.Tensor, torch.Tensor]] | None) -> nn.Module:
    """A channel plan's physically smaller copy of ``model``."""
    try:
        # The groups a profile searches: Torch-Pruning's, less those left whole (a search never
        # plans for them, so neither does a plan file).
        groups = profile_model(model, example_input[:1], ignored_layers=ignored_layers).groups
    except RuntimeError as exc:
        raise PlanMismatchError(
            f"The plan's input shape {tuple(example_input.shape)} does not fit the model "
            f"({str(exc).splitlines()[0][:200]}); the plan was made for another model."
        ) from None
    check_plan_matches(plan, [(g.name, g.channels) for g in groups],
                       input_shape=tuple(example_input.shape) if given_input else None)
    if scores is None:
        criterion = pruning.make_importance(importance)
        scores = pruning.channel_scores(
            model, example_input, criterion, ignored_layers=ignored_layers, batches=batches or ()
        )
    return pruning.prune_copy(model, example_input, plan.kept, scores)
