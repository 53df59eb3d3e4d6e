"""Every user mistake: one clear message, exit status 2, no traceback, nothing half-written."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, needs_fashion_mnist, nothing_written, run_cli

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
    assert nothing_written(workdir)  # nothing half-written
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
    (["--strategy", "grid"], ["option --strategy", "'optuna', 'rl', 'random', 'uniform', 'global' or 'lamp'"]),
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


@needs_fashion_mnist
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
    import optuna

    optuna.create_study(study_name="other", storage=f"sqlite:///{workdir / 'optuna.db'}")  # searches, not this one
    out_dir = tmp_path / "exported"
    code, out = _cli(capsys, "export", "--study", "nope", "--out", str(out_dir), "--workdir", str(workdir))
    assert code == 2 and "No study named 'nope'" in out and "studies there: other" in out and not out_dir.exists()


def test_export_refuses_an_unknown_choice_before_any_work(capsys, workdir, tmp_path):
    out_dir = tmp_path / "exported"
    code, out = _cli(capsys, "export", "--study", "any", "--out", str(out_dir), "--choose", "test",
                     "--workdir", str(workdir))
    assert code == 2 and "--choose 'test' is not allowed; use one of: search, val" in out and not out_dir.exists()


def test_real_process_exit_status_and_no_traceback(workdir):
    done = run_cli("search", "--budget", "flops=2.5e-9", "--workdir", str(workdir))
    assert done.returncode == 2 and "error:" in done.stderr and "Traceback" not in done.stderr + done.stdout


def test_space_file_that_is_not_utf8(capsys, tmp_path):
    workdir = tmp_path / "home"  # refused before any task is loaded
    path = tmp_path / "latin1.yaml"
    path.write_bytes("task: digits-cnn\nname: caf\u00e9\n".encode("latin-1"))
    _refused(capsys, workdir, "search", "--space", str(path), expect=[str(path), "is not UTF-8 text"])


@pytest.mark.parametrize("text, words", [
    ("task: digits-cnn\nbudget: {flops: 0.5}\nbudget: {flops: 0.2}\n", "key 'budget' appears twice (line 2 and line 3)"),
    ("task: digits-cnn\nstrategy:\n  trials: 5\n  trials: 50\n", "key 'trials' appears twice (line 3 and line 4)"),
])
def test_duplicate_key_in_space_file(capsys, tmp_path, text, words):
    workdir = tmp_path / "home"  # refused before any task is loaded
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    _refused(capsys, workdir, "search", "--space", str(path), expect=[str(path), words])


@pytest.mark.parametrize("text, words", [
    ("", "is empty"), ("# nothing here\n\n# yet\n", "is empty"), ("budget: {flops: 0.3}\n", "names no task"),
])
def test_space_file_without_settings_or_task(capsys, tmp_path, text, words):
    workdir = tmp_path / "home"  # refused before any task is loaded
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    _refused(capsys, workdir, "search", "--space", str(path),
             expect=[str(path), words, "needs at least `task:`", "search_spaces/default.yaml"])


@pytest.mark.parametrize("change, words", [
    ({"strategy__trials": True}, "key 'strategy.trials': must be an integer, got the boolean true"),
    ({"strategy__seed": "3"}, "key 'strategy.seed': must be an integer, got '3'"),
    ({"groups__round_to": True}, "key 'groups.round_to': must be an integer"),
    ({"groups__ratio": [0.0, "0.5"]}, "key 'groups.ratio.1': must be a number, got '0.5'"),
    ({"evaluation__val_samples": True}, "key 'evaluation.val_samples': must be an integer or null"),
    ({"evaluation__calibration_batches": "16"}, "key 'evaluation.calibration_batches': must be an integer"),
    ({"strategy__rl": {"tau": True}}, "key 'strategy.rl.tau': must be a number, got the boolean true"),
    ({"strategy__rl": {"noise_sigma": float("inf")}}, "key 'strategy.rl.noise_sigma': must be a finite number"),
    ({"latency": {"threads": False}}, "key 'latency.threads': must be an integer"),
    ({"budget": {"flops": True}}, "key 'budget': Budget flops=True is not allowed"),
    ({"budget": {"params": "0.4"}}, "key 'budget': Budget params='0.4' is not allowed"),
    ({"strategy__rl": {"start_from_baselines": "yes"}},
     "key 'strategy.rl.start_from_baselines': must be true or false, got 'yes'"),
    ({"evaluation__fidelity": {"rungs": [0, 8], "distill": 1}},
     "key 'evaluation.fidelity.distill': must be true or false, got 1"),
])
def test_booleans_and_strings_are_not_numbers_in_space_files(capsys, tmp_path, change, words):
    workdir = tmp_path / "home"  # refused before any task is loaded
    _refused(capsys, workdir, "search", "--space", _space(tmp_path, **change), expect=[words])


def test_space_still_validates_after_a_json_round_trip(tmp_path):
    from autoprune.search import SearchSettings, resolve_settings

    settings = resolve_settings("default", seed=7, n_trials=3, workdir=tmp_path)
    again = SearchSettings.from_dict(json.loads(json.dumps(settings.to_dict())))
    assert again.space == settings.space and again.space.groups.ratio == (0.0, 0.8)


def test_seed_outside_32_bits_is_refused(capsys, tmp_path):
    workdir = tmp_path / "home"  # refused before any task is loaded
    _refused(capsys, workdir, "search", "--space", _space(tmp_path, strategy__seed=2**32),
             expect=["key 'strategy.seed'", "seed 4294967296 is out of range", "0..4294967295"])
    _refused(capsys, workdir, "search", "--seed", "-1",
             expect=["key 'strategy.seed' (option --seed)", "seed -1 is out of range", "0..4294967295"])


def test_space_that_is_a_directory(capsys, tmp_path):
    workdir = tmp_path / "home"  # refused before any task is loaded
    _refused(capsys, workdir, "search", "--space", str(tmp_path),
             expect=[f"Search space {str(tmp_path)!r} is a directory", "a search space is a YAML file"])


def test_budget_with_two_metrics(capsys, tmp_path):
    workdir = tmp_path / "home"  # refused before any task is loaded
    out = _refused(capsys, workdir, "search", "--budget", "flops=0.5,params=0.5",
                   expect=["one budget metric at a time", "flops=, params=, latency_ms=, latency="])
    assert "is not a number" not in out
    out = _refused(capsys, workdir, "search", "--space", _space(tmp_path, budget={"flops": 0.5, "params": 0.5}),
                   expect=["key 'budget'", "one metric at a time, got 2 (flops, params)",
                           "flops, params, latency_ms, latency"])
    assert "(top level)" not in out and ".." not in out


def test_round_to_larger_than_every_group(capsys, workdir, tmp_path, digits_profile):
    import autoprune as ap

    _refused(capsys, workdir, "search", "--space", _space(tmp_path, groups__round_to=256),
             expect=["key 'groups.round_to'", "round_to=256", "'conv3', has 128 channels"])
    with pytest.raises(ap.InfeasibleBudgetError, match=r"round_to=256 \(groups\.round_to.*largest group has 128 channels"):
        ap.uniform_plan(digits_profile, ap.Budget(flops=0.5), round_to=256)


def _apply_refused(capsys, workdir, tmp_path, data, words):
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(data))
    out_file = tmp_path / "pruned.pt"
    code, out = _cli(capsys, "apply", "--plan", str(path), "--task", "digits-cnn", "--out", str(out_file),
                     "--workdir", str(workdir))
    assert code == 2 and "error:" in out and "Traceback" not in out, out
    assert words in out, (words, out)
    assert not out_file.exists()


def test_plans_are_checked_field_by_field_not_by_their_fingerprint(capsys, workdir, tmp_path, digits_profile):
    from dataclasses import replace

    import autoprune as ap
    from autoprune.plan import check_plan_matches

    plan = ap.uniform_plan(digits_profile, ap.Budget(flops=0.5))
    base = plan.to_dict()  # every edit below keeps the model's true fingerprint
    missing = json.loads(json.dumps(base))
    del missing["channels"]["fc1"], missing["ratios"]["fc1"]
    _apply_refused(capsys, workdir, tmp_path, missing, "the model has group 'fc1' (128 channels) that the plan lacks")
    extra = json.loads(json.dumps(base))
    extra["channels"]["conv9"], extra["ratios"]["conv9"] = [64, 32], 0.5
    _apply_refused(capsys, workdir, tmp_path, extra, "'conv9' (64 channels) is not a group of the model")
    wider = json.loads(json.dumps(base))
    wider["channels"]["conv1"] = [64, 2 * wider["channels"]["conv1"][1]]
    _apply_refused(capsys, workdir, tmp_path, wider, "'conv1' has 32 channels in the model but 64 in the plan")
    reordered = json.loads(json.dumps(base))
    reordered["channels"] = dict(reversed(list(reordered["channels"].items())))
    _apply_refused(capsys, workdir, tmp_path, reordered, "listed in another order (position 0: 'fc1' in the plan")
    shape = json.loads(json.dumps(base))
    shape["input_shape"] = [1, 3, 8, 8]
    _apply_refused(capsys, workdir, tmp_path, shape, "made for inputs of shape (1, 3, 8, 8) but the model takes (1, 1, 8, 8)")
    edited = json.loads(json.dumps(base))
    edited["model_fingerprint"] = "0" * 64
    _apply_refused(capsys, workdir, tmp_path, edited, "model_fingerprint '0000000000000000'... is not the fingerprint")

    groups = [(g.name, g.channels) for g in digits_profile.groups]
    contradicting = replace(plan, ratios={**plan.ratios, "conv2": 0.1})
    with pytest.raises(ap.PlanError, match="group 'conv2' has ratio 0.1 but channels"):
        check_plan_matches(contradicting, groups)
    with pytest.raises(ap.PlanError, match="keeps 0 of 32"):
        check_plan_matches(replace(plan, channels={**plan.channels, "conv1": (32, 0)}), groups)
    with pytest.raises(ap.PlanMismatchError, match=r"inputs of shape \(1, 1, 8, 8\) but task 'x' takes \(1, 1, 28, 28\)"):
        check_plan_matches(plan, groups, what="task 'x'", input_shape=(1, 1, 28, 28))
    check_plan_matches(plan, groups, input_shape=(4, 1, 8, 8))  # the batch size does not matter


def _untrained_digits_profile():
    import autoprune as ap
    from autoprune.task import dense_model

    return ap.profile_model(*dense_model("digits-cnn", pretrained=False))  # the groups of digits-cnn, untrained


@pytest.mark.parametrize("key, value, words", [
    ("ratios", {"conv1": float("nan")}, "key 'ratios': group 'conv1' has ratio nan"),
    ("ratios", {"conv1": True}, "key 'ratios': group 'conv1' has ratio the boolean true"),
    ("channels", {"conv1": [32, True]}, "key 'channels': group 'conv1' must be a pair of integers (dense channels, kept channels)"),
    ("channels", {"conv1": ["32", 16]}, "key 'channels': group 'conv1' must be a pair of integers"),
    ("input_shape", [1, True, 8, 8], "key 'input_shape': must be a list of positive integers"),
    ("model_fingerprint", 12, "key 'model_fingerprint': must be a string"),
    ("budget", [0.5], "key 'budget': must be an object"),
    ("budget", {"flops": True}, "key 'budget': Budget flops=True is not allowed"),
    ("metrics", "fast", "key 'metrics': must be an object"),
    ("metrics", {"val_score": False}, "key 'metrics': 'val_score' must be a number"),
    ("provenance", ["optuna"], "key 'provenance': must be an object"),
    ("ratioz", {}, "unknown keys 'ratioz'"),
])
def test_plan_from_dict_refuses_bad_fields(key, value, words):
    import autoprune as ap

    data = ap.uniform_plan(_untrained_digits_profile(), ap.Budget(flops=0.5)).to_dict()
    if key in ("ratios", "channels"):
        data[key] = {**data[key], **value}
    else:
        data[key] = value
    with pytest.raises(ap.PlanError) as info:
        ap.Plan.from_json(json.dumps(data), source="plan file p.json")
    assert words in str(info.value) and "plan file p.json" in str(info.value)


def test_plan_with_a_duplicate_key_is_refused():
    import autoprune as ap

    text = ap.uniform_plan(_untrained_digits_profile(), ap.Budget(flops=0.5)).to_json()
    with pytest.raises(ap.PlanError, match="key 'task' appears twice"):
        ap.Plan.from_json(text.replace("{", '{"task": "fashionmnist-cnn", ', 1))


# -- the reliability issue's remaining user mistakes, one test each --------------------------------


def test_negative_threads(capsys, workdir):
    _refused(capsys, workdir, "search", "--threads", "-1", expect=["--threads must be a positive integer"])


def test_empty_checkpoint_file(capsys, workdir):
    (workdir / "checkpoints" / "digits-cnn.pt").write_bytes(b"")
    _refused(capsys, workdir, "search", "--trials", "1", expect=["digits-cnn.pt", "it is empty"])


def test_pickled_checkpoint_names_its_object_not_torchs_advice(capsys, workdir):
    torch.save({"model": torch.nn.Linear(2, 2)}, workdir / "checkpoints" / "digits-cnn.pt")
    out = _refused(capsys, workdir, "search", "--trials", "1", expect=["pickled torch.nn.modules.linear.Linear"])
    assert "weights_only set to False" not in out and "weights_only=False" not in out


def test_apply_out_is_a_directory(capsys, workdir, tmp_path):
    import autoprune as ap
    from autoprune.task import dense_model

    plan = ap.uniform_plan(ap.profile_model(*dense_model("digits-cnn", pretrained=False)), ap.Budget(flops=0.5))
    plan_file = plan.save(tmp_path / "plan.json")
    code, out = _cli(capsys, "apply", "--plan", str(plan_file), "--out", str(tmp_path), "--workdir", str(workdir))
    assert code == 2 and "is a directory" in out and "pruned.pt" in out and "Traceback" not in out


def test_export_out_under_an_unwritable_parent_is_refused_before_any_work(capsys, workdir, tmp_path):
    parent = tmp_path / "a-file"  # a path under a file cannot be created, whoever runs the test
    parent.write_text("not a directory")
    code, out = _cli(capsys, "export", "--study", "none-yet", "--out", str(parent / "exported"),
                     "--workdir", str(workdir))
    assert code == 2 and "cannot be created" in out and "Traceback" not in out
    assert not (workdir / "optuna.db").exists()  # refused before the study was even opened


@pytest.mark.parametrize("uri", ["ftp://host/x", "/plain/path/mlruns", "file:///tmp/mlruns"])
def test_tracking_uri_that_is_not_a_tracking_store(capsys, workdir, uri):
    _refused(capsys, workdir, "search", "--tracking-uri", uri, expect=["--tracking-uri", "sqlite:///path/to/mlflow.db"])


def test_storage_that_is_not_a_database_url(capsys, workdir):
    _refused(capsys, workdir, "search", "--storage", "/tmp/optuna.db", expect=["--storage", "sqlite:///path/to/optuna.db"])


@pytest.mark.parametrize("spec, words", [
    (":make", "is not of the form 'package.module:function'"),
    ("mod:", "is not of the form 'package.module:function'"),
    ("broken_syntax_task:make_task", "has a syntax error at"),
    ("user_tasks:non_numeric_score", "did not return a number"),
])
def test_more_bad_user_tasks(capsys, workdir, tmp_path, monkeypatch, spec, words):
    modules = tmp_path / "modules"
    modules.mkdir()
    (modules / "broken_syntax_task.py").write_text("def make_task(:\n    pass\n")
    monkeypatch.syspath_prepend(str(modules))
    _refused(capsys, workdir, "search", "--space", _space(tmp_path, task=spec), expect=[words])


def test_a_dense_model_with_nan_outputs_is_refused(capsys, workdir, tmp_path):
    _refused(capsys, workdir, "search", "--space", _space(tmp_path, task="user_tasks:nan_outputs"),
             expect=["outputs on the validation data are not all finite"])


def test_finetune_epochs_nan_is_refused(capsys, workdir):
    code, out = _cli(capsys, "export", "--study", "x", "--out", str(workdir / "exp"), "--finetune-epochs", "nan",
                     "--workdir", str(workdir))
    assert code == 2 and "--finetune-epochs must be a finite number" in out and "Traceback" not in out


def test_resuming_a_study_with_another_space_names_what_differs(capsys, workdir, tmp_path):
    code, out = _cli(capsys, "search", "--trials", "1", "--study", "kept", "--workdir", str(workdir))
    assert code == 0, out
    code, out = _cli(capsys, "search", "--trials", "2", "--study", "kept", "--budget", "flops=0.3",
                     "--workdir", str(workdir))
    assert code == 2 and "budget: {'flops': 0.5} in the study, {'flops': 0.3} now" in out and "None" not in out


def test_a_killed_exports_leftovers_are_cleared(capsys, workdir, tmp_path):
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    leftover = tmp_path / f".exported.partial-{dead.pid}-abc"
    leftover.mkdir()
    (leftover / "model.pt").write_bytes(b"half")
    _cli(capsys, "export", "--study", "no-such-study", "--out", str(tmp_path / "exported"), "--workdir", str(workdir))
    assert not leftover.exists()


def test_rich_markup_in_a_message_is_shown_as_typed(capsys, workdir, tmp_path):
    path = tmp_path / "markup.yaml"
    path.write_text("task: digits-cnn\n'[/b]': 1\n")
    code, out = _cli(capsys, "search", "--space", str(path), "--workdir", str(workdir))
    assert code == 2 and "[/b]" in out and "Traceback" not in out
