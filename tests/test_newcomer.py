"""A newcomer's first hour (#16 items 12 and 15): what export writes and says, where a resumed
search picks up, and commands run in the wrong place or on the wrong kind of task that say so
instead of creating an empty workdir or contradicting themselves."""

from __future__ import annotations

import json

import optuna
import pytest
from conftest import mlflow_runs

import autoprune as ap
from autoprune import plots
from autoprune.cli import run
from autoprune.study import stored_trials

#: The default search scored on fewer images: what these tests check does not depend on the scores.
QUICK = "task: digits-cnn\nbudget: {flops: 0.5}\nevaluation: {calibration_batches: 2, val_samples: 200}\n"


def _quick_space(tmp_path) -> str:
    path = tmp_path / "quick.yaml"
    path.write_text(QUICK)
    return str(path)


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


def test_export_of_a_pareto_front_by_budget_writes_budgets_as_the_cli_does_and_its_figures(
        capsys, workdir, tmp_path, monkeypatch):
    result = ap.search(_quick_space(tmp_path), objective="pareto", strategy="random", n_trials=3, workdir=workdir,
                       show_progress=False)
    drawn = []  # every figure export draws, as it closes them
    monkeypatch.setattr(plots, "close", drawn.append)
    out_dir = tmp_path / "exported"
    code, out, err = _cli(capsys, "export", "--study", result.study_name, "--out", str(out_dir), "--budget",
                          "flops=0.6", "--finetune-epochs", "0", "--threads", "1", "--workdir", str(workdir))
    assert code == 0, err
    report = (out_dir / "report.md").read_text()
    chosen = ap.Plan.load(out_dir / "plan.json")
    assert f"Budget {ap.Budget.from_dict(chosen.budget)} (the best trial within export --budget flops=0.6);" in report
    assert "{'" not in report and "{'" not in out  # no Python dicts in what the user reads

    # The figures: PNG files beside the report, listed in report.md and report.json, logged with the export.
    figures = json.loads((out_dir / "report.json").read_text())["figures"]
    assert list(figures) == ["score_vs_macs.png", "plan_ratios.png"]
    for name, caption in figures.items():
        assert (out_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"![{caption}]({name})" in report
    macs, ratios = drawn
    trial = chosen.provenance["trial"]
    ax = macs.axes[0]
    marker = next(c for c in ax.collections if c.get_gid() == "chosen")
    stored = next(t for t in stored_trials(optuna.load_study(study_name=result.study_name,
                                                             storage=result.storage_url)) if t.number == trial)
    assert tuple(marker.get_offsets()[0]) == pytest.approx((stored.result.macs_ratio, stored.result.val_score))
    assert f"exported (trial {trial})" in [t.get_text() for t in ax.get_legend().get_texts()]
    assert len(ax.collections[0].get_offsets()) == result.n_finished  # every trial of the study
    assert 0.6 in [line.get_xdata()[0] for line in ax.get_lines()]  # the --budget it was picked within
    bars = ratios.axes[0].patches
    assert [b.get_height() for b in bars] == pytest.approx(list(chosen.ratios.values()))
    client, parents, _ = mlflow_runs(workdir, result.experiment)
    logged = {a.path for a in client.list_artifacts(parents[0].info.run_id, "export/1-exported")}
    assert {"export/1-exported/score_vs_macs.png", "export/1-exported/plan_ratios.png"} <= logged


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


def test_a_resumed_search_says_where_it_resumes_before_its_trials(capsys, workdir, tmp_path):
    args = ("search", "--space", _quick_space(tmp_path), "--study", "again", "--strategy", "random",
            "--workdir", str(workdir))
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
