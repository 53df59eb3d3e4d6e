"""Tasks declared in a search space file: a model factory, a state-dict file and data files.

The common case needs no Python: ``task:`` as a mapping names the model (an import path such as
``torchvision.models:resnet18`` with keyword arguments, or ``timm:<name>``), its trained weights
(a state dict, loaded with ``torch.load(weights_only=True)``), the data (an ImageFolder directory
per split, or one ``.npz`` archive) and the input size and normalization. :func:`load_declared`
turns it into an :class:`~autoprune.Task`; anything else is a Python task function.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import json
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
from pydantic import BeforeValidator, Field, field_validator, model_validator
from torch import nn
from torch.utils.data import Dataset, Subset, TensorDataset

from ._schema import Float, Int, Strict, number_check, show
from ._workdir import resolve_workdir
from .data import Splits
from .errors import CheckpointError, DataNotFoundError, TaskError, short
from .task import Task, _loaders, load_state_dict
from .train import TrainRecipe, train_model

__all__ = ["DeclaredTask", "load_declared"]

_IMPORT_PATH = r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*"
_TIMM = r"timm:[\w.-]+"
_NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]*"
# Factory arguments that fetch weights over the network; autoprune runs offline.
_DOWNLOADING_KWARGS = ("weights", "pretrained", "pretrained_cfg", "checkpoint_path")


class ModelDecl(Strict):
    """``factory``: ``module.path:callable`` (``torchvision.models:resnet18``) or ``timm:<name>``,
    called with ``kwargs``; ``weights``: the trained model's state-dict file."""

    factory: str
    kwargs: dict[str, Any] = Field(default_factory=dict)
    weights: str | None = None

    @field_validator("factory")
    @classmethod
    def _import_path(cls, v: str) -> str:
        if not re.fullmatch(_TIMM, v) and not re.fullmatch(_IMPORT_PATH, v):
            raise ValueError(f"{v!r} is not a model factory; allowed: 'module.path:callable' (e.g. "
                             "torchvision.models:resnet18, mypkg.nets:MyNet) or 'timm:<model name>'")
        return v

    @field_validator("kwargs")
    @classmethod
    def _offline(cls, v: dict[str, Any]) -> dict[str, Any]:
        for key in _DOWNLOADING_KWARGS:
            if v.get(key) not in (None, False):
                raise ValueError(
                    f"kwargs {key}: {show(v[key])} would download weights, and autoprune runs offline; save the "
                    "trained model with torch.save(model.state_dict(), path) and give that file as model.weights"
                )
        return v


class DataDecl(Strict):
    """``imagefolder``: ``train`` (and optional ``val``, ``test``) directories of one sub-directory
    per class; ``npz``: ``path`` of an archive with ``x_train``, ``y_train`` (and optional
    ``x_val``/``y_val``, ``x_test``/``y_test``). Without a validation split, ``val_fraction``
    (default 0.2) of the training images is held out (seeded) to score candidates."""

    format: Literal["imagefolder", "npz"]
    train: str | None = None
    val: str | None = None
    test: str | None = None
    path: str | None = None
    val_fraction: Annotated[float | None, number_check(integer=False, optional=True)] = Field(default=None, gt=0, lt=1)

    @model_validator(mode="after")
    def _keys_of_the_format(self) -> DataDecl:
        if self.format == "imagefolder":
            if self.train is None:
                raise ValueError("format imagefolder needs train: the directory of training images (one "
                                 "sub-directory per class), and optionally val: and test:")
            if self.path is not None:
                raise ValueError("path: is the .npz archive of format npz; format imagefolder takes train:, val:, test:")
        else:
            if self.path is None:
                raise ValueError("format npz needs path: the .npz archive (x_train, y_train, optionally x_val, "
                                 "y_val, x_test, y_test)")
            given = [k for k in ("train", "val", "test") if getattr(self, k) is not None]
            if given:
                raise ValueError(f"{', '.join(given)}: belong to format imagefolder; format npz reads every split "
                                 "from the archive at path:")
        if self.val is not None and self.val_fraction is not None:
            raise ValueError("val_fraction holds training images out when there is no val split; this data has val:")
        return self


def _square(value: Any) -> Any:
    return [value, value] if isinstance(value, int) and not isinstance(value, bool) else value


class InputDecl(Strict):
    """Images are resized to ``size`` (height, width) with ``channels`` channels (1: grayscale,
    3: RGB), scaled to [0, 1], then normalized per channel: ``(x - mean) / std``."""

    size: Annotated[tuple[Int, Int], BeforeValidator(_square)]
    channels: Int = Field(default=3, ge=1)
    mean: list[Float] | None = None
    std: list[Float] | None = None

    @model_validator(mode="after")
    def _normalization(self) -> InputDecl:
        if min(self.size) < 1:
            raise ValueError(f"size {list(self.size)} must be two positive integers (height, width)")
        if (self.mean is None) != (self.std is None):
            raise ValueError("mean and std go together: give both (one value per channel) or neither")
        for key, values in (("mean", self.mean), ("std", self.std)):
            if values is not None and len(values) not in (1, self.channels):
                raise ValueError(f"{key} has {len(values)} values; give one per channel ({self.channels}) or one for all")
        if self.std is not None and min(self.std) <= 0:
            raise ValueError(f"std {self.std} must be positive")
        return self


class RecipeDecl(Strict):
    """How the model is trained from scratch when no weights are given (then cached in the
    workdir), and the recipe export fine-tunes with (at a tenth of ``lr``)."""

    epochs: Int = Field(default=10, ge=1)
    lr: Float = Field(default=0.1, gt=0)
    momentum: Float = Field(default=0.9, ge=0, lt=1)
    weight_decay: Float = Field(default=5e-4, ge=0)
    batch_size: Int = Field(default=128, ge=1)

    def recipe(self) -> TrainRecipe:
        return TrainRecipe(**self.model_dump())


class DeclaredTask(Strict):
    """A search space's ``task:`` mapping (see the README, "Your own model and data")."""

    name: str

    @field_validator("name")
    @classmethod
    def _usable_name(cls, v: str) -> str:
        if not re.fullmatch(_NAME, v):
            raise ValueError(f"{v!r} is not allowed; a task name is letters, digits, '.', '_' and '-', starting "
                             "with a letter or digit (it names studies and MLflow experiments)")
        return v
    model: ModelDecl
    data: DataDecl
    input: InputDecl
    recipe: RecipeDecl | None = None
    ignored_layers: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _trained_somehow(self) -> DeclaredTask:
        if self.model.weights is None and self.recipe is None:
            raise ValueError(
                "model.weights is missing: autoprune prunes a trained model; give its state-dict file "
                "(torch.save(model.state_dict(), path)), or add recipe: (e.g. {epochs: 10}) to have autoprune "
                "train it from scratch first (once; the checkpoint is cached in the workdir)"
            )
        return self

    def paths(self) -> dict[str, str]:
        """The files and directories it names, by key (``model.weights``, ``data.train``, ...)."""
        found = {"model.weights": self.model.weights}
        found.update({f"data.{k}": getattr(self.data, k) for k in ("train", "val", "test", "path")})
        return {k: v for k, v in found.items() if v is not None}

    def resolved(self, base: str | os.PathLike[str]) -> DeclaredTask:
        """A copy whose relative paths are made absolute against ``base`` (the space file's directory)."""
        absolute = {k: str((Path(base) / Path(v).expanduser()).resolve()) for k, v in self.paths().items()}
        model = self.model.model_copy(update={k.split(".")[1]: v for k, v in absolute.items() if k.startswith("model.")})
        data = self.data.model_copy(update={k.split(".")[1]: v for k, v in absolute.items() if k.startswith("data.")})
        return self.model_copy(update={"model": model, "data": data})

    def missing_path(self) -> str | None:
        """A message for the first file or directory that is not there, if any."""
        for key, value in self.paths().items():
            want_dir = key in ("data.train", "data.val", "data.test")
            if not (Path(value).is_dir() if want_dir else Path(value).is_file()):
                what = "directory" if want_dir else "file"
                return f"key 'task.{key}': the {what} {value} does not exist"
        return None


def load_declared(spec: Mapping[str, Any] | DeclaredTask, *, data_root: str | None = None,
                  workdir: str | os.PathLike[str] | None = None, seed: int = 0, pretrained: bool = True) -> Task:
    """The :class:`~autoprune.Task` a ``task:`` mapping declares (relative paths against the
    working directory; a space file's are already absolute). With ``pretrained=False`` the model
    keeps the factory's initialization: enough to profile it, and nothing is trained."""
    del data_root  # a declared task names its own data files
    if not isinstance(spec, DeclaredTask):
        from .space import validate_task

        spec = validate_task(spec, source="The declared task")
    decl = spec.resolved(Path.cwd())
    missing = decl.missing_path()
    if missing:
        raise DataNotFoundError(f"Declared task {decl.name!r}: {missing}.")
    splits, classes = _splits(decl)
    recipe = decl.recipe.recipe() if decl.recipe else TrainRecipe()
    # The dense model never depends on the search's seed: export and apply must rebuild the same one.
    torch.manual_seed(0)
    model = _build_model(decl)
    example_input = torch.zeros(1, decl.input.channels, *decl.input.size)
    _probe(model, example_input, classes, decl)
    loaders = _loaders(splits, recipe, seed)
    if pretrained and decl.model.weights is not None:
        _load_weights(model, decl)
    elif pretrained:
        _train_or_reuse(model, decl, recipe, loaders.train, workdir)
    return Task(name=decl.name, model=model.eval(), example_input=example_input, train_loader=loaders.train,
                val_loader=loaders.val, test_loader=loaders.test if len(splits.test) else None, recipe=recipe,
                ignored_layers=tuple(decl.ignored_layers))


# -- the model -------------------------------------------------------------------------------------


def _build_model(decl: DeclaredTask) -> nn.Module:
    factory, kwargs = decl.model.factory, decl.model.kwargs
    where = f"Declared task {decl.name!r}: model factory {factory!r}"
    module_name, _, attr = factory.partition(":")
    if module_name == "timm":
        try:
            import timm
        except ImportError:
            raise TaskError(f"{where} needs timm, which is not installed: pip install timm (or name a torchvision "
                            "factory such as torchvision.models:resnet18).") from None
        build = functools.partial(timm.create_model, attr)
    else:
        # As for a task function: a factory module in the working directory imports without PYTHONPATH.
        if "" not in sys.path and os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            build = importlib.import_module(module_name)
            for part in attr.split("."):
                build = getattr(build, part)
        except ImportError as exc:
            raise TaskError(f"{where}: cannot import module {module_name!r} ({exc}).") from None
        except AttributeError:
            raise TaskError(f"{where}: module {module_name!r} has no {attr!r}.") from None
        if not callable(build):
            raise TaskError(f"{where}: {attr!r} is a {type(build).__name__}, not a function or class.")
    try:
        model = build(**kwargs)
    except Exception as exc:
        raise TaskError(f"{where} with kwargs {kwargs} raised {type(exc).__name__}: {short(exc)}") from None
    if not isinstance(model, nn.Module):
        raise TaskError(f"{where} returned a {type(model).__name__}, not a torch.nn.Module.")
    return model


def _probe(model: nn.Module, example_input: torch.Tensor, classes: int, decl: DeclaredTask) -> None:
    """Run the model once, so a wrong input size, channel count or class count is named now."""
    shape = tuple(example_input.shape)
    try:
        with torch.no_grad():
            out = model.eval()(example_input)
    except Exception as exc:
        raise TaskError(f"Declared task {decl.name!r}: the model does not run on an input of shape {shape} "
                        f"(input.size and input.channels): {type(exc).__name__}: {short(exc)}") from None
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        raise TaskError(f"Declared task {decl.name!r}: the model's output on {shape} is not logits of shape "
                        f"(1, classes) but {tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}.")
    if out.shape[1] < classes:
        raise TaskError(f"Declared task {decl.name!r}: the data has {classes} classes but the model outputs "
                        f"{out.shape[1]} scores; set the factory's class count (e.g. kwargs: {{num_classes: {classes}}}).")


def _load_weights(model: nn.Module, decl: DeclaredTask) -> None:
    path = decl.model.weights
    state = load_state_dict(path)  # type: ignore[arg-type]
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"Declared task {decl.name!r}: the state dict {path} (model.weights) does not fit "
                              f"the model {decl.model.factory} with kwargs {decl.model.kwargs}: {short(exc)}") from None


def _train_or_reuse(model: nn.Module, decl: DeclaredTask, recipe: TrainRecipe, loader: Any,
                    workdir: str | os.PathLike[str] | None) -> None:
    """Train from scratch once; the checkpoint is keyed by what defines it (model, data, input, recipe),
    so changing any of them trains again (changed image files do not: delete the checkpoint)."""
    defining = decl.model_dump(mode="json", exclude={"name", "ignored_layers"})
    key = hashlib.sha256(json.dumps(defining, sort_keys=True).encode()).hexdigest()[:12]
    path = resolve_workdir(workdir) / "checkpoints" / f"{decl.name}-{key}.pt"
    if path.is_file():
        model.load_state_dict(load_state_dict(path))
        return
    train_model(model, loader, epochs=recipe.epochs, recipe=recipe, seed=0, description=f"train {decl.name}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".pt.tmp")
    torch.save({k: v.contiguous() for k, v in model.state_dict().items()}, tmp)
    os.replace(tmp, path)


# -- the data --------------------------------------------------------------------------------------


def _hold_out(train: Dataset, fraction: float) -> tuple[Dataset, Dataset]:
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0)).tolist()  # type: ignore[arg-type]
    n_val = max(1, round(fraction * len(order)))
    return Subset(train, order[n_val:]), Subset(train, order[:n_val])


def _splits(decl: DeclaredTask) -> tuple[Splits, int]:
    """Train/val/test datasets (test empty when not given) and the number of classes."""
    read = _imagefolder_splits if decl.data.format == "imagefolder" else _npz_splits
    train, val, test, classes = read(decl)
    if val is None:
        if len(train) < 2:  # type: ignore[arg-type]
            raise TaskError(f"Declared task {decl.name!r}: {len(train)} training image(s) cannot "  # type: ignore[arg-type]
                            "be split into training and validation images.")
        train, val = _hold_out(train, 0.2 if decl.data.val_fraction is None else decl.data.val_fraction)
    return Splits(train, val, test if test is not None else TensorDataset(torch.zeros(0))), classes


def _normalize(x: torch.Tensor, inp: InputDecl) -> torch.Tensor:
    if inp.mean is None or inp.std is None:
        return x
    shape = (-1, 1, 1) if x.ndim == 3 else (1, -1, 1, 1)
    return (x - torch.tensor(inp.mean).view(shape)) / torch.tensor(inp.std).view(shape)


def _open_image(path: str, mode: str) -> Any:
    from PIL import Image

    with Image.open(path) as image:
        return image.convert(mode)


def _imagefolder_splits(decl: DeclaredTask) -> tuple[Dataset, Dataset | None, Dataset | None, int]:
    from torchvision import datasets, transforms

    inp = decl.input
    if inp.channels not in (1, 3):
        raise TaskError(f"Declared task {decl.name!r}: image files are read as grayscale (input.channels: 1) or RGB "
                        f"(input.channels: 3), not {inp.channels} channels; use format npz for other channel counts.")
    transform = transforms.Compose([
        transforms.Resize(tuple(inp.size)), transforms.ToTensor(),
        transforms.Lambda(functools.partial(_normalize, inp=inp)),
    ])
    loader = functools.partial(_open_image, mode="L" if inp.channels == 1 else "RGB")
    found: dict[str, Any] = {}
    for split in ("train", "val", "test"):
        root = getattr(decl.data, split)
        if root is None:
            continue
        try:
            found[split] = datasets.ImageFolder(root, transform=transform, loader=loader)
        except (FileNotFoundError, OSError) as exc:
            raise DataNotFoundError(f"Declared task {decl.name!r}: data.{split} {root} is not an ImageFolder "
                                    f"directory (one sub-directory of images per class): {short(exc)}") from None
    classes = found["train"].classes
    for split in ("val", "test"):
        if split in found and found[split].classes != classes:
            raise TaskError(f"Declared task {decl.name!r}: the class folders of data.{split} "
                            f"({', '.join(found[split].classes)}) differ from those of data.train ({', '.join(classes)}); "
                            "every split needs the same class folders, as each folder's rank is its label.")
    return found["train"], found.get("val"), found.get("test"), len(classes)


def _npz_splits(decl: DeclaredTask) -> tuple[Dataset, Dataset | None, Dataset | None, int]:
    path = decl.data.path
    try:
        with np.load(path, allow_pickle=False) as archive:  # type: ignore[arg-type]
            arrays = {k: archive[k] for k in archive.files}
    except (OSError, ValueError) as exc:
        raise DataNotFoundError(f"Declared task {decl.name!r}: data.path {path} is not a readable .npz archive "
                                f"without pickled objects: {short(exc)}") from None
    if "x_train" not in arrays or "y_train" not in arrays:
        raise TaskError(f"Declared task {decl.name!r}: {path} holds {', '.join(sorted(arrays)) or 'nothing'}; it needs "
                        "x_train and y_train (and optionally x_val, y_val, x_test, y_test).")
    sets: dict[str, TensorDataset | None] = {}
    for split in ("train", "val", "test"):
        x, y = arrays.get(f"x_{split}"), arrays.get(f"y_{split}")
        if (x is None) != (y is None):
            raise TaskError(f"Declared task {decl.name!r}: {path} has only one of x_{split} and y_{split}.")
        sets[split] = None if x is None else TensorDataset(_npz_images(x, decl, f"x_{split}"),
                                                           _npz_labels(y, len(x), decl, f"y_{split}"))
    classes = int(max(int(s.tensors[1].max()) for s in sets.values() if s is not None and len(s))) + 1
    return sets["train"], sets["val"], sets["test"], classes  # type: ignore[return-value]


def _npz_images(x: np.ndarray, decl: DeclaredTask, key: str) -> torch.Tensor:
    """N x H x W, N x H x W x C (channels last, as images are stored) or N x C x H x W images;
    uint8 is scaled to [0, 1], floats are taken as they are; then resized and normalized."""
    inp, where = decl.input, f"Declared task {decl.name!r}: {key} of {decl.data.path}"
    if x.dtype.kind not in "uif" or x.ndim not in (3, 4):
        raise TaskError(f"{where} has shape {x.shape} and dtype {x.dtype}; images are N x H x W or N x H x W x C "
                        "(or N x C x H x W) arrays of uint8 or floats.")
    t = torch.from_numpy(np.ascontiguousarray(x))
    t = t.float().div_(255.0) if x.dtype == np.uint8 else t.float()
    if t.ndim == 3:
        t = t.unsqueeze(1)
    elif t.shape[-1] in (1, inp.channels) and t.shape[1] not in (1, inp.channels):
        t = t.permute(0, 3, 1, 2)
    if t.shape[1] == 1 and inp.channels > 1:
        t = t.expand(-1, inp.channels, -1, -1)  # grayscale into a model that reads RGB
    if t.shape[1] != inp.channels:
        raise TaskError(f"{where} has {t.shape[1]} channels (shape {x.shape}); input.channels is {inp.channels}.")
    if tuple(t.shape[2:]) != tuple(inp.size):
        t = torch.nn.functional.interpolate(t, size=tuple(inp.size), mode="bilinear", antialias=True,
                                            align_corners=False)
    return _normalize(t, inp).contiguous()


def _npz_labels(y: np.ndarray, n: int, decl: DeclaredTask, key: str) -> torch.Tensor:
    if y.ndim != 1 or len(y) != n or y.dtype.kind not in "iu" or (len(y) and y.min() < 0):
        raise TaskError(f"Declared task {decl.name!r}: {key} of {decl.data.path} must be {n} class indices "
                        f"(integers >= 0), one per image; it has shape {y.shape} and dtype {y.dtype}.")
    return torch.from_numpy(y.astype(np.int64))
