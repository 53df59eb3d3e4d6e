"""Candidate evaluation: prune a copy, recalibrate BatchNorm, score on held-out data.

Built for hundreds of candidates per search: the dense model, its profile, the channel ranking
and the calibration and validation batches are prepared once in the constructor; each
:meth:`Evaluator.evaluate` only prunes, recalibrates and scores.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from . import pruning
from .budget import LatencyModel
from .errors import ConfigError, TaskError, short
from .plan import Plan, check_plan_matches
from .profile import ModelProfile, profile_model
from .task import Task
from .train import predict, train_model

__all__ = ["TrialResult", "Evaluator", "recalibrate_batchnorm"]


@dataclass(frozen=True)
class TrialResult:
    """What one candidate evaluation measured.

    Attributes:
        val_score: the task's score (top-1 accuracy by default) on the validation samples.
        macs: multiply-accumulates of the pruned model for one input (Torch-Pruning's count).
        macs_ratio: ``macs`` over the dense model's.
        params: parameters of the pruned model; ``params_ratio`` over the dense model's.
        seconds: wall time of this evaluation (prune + recalibrate + fine-tune + score).
        latency_ms: predicted latency in ms per batch (the search's latency settings), when it measures latency.
    """

    val_score: float
    macs: float
    macs_ratio: float
    params: float
    params_ratio: float
    seconds: float
    latency_ms: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: list[torch.Tensor]) -> None:
    """Re-estimate every BatchNorm's running statistics on ``batches`` (adaptive BN, EagleEye).

    Removing channels shifts the statistics each BN layer sees, so the stored running means and
    variances are stale; recomputing them on a few training batches, with cumulative averages and
    no gradient, recovers most of the accuracy ranking that fine-tuning would give. Only BN layers
    run in train mode, so dropout stays off.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms or not batches:
        return
    model.eval()
    momenta = []
    for bn in norms:
        momenta.append(bn.momentum)
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average over all calibration batches
        bn.train()
    try:
        for x in batches:
            model(x)
    finally:
        for bn, momentum in zip(norms, momenta):
            bn.momentum = momentum
        model.eval()


class Evaluator:
    """Scores plans on a task.

    Args:
        task: the dense model and its data.
        calibration_batches: training batches that recalibrate BatchNorm (0 keeps stale statistics).
        calibration_batch_size: images per calibration (and fine-tuning) batch.
        val_samples: validation samples scored per candidate (``None``: the whole split).
        finetune_steps: SGD steps on training batches after recalibration (0 for none).
        finetune_lr: learning rate of those steps.
        importance: channel criterion (``l1``, ``l2``, ``taylor``, ``bn_scale``, ``random``).
        seed: fixes the calibration batches and any fine-tuning; evaluation is deterministic.
        profile: a profile of ``task`` computed earlier, to skip recomputing it.
        latency: a latency predictor; each result then carries the plan's predicted ``latency_ms``.
    """

    def __init__(
        self,
        task: Task,
        *,
        calibration_batches: int = 16,
        calibration_batch_size: int = 64,
        val_samples: int | None = None,
        finetune_steps: int = 0,
        finetune_lr: float = 0.01,
        importance: str | pruning.ChannelImportance = "l1",
        seed: int = 0,
        profile: ModelProfile | None = None,
        latency: LatencyModel | None = None,
    ) -> None:
        if calibration_batches < 0 or finetune_steps < 0:
            raise ConfigError(
                f"calibration_batches and finetune_steps must be >= 0, got {calibration_batches} and {finetune_steps}."
            )
        if calibration_batch_size < 1:
            raise ConfigError(f"calibration_batch_size must be >= 1, got {calibration_batch_size}.")
        if val_samples is not None and val_samples < 1:
            raise ConfigError(f"val_samples must be a positive number of samples or None, got {val_samples}.")
        self.task = task
        self.seed = seed
        self.finetune_steps = finetune_steps
        self.finetune_lr = finetune_lr
        self.calibration_batches = calibration_batches
        self.profile = profile or profile_model(task)
        self.latency = latency
        self.importance = pruning.make_importance(importance, seed=seed)
        generator = torch.Generator().manual_seed(seed)
        loader = torch.utils.data.DataLoader(
            task.train_loader.dataset, batch_size=calibration_batch_size,
            shuffle=True, generator=generator,
        )
        n_train_batches = max(calibration_batches, 4 if self.importance.needs_gradients else 0, finetune_steps)
        self._train_batches: list[tuple[torch.Tensor, torch.Tensor]] = list(itertools.islice(loader, n_train_batches))
        self._val_batches = self._take_samples(task.val_loader, val_samples)
        self.val_samples = sum(len(y) for _, y in self._val_batches)
        self.scores = pruning.channel_scores(
            task.model, task.example_input, self.importance,
            ignored_layers=task.ignored_layers, batches=self._train_batches[:4],
        )
        self._dense_score: float | None = None

    @staticmethod
    def _take_samples(loader: torch.utils.data.DataLoader, n: int | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        batches, seen = [], 0
        for x, y in loader:
            if n is not None and seen + len(y) > n:
                x, y = x[: n - seen], y[: n - seen]
            batches.append((x, y))
            seen += len(y)
            if n is not None and seen >= n:
                break
        if not batches:
            raise TaskError(f"Task {loader!r} has an empty validation split.")
        return batches

    @property
    def dense_score(self) -> float:
        """The dense model's score on the same validation samples."""
        if self._dense_score is None:
            self._dense_score = self._score(self.task.model, dense=True)
        return self._dense_score

    def _score(self, model: nn.Module, *, dense: bool = False) -> float:
        logits, targets = predict(model, self._val_batches)
        if dense and not bool(torch.isfinite(logits).all()):
            raise TaskError(
                f"Task {self.task.name!r}: the dense model's outputs on the validation data are not all finite "
                "(NaN or infinite values); every candidate would score on garbage. Check the checkpoint and the "
                "input normalization."
            )
        try:
            value = float(self.task.score_fn(logits, targets))
        except Exception as exc:
            raise TaskError(
                f"Task {self.task.name!r}: its score function failed or did not return a number "
                f"({type(exc).__name__}: {short(exc)}); it must map (logits (N, C), targets (N,)) to a float, "
                "higher is better."
            ) from None
        if not math.isfinite(value):
            raise TaskError(
                f"Task {self.task.name!r}: its score function returned {value}; scores must be finite "
                "numbers (higher is better)."
            )
        return value

    def build(self, plan: Plan) -> nn.Module:
        """The pruned model of ``plan`` with recalibrated BatchNorm (and fine-tuned if asked)."""
        check_plan_matches(plan, [(g.name, g.channels) for g in self.profile.groups], what=f"task {self.task.name!r}")
        model = pruning.prune_copy(self.task.model, self.task.example_input, plan.kept, self.scores)
        recalibrate_batchnorm(model, [x for x, _ in self._train_batches[: self.calibration_batches]])
        if self.finetune_steps:
            train_model(
                model, self._train_batches[: self.finetune_steps], epochs=1,
                recipe=replace(self.task.recipe, lr=self.finetune_lr),
                seed=self.seed, show_progress=False,
            )
        return model

    def evaluate(self, plan: Plan) -> TrialResult:
        """Prune, recalibrate, (fine-tune,) score ``plan`` on the validation samples."""
        start = time.perf_counter()
        model = self.build(plan)
        score = self._score(model)
        macs, params = self.profile.macs_of(plan.kept), self.profile.params_of(plan.kept)
        latency_ms = None
        if self.latency is not None:
            kept = [plan.kept[g.name] for g in self.profile.groups]
            latency_ms = self.latency.predict_kept(np.array(kept, dtype=np.float64))
        return TrialResult(
            val_score=score, macs=macs, macs_ratio=macs / self.profile.macs, params=params,
            params_ratio=params / self.profile.params, seconds=time.perf_counter() - start, latency_ms=latency_ms,
        )

    def describe(self) -> Mapping[str, Any]:
        """Settings to record with a search."""
        return {
            "calibration_batches": self.calibration_batches, "val_samples": self.val_samples,
            "finetune_steps": self.finetune_steps, "importance": self.importance.name, "seed": self.seed,
        }
