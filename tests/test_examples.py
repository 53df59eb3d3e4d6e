"""The README's "Your own model and data" examples (examples/), run end to end as a user would."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import REPO

import autoprune as ap
from autoprune.cli import run

EXAMPLES = REPO / "examples"


@pytest.fixture
def examples_importable(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    monkeypatch.chdir(EXAMPLES)


def test_python_user_task_example_searches_exports_and_applies(tmp_path, examples_importable, capsys):
    from my_task import SmallCNN

    workdir = tmp_path / "home"
    # As the README runs it, from examples/: the working directory is importable.
    assert run(["search", "--task", "my_task:make_task", "--trials", "3", "--threads", "1",
                "--workdir", str(workdir)]) == 0, capsys.readouterr().err
    study = "my_task:make_task-optuna-tpe-flops0.5"  # named after the task as given
    out = tmp_path / "exported"
    assert run(["export", "--study", study, "--out", str(out), "--finetune-epochs", "0.2", "--threads", "1",
                "--workdir", str(workdir)]) == 0, capsys.readouterr().err
    pruned, plan = ap.load_pruned(out / "model.pt", SmallCNN())
    assert plan.provenance["task_spec"] == "my_task:make_task" and plan.metrics["flops_ratio"] <= 0.5
    dense_params = sum(p.numel() for p in SmallCNN().parameters())
    assert sum(p.numel() for p in pruned.parameters()) < dense_params
    with torch.no_grad():
        assert pruned(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    assert run(["apply", "--plan", str(out / "plan.json"), "--out", str(tmp_path / "applied.pt"),
                "--workdir", str(workdir)]) == 0, capsys.readouterr().err
    applied, _ = ap.load_pruned(tmp_path / "applied.pt", SmallCNN())
    assert [p.shape for p in applied.parameters()] == [p.shape for p in pruned.parameters()]


def test_task_object_is_searched_and_exported_with_the_same_object(tmp_path, examples_importable, capsys):
    import dataclasses

    from my_task import SmallCNN, make_task

    workdir = tmp_path / "home"
    task = make_task(workdir=workdir)
    result = ap.search("default", task=task, n_trials=3, threads=1, workdir=workdir, show_progress=False)
    assert result.study_name == "my-digits-optuna-tpe-flops0.5" and result.n_finished == 3
    assert result.best_plan.provenance["task_spec"] == {"in_memory": "my-digits"}

    # The command line cannot rebuild the object: it says how to export and apply instead.
    assert run(["export", "--study", result.study_name, "--out", str(tmp_path / "cli"), "--workdir", str(workdir)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "ap.Task object 'my-digits' built in Python" in err
    assert f"ap.export_study('{result.study_name}', out, task=task)" in err
    assert not (tmp_path / "cli").exists()

    report = ap.export_study(result.study_name, tmp_path / "exported", task=task, finetune_epochs=0.2,
                             workdir=workdir, show_progress=False)
    assert report.task == "my-digits" and report.searched.macs_ratio <= 0.5
    saved = json.loads((tmp_path / "exported" / "plan.json").read_text())
    assert saved["provenance"]["task_spec"] == {"in_memory": "my-digits"}
    assert run(["apply", "--plan", str(tmp_path / "exported" / "plan.json"), "--out", str(tmp_path / "a.pt"),
                "--workdir", str(workdir)]) == 2
    assert "ap.apply_plan(task.model, plan" in " ".join(capsys.readouterr().err.split())

    # Another task object whose model the plan does not fit is refused before any fine-tuning.
    other = dataclasses.replace(task, name="narrower", model=SmallCNN(width=8).eval())
    with pytest.raises(ap.PlanMismatchError, match="does not fit task 'narrower'"):
        ap.export_study(result.study_name, tmp_path / "wrong", task=other, finetune_epochs=0, workdir=workdir,
                        show_progress=False)
    # Worker processes load their task themselves: an object cannot reach them.
    with pytest.raises(ap.ConfigError, match=r"workers=2 .* 'my-digits' lives in this process only"):
        ap.search("default", task=task, workers=2, workdir=workdir, show_progress=False)


def test_readme_walk_through_matches_the_examples():
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("### Your own model and data"):readme.index("### Your own models")]
    declared = section.split("```yaml\n")[1].split("```")[0]
    assert declared in (EXAMPLES / "declared.yaml").read_text()  # the task: part, verbatim
    # The study names the tests find are the ones the README tells a reader to export.
    for study in ("declared-optuna-tpe-flops0.5", "my_task:make_task-optuna-tpe-flops0.5"):
        assert f"autoprune export --study {study} --out exported/" in section
    assert "ap.load_pruned(" in section and "ap.search(\"default\", task=task" in section
