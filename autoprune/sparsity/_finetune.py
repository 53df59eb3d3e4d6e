"""Reaching a sparsity plan and fine-tuning it: one-shot, iterative, or gradual (polynomial).

Every schedule ends with exactly the plan's weights per tensor, zero elsewhere. Masks are held
two ways while the model trains: a gradient hook zeroes a masked weight's gradient (so SGD, its
momentum and weight decay included, computes no update for it), and after every optimizer step
the masked weights are multiplied by zero again, which catches what momentum carried over from
before a gradual schedule masked them. Weights are ranked by the criterion on the current weights
at each cut; weights already masked rank last, so a mask only ever grows.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import replace

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError
from ..plan import Plan
from ..task import Task
from ..train import Distillation, FinetuneSchedule, train_model
from ._mask import masks_at, weight_scores
from ._profile import SparsityProfile

__all__ = ["MaskHolder", "sparsify_and_finetune", "kept_at"]

#: Gradual pruning updates its masks about this many times over its ramp (TensorFlow Model
#: Optimization updates every 100 steps; on short fine-tunings that would be a handful).
_MASK_UPDATES = 100


def kept_at(profile: SparsityProfile, plan: Plan, schedule: FinetuneSchedule, step: int, total: int) -> dict[str, int]:
    """Weights each tensor keeps after ``step`` of ``total`` fine-tuning steps of a polynomial
    schedule; the plan's own counts once the ramp is over."""
    kept = {}
    for name, (dense, final_kept) in plan.channels.items():
        sparsity = schedule.sparsity_at(plan.ratios[name], step, total)
        kept[name] = max(final_kept, dense - int(round(sparsity * dense)))
    return kept


class MaskHolder:
    """The current masks of a model that trains sparse: gradient hooks read them, :meth:`enforce`
    writes them into the weights, :meth:`cut` ranks the current weights and tightens them."""

    def __init__(self, model: nn.Module, *, profile: SparsityProfile, criterion: str,
                 batches: list[tuple[torch.Tensor, torch.Tensor]], seed: int) -> None:
        self.model = model
        self.profile = profile
        self.criterion = criterion
        self.batches = batches
        self.seed = seed
        modules = dict(model.named_modules())
        self.weights: dict[str, torch.Tensor] = {g.name: modules[g.name].weight for g in profile.groups}  # type: ignore[misc]
        self.factors = {name: torch.ones_like(w) for name, w in self.weights.items()}
        self._handles = [w.register_hook(lambda grad, name=name: grad * self.factors[name])
                         for name, w in self.weights.items()]

    def cut(self, kept: Mapping[str, int]) -> None:
        """Tighten the masks to ``kept`` weights per tensor, ranked on the current weights."""
        if all(int(self.factors[n].sum()) <= k for n, k in kept.items()):
            return
        scores = weight_scores(self.model, self.profile, self.criterion, batches=self.batches, seed=self.seed)
        for name, s in scores.items():
            s[self.factors[name].flatten().numpy() == 0] = -np.inf  # masked weights stay masked
        for name, keep in masks_at(self.profile, scores, kept).items():
            self.factors[name] = keep.reshape(self.weights[name].shape).to(self.weights[name].dtype)
        self.enforce()

    @torch.no_grad()
    def enforce(self) -> None:
        for name, w in self.weights.items():
            w.mul_(self.factors[name].to(w.device))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def sparsify_and_finetune(
    task: Task,
    plan: Plan,
    profile: SparsityProfile,
    *,
    epochs: float,
    schedule: FinetuneSchedule = FinetuneSchedule(),
    importance: str = "l1",
    seed: int = 0,
    calibration_batches: int = 16,
    show_progress: bool = True,
    distill: Distillation | None = None,
    precision: str = "fp32",
) -> nn.Module:
    """A copy of ``task.model`` with ``plan``'s weights zeroed, fine-tuned with the zeros held.

    ``oneshot`` masks once, recalibrates BatchNorm, then fine-tunes ``epochs``; ``iterative:K``
    masks in K equal steps with ``epochs / K`` of fine-tuning after each; ``polynomial`` raises the
    sparsity along its schedule during the ``epochs`` of fine-tuning (without fine-tuning it can
    only mask once). Fine-tuning is the task's recipe at a tenth of its learning rate, cosine-decayed.
    """
    from ..evaluate import recalibrate_batchnorm, sample_calibration_batches

    if plan.mode != "sparsity":
        raise ConfigError(f"sparsify_and_finetune needs a sparsity plan, got a {plan.mode} plan.")
    if profile.pattern == "2:4" and schedule.kind != "oneshot":
        raise ConfigError(f"--schedule {schedule}: under the 2:4 pattern a layer is dense or 2:4, with nothing in "
                          "between to reach gradually; use --schedule oneshot.")
    calibration = sample_calibration_batches(task.train_loader.dataset, calibration_batches, seed=seed)
    recipe = replace(task.recipe, lr=task.recipe.lr / 10)
    model = copy.deepcopy(task.model)
    holder = MaskHolder(model, profile=profile, criterion=importance, batches=calibration[:4], seed=seed)
    inputs = [x for x, _ in calibration]
    try:
        if schedule.kind == "polynomial" and epochs > 0:
            holder.cut(kept_at(profile, plan, schedule, 0, 1))
            recalibrate_batchnorm(model, inputs)
            total = max(1, int(np.ceil(epochs * len(task.train_loader))))
            ramp = max(1, int(schedule.end * total))
            every = max(1, ramp // _MASK_UPDATES)

            def on_step(step: int, total: int) -> None:
                if step % every == 0 or step == ramp:
                    holder.cut(kept_at(profile, plan, schedule, step, total))
                holder.enforce()

            train_model(model, task.train_loader, epochs=epochs, recipe=recipe, seed=seed,
                        description=f"fine-tune ({schedule})", show_progress=show_progress, distill=distill,
                        precision=precision, on_step=on_step)  # type: ignore[arg-type]
            holder.cut(plan.kept)  # a ramp shorter than one update, or a schedule that rounds late
            # BatchNorm's running statistics trail the weights by their momentum, and the weights
            # changed under them until the ramp ended: re-estimate them for the final masks.
            recalibrate_batchnorm(model, inputs)
        else:
            steps = schedule.steps
            for k in range(1, steps + 1):
                holder.cut({n: dense - round((dense - keep) * k / steps) for n, (dense, keep) in plan.channels.items()})
                recalibrate_batchnorm(model, inputs)
                if epochs > 0:
                    train_model(model, task.train_loader, epochs=epochs / steps, recipe=recipe, seed=seed + k,
                                description=f"fine-tune step {k}/{steps}", show_progress=show_progress,
                                distill=distill, precision=precision,  # type: ignore[arg-type]
                                on_step=lambda step, total: holder.enforce())
        holder.enforce()
    finally:
        holder.remove()
    return model.eval().to(memory_format=torch.contiguous_format)
