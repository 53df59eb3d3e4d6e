"""Small models of the architectures users bring, and user tasks built on them (digits, offline).

``tiny_vit`` is written the way most ViT codebases write attention (timm's convention): one fused
``qkv`` Linear and a ``num_heads`` attribute the forward pass reshapes by. ``tiny_resnext`` has
grouped 3x3 convolutions in residual blocks. ``FixedReshape`` views a feature map with a constant
channel count, the kind of layer autoprune must leave whole rather than break.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader

import autoprune as ap
from autoprune.data import load_digits_splits
from autoprune.train import train_model


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attention = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        x = (attention @ v).transpose(1, 2).reshape(batch, tokens, self.num_heads * self.head_dim)
        return self.proj(x)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


class TinyViT(nn.Module):
    def __init__(self, dim: int = 32, heads: int = 4, depth: int = 2, hidden: int = 64, patch: int = 2,
                 image: int = 8, channels: int = 1, classes: int = 10) -> None:
        super().__init__()
        self.patch = nn.Conv2d(channels, dim, patch, patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, (image // patch) ** 2 + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads, hidden) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        x = self.blocks(x)
        return self.head(self.norm(x)[:, 0])


class Bottleneck(nn.Module):
    def __init__(self, channels: int, width: int, groups: int) -> None:
        super().__init__()
        self.reduce = nn.Sequential(nn.Conv2d(channels, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.grouped = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, groups=groups, bias=False),
                                     nn.BatchNorm2d(width), nn.ReLU())
        self.expand = nn.Sequential(nn.Conv2d(width, channels, 1, bias=False), nn.BatchNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.expand(self.grouped(self.reduce(x))))


class TinyResNeXt(nn.Module):
    def __init__(self, channels: int = 32, width: int = 32, groups: int = 4, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU())
        self.blocks = nn.Sequential(Bottleneck(channels, width, groups), Bottleneck(channels, width, groups))
        self.head = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))


class FixedReshape(nn.Module):
    """A conv whose output is viewed as (8, 2, H, W): it needs all 16 channels, so it stays whole."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Conv2d(1, 16, 3, padding=1)
        self.fixed = nn.Conv2d(16, 16, 3, padding=1)
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fixed(torch.relu(self.first(x)))
        x = x.view(x.shape[0], 8, 2, *x.shape[2:]).mean(dim=(2, 3, 4))
        return self.head(x)


def _digits_task(name: str, model: nn.Module, epochs: float) -> ap.Task:
    splits = load_digits_splits()
    recipe = ap.TrainRecipe(epochs=int(max(1, epochs)), lr=0.05, batch_size=64)
    generator = torch.Generator().manual_seed(0)
    train = DataLoader(splits.train, batch_size=64, shuffle=True, generator=generator)
    val = DataLoader(splits.val, batch_size=256)
    test = DataLoader(splits.test, batch_size=256)
    torch.manual_seed(0)
    if epochs:
        train_model(model, train, epochs=epochs, recipe=recipe, show_progress=False)
    return ap.Task(name=name, model=model.eval(), example_input=torch.zeros(1, 1, 8, 8), train_loader=train,
                   val_loader=val, test_loader=test, recipe=recipe)


def tiny_vit() -> ap.Task:
    torch.manual_seed(0)
    return _digits_task("tiny-vit", TinyViT(), epochs=3)


def tiny_resnext() -> ap.Task:
    torch.manual_seed(0)
    return _digits_task("tiny-resnext", TinyResNeXt(), epochs=2)
