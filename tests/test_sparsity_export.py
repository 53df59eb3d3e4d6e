"""Exporting a weight-sparsity search (#15 item 4): fine-tuning with the zeros held (one-shot,
iterative, polynomial), the compressed model file, the report, MLflow, and the CLI's apply."""

import json

import pytest
import torch
from conftest import REPO, mlflow_runs

import autoprune as ap
from autoprune.cli import run
from autoprune.sparsity import (
    SPARSE_FORMAT,
    load_sparse,
    measured_sparsity,
    payload_bytes,
    profile_weights,
    save_sparse,
    sparse_payload,
    sparsify_and_finetune,
)
from autoprune.sparsity._finetune import kept_at
from autoprune.train import FinetuneSchedule

SPACE = str(REPO / "search_spaces" / "digits-sparsity.yaml")


@pytest.fixture(scope="module")
def sparse_profile(digits_task):
    return profile_weights(digits_task)


def test_polynomial_schedule_is_parsed_and_rises_from_begin_to_the_plan_by_end():
    s = FinetuneSchedule.parse("polynomial:begin=0.2,end=0.5,power=3")
    assert (s.kind, s.begin, s.end, s.power) == ("polynomial", 0.2, 0.5, 3.0)
    assert str(FinetuneSchedule.parse(str(s))) == str(s)
    assert FinetuneSchedule.parse("polynomial") == FinetuneSchedule("polynomial", 1, 0.0, 0.75, 3.0)
    path = [s.sparsity_at(0.9, t, 100) for t in range(101)]
    assert path[0] == pytest.approx(0.2) and path[50] == pytest.approx(0.9) and path[-1] == pytest.approx(0.9)
    assert all(b >= a for a, b in zip(path, path[1:]))  # never less sparse than before
    assert path[10] - path[0] > path[50] - path[40]  # power 3: fast first, slow near the end
    assert s.sparsity_at(0.1, 0, 100) == pytest.approx(0.1)  # begin is capped at the layer's own sparsity
    for bad, words in [("polynomial:begin=1.0", "begin must be a sparsity in [0, 1)"),
                       ("polynomial:end=0", "end a fraction of the fine-tuning steps in (0, 1]"),
                       ("polynomial:power=x", "power='x' is not a number"),
                       ("polynomial:start=0.1", "'start=0.1' is not a setting of polynomial"),
                       ("gradual", "use oneshot, iterative:K with K >= 1, or (sparsity searches) polynomial")]:
        with pytest.raises(ap.ConfigError, match=words.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
            FinetuneSchedule.parse(bad)


@pytest.mark.parametrize("schedule", ["oneshot", "iterative:2", "polynomial:begin=0.0,end=0.5,power=3"])
def test_every_schedule_ends_exactly_at_the_plan_with_the_zeros_held(digits_task, sparse_profile, schedule):
    dense = {k: v.clone() for k, v in digits_task.model.state_dict().items()}
    plan = ap.uniform_plan(sparse_profile, ap.Budget(nonzeros=0.1))
    model = sparsify_and_finetune(digits_task, plan, sparse_profile, epochs=1, schedule=FinetuneSchedule.parse(schedule),
                                  show_progress=False)
    assert measured_sparsity(model, sparse_profile) == pytest.approx(dict(plan.ratios), abs=1e-12)
    assert all(torch.equal(v, dense[k]) for k, v in digits_task.model.state_dict().items())  # dense untouched
    score = ap.train.score_model(model, digits_task.val_loader)
    assert score > 0.7  # fine-tuned: uniform 90% on the dense weights alone scores about 0.47


def test_gradual_masks_only_grow_and_reach_the_plan(sparse_profile):
    plan = ap.uniform_plan(sparse_profile, ap.Budget(nonzeros=0.1))
    schedule = FinetuneSchedule.parse("polynomial:begin=0.0,end=0.6,power=3")
    counts = [kept_at(sparse_profile, plan, schedule, t, 50) for t in range(51)]
    assert counts[0] == {g.name: g.channels for g in sparse_profile.groups}
    assert counts[30] == counts[-1] == plan.kept
    for name in plan.kept:
        assert all(b[name] <= a[name] for a, b in zip(counts, counts[1:]))


def test_two_four_plans_refuse_gradual_schedules(digits_task):
    profile = profile_weights(digits_task, pattern="2:4")
    plan = ap.uniform_plan(profile, ap.Budget(nonzeros=0.6))
    with pytest.raises(ap.ConfigError, match="under the 2:4 pattern a layer is dense or 2:4"):
        sparsify_and_finetune(digits_task, plan, profile, epochs=1, schedule=FinetuneSchedule.parse("polynomial"))


def test_the_compressed_file_loads_back_bit_for_bit_and_is_a_fraction_of_the_dense_file(digits_task, sparse_profile,
                                                                                     tmp_path):
    plan = ap.uniform_plan(sparse_profile, ap.Budget(nonzeros=0.1))
    model = ap.apply_plan(digits_task.model, plan, calibration_batches=[next(iter(digits_task.train_loader))[0]])
    path = ap.save_pruned(model, plan, tmp_path / "model.pt")
    torch.save(digits_task.model.state_dict(), tmp_path / "dense.pt")
    assert path.stat().st_size <= 0.2 * (tmp_path / "dense.pt").stat().st_size  # 90% sparse: at most 20% the bytes
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == SPARSE_FORMAT and set(raw["sparse"]) == {f"{g.name}.weight" for g in sparse_profile.groups}
    assert payload_bytes(raw) == plan.metrics["size_bytes"]  # what the size budget counted, to the byte
    for loaded, _ in (ap.load_pruned(path, digits_task.model), load_sparse(path, digits_task.model)):
        for (key, a), b in zip(loaded.state_dict().items(), model.state_dict().values()):
            assert torch.equal(a, b), key
    broken = sparse_payload(model, plan, profile=sparse_profile)
    broken["sparse"]["fc1.weight"]["values"] = broken["sparse"]["fc1.weight"]["values"][:-1]
    torch.save(broken, tmp_path / "broken.pt")
    with pytest.raises(ap.CheckpointError, match="fc1.weight.*the file is corrupted"):
        ap.load_pruned(tmp_path / "broken.pt", digits_task.model)
    other = ap.uniform_plan(profile_weights(digits_task, pattern="2:4"), ap.Budget(nonzeros=0.6))
    with pytest.raises(ap.PlanError):
        save_sparse(model, other, tmp_path / "mismatch.pt", profile=sparse_profile)


def test_export_of_a_sparsity_search_writes_the_compressed_model_and_reports_bytes_sparsity_and_latency(
        workdir, capsys):
    result = ap.search(SPACE, n_trials=4, workdir=workdir, show_progress=False, threads=1)
    out = workdir / "exported"
    code = run(["export", "--study", result.study_name, "--out", str(out), "--finetune-epochs", "1", "--schedule",
                "polynomial:begin=0.0,end=0.5,power=3", "--workdir", str(workdir), "--threads", "1"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert {"plan.json", "model.pt", "report.json", "report.md", "sparsity_per_layer.png"} <= {p.name for p in out.iterdir()}
    assert "Sparsity per layer" in printed and "smaller, not faster" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["mode"] == "sparsity" and report["schedule"] == "polynomial:begin=0,end=0.5,power=3"
    assert report["round_trip_exact"] is True
    assert report["pruned"]["layer_sparsity"] == pytest.approx(report["pruned"]["planned_sparsity"], abs=1e-12)
    assert report["pruned"]["file_bytes"] == (out / "model.pt").stat().st_size
    assert report["size_ratio"] <= 0.2 and report["dense"]["file_bytes"] > 5 * report["pruned"]["file_bytes"]
    assert report["pruned"]["sparsity"] == pytest.approx(0.9, abs=1e-4)
    assert report["latency"]["cpu"]["dense_ms"] > 0 and report["latency"]["cpu"]["sparse_ms"] > 0
    assert "error" in report["latency"]["cuda_2_4"] or "sparse_ms" in report["latency"]["cuda_2_4"]
    plan = ap.Plan.load(out / "plan.json")
    model, loaded_plan = ap.load_pruned(out / "model.pt", ap.load_task("digits-cnn", workdir=workdir).model)
    assert loaded_plan.kept == plan.kept
    client, parents, _ = mlflow_runs(workdir, "digits-sparsity")
    parent = client.get_run(parents[0].info.run_id)
    assert {"export_size_ratio", "export_sparsity", "export_test_score_best"} <= set(parent.data.metrics)
    assert "export/1-exported" in {a.path for a in client.list_artifacts(parent.info.run_id, "export")}

    # apply writes the same compressed form; a channel study refuses a gradual schedule, naming the mode.
    code = run(["apply", "--plan", str(out / "plan.json"), "--out", str(workdir / "applied.pt"), "--workdir", str(workdir)])
    assert code == 0 and "sparsified digits-cnn (unstructured)" in capsys.readouterr().out
    assert torch.load(workdir / "applied.pt", weights_only=True)["format"] == SPARSE_FORMAT
    channels = ap.search("default", strategy="uniform", workdir=workdir, show_progress=False, threads=1)
    code = run(["export", "--study", channels.study_name, "--out", str(workdir / "x"), "--schedule", "polynomial",
                "--workdir", str(workdir)])
    assert code == 2 and "needs a sparsity search (mode: sparsity); this study prunes channels" in capsys.readouterr().err
