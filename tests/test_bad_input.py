"""Every user mistake: one clear message, exit status 2, no traceback, nothing half-written."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, run_cli

from autoprune.cli import run

DEFAULT = yaml.safe_load((REPO / "search_spaces" / "default.yaml").read_text())


def _cli(capsys, *args: str) -> tuple[int, str]:
    code = run(list(args))
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def _space(tmp_path: Path, **changes) -> str:
    data = json.loads(json.dumps(DEFAULT))
    for dotted, value in changes.items():
        node = data
        *parents, leaf = dotted.split("__")
        for p in parents:
            node = node[p]
        node[leaf] = value
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _refused(capsys, workdir: Path, *args: str, expect: list[str]) -> str:
    code, out = _cli(capsys, *args, "--workdir", str(workdir))
    assert code == 2, out
    assert "error:" in out and "Traceback" not in out
    for words in expect:
        assert words in out, (words, out)
    assert not (workdir / "optuna.db").exists() and not (workdir / "mlflow.db").exists()  # nothing half-written
    return out


def test_malformed_yaml(capsys, workdir, tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("task: digits-cnn\nbudget: {flops: 0.5\n")
    _refused(capsys, workdir, "search", "--space", str(path), expect=[str(path), "not valid YAML"])


def test_unknown_key_in_space_file(capsys, workdir, tmp_path):
    _refused(capsys, workdir, "search", "--space", _space(tmp_path, groups__inclde=["*"]),
             expect=["key 'groups.inclde'", "allowed keys here: include, exclude, ratio, round_to"])


@pytest.mark.parametrize("budget, words", [
    ("flops=-1", "must be a positive number"),
    ("macs=0.5", "Unknown budget metric 'macs'"),
    ("flops", "must look like flops=0.5"),
    ("latency=2", "must be a fraction in (0, 1)"),
])
def test_budget_out_of_range_or_malformed(capsys, workdir, budget, words):
    _refused(capsys, workdir, "search", "--budget", budget, expect=[words])


def test_infeasible_budget(capsys, workdir):
    _refused(capsys, workdir, "search", "--budget", "flops=0.01", expect=["cannot be met", "between 0.0462 and 1.0000"])


@pytest.mark.parametrize("args, words", [
    (["--sampler", "bayes"], ["option --sampler", "'tpe', 'gp', 'cmaes', 'random', 'qmc' or 'nsga2'"]),
    (["--strategy", "grid"], ["option --strategy", "'optuna', 'rl', 'random', 'uniform' or 'global'"]),
    (["--strategy", "rl", "--agent", "ppo"], ["option --agent", "'ddpg', 'td3' or 'sac'"]),
    (["--objective", "max"], ["option --objective", "'score' or 'pareto'"]),
    (["--workers", "0"], ["--workers must be a positive integer"]),
])
def test_unknown_choices(capsys, workdir, args, words):
    _refused(capsys, workdir, "search", *args, expect=words)


def test_unknown_task(capsys, workdir, tmp_path):
    _refused(capsys, workdir, "search", "--space", _space(tmp_path, task="resnet-9000"),
             expect=["Unknown task 'resnet-9000'", "digits-cnn"])


def test_glob_matching_no_group(capsys, workdir, tmp_path):
    _refused(capsys, workdir, "search", "--space", _space(tmp_path, groups__include=["layer9*"]),
             expect=["'layer9*' matches no group", "conv1, conv2, conv3, fc1"])


def test_inverted_ratio_range(capsys, workdir, tmp_path):
    _refused(capsys, workdir, "search", "--space", _space(tmp_path, groups__ratio=[0.8, 0.2]),
             expect=["key 'groups.ratio'", "0 <= low <= high < 1"])


def test_missing_dataset(capsys, workdir, tmp_path, monkeypatch):
    monkeypatch.delenv("AUTOPRUNE_DATA", raising=False)
    _refused(capsys, workdir, "search", "--space", _space(tmp_path, task="cifar10-resnet20"),
             expect=["CIFAR-10 was not found", "--data-root"])


def test_unwritable_workdir(capsys, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code, out = _cli(capsys, "search", "--workdir", str(blocker / "runs"))
    assert code == 2 and "cannot be written" in out and "Traceback" not in out


def test_unreachable_storage_and_tracking(capsys, workdir):
    _refused(capsys, workdir, "search", "--storage", "postgresql+psycopg://u:secret@127.0.0.1:1/db",
             expect=["Cannot open the Optuna storage", "u:***@127.0.0.1"])
    out = _refused(capsys, workdir, "search", "--tracking-uri", "http://127.0.0.1:1", expect=["does not answer"])
    assert "secret" not in out


@pytest.mark.parametrize("spec, words", [
    ("crashing_task:no_such_function", "has no function 'no_such_function'"),
    ("nan_task:make_task", "must be finite"),
])
def test_bad_user_tasks(capsys, workdir, tmp_path, spec, words):
    _refused(capsys, workdir, "search", "--space", _space(tmp_path, task=spec), expect=[words])


def test_user_task_that_raises(capsys, workdir):
    code, out = _cli(capsys, "profile", "--task", "user_tasks:raises", "--workdir", str(workdir))
    assert code == 2 and "raised RuntimeError: my data server is down" in out and "Traceback" not in out


def test_checkpoint_that_is_not_a_state_dict(capsys, workdir):
    torch.save({"model": torch.nn.Linear(2, 2)}, workdir / "checkpoints" / "digits-cnn.pt")
    _refused(capsys, workdir, "search", expect=["not a plain state dict", "weights_only"])


def test_plan_for_another_model_and_corrupt_plans(capsys, workdir, tmp_path, digits_profile):
    import autoprune as ap

    plan = ap.uniform_plan(digits_profile, ap.Budget(flops=0.5)).save(tmp_path / "plan.json")
    code, out = _cli(capsys, "apply", "--plan", str(plan), "--task", "fashionmnist-cnn", "--out", str(tmp_path / "x.pt"),
                     "--workdir", str(workdir))
    assert code == 2 and "does not fit" in out and "Traceback" not in out
    assert not (tmp_path / "x.pt").exists()
    text = plan.read_text()
    for bad, words in ((text[: len(text) // 2], "not valid JSON"), ("{}", "unknown plan schema"),
                       (text.replace('"channels"', '"chanels"'), "missing required keys: channels")):
        broken = tmp_path / "broken.json"
        broken.write_text(bad)
        code, out = _cli(capsys, "apply", "--plan", str(broken), "--out", str(tmp_path / "y.pt"), "--workdir", str(workdir))
        assert code == 2 and words in out and "Traceback" not in out, out
    assert not (tmp_path / "y.pt").exists()


def test_export_of_unknown_study_leaves_no_directory(capsys, workdir, tmp_path):
    out_dir = tmp_path / "exported"
    code, out = _cli(capsys, "export", "--study", "nope", "--out", str(out_dir), "--workdir", str(workdir))
    assert code == 2 and "No study named 'nope'" in out and not out_dir.exists()


def test_export_refuses_an_unknown_choice_before_any_work(capsys, workdir, tmp_path):
    out_dir = tmp_path / "exported"
    code, out = _cli(capsys, "export", "--study", "any", "--out", str(out_dir), "--choose", "test",
                     "--workdir", str(workdir))
    assert code == 2 and "--choose 'test' is not allowed; use one of: search, val" in out and not out_dir.exists()


def test_real_process_exit_status_and_no_traceback(workdir):
    done = run_cli("search", "--budget", "flops=2.5e-9", "--workdir", str(workdir))
    assert done.returncode == 2 and "error:" in done.stderr and "Traceback" not in done.stderr + done.stdout
