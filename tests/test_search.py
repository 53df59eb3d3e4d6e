import json
import socket
import subprocess
import sys
import time
import urllib.request

import optuna
import pytest
from conftest import REPO, mlflow_runs, run_cli

import autoprune as ap
from autoprune.study import completed_trials

SPACE = str(REPO / "search_spaces" / "default.yaml")


def test_cli_search_tracks_every_trial_and_resumes_exactly(workdir):
    first = run_cli("search", "--trials", "8", "--workdir", str(workdir), cwd=REPO)
    assert first.returncode == 0, first.stderr
    assert "best plan of study" in first.stdout
    client, parents, children = mlflow_runs(workdir)
    assert len(parents) == 1 and len(children) == 8
    for run in children:
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert {"val_score", "macs", "macs_ratio", "params", "seconds"} <= set(run.data.metrics)
        assert run.data.metrics["macs_ratio"] <= 0.5
        assert any(k.startswith("ratio.") for k in run.data.params)
        with open(client.download_artifacts(run.info.run_id, "plan.json")) as f:
            plan = ap.Plan.from_json(f.read())
        assert plan.metrics["flops_ratio"] <= 0.5
    parent = client.get_run(parents[0].info.run_id)
    assert parent.info.status == "FINISHED"
    assert {"best_val_score", "uniform_val_score", "global_val_score"} <= set(parent.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert {"plots/score_vs_macs.png", "plots/best_plan_ratios.png", "plots/history.png"} <= artifacts

    second = run_cli("search", "--trials", "12", "--workdir", str(workdir), cwd=REPO)
    assert second.returncode == 0, second.stderr
    study = optuna.load_study(study_name="digits-cnn-optuna-tpe-flops0.5", storage=f"sqlite:///{workdir / 'optuna.db'}")
    complete = completed_trials(study)
    assert len(complete) == 12
    assert len({t.number for t in complete}) == 12
    _, parents, children = mlflow_runs(workdir)
    assert len(parents) == 1 and len([c for c in children if c.info.status == "FINISHED"]) == 12


def test_search_starts_from_baselines_and_never_does_worse(workdir):
    result = ap.search(SPACE, n_trials=6, workdir=workdir, show_progress=False, budget="flops=0.3")
    study = optuna.load_study(study_name=result.study_name, storage=result.storage_url)
    first_two = [t.user_attrs.get("baseline") for t in completed_trials(study)[:2]]
    assert first_two == ["uniform", "global"]
    assert result.best_result.val_score >= max(result.baselines.values())
    assert result.best_result.macs_ratio <= 0.3


def _plan_sequence(result):
    study = optuna.load_study(study_name=result.study_name, storage=result.storage_url)
    return [tuple(t.user_attrs["plan"]["channels"][g][1] for g in sorted(t.user_attrs["plan"]["channels"]))
            for t in completed_trials(study)]


def test_seed_reproduces_the_plan_sequence(workdir):
    runs = [ap.search(SPACE, n_trials=14, seed=seed, study=f"s{i}", workdir=workdir, show_progress=False)
            for i, seed in enumerate([3, 3, 4])]
    a, b, c = (_plan_sequence(r) for r in runs)
    assert a == b
    assert a[2:] != c[2:]  # the first two trials are the baselines


def test_resuming_with_another_space_is_refused(workdir):
    ap.search(SPACE, n_trials=2, study="fixed", workdir=workdir, show_progress=False)
    with pytest.raises(ap.StudyError, match="made for another search space"):
        ap.search(SPACE, n_trials=3, study="fixed", budget="flops=0.4", workdir=workdir, show_progress=False)


@pytest.mark.parametrize("sampler", ["gp", "cmaes", "qmc", "nsga2", "random"])
def test_every_sampler_runs_within_budget(workdir, sampler):
    result = ap.search(SPACE, sampler=sampler, n_trials=4, workdir=workdir, show_progress=False)
    assert result.n_finished == 4
    study = optuna.load_study(study_name=result.study_name, storage=result.storage_url)
    assert all(t.user_attrs["result"]["macs_ratio"] <= 0.5 for t in completed_trials(study))
    raw = [t.user_attrs.get("raw_ratios") for t in completed_trials(study)[2:]]
    assert all(r is not None for r in raw)  # raw and projected values are both recorded


@pytest.mark.parametrize("strategy, trials", [("uniform", 1), ("global", 1), ("random", 3)])
def test_baseline_strategies_are_tracked_the_same_way(workdir, strategy, trials):
    result = ap.search(SPACE, strategy=strategy, n_trials=3, workdir=workdir, show_progress=False)
    assert result.n_finished == trials
    _, parents, children = mlflow_runs(workdir)
    assert len(children) == trials and all("val_score" in c.data.metrics for c in children)
    assert result.best_plan.provenance["strategy"] in (strategy, "random")


def test_pareto_search_returns_a_front_and_export_picks_by_budget(workdir):
    result = ap.search(SPACE, objective="pareto", n_trials=12, workdir=workdir, show_progress=False)
    ratios = [res.macs_ratio for _, res in result.pareto]
    assert len(result.pareto) >= 2 and min(ratios) < 0.45
    report = ap.export_study(result.study_name, workdir / "exp", workdir=workdir, finetune_epochs=0,
                             budget="flops=0.45", show_progress=False)
    assert report.plan.metrics["flops_ratio"] <= 0.45


def test_cmaes_refuses_pareto(workdir):
    with pytest.raises(ap.ConfigError, match="optimizes one objective"):
        ap.search(SPACE, sampler="cmaes", objective="pareto", n_trials=2, workdir=workdir, show_progress=False)


def test_a_crashing_trial_ends_its_run_failed_and_the_search_goes_on(workdir):
    from crashing_task import reset

    reset(fail_on_calls={4})
    result = ap.search(ap.load_space(SPACE).with_overrides(task="crashing_task:make_task", name="crashing"),
                       n_trials=5, workdir=workdir, show_progress=False)
    assert result.n_finished == 5 and result.failed_trials == 1
    _, _, children = mlflow_runs(workdir, "crashing")
    statuses = sorted(c.info.status for c in children)
    assert statuses == ["FAILED"] + ["FINISHED"] * 5
    failed = next(c for c in children if c.info.status == "FAILED")
    assert "simulated" in failed.data.tags["autoprune.error"]


def test_two_workers_share_one_study_exactly(workdir):
    # Fine-tuning steps make each trial slow enough (~1 s) that the second process, which
    # needs a few seconds to start, gets its share.
    slow = ap.load_space(SPACE).with_overrides(**{"evaluation.finetune_steps": 40})
    result = ap.search(slow, n_trials=10, workers=2, workdir=workdir, show_progress=False)
    study = optuna.load_study(study_name=result.study_name, storage=result.storage_url)
    complete = completed_trials(study)
    assert len(complete) == 10
    workers = {t.user_attrs["worker"] for t in complete}
    assert len(workers) == 2  # both processes evaluated trials
    _, _, children = mlflow_runs(workdir)
    assert len([c for c in children if c.info.status == "FINISHED"]) == 10


def test_export_then_apply(workdir, tmp_path):
    result = ap.search(SPACE, n_trials=4, workdir=workdir, show_progress=False)
    out = tmp_path / "exported"
    done = run_cli("export", "--study", result.study_name, "--out", str(out), "--workdir", str(workdir),
                   "--finetune-epochs", "1")
    assert done.returncode == 0, done.stderr
    written = {p.name for p in out.iterdir()}
    assert {"plan.json", "model.pt", "model.pt2", "model.onnx", "report.json", "report.md"} <= written
    assert "model.onnx.data" not in written  # a small model's ONNX file is self-contained
    assert report_formats_match(out)
    report = json.loads((out / "report.json").read_text())
    assert report["pruned"]["macs_ratio"] <= 0.5 and report["uniform"]["macs_ratio"] <= 0.5
    assert 0.5 < report["pruned"]["score"] <= 1.0
    ort = report["latency"]["onnxruntime"]  # onnxruntime is in the dev extra
    assert ort["dense_ms"] > 0 and ort["pruned_ms"] > 0 and ort["speedup"] == pytest.approx(ort["dense_ms"] / ort["pruned_ms"])
    simd = report["latency"]["simd_channels"]
    channels = json.loads((out / "plan.json").read_text())["channels"]
    assert report["latency"]["unaligned_groups"] == sorted(n for n, (_, kept) in channels.items() if kept % simd)
    assert "ONNX Runtime" in (out / "report.md").read_text()
    applied = run_cli("apply", "--plan", str(out / "plan.json"), "--out", str(tmp_path / "p.pt"), "--workdir", str(workdir))
    assert applied.returncode == 0, applied.stderr
    task = ap.load_task("digits-cnn", workdir=workdir)
    model, plan = ap.load_pruned(tmp_path / "p.pt", task.model)
    macs, _ = ap.count_macs_params(model, task.example_input)
    assert macs <= 0.5 * ap.profile_model(task).macs
    again = run_cli("export", "--study", result.study_name, "--out", str(out), "--workdir", str(workdir))
    assert again.returncode == 2 and "already exists" in again.stderr


def test_export_choose_val_writes_the_model_that_scores_higher_on_validation(workdir, tmp_path):
    result = ap.search(SPACE, strategy="random", budget="flops=0.3", n_trials=3, workdir=workdir, show_progress=False)
    report = ap.export_study(result.study_name, tmp_path / "out", workdir=workdir, finetune_epochs=0.5,
                             choose="val", show_progress=False)
    data = report.data
    searched_val, uniform_val = data["pruned"]["val_score_finetuned"], data["uniform"]["val_score_finetuned"]
    assert data["choose"] == "val"
    assert data["exported"] == ("uniform" if uniform_val > searched_val else "searched")
    written = ap.Plan.load(tmp_path / "out" / "plan.json")
    expected = ap.uniform_plan(ap.profile_model(ap.load_task("digits-cnn", workdir=workdir)), ap.Budget(flops=0.3)) \
        if data["exported"] == "uniform" else result.best_plan
    assert written.channels == expected.channels
    assert written.metrics["val_score_finetuned"] == max(searched_val, uniform_val)
    assert "Exported: the" in (tmp_path / "out" / "report.md").read_text()


def report_formats_match(out) -> bool:
    formats = json.loads((out / "report.json").read_text())["formats"]
    return formats["torch_export"]["matches"] and formats["onnx"]["matches"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ui_serves_the_tracking_store_and_stops_cleanly(workdir):
    ap.search(SPACE, strategy="uniform", workdir=workdir, show_progress=False)
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "autoprune.cli", "ui", "--workdir", str(workdir), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, status = time.time() + 90, None
        while time.time() < deadline and status != 200:
            try:
                status = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2).status
            except OSError:
                time.sleep(1)
        assert status == 200
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=60)
    assert f"http://127.0.0.1:{port}" in out
    client, parents, _ = mlflow_runs(workdir)
    experiment = client.get_experiment(parents[0].info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # opens on its runs
    assert f"runs of digits-cnn: http://127.0.0.1:{port}/#/experiments/{experiment.experiment_id}/runs" in out
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)


def test_studies_lists_each_search_with_its_trials_and_best(workdir, capsys):
    from autoprune._catalog import list_studies
    from autoprune.cli import run

    assert run(["studies", "--workdir", str(workdir)]) == 2
    assert "No searches in" in capsys.readouterr().err
    first = ap.search(SPACE, n_trials=3, workdir=workdir, show_progress=False)
    ap.search(SPACE, strategy="uniform", workdir=workdir, show_progress=False)
    found = list_studies(first.storage_url)
    assert [s.name for s in found] == [first.study_name, "digits-cnn-uniform-flops0.5"]
    assert (found[0].task, found[0].strategy, found[0].budget, found[0].trials, found[0].planned) == (
        "digits-cnn", "optuna/tpe", {"flops": 0.5}, 3, 3)
    assert found[0].best_val_score == first.best_result.val_score and found[0].best_macs_ratio <= 0.5
    assert found[0].started <= found[0].last_finished
    assert run(["studies", "--workdir", str(workdir)]) == 0
    printed = capsys.readouterr().out
    assert "2 search(es)" in printed and "3/3" in printed
    # Captured output is 80 columns wide: each name stays whole on its own line, not folded in a cell.
    assert f"\n{first.study_name}\n" in printed and "\ndigits-cnn-uniform-flops0.5\n" in printed


def test_task_flag_searches_another_task_with_the_same_space(workdir, capsys):
    from autoprune.cli import run

    code = run(["search", "--task", "user_tasks:make_task", "--trials", "3", "--workdir", str(workdir)])
    assert code == 0, capsys.readouterr().err
    (study,) = optuna.get_all_study_summaries(f"sqlite:///{workdir / 'optuna.db'}")
    assert study.study_name.startswith("user_tasks") and "digits" not in study.study_name
    loaded = optuna.load_study(study_name=study.study_name, storage=f"sqlite:///{workdir / 'optuna.db'}")
    trials = completed_trials(loaded)
    assert len(trials) == 3 and {t.user_attrs["plan"]["task"] for t in trials} == {"tiny-user"}
    assert run(["search", "--task", "nosuch-task", "--workdir", str(workdir)]) == 2
    assert "nosuch-task" in capsys.readouterr().err
