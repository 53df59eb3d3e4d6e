"""Multi-fidelity search: scores reported at fine-tuning rungs, Optuna's pruners stop trials early."""

from __future__ import annotations

import optuna
import pytest
import yaml
from conftest import REPO, mlflow_runs
from optuna.trial import TrialState

import autoprune as ap
from autoprune.evaluate import Fidelity
from autoprune.study import stored_trials

SPACE = REPO / "search_spaces" / "default.yaml"


def _fidelity_space(pruner: str = "successive_halving", rungs: list[int] | None = None) -> ap.SearchSpace:
    space = ap.load_space(SPACE)
    data = space.model_dump(mode="json")
    data["evaluation"]["fidelity"] = {"rungs": rungs or [0, 4, 12], "pruner": pruner, "reduction_factor": 2,
                                      "distill": True}
    return ap.SearchSpace.model_validate(data)


def test_the_evaluator_reports_each_rung_and_ends_with_the_last(digits_task, digits_profile):
    evaluator = ap.Evaluator(digits_task, profile=digits_profile, fidelity=Fidelity(rungs=(0, 3, 6), distill=False))
    plan = ap.uniform_plan(digits_profile, ap.Budget(flops=0.3))
    seen: list[tuple[int, float]] = []
    result = evaluator.evaluate(plan, on_step=lambda step, score: seen.append((step, score)))
    assert [step for step, _ in seen] == [0, 3, 6]
    assert result.val_score == seen[-1][1] and result.finetune_steps == 6
    # Without a callback only the last rung is scored, to the same value (deterministic).
    assert evaluator.evaluate(plan).val_score == result.val_score
    # Rung 0 is adaptive BN alone: the score of an evaluator without fine-tuning.
    assert seen[0][1] == ap.Evaluator(digits_task, profile=digits_profile).evaluate(plan).val_score


@pytest.mark.parametrize("strategy", ["optuna", "random"])
def test_successive_halving_stops_trials_and_they_are_recorded_as_pruned(workdir, strategy):
    result = ap.search(_fidelity_space(), strategy=strategy, n_trials=12, budget="flops=0.3", workdir=workdir,
                       show_progress=False)
    study = optuna.load_study(study_name=result.study_name, storage=result.storage_url)
    states = [t.state for t in study.get_trials(deepcopy=False)]
    stopped = stored_trials(study, states=(TrialState.PRUNED,))
    assert states.count(TrialState.COMPLETE) + states.count(TrialState.PRUNED) == 12  # stopped trials count
    assert stopped and result.stopped_trials == len(stopped) and result.n_finished == 12
    assert all(t.result.finetune_steps < 12 for t in stopped)
    assert all(t.result.finetune_steps == 12 for t in stored_trials(study))
    assert all(t.result.macs_ratio <= 0.3 for t in stopped + stored_trials(study))
    # The best plan is a complete trial, ranked by its last-rung score.
    assert result.best_result.finetune_steps == 12
    _, _, children = mlflow_runs(workdir)
    killed = [c for c in children if c.info.status == "KILLED"]
    assert len(killed) == len(stopped) and all(c.data.tags["autoprune.state"] == "stopped" for c in killed)
    client, _, _ = mlflow_runs(workdir)
    history = client.get_metric_history(children[0].info.run_id, "val_score_rung")
    assert [m.step for m in history][:1] == [0]


def test_no_pruner_runs_every_trial_to_the_last_rung(workdir):
    result = ap.search(_fidelity_space(pruner="none"), n_trials=5, workdir=workdir, show_progress=False)
    study = optuna.load_study(study_name=result.study_name, storage=result.storage_url)
    assert [t.state for t in study.get_trials(deepcopy=False)] == [TrialState.COMPLETE] * 5
    assert all(len(t.intermediate_values) == 3 for t in study.get_trials(deepcopy=False))


def test_a_multi_fidelity_search_resumes(workdir):
    space = _fidelity_space()
    ap.search(space, n_trials=4, study="mf", workdir=workdir, show_progress=False)
    resumed = ap.search(space, n_trials=9, study="mf", workdir=workdir, show_progress=False)
    assert resumed.n_finished == 9


@pytest.mark.parametrize("fidelity, words", [
    ({"rungs": [0, 100, 50]}, "strictly ascending"),
    ({"rungs": [-5, 10]}, "strictly ascending"),
    ({"rungs": [10], "pruner": "hyperband"}, "at least two rungs"),
    ({"pruner": "asha"}, "'asha' is not allowed"),
    ({"reduction_factor": 1}, "greater than or equal to 2"),
])
def test_bad_fidelity_settings_are_refused(tmp_path, fidelity, words):
    data = yaml.safe_load(SPACE.read_text())
    data["evaluation"]["fidelity"] = fidelity
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ap.ConfigError) as info:
        ap.load_space(path)
    assert words in str(info.value) and "evaluation.fidelity" in str(info.value)


def test_fidelity_and_finetune_steps_are_one_or_the_other(tmp_path):
    data = yaml.safe_load(SPACE.read_text())
    data["evaluation"].update(finetune_steps=10, fidelity={"rungs": [0, 10]})
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ap.ConfigError, match="finetune_steps and fidelity both fine-tune"):
        ap.load_space(path)
