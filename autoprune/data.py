"""Offline datasets of the built-in tasks, split once with a fixed seed.

Nothing here downloads: scikit-learn ships the digits, Debian's ``dataset-fashion-mnist`` package
ships Fashion-MNIST, and CIFAR-10 must already sit under ``--data-root``/``AUTOPRUNE_DATA``.
Each loader returns train/val/test :class:`torch.utils.data.Dataset` objects; the validation split
is carved out of the training images so the test split is never used to choose a plan.
"""

from __future__ import annotations

import functools
import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from .errors import DataNotFoundError

__all__ = ["Splits", "load_digits_splits", "load_fashion_mnist_splits", "load_cifar10_splits"]

SPLIT_SEED = 0
FASHION_MNIST_DIRS = (Path("/usr/share/datasets/fashion-mnist"),)
_FASHION_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}


@dataclass(frozen=True)
class Splits:
    """The three splits of a task's data; ``val`` is held out of the training images."""

    train: Dataset
    val: Dataset
    test: Dataset


def _seeded_permutation(n: int, seed: int = SPLIT_SEED) -> np.ndarray:
    return np.random.default_rng(seed).permutation(n)


@functools.lru_cache(maxsize=1)
def load_digits_splits() -> Splits:
    """scikit-learn's 1,797 8x8 digits: 60% train, 20% val, 20% test, standardized."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.from_numpy(_seeded_permutation(len(y)))
    n_train, n_val = int(0.6 * len(y)), int(0.2 * len(y))
    train, val, test = order[:n_train], order[n_train : n_train + n_val], order[n_train + n_val :]
    mean, std = x[train].mean(), x[train].std()
    x = (x - mean) / std
    return Splits(
        TensorDataset(x[train], y[train]), TensorDataset(x[val], y[val]), TensorDataset(x[test], y[test])
    )


def _fashion_dir(data_root: str | os.PathLike[str] | None) -> Path:
    candidates: list[Path] = []
    for root in (data_root, os.environ.get("AUTOPRUNE_DATA")):
        if root:
            candidates += [Path(root) / "fashion-mnist", Path(root)]
    candidates += list(FASHION_MNIST_DIRS)
    for directory in candidates:
        if all((directory / name).is_file() for name in _FASHION_FILES.values()):
            return directory
    raise DataNotFoundError(
        "Fashion-MNIST was not found. autoprune looks for "
        + ", ".join(_FASHION_FILES.values())
        + " in: "
        + ", ".join(str(c) for c in candidates)
        + ". Install it offline with `apt-get install -y dataset-fashion-mnist` (files land in "
        "/usr/share/datasets/fashion-mnist), or put the four IDX files under --data-root."
    )


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


FASHION_MEAN, FASHION_STD = 0.2860, 0.3530


@functools.lru_cache(maxsize=2)
def load_fashion_mnist_splits(data_root: str | None = None, val_size: int = 5000) -> Splits:
    """Fashion-MNIST's 60,000 training images minus ``val_size`` held out, and its 10,000 tests.

    Images are (1, 28, 28) float32 tensors normalized with the training set's mean and std.
    """
    directory = _fashion_dir(data_root)
    arrays = {key: _read_idx(directory / name) for key, name in _FASHION_FILES.items()}

    def images(key: str) -> torch.Tensor:
        x = torch.from_numpy(arrays[key].copy()).float().div_(255.0).unsqueeze(1)
        return x.sub_(FASHION_MEAN).div_(FASHION_STD)

    x_train, y_train = images("train_images"), torch.from_numpy(arrays["train_labels"].astype(np.int64))
    x_test, y_test = images("test_images"), torch.from_numpy(arrays["test_labels"].astype(np.int64))
    order = torch.from_numpy(_seeded_permutation(len(y_train)))
    val, train = order[:val_size], order[val_size:]
    return Splits(
        TensorDataset(x_train[train], y_train[train]),
        TensorDataset(x_train[val], y_train[val]),
        TensorDataset(x_test, y_test),
    )


CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def cifar10_root(data_root: str | os.PathLike[str] | None) -> Path:
    """The directory holding ``cifar-10-batches-py``, or a clear error naming where to put it."""
    candidates = [Path(r) for r in (data_root, os.environ.get("AUTOPRUNE_DATA")) if r]
    for root in candidates:
        for directory in (root, root / "cifar10", root / "cifar-10"):
            if (directory / "cifar-10-batches-py" / "data_batch_1").is_file():
                return directory
    where = ", ".join(str(c) for c in candidates) or "nowhere (neither --data-root nor AUTOPRUNE_DATA is set)"
    raise DataNotFoundError(
        "CIFAR-10 was not found; autoprune never downloads it. Put the python version of the "
        "dataset (the folder cifar-10-batches-py from cifar-10-python.tar.gz) under a directory "
        "and pass it with --data-root DIR or AUTOPRUNE_DATA=DIR. Looked in: " + where + "."
    )


def load_cifar10_splits(data_root: str | None = None, val_size: int = 5000) -> Splits:
    """CIFAR-10 via torchvision (never downloaded): crop+flip on train, ``val_size`` held out."""
    from torchvision import datasets, transforms

    root = cifar10_root(data_root)
    normalize = transforms.Normalize(CIFAR_MEAN, CIFAR_STD)
    plain = transforms.Compose([transforms.ToTensor(), normalize])
    augmented = transforms.Compose(
        [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(), transforms.ToTensor(), normalize]
    )
    train_aug = datasets.CIFAR10(str(root), train=True, transform=augmented, download=False)
    train_plain = datasets.CIFAR10(str(root), train=True, transform=plain, download=False)
    test = datasets.CIFAR10(str(root), train=False, transform=plain, download=False)
    order = _seeded_permutation(len(train_plain)).tolist()
    return Splits(Subset(train_aug, order[val_size:]), Subset(train_plain, order[:val_size]), test)
