"""What a latency-budget search tells its user (#16 item 5): the limit, the dense and chosen latency,
whether the budget was met, which trials were passed over, and a loud warning when none meets it.

The after-search timing of the best trials is replaced by a stand-in that returns chosen fractions
of the limit, so each story is told deterministically; everything else is real (the latency table,
the Optuna study, MLflow, the export).
"""

from __future__ import annotations

import json
import shutil

import optuna
import pytest
from conftest import REPO, mlflow_runs

import autoprune as ap
import autoprune._finish as finish_stage
from autoprune._latency_check import LatencyBudgetWarning, LatencyCheck
from autoprune.cli import run
from autoprune.study import read_record

SPACE_TEXT = (REPO / "search_spaces" / "default.yaml").read_text() + (
    "latency: {batch_size: 32, threads: 1, repeats: 3, device: cpu, tolerance: 0.05}\n")


@pytest.fixture(scope="module")
def home(tmp_path_factory, session_workdir, digits_task):
    """One workdir for the module: the latency table is timed once and cached for every search."""
    path = tmp_path_factory.mktemp("latency-budget")
    shutil.copytree(session_workdir / "checkpoints", path / "checkpoints")
    (path / "space.yaml").write_text(SPACE_TEXT)
    return path


def timed_as(monkeypatch, *fractions: float) -> None:
    """The best trials measure, in rank order, at these fractions of the 0.7-of-dense limit (the last repeats)."""
    calls = []

    def measure(models, dense, example_input, predictor):
        calls.append(1)
        return [fractions[min(len(calls), len(fractions)) - 1] * 0.7 * predictor.dense_ms]

    monkeypatch.setattr(finish_stage, "measure_relative", measure)


def search(home, capsys, study: str) -> str:
    code = run(["search", "--space", str(home / "space.yaml"), "--budget", "latency=0.7", "--trials", "4",
                "--study", study, "--workdir", str(home)])
    out, err = capsys.readouterr()
    assert code == 0, err
    return " ".join(out.split()), " ".join(err.split())  # rich wraps lines at the terminal's width


def check_of(home, study: str) -> LatencyCheck:
    loaded = optuna.load_study(study_name=study, storage=f"sqlite:///{home / 'optuna.db'}")
    return LatencyCheck.from_dict(read_record(loaded).latency_check)


def test_summary_states_limit_dense_chosen_latency_and_the_trial_passed_over(home, capsys, monkeypatch):
    timed_as(monkeypatch, 1.2, 0.9)
    out, err = search(home, capsys, "passed-over")
    check = check_of(home, "passed-over")
    over, chosen = check.measured
    assert check.chosen == chosen.number != over.number and over.val_score >= chosen.val_score
    assert check.limit_ms == pytest.approx(0.7 * check.dense_ms)
    assert (f"latency budget latency=0.7: limit {check.limit_ms:.3f} ms per batch = 0.700 of the dense model's "
            f"measured {check.dense_ms:.3f} ms (batch 32, 1 thread(s), cpu); timing tolerance 5.0%") in out
    assert (f"trial {over.number} ranks higher (val score {over.val_score:.4f}) but measured {over.measured_ms:.3f} ms "
            f"(predicted {over.predicted_ms:.3f} ms), 20.0% over the limit: passed over for trial {chosen.number}") in out
    assert (f"chosen plan, trial {chosen.number}: measured {chosen.measured_ms:.3f} ms = 0.630 of dense "
            f"(predicted {chosen.predicted_ms:.3f} ms): budget met (10.0% under the limit)") in out
    assert f"best plan of study passed-over (trial {chosen.number})" in out
    assert "warning" not in out.lower() and "MISSED" not in err
    client, parents, _ = mlflow_runs(home, "space")
    parent = next(p for p in parents if p.info.run_name == "passed-over")
    assert parent.data.metrics["latency_budget_met"] == 1.0
    assert parent.data.metrics["best_latency_ms_measured"] == pytest.approx(chosen.measured_ms)
    plotted = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert {"plots/score_vs_latency.png", "plots/score_vs_macs.png"} <= plotted  # #16 item 11


def test_a_miss_just_over_the_tolerance_is_loud_in_the_summary_and_the_export(home, capsys, monkeypatch, tmp_path):
    timed_as(monkeypatch, 1.053)  # 5.3% over a 5.0% tolerance: neither "5%" nor met
    out, err = search(home, capsys, "missed")
    check = check_of(home, "missed")
    assert check.chosen is None and not check.met and len(check.measured) == 4
    handed = check.best_by_score
    assert (f"warning: latency budget latency=0.7 MISSED: none of the 4 best trials measures within "
            f"{check.limit_ms:.3f} ms + 5.0% tolerance; the plan handed on, trial {handed.number}, measured "
            f"{handed.measured_ms:.3f} ms, 5.3% over the limit") in out
    assert (f"plan handed on (highest val score), trial {handed.number}: measured {handed.measured_ms:.3f} ms "
            "= 0.737 of dense") in out and "BUDGET MISSED (5.3% over the limit, tolerance 5.0%)" in out
    assert "warning: latency budget latency=0.7 MISSED" in err and "tolerance 5%" not in err

    with pytest.warns(LatencyBudgetWarning, match="MISSED: none of the 4 best trials"):
        report = ap.export_study("missed", tmp_path / "out", workdir=home, finetune_epochs=0, show_progress=False)
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert markdown.split("\n")[2].startswith("**WARNING: the search's latency budget latency=0.7 MISSED")
    assert "## Latency budget" in markdown and f"- search: plan handed on (highest val score), trial {handed.number}" in markdown
    lat = report.latency
    assert f"- this export: the exported model measured {lat.pruned_ms:.3f} ms against a limit of {lat.limit_ms:.3f} ms" in markdown
    assert lat.limit_ms == pytest.approx(0.7 * lat.dense_ms)
    data = json.loads((tmp_path / "out" / "report.json").read_text())
    assert data["latency_budget"]["met"] is False and data["latency_budget"]["limit_ms"] == check.limit_ms
    assert data["latency"]["budget_met"] == (lat.pruned_ms <= lat.limit_ms * 1.05)
