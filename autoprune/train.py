"""Standard training and fine-tuning recipe, and scoring.

SGD with Nesterov momentum and a per-step cosine learning-rate schedule: the recipe the CIFAR
pruning literature (AMC, EagleEye) uses for dense training and for fine-tuning pruned models.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.data import DataLoader

from ._progress import progress_bar
from .errors import CheckpointError, ConfigError
from .precision import Precision, as_input, autocast, to_memory_format

__all__ = ["TrainRecipe", "FinetuneSchedule", "Distillation", "distillation_loss", "train_model", "score_model", "predict",
           "top1_accuracy"]

ScoreFn = Callable[[torch.Tensor, torch.Tensor], float]


@dataclass(frozen=True)
class TrainRecipe:
    """How a dense model is trained and a pruned one fine-tuned.

    ``lr`` is the peak learning rate, decayed to 0 by a cosine over all steps; ``weight_decay`` is
    L2 on all parameters; ``batch_size`` is images per step.
    """

    epochs: int = 10
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 128

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


@dataclass(frozen=True)
class FinetuneSchedule:
    """How a pruned model is reached and fine-tuned: ``oneshot`` (prune once, then fine-tune),
    ``iterative:K`` (K steps, each removing 1/K of the channels to remove, then fine-tuning for
    1/K of the epochs), or, for weight sparsity, ``polynomial`` (gradual magnitude pruning, Zhu &
    Gupta 2017, as TensorFlow Model Optimization's ``PolynomialDecay``: every layer's sparsity
    rises from ``begin`` to the plan's as ``final + (begin - final) * (1 - t / (end * T))**power``
    over the first ``end`` of the T fine-tuning steps, then stays there while fine-tuning goes on).

    Attributes:
        kind: ``oneshot``, ``iterative`` or ``polynomial``.
        steps: prune/fine-tune steps (1 for oneshot and polynomial).
        begin: polynomial: the sparsity every layer starts at, in [0, 1) (capped at the layer's plan).
        end: polynomial: the fraction of the fine-tuning steps, in (0, 1], by which every layer
            reaches the plan's sparsity.
        power: polynomial: the exponent (> 0); 3 prunes fast first and slowly near the end.
    """

    kind: Literal["oneshot", "iterative", "polynomial"] = "oneshot"
    steps: int = 1
    begin: float = 0.0
    end: float = 0.75
    power: float = 3.0

    @classmethod
    def parse(cls, text: str) -> FinetuneSchedule:
        """``oneshot``, ``iterative:K`` (K >= 1) or ``polynomial[:begin=B,end=E,power=P]``, as
        ``--schedule`` takes it."""
        if text == "oneshot":
            return cls()
        kind, _, rest = text.partition(":")
        if kind == "iterative" and rest.isdigit() and int(rest) >= 1:
            return cls("iterative", int(rest))
        if kind == "polynomial":
            return cls._polynomial(text, rest)
        raise ConfigError(f"--schedule {text!r} is not allowed; use oneshot, iterative:K with K >= 1, or (sparsity "
                          "searches) polynomial:begin=0.0,end=0.75,power=3.")

    @classmethod
    def _polynomial(cls, text: str, rest: str) -> FinetuneSchedule:
        values = {"begin": 0.0, "end": 0.75, "power": 3.0}
        for item in filter(None, rest.split(",")):
            key, sep, value = item.partition("=")
            if not sep or key.strip() not in values:
                raise ConfigError(f"--schedule {text!r}: {item!r} is not a setting of polynomial; give begin=, end= "
                                  "and power=, e.g. polynomial:begin=0.0,end=0.75,power=3.")
            try:
                values[key.strip()] = float(value)
            except ValueError:
                raise ConfigError(f"--schedule {text!r}: {key.strip()}={value!r} is not a number.") from None
        begin, end, power = values["begin"], values["end"], values["power"]
        if not (0.0 <= begin < 1.0 and 0.0 < end <= 1.0 and power > 0 and math.isfinite(power)):
            raise ConfigError(f"--schedule {text!r}: begin must be a sparsity in [0, 1), end a fraction of the "
                              f"fine-tuning steps in (0, 1] and power > 0; got begin={begin:g}, end={end:g}, "
                              f"power={power:g}.")
        return cls("polynomial", 1, begin, end, power)

    def sparsity_at(self, final: float, step: int, total: int) -> float:
        """A layer's sparsity after ``step`` of ``total`` fine-tuning steps, ending at ``final``."""
        if self.kind != "polynomial":
            return final
        start = min(self.begin, final)
        progress = min(1.0, step / max(1.0, self.end * total))
        return final + (start - final) * (1.0 - progress) ** self.power

    def __str__(self) -> str:
        if self.kind == "polynomial":
            return f"polynomial:begin={self.begin:g},end={self.end:g},power={self.power:g}"
        return "oneshot" if self.kind == "oneshot" else f"iterative:{self.steps}"


@dataclass(frozen=True)
class Distillation:
    """Knowledge distillation from a teacher's logits (Hinton et al., 2015).

    Attributes:
        teacher: the model whose logits the student learns (the dense model; eval mode, not trained).
        temperature: softmax temperature, > 0.
        alpha: weight of the distillation term in [0, 1]; ``1 - alpha`` weighs the labels.
    """

    teacher: nn.Module
    temperature: float = 4.0
    alpha: float = 0.9

    def loss(self, student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return distillation_loss(student, teacher, targets, temperature=self.temperature, alpha=self.alpha)


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor, *,
                      temperature: float, alpha: float) -> torch.Tensor:
    """``alpha`` T^2 KL(teacher || student) at temperature T plus ``1 - alpha`` cross-entropy with
    the labels; logits (N, C), targets (N,)."""
    t = temperature
    soft = nn.functional.kl_div(nn.functional.log_softmax(student.float() / t, dim=1),
                                nn.functional.softmax(teacher.float() / t, dim=1), reduction="batchmean")
    hard = nn.functional.cross_entropy(student.float(), targets)
    return alpha * t * t * soft + (1.0 - alpha) * hard


def top1_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Fraction of rows whose arg-max matches the target; logits (N, C), targets (N,)."""
    return float((logits.argmax(dim=1) == targets).float().mean())


def _device_of(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@torch.no_grad()
def predict(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    precision: Precision = "fp32",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``model``'s outputs in eval mode over all batches, as float32 on the CPU, and the targets.

    With ``precision="bf16"`` the forward passes run under bf16 autocast (the model should be in
    the memory format :func:`autoprune.precision.to_memory_format` gives it).
    """
    model.eval()
    device = _device_of(model)
    logits, targets = [], []
    for x, y in batches:
        with autocast(precision, device):
            logits.append(model(as_input(x.to(device), precision)).float().cpu())
        targets.append(y)
    return torch.cat(logits), torch.cat(targets)


def score_model(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    score_fn: ScoreFn = top1_accuracy,
    *,
    precision: Precision = "fp32",
) -> float:
    """Score ``model`` in eval mode over all batches at once (so any metric, not only means)."""
    return float(score_fn(*predict(model, batches, precision=precision)))


def _save_state(path: Path, state: dict[str, Any]) -> None:
    # Written beside and renamed over: a kill during the write leaves the previous epoch's state.
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _load_state(path: Path, total: int, recipe: TrainRecipe, seed: int) -> dict[str, Any] | None:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"The training state {path} cannot be read as plain tensors ({type(exc).__name__}); delete it "
            "to train from scratch."
        ) from None
    same = (isinstance(state, dict) and state.get("total_steps") == total and state.get("seed") == seed
            and state.get("recipe") == recipe.to_dict())
    return state if same else None


def train_model(
    model: nn.Module,
    loader: DataLoader | Sequence[tuple[torch.Tensor, torch.Tensor]],
    *,
    epochs: float,
    recipe: TrainRecipe,
    seed: int = 0,
    description: str = "training",
    show_progress: bool = True,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    precision: Precision = "fp32",
    state_path: str | os.PathLike[str] | None = None,
    on_epoch: Callable[[int, nn.Module], None] | None = None,
    distill: Distillation | None = None,
    on_step: Callable[[int, int], None] | None = None,
) -> nn.Module:
    """Train ``model`` in place for ``epochs`` passes over ``loader`` (fractions allowed).

    ``precision="bf16"`` trains under bf16 autocast with channels-last memory (weights and
    optimizer state stay float32). With ``state_path`` the whole training state (weights,
    optimizer, schedule, random generators) is written there after every epoch, and a run with the
    same recipe, length and seed resumes from it where the last one stopped, reproducing the
    uninterrupted run; the file is removed when training ends. ``on_epoch(epoch, model)`` is
    called after each finished epoch (1-based). With ``distill`` the loss is the distillation
    loss against its teacher's logits on the same batch (``loss_fn`` is then not used).
    ``on_step(step, total)`` is called after every optimizer step (1-based): how gradual pruning
    changes its masks, and holds them, while the schedule runs.

    Returns the model, left in eval mode.
    """
    torch.manual_seed(seed)
    generator = loader.generator if isinstance(loader, DataLoader) else None
    if generator is not None:
        # A task's loader keeps one shuffling generator for its lifetime; without this, the batch
        # order (and the result) would depend on how often the loader was iterated before.
        generator.manual_seed(seed)
    loss_fn = loss_fn or nn.functional.cross_entropy
    device = _device_of(model)
    to_memory_format(model, precision)
    steps_per_epoch = len(loader)
    total = max(1, math.ceil(epochs * steps_per_epoch))
    optimizer = torch.optim.SGD(
        model.parameters(), lr=recipe.lr, momentum=recipe.momentum,
        weight_decay=recipe.weight_decay, nesterov=recipe.momentum > 0,
    )
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    step = 0
    path = Path(state_path) if state_path is not None else None
    if path is not None and path.is_file() and (state := _load_state(path, total, recipe, seed)) is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        torch.set_rng_state(state["rng"])
        if generator is not None:
            generator.set_state(state["loader_rng"])
        step = int(state["step"])
    model.train()
    with progress_bar(description, total=total, enabled=show_progress) as advance:
        advance(step, "resumed" if step else "")
        while step < total:
            for x, y in loader:
                x, y = as_input(x.to(device), precision), y.to(device)
                with autocast(precision, device):
                    out = model(x)
                    if distill is not None:
                        with torch.no_grad():
                            target_logits = distill.teacher(x)
                loss = distill.loss(out, target_logits, y) if distill is not None else loss_fn(out.float(), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                step += 1
                if on_step is not None:
                    on_step(step, total)
                advance(1, f"loss {loss.item():.3f}")
                if step >= total:
                    break
            epoch_done = step % steps_per_epoch == 0 or step >= total
            if path is not None and epoch_done and step < total:
                _save_state(path, {
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "schedule": schedule.state_dict(), "rng": torch.get_rng_state(),
                    "loader_rng": generator.get_state() if generator is not None else torch.empty(0),
                    "step": step, "total_steps": total, "seed": seed, "recipe": recipe.to_dict(),
                })
            if on_epoch is not None and epoch_done:
                on_epoch(math.ceil(step / steps_per_epoch), model)
                model.train()
    model.eval()
    if path is not None:
        path.unlink(missing_ok=True)
    return model
