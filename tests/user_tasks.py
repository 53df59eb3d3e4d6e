"""User tasks for the `package.module:function` tests."""

import torch
from torch.utils.data import DataLoader, TensorDataset

import autoprune as ap
from autoprune.models import DigitsCNN


def make_task() -> ap.Task:
    torch.manual_seed(0)
    x, y = torch.randn(64, 1, 8, 8), torch.randint(0, 10, (64,))
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    return ap.Task(name="tiny-user", model=DigitsCNN(), example_input=x[:1], train_loader=loader, val_loader=loader)


def raises() -> ap.Task:
    raise RuntimeError("my data server is down")


def not_a_task():
    return 42


def non_numeric_score(workdir=None) -> ap.Task:
    import dataclasses

    base = ap.load_task("digits-cnn", workdir=workdir)
    return dataclasses.replace(base, name="text-score", score_fn=lambda logits, targets: "excellent")


class _NaNOutputs(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) * float("nan")


def nan_outputs(workdir=None) -> ap.Task:
    import dataclasses

    base = ap.load_task("digits-cnn", workdir=workdir)
    return dataclasses.replace(base, name="nan-outputs", model=_NaNOutputs(base.model))
