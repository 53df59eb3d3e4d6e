"""Tasks declared in the search space file alone (autoprune/_declared.py), and examples/declared.yaml."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import yaml
from conftest import REPO

import autoprune as ap
from autoprune.cli import run

EXAMPLES = REPO / "examples"


def _err(capsys) -> str:
    return " ".join(capsys.readouterr().err.split())


@pytest.mark.slow  # trains torchvision's ResNet-18 on 16x16 digits for 3 epochs (the example's recipe)
def test_declared_example_searches_exports_and_applies(tmp_path, monkeypatch, capsys):
    import torchvision

    monkeypatch.syspath_prepend(str(EXAMPLES))
    from make_digits_imagefolder import make_imagefolder

    # The README's steps with examples/declared.yaml as it is, run from another directory: its
    # relative data paths are read from the file's directory.
    here = tmp_path / "project"
    here.mkdir()
    shutil.copy(EXAMPLES / "declared.yaml", here / "declared.yaml")
    make_imagefolder(here / "digits")
    monkeypatch.chdir(tmp_path)
    workdir = tmp_path / "home"
    assert run(["search", "--space", "project/declared.yaml", "--trials", "3", "--threads", "1",
                "--workdir", str(workdir)]) == 0, _err(capsys)
    study = "declared-optuna-tpe-flops0.5"
    from autoprune._catalog import list_studies

    (found,) = list_studies(f"sqlite:///{workdir / 'optuna.db'}")  # what `autoprune studies` shows
    assert (found.name, found.task, found.trials) == (study, "digits-resnet18", 3)
    out = tmp_path / "exported"
    assert run(["export", "--study", study, "--out", str(out), "--finetune-epochs", "0.1", "--threads", "1",
                "--workdir", str(workdir)]) == 0, _err(capsys)

    pruned, plan = ap.load_pruned(out / "model.pt", torchvision.models.resnet18(num_classes=10))
    assert plan.task == "digits-resnet18" and plan.metrics["flops_ratio"] <= 0.5
    spec = plan.provenance["task_spec"]
    assert spec["model"]["factory"] == "torchvision.models:resnet18"
    assert spec["data"]["train"] == str(here / "digits" / "train")  # absolute: apply works from anywhere
    with torch.no_grad():
        assert pruned(torch.zeros(2, 3, 16, 16)).shape == (2, 10)
    monkeypatch.chdir(REPO)
    assert run(["apply", "--plan", str(out / "plan.json"), "--out", str(tmp_path / "applied.pt"),
                "--workdir", str(workdir)]) == 0, _err(capsys)
    applied, _ = ap.load_pruned(tmp_path / "applied.pt", torchvision.models.resnet18(num_classes=10))
    assert [p.shape for p in applied.parameters()] == [p.shape for p in pruned.parameters()]


def _digits_npz(path, *, with_val: bool = False) -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images * (255 / 16)).astype(np.uint8)  # N x 8 x 8 grayscale
    y = digits.target.astype(np.int64)
    arrays = {"x_train": x[:1200], "y_train": y[:1200], "x_test": x[1500:], "y_test": y[1500:]}
    if with_val:
        arrays.update(x_val=x[1200:1500], y_val=y[1200:1500])
    np.savez(path, **arrays)


def _space(path, task, **extra) -> str:
    path.write_text(yaml.safe_dump({"task": task, "budget": {"flops": 0.5},
                                    "strategy": {"name": "optuna", "trials": 2}, **extra}))
    return str(path)


def test_declared_task_loads_a_state_dict_and_an_npz(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    from my_task import SmallCNN

    torch.manual_seed(3)
    trained = SmallCNN(width=8)
    (tmp_path / "data").mkdir()
    torch.save(trained.state_dict(), tmp_path / "data" / "weights.pt")
    _digits_npz(tmp_path / "data" / "digits.npz")
    task = {"name": "npz-digits",
            "model": {"factory": "my_task:SmallCNN", "kwargs": {"width": 8}, "weights": "data/weights.pt"},
            "data": {"format": "npz", "path": "data/digits.npz", "val_fraction": 0.25},
            "input": {"size": 8, "channels": 1, "mean": [0.3], "std": [0.4]},
            "ignored_layers": ["features.0"]}
    space = ap.load_space(_space(tmp_path / "space.yaml", task))
    assert space.name == "space" and space.task_label == "npz-digits"
    assert space.task.data.path == str(tmp_path / "data" / "digits.npz")

    loaded = ap.load_task(space.task_spec)
    assert loaded.name == "npz-digits" and loaded.ignored_layers == ("features.0",)
    assert all(torch.equal(a, b) for a, b in zip(loaded.model.state_dict().values(),
                                                 trained.state_dict().values()))
    assert tuple(loaded.example_input.shape) == (1, 1, 8, 8)
    assert (len(loaded.train_loader.dataset), len(loaded.val_loader.dataset)) == (900, 300)
    assert len(loaded.test_loader.dataset) == 297
    x, _ = loaded.train_loader.dataset[0]
    assert x.shape == (1, 8, 8) and float(x.min()) == pytest.approx((0 - 0.3) / 0.4)
    assert "features.0" not in {g.name for g in ap.profile_model(loaded).groups}
    capsys.readouterr()
    assert run(["profile", "--space", str(tmp_path / "space.yaml"), "--json"]) == 0
    assert __import__("json").loads(capsys.readouterr().out)["task"] == "npz-digits"

    # Resized, and grayscale repeated into RGB, for a model that reads 3 channels at another size.
    from autoprune._declared import _splits

    rgb = ap.load_space(_space(tmp_path / "rgb.yaml", dict(task, input={"size": [12, 10], "channels": 3}))).task
    splits, classes = _splits(rgb)
    assert classes == 10 and splits.train[0][0].shape == (3, 12, 10)
    assert torch.equal(splits.train[0][0][0], splits.train[0][0][2])


@pytest.mark.parametrize(("change", "message"), [
    ({"modle": {}}, r"key 'task.modle': unknown key; allowed keys here: name, model, data, input, recipe, ignored_layers"),
    ({"model": {"factory": "resnet18"}},
     r"key 'task.model.factory': 'resnet18' is not a model factory; allowed: 'module.path:callable'"),
    ({"model": {"factory": "my_task:SmallCNN"}}, r"key 'task': model.weights is missing: .* add recipe:"),
    ({"model": {"factory": "torchvision.models:resnet18", "kwargs": {"weights": "IMAGENET1K_V1"},
                "weights": "w.pt"}}, r"key 'task.model.kwargs': kwargs weights: 'IMAGENET1K_V1' would download"),
    ({"data": {"format": "csv", "path": "d.npz"}}, r"key 'task.data.format': value 'csv' is not allowed; input should "
                                                   r"be 'imagefolder' or 'npz'"),
    ({"data": {"format": "imagefolder", "path": "d.npz"}}, r"key 'task.data': format imagefolder needs train:"),
    ({"input": {"size": 8, "channels": 1, "mean": [0.1, 0.2]}}, r"key 'task.input': mean and std go together"),
    ({"input": {"size": [8, 8, 8]}}, r"key 'task.input.size'"),
    ({"name": "my task"}, r"key 'task.name': 'my task' is not allowed"),
    ({"data": {"format": "npz", "path": "nowhere.npz"}}, r"key 'task.data.path': the file .*nowhere.npz does not "
                                                         r"exist \(relative paths are read from the file's directory"),
])
def test_bad_declarations_are_refused_before_any_work(change, message, tmp_path, capsys):
    torch.save({}, tmp_path / "w.pt")
    _digits_npz(tmp_path / "d.npz")
    task = {"name": "t", "model": {"factory": "my_task:SmallCNN", "weights": "w.pt"},
            "data": {"format": "npz", "path": "d.npz"}, "input": {"size": 8, "channels": 1}, **change}
    space = _space(tmp_path / "bad.yaml", task)
    assert run(["search", "--space", space, "--workdir", str(tmp_path / "home")]) == 2
    err = _err(capsys)
    assert f"Search space file {space}" in err
    assert __import__("re").search(message, err), err
    assert not (tmp_path / "home" / "optuna.db").exists()


def test_declared_models_that_do_not_fit_are_named(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    monkeypatch.chdir(tmp_path)
    from my_task import SmallCNN

    torch.save(SmallCNN(width=16).state_dict(), tmp_path / "w16.pt")
    _digits_npz(tmp_path / "d.npz", with_val=True)
    base = {"name": "t", "model": {"factory": "my_task:SmallCNN", "kwargs": {"width": 8}, "weights": "w16.pt"},
            "data": {"format": "npz", "path": "d.npz"}, "input": {"size": 8, "channels": 1}}
    cases = [
        (base, r"the state dict .*w16.pt \(model.weights\) does not fit the model my_task:SmallCNN with kwargs "
               r"\{'width': 8\}"),
        (dict(base, model={"factory": "torchvision.models:resnet18", "kwargs": {"num_classes": 4},
                           "weights": "w16.pt"}, input={"size": 16, "channels": 3}),
         r"the data has 10 classes but the model outputs 4 scores; set the factory's class count"),
        (dict(base, input={"size": 8, "channels": 3}), r"the model does not run on an input of shape \(1, 3, 8, 8\) "
                                                      r"\(input.size and input.channels\)"),
        (dict(base, model={"factory": "timm:resnet18", "weights": "w16.pt"}), r"needs timm, which is not installed"),
        (dict(base, model={"factory": "my_task:NoSuchNet", "weights": "w16.pt"}), r"module 'my_task' has no 'NoSuchNet'"),
    ]
    for task, message in cases:
        if "timm" in message and __import__("importlib").util.find_spec("timm") is not None:
            continue
        space = _space(tmp_path / "s.yaml", task)
        assert run(["search", "--space", space, "--workdir", str(tmp_path / "home")]) == 2
        err = _err(capsys)
        assert __import__("re").search(message, err), err
