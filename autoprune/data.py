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
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from .errors import DataNotFoundError

__all__ = ["Splits", "CifarImages", "load_digits_splits", "load_fashion_mnist_splits", "load_cifar10_splits", "cifar10_source"]

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
    #: named parts of the test split reported beside it (CIFAR-10's lossless images)
    test_subsets: Mapping[str, Dataset] = field(default_factory=dict)


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
CIFAR_NPZ = "cifar10.npz"
_CIFAR_NPZ_ARRAYS = ("x_train", "y_train", "x_test", "y_test")


class CifarImages(Dataset):
    """uint8 images (N, 3, H, W) served as normalized float32 tensors, optionally augmented.

    Augmentation is the CIFAR standard: a random HxW crop of the image zero-padded by 4 pixels,
    then a horizontal flip with probability 1/2 (drawn from torch's global generator, so a
    seeded training run is reproducible). Padding is done once here, not per item, because
    per-image PIL transforms cost as much as a ResNet-20 step on 2 cores.
    """

    PAD = 4

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, *, augment: bool) -> None:
        self.labels = labels
        self.augment = augment
        pad = (self.PAD,) * 4
        self._images = torch.nn.functional.pad(images, pad) if augment else images
        self._mean = torch.tensor(CIFAR_MEAN).view(3, 1, 1) * 255.0
        self._std = torch.tensor(CIFAR_STD).view(3, 1, 1) * 255.0

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self._images[index]
        if self.augment:
            size = image.shape[-1] - 2 * self.PAD
            top, left = torch.randint(0, 2 * self.PAD + 1, (2,)).tolist()
            image = image[:, top : top + size, left : left + size]
            if torch.rand(()) < 0.5:
                image = image.flip(-1)
        return (image.float() - self._mean) / self._std, self.labels[index]


def _cifar_candidates(data_root: str | os.PathLike[str] | None) -> list[Path]:
    roots = [Path(r) for r in (data_root, os.environ.get("AUTOPRUNE_DATA")) if r]
    return [d for root in roots for d in (root, root / "cifar10", root / "cifar-10")]


def cifar10_source(data_root: str | os.PathLike[str] | None) -> Path:
    """Where CIFAR-10 is: a ``cifar10.npz`` file, or a directory holding ``cifar-10-batches-py``.

    ``data_root`` (or ``$AUTOPRUNE_DATA``) may name the archive itself or a directory with either
    layout in it (directly, or in a ``cifar10``/``cifar-10`` subdirectory). The official folder
    wins when both are present: it is the reference copy.
    """
    candidates = _cifar_candidates(data_root)
    for directory in candidates:
        if (directory / "cifar-10-batches-py" / "data_batch_1").is_file():
            return directory
    for path in candidates:
        if path.is_file() and path.suffix == ".npz":
            return path
        if (path / CIFAR_NPZ).is_file():
            return path / CIFAR_NPZ
    where = ", ".join(str(c) for c in candidates) or "nowhere (neither --data-root nor AUTOPRUNE_DATA is set)"
    raise DataNotFoundError(
        "CIFAR-10 was not found; autoprune never downloads it. It reads either the python version "
        "of the dataset (the folder cifar-10-batches-py from cifar-10-python.tar.gz) or a NumPy "
        f"archive {CIFAR_NPZ} with uint8 arrays x_train (N,32,32,3), y_train, x_test, y_test "
        "(optional bool test_lossless). Put one of them under a directory and pass it with "
        "--data-root DIR or AUTOPRUNE_DATA=DIR. Looked in: " + where + "."
    )


def _read_cifar_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [k for k in _CIFAR_NPZ_ARRAYS if k not in archive.files]
            if missing:
                raise DataNotFoundError(
                    f"{path} lacks the array(s) {', '.join(missing)}; a CIFAR-10 archive needs "
                    f"{', '.join(_CIFAR_NPZ_ARRAYS)} (uint8 images N,32,32,3 and labels 0-9)."
                )
            arrays = {k: archive[k] for k in archive.files if k in (*_CIFAR_NPZ_ARRAYS, "test_lossless")}
    except (OSError, ValueError) as exc:
        raise DataNotFoundError(f"{path} is not a readable NumPy archive ({exc}).") from None
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (32, 32, 3) or len(y) != len(x):
            raise DataNotFoundError(
                f"{path}: x_{split} must be uint8 of shape (N, 32, 32, 3) with one label per image in "
                f"y_{split}; got {x.dtype} {x.shape} and {len(y)} labels."
            )
    return arrays


def _read_cifar_batches(directory: Path) -> dict[str, np.ndarray]:
    from torchvision import datasets

    # torchvision checks the md5 sums of the official batches; a damaged copy is refused there.
    try:
        train = datasets.CIFAR10(str(directory), train=True, download=False)
        test = datasets.CIFAR10(str(directory), train=False, download=False)
    except RuntimeError as exc:
        raise DataNotFoundError(f"CIFAR-10 under {directory} is incomplete or damaged: {exc}") from None
    return {"x_train": train.data, "y_train": np.asarray(train.targets), "x_test": test.data,
            "y_test": np.asarray(test.targets)}


@functools.lru_cache(maxsize=2)
def _cifar_tensors(source: Path) -> dict[str, torch.Tensor]:
    arrays = _read_cifar_npz(source) if source.is_file() else _read_cifar_batches(source)
    out = {}
    for split in ("train", "test"):
        out[f"x_{split}"] = torch.from_numpy(np.ascontiguousarray(arrays[f"x_{split}"].transpose(0, 3, 1, 2)))
        out[f"y_{split}"] = torch.from_numpy(arrays[f"y_{split}"].astype(np.int64))
    if "test_lossless" in arrays:
        out["test_lossless"] = torch.from_numpy(arrays["test_lossless"].astype(bool))
    return out


def load_cifar10_splits(data_root: str | None = None, val_size: int = 5000) -> Splits:
    """CIFAR-10, never downloaded: ``val_size`` training images held out (seeded), crop + flip on
    the rest; test images whole. When the archive marks its lossless test images
    (``test_lossless``), ``Splits.test_subsets["lossless"]`` holds those alone."""
    tensors = _cifar_tensors(cifar10_source(data_root))
    x, y = tensors["x_train"], tensors["y_train"]
    order = torch.from_numpy(_seeded_permutation(len(y)))
    val, train = order[:val_size], order[val_size:]
    subsets: dict[str, Dataset] = {}
    if "test_lossless" in tensors:
        mask = tensors["test_lossless"]
        subsets["lossless"] = CifarImages(tensors["x_test"][mask], tensors["y_test"][mask], augment=False)
    return Splits(
        CifarImages(x[train], y[train], augment=True),
        CifarImages(x[val], y[val], augment=False),
        CifarImages(tensors["x_test"], tensors["y_test"], augment=False),
        test_subsets=subsets,
    )
