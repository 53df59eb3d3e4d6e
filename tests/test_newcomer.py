"""A newcomer's first hour (#16 items 12 and 15): what export writes and says, where a resumed
search picks up, and commands run in the wrong place or on the wrong kind of task that say so
instead of creating an empty workdir or contradicting themselves."""

from __future__ import annotations

from conftest import REPO

import autoprune as ap
from autoprune.cli import run

SPACE = str(REPO / "search_spaces" / "default.yaml")


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    code = run(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_train_of_a_user_task_says_it_brings_its_own_model(capsys, tmp_path):
    code, out, err = _cli(capsys, "train", "--task", "user_tasks:make_task", "--workdir", str(tmp_path / "home"))
    message = " ".join(err.split())
    assert code == 2 and "Traceback" not in out + err
    assert "'user_tasks:make_task' is a user task, which brings its own trained model" in message
    assert "autoprune search --task user_tasks:make_task" in message
    assert "Unknown task" not in message and "or give a user task" not in message  # no self-contradiction
    assert not (tmp_path / "home").exists()


def test_export_of_a_pareto_front_by_budget_writes_budgets_as_the_cli_does(capsys, workdir, tmp_path):
    result = ap.search(SPACE, objective="pareto", strategy="random", n_trials=3, workdir=workdir,
                       show_progress=False)
    out_dir = tmp_path / "exported"
    code, out, err = _cli(capsys, "export", "--study", result.study_name, "--out", str(out_dir), "--budget",
                          "flops=0.6", "--finetune-epochs", "0", "--threads", "1", "--workdir", str(workdir))
    assert code == 0, err
    report = (out_dir / "report.md").read_text()
    chosen = ap.Plan.load(out_dir / "plan.json")
    assert f"Budget {ap.Budget.from_dict(chosen.budget)} (the best trial within export --budget flops=0.6);" in report
    assert "{'" not in report and "{'" not in out  # no Python dicts in what the user reads


def test_export_and_studies_outside_the_searchs_directory_name_it_and_create_nothing(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("AUTOPRUNE_HOME", raising=False)
    for args in (["export", "--study", "mine", "--out", "exported"], ["studies"]):
        code, out, err = _cli(capsys, *args)
        message = " ".join(err.split())
        assert code == 2 and "Traceback" not in out + err, message
        assert f"No searches in {tmp_path / 'autoprune-runs'}: it has no optuna.db." in message
        assert "--workdir" in message and "AUTOPRUNE_HOME" in message and "--storage" in message
        assert list(tmp_path.iterdir()) == []  # no empty ./autoprune-runs, no partial export


def test_a_resumed_search_says_where_it_resumes_before_its_trials(capsys, workdir):
    import optuna

    args = ("search", "--study", "again", "--strategy", "random", "--workdir", str(workdir))
    code, _, err = _cli(capsys, *args, "--trials", "2")
    assert code == 0 and "resuming" not in err, err
    study = optuna.load_study(study_name="again", storage=f"sqlite:///{workdir / 'optuna.db'}")
    next_number = len(study.trials)
    code, _, err = _cli(capsys, *args, "--trials", "3")
    assert code == 0, err
    line = f"resuming study again: 2 of 3 trials finished, continuing from trial {next_number}"
    assert line in err and err.index(line) < err.index("search again: 3/3")
    finished = [t.number for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))]
    assert len(finished) == 3 and finished[-1] == next_number  # the trial it said it would run
    code, _, err = _cli(capsys, *args, "--trials", "3")
    assert "resuming study again: 3 of 3 trials finished; nothing left to run" in err
