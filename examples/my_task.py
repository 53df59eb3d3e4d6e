"""Your own model and data as an autoprune task: a function that returns ``ap.Task``.

Search it from this directory (the working directory is importable)::

    autoprune search --task my_task:make_task --trials 20
    autoprune export --study my-digits-optuna-tpe-flops0.5 --out exported/ --finetune-epochs 2

or from Python, with the task object itself::

    import autoprune as ap
    from my_task import make_task

    task = make_task()
    result = ap.search("default", task=task, n_trials=20)
    report = ap.export_study(result.study_name, "exported", task=task)

Everything here is offline: scikit-learn ships the 8x8 digits. A real task would load its own
trained weights; this one trains its small CNN once (a few seconds) and caches the state dict.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import autoprune as ap


class SmallCNN(nn.Module):
    """Three conv blocks and a linear head for 1x8x8 images, 10 classes."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.classifier = nn.Linear(2 * width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def _splits() -> tuple[TensorDataset, TensorDataset, TensorDataset]:
    """60% train, 20% validation (scores candidates), 20% test (the final report only)."""
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    n_train, n_val = int(0.6 * len(y)), int(0.2 * len(y))
    parts = order[:n_train], order[n_train:n_train + n_val], order[n_train + n_val:]
    return tuple(TensorDataset(x[i], y[i]) for i in parts)  # type: ignore[return-value]


def _train(model: nn.Module, loader: DataLoader, epochs: int = 8) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()


def make_task(workdir: str | os.PathLike[str] | None = None) -> ap.Task:
    """The digits task. autoprune passes ``workdir`` (and ``data_root``) when the function takes them."""
    train, val, test = _splits()
    train_loader = DataLoader(train, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))
    model = SmallCNN()
    weights = Path(workdir or "autoprune-runs") / "checkpoints" / "my-digits.pt"
    if weights.is_file():
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    else:
        torch.manual_seed(0)
        _train(model, train_loader)
        weights.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), weights)
    return ap.Task(
        name="my-digits",
        model=model.eval(),
        example_input=train[0][0].unsqueeze(0),  # one input of batch size 1: (1, 1, 8, 8)
        train_loader=train_loader,  # BatchNorm recalibration and fine-tuning
        val_loader=DataLoader(val, batch_size=256),  # scores every candidate of the search
        test_loader=DataLoader(test, batch_size=256),  # scored once, in the export's report
        recipe=ap.TrainRecipe(lr=0.05, batch_size=64),  # export fine-tunes at a tenth of this lr
    )
