"""Candidate evaluation: prune a copy, recalibrate BatchNorm, score on held-out data.

In sparsity mode (a :class:`~autoprune.sparsity.SparsityProfile`) the copy is masked instead of
pruned: the plan's weights are set to zero and held there through any fine-tuning, no surgery.

Built for hundreds of candidates per search: the dense model, its profile, the channel ranking
and the calibration and validation batches are prepared once in the constructor; each
:meth:`Evaluator.evaluate` only prunes, recalibrates and scores.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from . import pruning
from .budget import LatencyModel
from .errors import ConfigError, TaskError, short
from .plan import Plan, check_plan_matches
from .precision import Precision, as_input, autocast, resolve_precision, to_memory_format
from .profile import ModelProfile, profile_model
from .task import Task
from .train import distillation_loss, predict

if TYPE_CHECKING:
    from .space import EvaluationSettings

__all__ = ["TrialResult", "Evaluator", "Fidelity", "recalibrate_batchnorm", "StepCallback"]


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
        finetune_steps: SGD steps of fine-tuning before ``val_score`` was taken (0: adaptive BN alone).
        nonzeros, nonzeros_ratio: sparsity mode: nonzero weights of the prunable tensors, and over
            their dense count (None for channel plans; their ``macs`` and ``params`` then count what
            touches a nonzero weight).
        size_bytes, size_ratio: sparsity mode: bytes of the compressed model's tensors, and over the
            dense model's.
    """

    val_score: float
    macs: float
    macs_ratio: float
    params: float
    params_ratio: float
    seconds: float
    latency_ms: float | None = None
    finetune_steps: int = 0
    nonzeros: float | None = None
    nonzeros_ratio: float | None = None
    size_bytes: float | None = None
    size_ratio: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrialResult:
        """The result stored by :meth:`to_dict`; keys of other autoprune versions are ignored."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@torch.no_grad()
def sample_calibration_batches(dataset: torch.utils.data.Dataset, count: int, *, batch_size: int = 64,
                        seed: int = 0) -> list[Any]:
    """``count`` shuffled training batches of ``batch_size``, the same ones for the same ``seed``:
    what a search recalibrates BatchNorm on, so that apply and export recalibrate alike."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(seed))
    return list(itertools.islice(loader, count))


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


@dataclass(frozen=True)
class Fidelity:
    """Multi-fidelity candidate evaluation: the validation score after each rung of fine-tuning.

    Attributes:
        rungs: cumulative SGD steps (batches of ``calibration_batch_size`` training images) after
            which the candidate's validation score is reported, ascending; 0 is BatchNorm
            recalibration alone. The last rung's score is the trial's.
        lr: peak learning rate of that fine-tuning, cosine-decayed to 0 over the last rung's
            steps, so a trial stopped at an earlier rung ran a prefix of the same schedule.
        distill: learn from the dense model's logits (knowledge distillation) as well as the labels.
        temperature: softmax temperature of the distillation (> 0).
        alpha: weight of the distillation term in [0, 1]; ``1 - alpha`` weighs the labels.
    """

    rungs: tuple[int, ...] = (0, 200, 800)
    lr: float = 0.01
    distill: bool = True
    temperature: float = 4.0
    alpha: float = 0.9


#: ``on_step(step, score)``: called after each fidelity rung with the SGD steps done so far and
#: the validation score; it may raise :class:`autoprune.strategies.TrialStopped` to end the trial.
StepCallback = Callable[[int, float], None]


class Evaluator:
    """Scores plans on a task.

    Args:
        task: the dense model and its data.
        calibration_batches: training batches that recalibrate BatchNorm (0 keeps stale statistics).
        calibration_batch_size: images per calibration (and fine-tuning) batch.
        val_samples: validation samples scored per candidate (``None``: the whole split).
        finetune_steps: SGD steps on training batches after recalibration (0 for none); a
            one-rung :class:`Fidelity` without intermediate scores.
        finetune_lr: learning rate of those steps.
        importance: channel criterion (``l1``, ``l2``, ``taylor``, ``bn_scale``, ``random``); with a
            sparsity profile, the criterion that ranks single weights (``bn_scale`` excluded).
        seed: fixes the calibration batches and any fine-tuning; evaluation is deterministic.
        profile: a profile of ``task`` computed earlier, to skip recomputing it; a
            :class:`~autoprune.sparsity.SparsityProfile` makes this a sparsity evaluator (masked copies).
        latency: a latency predictor; each result then carries the plan's predicted ``latency_ms``.
        fidelity: report scores at several fine-tuning rungs (replaces ``finetune_steps``).
        precision: ``fp32``, or ``bf16`` autocast for calibration, fine-tuning and scoring (see
            :mod:`autoprune.precision`; resolve ``auto`` first).
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
        fidelity: Fidelity | None = None,
        precision: Precision = "fp32",
    ) -> None:
        if calibration_batches < 0 or finetune_steps < 0:
            raise ConfigError(
                f"calibration_batches and finetune_steps must be >= 0, got {calibration_batches} and {finetune_steps}."
            )
        if calibration_batch_size < 1:
            raise ConfigError(f"calibration_batch_size must be >= 1, got {calibration_batch_size}.")
        if val_samples is not None and val_samples < 1:
            raise ConfigError(f"val_samples must be a positive number of samples or None, got {val_samples}.")
        if fidelity is not None and finetune_steps:
            raise ConfigError("finetune_steps and fidelity both fine-tune candidates; give the steps as fidelity rungs.")
        self.task = task
        self.seed = seed
        self.fidelity = fidelity or Fidelity(rungs=(finetune_steps,), lr=finetune_lr, distill=False)
        self.finetune_steps = self.fidelity.rungs[-1]
        self.finetune_lr = self.fidelity.lr
        self.calibration_batches = calibration_batches
        self.calibration_batch_size = calibration_batch_size
        self.precision = precision
        self.profile = profile or profile_model(task)
        self.latency = latency
        self.importance = pruning.make_importance(importance, seed=seed)
        n_train_batches = max(calibration_batches, 4 if self.importance.needs_gradients else 0)
        self._train_batches: list[tuple[torch.Tensor, torch.Tensor]] = sample_calibration_batches(
            task.train_loader.dataset, n_train_batches, batch_size=calibration_batch_size, seed=seed)
        self._val_batches = self._take_samples(task.val_loader, val_samples)
        self.val_samples = sum(len(y) for _, y in self._val_batches)
        self._dense_score: float | None = None
        if self.profile.mode == "sparsity":
            from .sparsity import WeightMasker, weight_scores

            # Weights ranked once on the dense model: every candidate masks the same ranking.
            self.scores = weight_scores(task.model, self.profile, self.importance.name,  # type: ignore[arg-type]
                                        batches=self._train_batches[:4], seed=seed)
            self._masker = WeightMasker(task.model, profile=self.profile, scores=self.scores)  # type: ignore[arg-type]
            return
        self.scores = pruning.channel_scores(
            task.model, task.example_input, self.importance,
            ignored_layers=task.ignored_layers, batches=self._train_batches[:4],
        )
        # Traced once: every candidate is cut from the same dense model.
        self._surgeon = pruning.Surgeon(task.model, task.example_input, task.ignored_layers)

    @classmethod
    def from_settings(cls, task: Task, settings: EvaluationSettings, *, seed: int, profile: ModelProfile | None = None,
                      latency: LatencyModel | None = None, cache_dir: Path | None = None) -> Evaluator:
        """The evaluator a search space's ``evaluation:`` section describes (``auto`` precision
        resolved on the task's model, the decision kept in ``cache_dir``)."""
        fidelity = None
        if settings.fidelity is not None:
            f = settings.fidelity
            fidelity = Fidelity(rungs=tuple(f.rungs), lr=f.lr, distill=f.distill, temperature=f.temperature,
                                alpha=f.alpha)
        precision = resolve_precision(settings.precision, model=task.model, example_input=task.example_input,
                                      cache_dir=cache_dir)
        return cls(task, calibration_batches=settings.calibration_batches, val_samples=settings.val_samples,
                   finetune_steps=settings.finetune_steps, importance=settings.importance, seed=seed,
                   profile=profile, latency=latency, fidelity=fidelity, precision=precision)

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
        logits, targets = predict(model, self._val_batches, precision="fp32" if dense else self.precision)
        if dense and not bool(torch.isfinite(logits).all()):
            raise TaskError(
                f"Task {self.task.name!r}: the dense model's outputs on the validation data are not all finite "
                "(NaN or infinite values); every candidate would score on garbage. Check the checkpoint and the "
                "input normalization."
            )
        try:
            value = float(self.task.score_fn(logits, targets))
        except Exception as exc:
            if not dense:
                raise  # fails this trial only; the dense model's score already proved the function
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

    def _cut(self, plan: Plan) -> nn.Module:
        if plan.mode != self.profile.mode:
            raise ConfigError(f"The plan is a {plan.mode} plan but this evaluator scores mode: {self.profile.mode} "
                              f"(give it a {'sparsity profile' if plan.mode == 'sparsity' else 'channel profile'}).")
        check_plan_matches(plan, [(g.name, g.channels) for g in self.profile.groups], what=f"task {self.task.name!r}",
                           input_shape=tuple(self.task.example_input.shape))
        if self.profile.mode == "sparsity":
            return to_memory_format(self._masker.copy(plan.kept), self.precision)
        return to_memory_format(self._surgeon.prune(plan.kept, self.scores), self.precision)

    def recalibrate(self, model: nn.Module) -> None:
        """Adaptive BN on the evaluator's calibration batches (under its precision)."""
        batches = [as_input(x, self.precision) for x, _ in self._train_batches[: self.calibration_batches]]
        with autocast(self.precision):
            recalibrate_batchnorm(model, batches)

    def _finetune(self, model: nn.Module, on_rung: Callable[[int], None]) -> None:
        """SGD through the fidelity rungs, calling ``on_rung(step)`` at each (step 0 included).

        Every candidate sees the same training batches in the same order (a loader seeded
        afresh), so scores differ only by plan.
        """
        fidelity, recipe = self.fidelity, self.task.recipe
        rungs = list(fidelity.rungs)
        if rungs[0] == 0:
            on_rung(rungs.pop(0))
        if not rungs:
            return
        torch.manual_seed(self.seed)  # augmentation draws
        loader = torch.utils.data.DataLoader(self.task.train_loader.dataset, batch_size=self.calibration_batch_size,
                                             shuffle=True, generator=torch.Generator().manual_seed(self.seed))
        optimizer = torch.optim.SGD(model.parameters(), lr=fidelity.lr, momentum=recipe.momentum,
                                    weight_decay=recipe.weight_decay, nesterov=recipe.momentum > 0)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=rungs[-1])
        teacher = self.task.model if fidelity.distill else None
        step = 0
        while rungs:
            for x, y in loader:
                model.train()
                x = as_input(x, self.precision)
                with autocast(self.precision):
                    logits = model(x)
                    if teacher is not None:
                        with torch.no_grad():
                            target_logits = teacher(x)
                if teacher is not None:
                    loss = distillation_loss(logits, target_logits, y, temperature=fidelity.temperature,
                                             alpha=fidelity.alpha)
                else:
                    loss = nn.functional.cross_entropy(logits.float(), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                step += 1
                if step == rungs[0]:
                    model.eval()
                    on_rung(rungs.pop(0))
                    if not rungs:
                        break
        model.eval()

    def build(self, plan: Plan) -> nn.Module:
        """The pruned model of ``plan`` with recalibrated BatchNorm (and fine-tuned if asked)."""
        model = self._cut(plan)
        self.recalibrate(model)
        self._finetune(model, on_rung=lambda step: None)
        return model.eval()

    def evaluate(self, plan: Plan, *, on_step: StepCallback | None = None) -> TrialResult:
        """Prune, recalibrate, (fine-tune,) score ``plan`` on the validation samples.

        With ``on_step``, the score is also computed after each fidelity rung and passed to
        ``on_step(step, score)``, which may end the evaluation by raising.
        """
        start = time.perf_counter()
        model = self._cut(plan)
        self.recalibrate(model)
        last = self.fidelity.rungs[-1]
        scores: dict[int, float] = {}

        def on_rung(step: int) -> None:
            if on_step is not None or step == last:
                scores[step] = self._score(model)
            if on_step is not None:
                on_step(step, scores[step])

        self._finetune(model, on_rung)
        return self.result_of(plan, scores[last], seconds=time.perf_counter() - start, finetune_steps=last)

    def result_of(self, plan: Plan, score: float, *, seconds: float, finetune_steps: int) -> TrialResult:
        """A :class:`TrialResult` for ``plan`` scored ``score`` after ``finetune_steps`` (also for a
        trial that stopped early)."""
        macs, params = self.profile.macs_of(plan.kept), self.profile.params_of(plan.kept)
        latency_ms = None
        if self.latency is not None:
            kept = [plan.kept[g.name] for g in self.profile.groups]
            latency_ms = self.latency.predict_kept(np.array(kept, dtype=np.float64))
        sparse: dict[str, float] = {}
        if self.profile.mode == "sparsity":
            p = self.profile
            nonzeros, size = p.nonzeros_of(plan.kept), p.size_of(plan.kept)  # type: ignore[attr-defined]
            sparse = {"nonzeros": nonzeros, "nonzeros_ratio": nonzeros / p.nonzeros,  # type: ignore[attr-defined]
                      "size_bytes": size, "size_ratio": size / p.dense_bytes}  # type: ignore[attr-defined]
        return TrialResult(
            val_score=score, macs=macs, macs_ratio=macs / self.profile.macs, params=params,
            params_ratio=params / self.profile.params, seconds=seconds, latency_ms=latency_ms,
            finetune_steps=finetune_steps, **sparse,
        )

    def describe(self) -> Mapping[str, Any]:
        """Settings to record with a search."""
        return {
            "calibration_batches": self.calibration_batches, "val_samples": self.val_samples,
            "finetune_steps": self.finetune_steps, "importance": self.importance.name, "seed": self.seed,
            "rungs": list(self.fidelity.rungs), "distill": self.fidelity.distill, "precision": self.precision,
            "mode": self.profile.mode, **({"pattern": self.profile.pattern} if self.profile.mode == "sparsity" else {}),  # type: ignore[attr-defined]
        }
