"""Tasks: a dense model, its data splits and how to score it.

A task is what a search prunes. Built-in tasks are named (``digits-cnn``, ``fashionmnist-resnet20``,
``cifar10-resnet56``, ...); a user task is ``"package.module:function"`` returning a :class:`Task`,
or a ``task:`` mapping in a search space file that declares a model factory and data files
(:mod:`autoprune._declared`).
Dense checkpoints are plain state dicts, looked up in ``<workdir>/checkpoints`` and then among those
shipped with autoprune, and loaded with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from . import data as _data
from . import models as _models
from ._workdir import resolve_workdir
from .errors import AutopruneError, CheckpointError, TaskError, short
from .precision import Precision, resolve_precision
from .train import ScoreFn, TrainRecipe, score_model, top1_accuracy, train_model

if TYPE_CHECKING:
    from ._declared import DeclaredTask

__all__ = [
    "Task", "load_task", "dense_model", "builtin_task_names", "train_task", "load_state_dict", "checkpoint_path",
    "score_test_splits",
]

SHIPPED_CHECKPOINTS = Path(__file__).parent / "checkpoints"


@dataclass(frozen=True, kw_only=True)
class Task:
    """A dense model with its data, ready to be pruned.

    Attributes:
        name: identifies the task in plans, studies and MLflow experiments.
        model: the dense model, in eval mode; never modified by autoprune.
        example_input: one input batch of size 1, e.g. shape (1, 3, 32, 32); used to trace the model.
        train_loader: training batches (BatchNorm recalibration, fine-tuning).
        val_loader: held-out batches that score candidates during a search.
        test_loader: batches scored only for the final report, never to choose a plan.
        score_fn: ``(logits (N, C), targets (N,)) -> float``, higher is better; top-1 accuracy by default.
        ignored_layers: module names whose output channels are never pruned, besides the classifier.
        recipe: how the dense model was (or would be) trained; also the fine-tuning recipe.
        test_subsets: named parts of the test data reported beside the whole test split (for
            CIFAR-10 from the shared archive, ``lossless``: the test images that are not JPEG copies).
    """

    name: str
    model: nn.Module
    example_input: torch.Tensor
    train_loader: DataLoader
    val_loader: DataLoader
    test_loader: DataLoader | None = None
    score_fn: ScoreFn = top1_accuracy
    ignored_layers: tuple[str, ...] = ()
    recipe: TrainRecipe = field(default_factory=TrainRecipe)
    test_subsets: Mapping[str, DataLoader] = field(default_factory=dict)


@dataclass(frozen=True)
class _Builtin:
    build_model: Callable[[], nn.Module]
    load_splits: Callable[[str | None], _data.Splits]
    input_shape: tuple[int, ...]
    recipe: TrainRecipe
    # Cheap enough (about a minute on 2 cores) to train silently on first use; the others need an
    # explicit `autoprune train` or a shipped checkpoint.
    auto_train: bool = False
    description: str = ""


def _fashion(data_root: str | None) -> _data.Splits:
    return _data.load_fashion_mnist_splits(data_root)


def _cifar(data_root: str | None) -> _data.Splits:
    return _data.load_cifar10_splits(data_root)


_CIFAR_RECIPE = TrainRecipe(epochs=160, lr=0.1, weight_decay=5e-4, batch_size=128)
_BUILTINS: dict[str, _Builtin] = {
    "digits-cnn": _Builtin(
        _models.DigitsCNN, lambda root: _data.load_digits_splits(), (1, 1, 8, 8),
        TrainRecipe(epochs=30, lr=0.05, weight_decay=5e-4, batch_size=64), auto_train=True,
        description="scikit-learn's 8x8 digits, 4-layer CNN with BatchNorm (offline)",
    ),
    "fashionmnist-cnn": _Builtin(
        _models.FashionCNN, _fashion, (1, 1, 28, 28),
        TrainRecipe(epochs=4, lr=0.05, weight_decay=5e-4, batch_size=128), auto_train=True,
        description="Fashion-MNIST, 5-layer CNN with BatchNorm (Debian dataset-fashion-mnist)",
    ),
    "fashionmnist-resnet20": _Builtin(
        lambda: _models.cifar_resnet(20, in_channels=1), _fashion, (1, 1, 28, 28),
        TrainRecipe(epochs=15, lr=0.1, weight_decay=5e-4, batch_size=128),
        description="Fashion-MNIST, ResNet-20 with projection shortcuts",
    ),
    "cifar10-resnet20": _Builtin(
        lambda: _models.cifar_resnet(20), _cifar, (1, 3, 32, 32), _CIFAR_RECIPE,
        description="CIFAR-10, ResNet-20 (He et al. 2016), projection shortcuts",
    ),
    "cifar10-resnet56": _Builtin(
        lambda: _models.cifar_resnet(56), _cifar, (1, 3, 32, 32), _CIFAR_RECIPE,
        description="CIFAR-10, ResNet-56, projection shortcuts",
    ),
    "cifar10-plain20": _Builtin(
        lambda: _models.plain_net(20), _cifar, (1, 3, 32, 32), _CIFAR_RECIPE,
        description="CIFAR-10, Plain-20 (ResNet-20 without shortcuts, as in AMC)",
    ),
    "cifar10-vgg16": _Builtin(
        lambda: _models.vgg16_bn(), _cifar, (1, 3, 32, 32), _CIFAR_RECIPE,
        description="CIFAR-10, VGG-16 with BatchNorm",
    ),
    "cifar10-mobilenetv2": _Builtin(
        lambda: _models.mobilenet_v2_cifar(), _cifar, (1, 3, 32, 32), _CIFAR_RECIPE,
        description="CIFAR-10, torchvision MobileNetV2 adapted to 32x32",
    ),
}


def builtin_task_names() -> list[str]:
    """Names accepted by :func:`load_task` besides ``package.module:function``."""
    return list(_BUILTINS)


def builtin_description(name: str) -> str:
    return _BUILTINS[name].description


def checkpoint_path(name: str, workdir: str | os.PathLike[str] | None = None) -> Path:
    """Where ``autoprune train`` writes the dense checkpoint of a built-in task."""
    return resolve_workdir(workdir, create=False) / "checkpoints" / f"{name}.pt"


def load_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Load a plain ``{name: tensor}`` state dict, refusing anything that needs unpickling."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"Checkpoint {path} does not exist.") from None
    except Exception as exc:  # weights_only raises UnpicklingError/RuntimeError on foreign objects
        # torch's own message goes on to suggest weights_only=False, the one thing not to do with
        # a file of unknown origin; say what it holds instead.
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
        what = f"it holds a pickled {found.group(1)} object" if found else (
            "it is empty" if Path(path).is_file() and Path(path).stat().st_size == 0
            else f"it is not a readable PyTorch file ({type(exc).__name__})")
        raise CheckpointError(
            f"Checkpoint {path} is not a plain state dict that loads with torch.load(weights_only=True): "
            f"{what}. autoprune never unpickles arbitrary objects, since loading them can run code; save "
            "the model's weights with torch.save(model.state_dict(), path)."
        ) from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise CheckpointError(
            f"Checkpoint {path} holds a {type(obj).__name__}, not a state dict of name -> tensor; "
            "save it with torch.save(model.state_dict(), path)."
        )
    return obj


def _load_weights(model: nn.Module, path: Path) -> None:
    state = load_state_dict(path)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(
            f"Checkpoint {path} does not fit the model: {short(exc)}. Delete it "
            "and run `autoprune train` again."
        ) from None


@dataclass(frozen=True)
class _Loaders:
    train: DataLoader
    val: DataLoader
    test: DataLoader
    test_subsets: Mapping[str, DataLoader]


def _loaders(splits: _data.Splits, recipe: TrainRecipe, seed: int) -> _Loaders:
    generator = torch.Generator().manual_seed(seed)
    return _Loaders(
        train=DataLoader(splits.train, batch_size=recipe.batch_size, shuffle=True, generator=generator),
        val=DataLoader(splits.val, batch_size=500, shuffle=False),
        test=DataLoader(splits.test, batch_size=500, shuffle=False),
        test_subsets={k: DataLoader(v, batch_size=500, shuffle=False) for k, v in splits.test_subsets.items()},
    )


def score_test_splits(model: nn.Module, task: Task, *, precision: Precision = "fp32") -> dict[str, float]:
    """The model's score on the task's test split (key ``test``) and on each named test subset
    (``test_<name>``); empty when the task has no test split."""
    if task.test_loader is None:
        return {}
    scores = {"test": score_model(model, task.test_loader, task.score_fn, precision=precision)}
    for name, loader in task.test_subsets.items():
        scores[f"test_{name}"] = score_model(model, loader, task.score_fn, precision=precision)
    return scores


def train_task(
    name: str,
    *,
    epochs: float | None = None,
    data_root: str | None = None,
    workdir: str | os.PathLike[str] | None = None,
    seed: int = 0,
    precision: str = "fp32",
    show_progress: bool = True,
) -> tuple[Path, dict[str, Any]]:
    """Train a built-in task's dense model with its recipe and cache the checkpoint.

    Training resumes from the last finished epoch when a run with the same task, epochs, seed and
    recipe was stopped (its state is kept beside the checkpoint until training ends). Returns the
    checkpoint path and its metadata (recipe, epochs, precision, validation and test accuracy,
    the validation accuracy after each epoch), which is also written next to it as JSON.
    """
    if ":" in name:
        # A user task's function hands over a model it already trained; `train` has no recipe for it.
        raise TaskError(
            f"autoprune train trains the dense model of a built-in task ({', '.join(_BUILTINS)}); {name!r} is a "
            "user task, which brings its own trained model (its function returns an ap.Task holding it), so there "
            "is nothing to train here. Train that model your own way, then search it with "
            f"`autoprune search --task {name}`."
        )
    spec = _builtin(name)
    epochs = spec.recipe.epochs if epochs is None else epochs
    if not isinstance(epochs, (int, float)) or not math.isfinite(epochs) or epochs <= 0:
        raise TaskError(f"--epochs must be a positive number, got {epochs}.")
    splits = spec.load_splits(data_root)
    loaders = _loaders(splits, spec.recipe, seed)
    torch.manual_seed(seed)
    model = spec.build_model()
    chosen = resolve_precision(precision, model=model, example_input=torch.zeros(spec.input_shape))
    path = resolve_workdir(workdir) / "checkpoints" / f"{name}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    log_path = path.with_suffix(".epochs.jsonl")
    state_path = path.with_suffix(".train-state.pt")
    if not state_path.is_file():
        log_path.unlink(missing_ok=True)
    started = time.monotonic()

    def after_epoch(epoch: int, trained: nn.Module) -> None:
        record = {"epoch": epoch, "val_accuracy": score_model(trained, loaders.val, precision=chosen),
                  "seconds": round(time.monotonic() - started, 1)}
        with log_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    train_model(model, loaders.train, epochs=epochs, recipe=spec.recipe, seed=seed, precision=chosen,
                description=f"train {name}", show_progress=show_progress, state_path=state_path,
                on_epoch=after_epoch)
    history = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()] \
        if log_path.is_file() else []
    task = Task(name=name, model=model, example_input=torch.zeros(spec.input_shape), train_loader=loaders.train,
                val_loader=loaders.val, test_loader=loaders.test, test_subsets=loaders.test_subsets)
    tests = score_test_splits(model, task)
    meta = {
        "task": name, "epochs": epochs, "seed": seed, "recipe": spec.recipe.to_dict(), "precision": chosen,
        "val_accuracy": score_model(model, loaders.val),
        **{f"{k}_accuracy": v for k, v in tests.items()},
        "train_images": len(splits.train), "torch": torch.__version__, "history": history,
    }
    tmp = path.with_suffix(".pt.tmp")
    torch.save({k: v.contiguous() for k, v in model.state_dict().items()}, tmp)
    os.replace(tmp, path)
    path.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    log_path.unlink(missing_ok=True)
    return path, meta


def _builtin(name: str) -> _Builtin:
    try:
        return _BUILTINS[name]
    except KeyError:
        raise TaskError(
            f"Unknown task {name!r}. Built-in tasks: {', '.join(_BUILTINS)}; or give a user task "
            "as 'package.module:function' returning autoprune.Task."
        ) from None


def dense_model(
    name: str,
    *,
    workdir: str | os.PathLike[str] | None = None,
    pretrained: bool = True,
    data_root: str | None = None,
    seed: int = 0,
) -> tuple[nn.Module, torch.Tensor]:
    """A built-in task's dense model (eval mode) and an example input of batch size 1.

    Needs no dataset unless ``pretrained`` and the task has to be trained first, so profiling and
    latency work on tasks whose data is absent.
    """
    spec = _builtin(name)
    model = spec.build_model()
    if pretrained:
        cached = checkpoint_path(name, workdir)
        shipped = SHIPPED_CHECKPOINTS / f"{name}.pt"
        if cached.is_file():
            _load_weights(model, cached)
        elif shipped.is_file():
            _load_weights(model, shipped)
        elif spec.auto_train:
            path, _ = train_task(name, data_root=data_root, workdir=workdir, seed=seed)
            _load_weights(model, path)
        else:
            raise TaskError(
                f"Task {name!r} has no trained dense checkpoint yet (looked for {cached} and "
                f"{shipped}). Train one with `autoprune train --task {name}` (about "
                f"{spec.recipe.epochs} epochs), or load it with pretrained=False for an untrained model."
            )
    return model.eval(), torch.zeros(spec.input_shape)


def _load_builtin(
    name: str, data_root: str | None, workdir: str | os.PathLike[str] | None, pretrained: bool, seed: int
) -> Task:
    spec = _builtin(name)
    splits = spec.load_splits(data_root)
    model, example_input = dense_model(name, workdir=workdir, pretrained=pretrained, data_root=data_root, seed=seed)
    loaders = _loaders(splits, spec.recipe, seed)
    return Task(
        name=name, model=model, example_input=example_input, train_loader=loaders.train,
        val_loader=loaders.val, test_loader=loaders.test, recipe=spec.recipe, test_subsets=loaders.test_subsets,
    )


_USER_TASK = re.compile(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*")


def _load_user_task(spec: str, data_root: str | None, workdir: str | os.PathLike[str] | None) -> Task:
    if not _USER_TASK.fullmatch(spec):
        raise TaskError(
            f"User task {spec!r} is not of the form 'package.module:function' (a dotted module path, a colon, "
            f"a function name), and not a built-in task ({', '.join(_BUILTINS)})."
        )
    module_name, _, func_name = spec.partition(":")
    # As `python -m` does: a task module in the current directory imports without PYTHONPATH.
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise TaskError(f"User task {spec!r}: cannot import module {module_name!r} ({exc}).") from None
    except SyntaxError as exc:
        raise TaskError(f"User task {spec!r}: module {module_name!r} has a syntax error at {exc.filename}, line "
                        f"{exc.lineno}: {exc.msg}.") from None
    except Exception as exc:
        raise TaskError(f"User task {spec!r}: importing module {module_name!r} raised {type(exc).__name__}: "
                        f"{short(exc)}") from exc
    factory = getattr(module, func_name, None)
    if not callable(factory):
        raise TaskError(f"User task {spec!r}: module {module_name!r} has no function {func_name!r}.")
    params = inspect.signature(factory).parameters
    kwargs = {k: v for k, v in (("data_root", data_root), ("workdir", workdir)) if k in params}
    try:
        task = factory(**kwargs)
    except AutopruneError:
        raise
    except Exception as exc:
        raise TaskError(f"User task {spec!r} raised {type(exc).__name__}: {short(exc)}") from exc
    if not isinstance(task, Task):
        raise TaskError(f"User task {spec!r} returned {type(task).__name__}; it must return autoprune.Task.")
    task.model.eval()
    return task


def load_task(
    name: str | Mapping[str, Any] | DeclaredTask,
    *,
    data_root: str | os.PathLike[str] | None = None,
    workdir: str | os.PathLike[str] | None = None,
    pretrained: bool = True,
    seed: int = 0,
) -> Task:
    """Load a built-in task by name, or a user task given as ``"package.module:function"``.

    ``name`` may also be a task as a plan's ``provenance.task_spec`` records it: the ``task:``
    mapping of a search space file (a model factory, a state-dict file and data files).
    ``data_root`` (or ``$AUTOPRUNE_DATA``) is where datasets that do not ship offline live.
    With ``pretrained=False`` a built-in model keeps its random initialization (enough for
    profiling and latency, which do not depend on the weights).
    """
    root = str(data_root) if data_root is not None else None
    if not isinstance(name, str):
        return _load_spec(name, root, workdir, seed, pretrained)
    if ":" in name:
        return _load_user_task(name, root, workdir)
    return _load_builtin(name, root, workdir, pretrained, seed)


def _load_spec(spec: Any, data_root: str | None, workdir: str | os.PathLike[str] | None, seed: int,
               pretrained: bool) -> Task:
    """A task recorded as a mapping: a declared one (a space file's ``task:`` mapping) or the mark of
    a search of a task object, which cannot be loaded again."""
    if isinstance(spec, Mapping) and "in_memory" in spec:
        raise TaskError(
            f"The plan was searched on the ap.Task object {spec['in_memory']!r} built in Python, which autoprune "
            "did not store. Pass --task with a task that builds the same model ('package.module:function'), or "
            "apply the plan in Python: ap.apply_plan(task.model, plan, calibration_batches=...)."
        )
    from ._declared import load_declared

    return load_declared(spec, data_root=data_root, workdir=workdir, seed=seed, pretrained=pretrained)

