import pytest
import torch
from conftest import needs_fashion_mnist

import autoprune as ap
from autoprune.export import prune_and_finetune
from autoprune.task import load_state_dict


def test_unknown_task_lists_builtins():
    with pytest.raises(ap.TaskError, match="Unknown task 'nope'.*digits-cnn.*cifar10-mobilenetv2"):
        ap.load_task("nope")


def test_cifar_without_data_says_where_files_go(monkeypatch, tmp_path):
    monkeypatch.delenv("AUTOPRUNE_DATA", raising=False)
    with pytest.raises(ap.DataNotFoundError, match="cifar-10-batches-py.*--data-root"):
        ap.load_task("cifar10-resnet20", data_root=tmp_path)


def test_user_task_loads_and_profiles():
    task = ap.load_task("user_tasks:make_task")
    assert task.name == "tiny-user"
    assert len(ap.profile_model(task).groups) == 4


@pytest.mark.parametrize("spec, message", [
    ("user_tasks:raises", "raised RuntimeError: my data server is down"),
    ("user_tasks:not_a_task", "returned int"),
    ("user_tasks:missing", "has no function 'missing'"),
    ("no_such_module_xyz:f", "cannot import module"),
])
def test_bad_user_tasks(spec, message):
    with pytest.raises(ap.TaskError, match=message):
        ap.load_task(spec)


def test_digits_task_splits_and_accuracy(digits_task, digits_evaluator):
    sizes = [len(loader.dataset) for loader in (digits_task.train_loader, digits_task.val_loader, digits_task.test_loader)]
    assert sizes == [1078, 359, 360]
    assert digits_evaluator.dense_score > 0.9


@needs_fashion_mnist
def test_fashion_mnist_splits():
    from autoprune.data import load_fashion_mnist_splits

    splits = load_fashion_mnist_splits()
    assert (len(splits.train), len(splits.val), len(splits.test)) == (55000, 5000, 10000)
    x, y = splits.train[0]
    assert x.shape == (1, 28, 28) and 0 <= int(y) < 10


def test_checkpoints_must_be_plain_state_dicts(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"w": torch.zeros(2)}, good)
    assert set(load_state_dict(good)) == {"w"}
    evil = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(2), "obj": ap.TrainRecipe()}, evil)
    with pytest.raises(ap.CheckpointError, match="not a plain state dict"):
        load_state_dict(evil)
    module = tmp_path / "module.pt"
    torch.save(torch.nn.Linear(2, 2), module)
    with pytest.raises(ap.CheckpointError):
        load_state_dict(module)


def test_finetuning_is_reproducible_whatever_ran_before(digits_task):
    plan = ap.uniform_plan(ap.profile_model(digits_task), ap.Budget(flops=0.5))
    first = prune_and_finetune(digits_task, plan, epochs=0.5, seed=3, show_progress=False)
    for _ in digits_task.train_loader:  # advance the loader's shuffling, as an earlier fine-tune would
        pass
    second = prune_and_finetune(digits_task, plan, epochs=0.5, seed=3, show_progress=False)
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), name
