"""How a search and an export report their outcome (#16 item 14): one summary shape for every
strategy, val scores labelled as the search measured them, test differences with their
uncertainty, and every export of a study kept apart in MLflow."""

from __future__ import annotations

import io
import json

import pytest
import torch
from conftest import REPO, mlflow_runs
from rich.console import Console

import autoprune as ap
from autoprune._compare import paired_difference
from autoprune._summary import print_search_result
from autoprune.train import top1_accuracy

SPACE = str(REPO / "search_spaces" / "default.yaml")


def summary(result) -> str:
    out = io.StringIO()
    print_search_result(Console(file=out, width=250), result)
    return out.getvalue()


def test_an_rl_search_summary_compares_with_both_baselines(workdir, tmp_path):
    space = tmp_path / "rl.yaml"
    space.write_text("task: digits-cnn\nbudget: {flops: 0.5}\nevaluation: {calibration_batches: 4, val_samples: 500}\n"
                     "strategy: {name: rl, trials: 3, rl: {warmup_episodes: 2, gradient_steps_per_episode: 3, batch_size: 8,\n"
                     "  start_from_baselines: false}}\n")
    result = ap.search(space, workdir=workdir, show_progress=False)
    # The agent was told not to play the baseline plans: the study has no baseline trial, the search scores them.
    assert set(result.baselines) == {"uniform", "global"}
    text = summary(result)
    best = result.best_result
    assert (f"val score before fine-tuning (BatchNorm recalibrated only): best plan {best.val_score:.4f} "
            f"(dense {result.dense_score:.4f}, uniform baseline {result.baselines['uniform']:.4f}, "
            f"global baseline {result.baselines['global']:.4f} at the same budget)") in text
    assert f"best plan of study {result.study_name}" in " ".join(text.split())  # the title wraps to the table


def test_a_pareto_search_summary_is_its_front(workdir):
    result = ap.search(SPACE, objective="pareto", n_trials=8, workdir=workdir, show_progress=False)
    text = summary(result)
    assert f"Pareto front of study {result.study_name}: {len(result.pareto)} plans" in " ".join(text.split())
    rows = [line for line in text.splitlines() if line.startswith("│")]
    assert len(rows) == len(result.pareto) >= 2
    for (plan, res), row in zip(sorted(result.pareto, key=lambda p: p[1].macs_ratio), rows):
        cells = [c.strip() for c in row.strip("│").split("│")]
        assert cells[:4] == [str(plan.provenance["trial"]), f"{res.macs_ratio:.3f}", f"{res.params_ratio:.3f}",
                             f"{res.val_score:.4f}"]
    assert "uniform baseline" in text and "global baseline" in text
    assert "--budget flops=<MACs ratio>" in text and "best plan of study" not in " ".join(text.split())


def test_a_two_example_difference_is_within_noise_and_a_large_one_is_not():
    torch.manual_seed(0)
    targets = torch.randint(10, (360,))
    a = torch.randn(360, 10)
    a[torch.arange(360), targets] += 3.0
    b = a.clone()
    b[:2] = -a[:2]  # b gets two of a's right answers wrong
    small = paired_difference(a, b, targets, top1_accuracy)
    assert small.difference == pytest.approx(2 / 360, abs=1e-6) and small.low <= 0 < small.high
    assert small.verdict == "within noise" and "within noise" in small.describe()
    b[:60] = -a[:60]
    large = paired_difference(a, b, targets, top1_accuracy)
    assert large.verdict == "higher" and large.low > 0.1
    assert paired_difference(a, a.clone(), targets, top1_accuracy).describe().endswith(": no difference")
    assert paired_difference(b, a, targets, top1_accuracy).verdict == "lower"
    # any score function is resampled the same way (the fast path for accuracy changes nothing)
    general = paired_difference(a, b, targets, lambda x, y: float((x.argmax(1) == y).float().mean()), resamples=200)
    fast = paired_difference(a, b, targets, top1_accuracy, resamples=200)
    assert (general.low, general.high) == pytest.approx((fast.low, fast.high))


def test_export_report_gives_intervals_and_each_export_keeps_its_own_mlflow_folder(workdir, tmp_path):
    result = ap.search(SPACE, strategy="random", n_trials=3, workdir=workdir, show_progress=False)
    reports = [ap.export_study(result.study_name, tmp_path / name, workdir=workdir, finetune_epochs=0,
                               show_progress=False) for name in ("first", "second")]
    markdown = (tmp_path / "first" / "report.md").read_text()
    data = json.loads((tmp_path / "first" / "report.json").read_text())
    diff = data["differences"]["test_searched_minus_uniform"]
    assert diff["low"] <= diff["difference"] <= diff["high"] and diff["examples"] > 100
    assert diff["difference"] == pytest.approx(data["pruned"]["score"] - data["uniform"]["score"])
    assert diff["verdict"] == ("no difference" if diff["low"] == diff["high"] == 0 else "higher" if diff["low"] > 0
                               else "lower" if diff["high"] < 0 else "within noise")
    assert f"- Searched minus uniform on the test split: {reports[0].differences['test_searched_minus_uniform'].describe()}." \
        in markdown
    assert "Searched minus dense on the test split: " in markdown and "paired bootstrap" in markdown
    assert "better than the uniform baseline" not in markdown
    assert f"The search scored trial {data['trial']} {data['pruned']['val_score_before_finetune']:.4f} on the " \
           "validation split before fine-tuning" in markdown
    assert "val score, fine-tuned |" in markdown

    client, parents, _ = mlflow_runs(workdir)
    run_id = parents[0].info.run_id
    folders = sorted(a.path for a in client.list_artifacts(run_id, "export") if a.is_dir)
    assert folders == ["export/1-first", "export/2-second"]
    for folder in folders:
        assert f"{folder}/report.md" in {a.path for a in client.list_artifacts(run_id, folder)}
    assert [r.mlflow_location for r in reports] == [f"MLflow run {run_id}, artifacts {f}/" for f in folders]
    history = client.get_metric_history(run_id, "export_test_score_best")
    assert sorted(m.step for m in history) == [1, 2]
