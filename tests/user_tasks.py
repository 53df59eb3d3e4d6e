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
