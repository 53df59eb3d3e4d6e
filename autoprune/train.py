"""Standard training and fine-tuning recipe, and scoring.

SGD with Nesterov momentum and a per-step cosine learning-rate schedule: the recipe the CIFAR
pruning literature (AMC, EagleEye) uses for dense training and for fine-tuning pruned models.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader

from ._progress import progress_bar

__all__ = ["TrainRecipe", "train_model", "score_model", "top1_accuracy"]

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


def top1_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Fraction of rows whose arg-max matches the target; logits (N, C), targets (N,)."""
    return float((logits.argmax(dim=1) == targets).float().mean())


def _device_of(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@torch.no_grad()
def score_model(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    score_fn: ScoreFn = top1_accuracy,
) -> float:
    """Score ``model`` in eval mode over all batches at once (so any metric, not only means)."""
    model.eval()
    device = _device_of(model)
    logits, targets = [], []
    for x, y in batches:
        logits.append(model(x.to(device)).float().cpu())
        targets.append(y)
    return float(score_fn(torch.cat(logits), torch.cat(targets)))


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
) -> nn.Module:
    """Train ``model`` in place for ``epochs`` passes over ``loader`` (fractions allowed).

    Returns the model, left in eval mode.
    """
    torch.manual_seed(seed)
    if isinstance(loader, DataLoader) and loader.generator is not None:
        # A task's loader keeps one shuffling generator for its lifetime; without this, the batch
        # order (and the result) would depend on how often the loader was iterated before.
        loader.generator.manual_seed(seed)
    loss_fn = loss_fn or nn.functional.cross_entropy
    device = _device_of(model)
    steps_per_epoch = len(loader)
    total = max(1, math.ceil(epochs * steps_per_epoch))
    optimizer = torch.optim.SGD(
        model.parameters(), lr=recipe.lr, momentum=recipe.momentum,
        weight_decay=recipe.weight_decay, nesterov=recipe.momentum > 0,
    )
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    model.train()
    step = 0
    with progress_bar(description, total=total, enabled=show_progress) as advance:
        while step < total:
            for x, y in loader:
                loss = loss_fn(model(x.to(device)), y.to(device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                step += 1
                advance(1, f"loss {loss.item():.3f}")
                if step >= total:
                    break
    model.eval()
    return model
