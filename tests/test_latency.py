import json

import numpy as np
import pytest
import torch
from conftest import REPO, mlflow_runs

import autoprune as ap
from autoprune._onnx import measure_onnx_many
from autoprune.budget import reachable_range
from autoprune.export import write_deployables, write_onnx
from autoprune.latency import (
    LatencySettings,
    build_predictor,
    measure_latency,
    simd_round_to,
    with_check,
)
from autoprune.task import dense_model

SPACE = str(REPO / "search_spaces" / "default.yaml")


@pytest.fixture(scope="module")
def resnet():
    model, x = dense_model("fashionmnist-resnet20", pretrained=False)
    return model, x, ap.profile_model(model, x)


def test_measurement_reports_median_and_spread(resnet):
    model, x, _ = resnet
    m = measure_latency(model, x, LatencySettings(batch_size=2, threads=1, repeats=7, warmup=1))
    assert m.p10_ms <= m.median_ms <= m.p90_ms and m.median_ms > 0
    assert (m.batch_size, m.threads, m.repeats) == (2, 1, 7)
    assert m.to_dict()["spread_ms"] == pytest.approx(m.p90_ms - m.p10_ms)


def test_predictor_is_cached_and_its_error_is_measured(resnet, tmp_path):
    model, x, prof = resnet
    settings = LatencySettings(batch_size=1, threads=1, repeats=10)
    plans = [ap.uniform_plan(prof, ap.Budget(flops=f)).kept for f in (0.7, 0.4)]
    first = build_predictor(model, x, prof, settings, cache_dir=tmp_path, check_plans=plans)
    assert first.check is not None and len(first.check.measured_ms) == 2
    assert np.isfinite(first.check.median_abs_error)
    assert first.predict({}) == pytest.approx(first.scale * first._raw(np.array(first.dense_channels, float)) + first.offset)
    # fewer channels are never predicted slower
    assert first.predict(plans[1]) <= first.predict(plans[0]) <= first.predict({})
    cached = build_predictor(model, x, prof, settings, cache_dir=tmp_path)
    assert cached.tables.keys() == first.tables.keys() and cached.scale == first.scale
    assert list(tmp_path.glob("latency-*.json"))
    checked = with_check(cached, model, x, plans[:1])
    assert len(checked.check.predicted_ms) == 1


def test_predictor_times_simd_aligned_channel_counts_too(tmp_path):
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 64, 3), torch.nn.Conv2d(64, 48, 3), torch.nn.Conv2d(48, 8, 3)).eval()
    x = torch.randn(1, 1, 12, 12)
    prof = ap.profile_model(model, x)
    settings = LatencySettings(batch_size=1, threads=1, repeats=5)
    predictor = build_predictor(model, x, prof, settings, cache_dir=tmp_path, block=16)
    assert predictor.block == 16
    grids = {layer.out_dense: set(layer.out_grid) for layer in predictor.layers if layer.out_group >= 0}
    # fractions of the dense count (an eighth of 48 is 6) and the multiples of 16 just above them
    assert grids[48] == {6, 12, 16, 24, 32, 36, 48} and grids[64] == {8, 16, 32, 48, 64}
    aligned = {prof.groups[0].name: 32, prof.groups[1].name: 16}
    again = build_predictor(model, x, prof, settings, cache_dir=tmp_path, block=16)
    assert again.to_dict() == predictor.to_dict()  # read back from the cache, block included
    assert again.predict(aligned) == predictor.predict(aligned)
    plain = build_predictor(model, x, prof, settings, cache_dir=tmp_path, block=1)
    assert {layer.out_dense: set(layer.out_grid) for layer in plain.layers if layer.out_group >= 0}[48] == {6, 12, 24, 36, 48}


def test_latency_budget_needs_a_predictor(resnet):
    _, _, prof = resnet
    with pytest.raises(ap.BudgetError, match="needs a latency predictor"):
        ap.uniform_plan(prof, ap.Budget(latency_ms=1.0))
    with pytest.raises(ap.BudgetError, match="fraction in \\(0, 1\\)"):
        ap.Budget(latency=1.5)
    assert ap.Budget.parse("latency_ms=2.5") == ap.Budget(latency_ms=2.5)


def test_projection_meets_a_predicted_latency_budget(resnet):
    model, x, prof = resnet
    predictor = build_predictor(model, x, prof, LatencySettings(repeats=5))
    # Relative to what the predictor can reach: on a busy machine its fit (and so its floor) moves.
    lowest, _ = reachable_range(prof, "latency", latency=predictor)
    limit = max(0.6, lowest + 0.1) * predictor.predict({})
    rng = np.random.default_rng(0)
    for _ in range(5):
        plan = ap.project(prof, {g.name: float(rng.uniform(0, 0.8)) for g in prof.groups},
                          ap.Budget(latency_ms=limit), latency=predictor)
        assert plan.metrics["latency_ms"] <= limit
        assert plan.metrics["latency_ms"] >= 0.9 * limit


def test_latency_budgeted_search_measures_its_best_within_budget(workdir):
    space = ap.load_space(SPACE).with_overrides(
        latency={"batch_size": 32, "threads": 1, "repeats": 15, "device": "cpu", "tolerance": 0.15})
    result = ap.search(space, budget="latency=0.7", n_trials=8, workdir=workdir, show_progress=False)
    best_trial = result.best_plan.provenance["trial"]
    measured = result.measured_latency_ms[best_trial]
    study_settings = json.loads(json.dumps(result.settings))
    assert study_settings["space"]["budget"] == {"latency": 0.7}
    predictor_dense = [p for p in (workdir / "latency").glob("latency-*.json")]
    dense_ms = json.loads(predictor_dense[0].read_text())["dense_ms"]
    assert measured <= 0.7 * dense_ms * 1.15
    _, _, children = mlflow_runs(workdir)
    assert all("latency_ms" in c.data.metrics for c in children)
    report = ap.export_study(result.study_name, workdir / "exported", workdir=workdir, finetune_epochs=0,
                             show_progress=False)
    assert report.trial == best_trial and report.data["latency"]["speedup"] > 0


def test_exported_formats_match_pytorch(resnet, tmp_path):
    model, x, prof = resnet
    pruned = ap.apply_plan(model, ap.uniform_plan(prof, ap.Budget(flops=0.5)), example_input=x)
    formats = write_deployables(pruned, x, tmp_path)
    assert formats["torch_export"]["matches"], formats
    assert formats["onnx"]["matches"], formats
    program = torch.export.load(tmp_path / "model.pt2").module()
    batch = torch.randn(3, *x.shape[1:])
    torch.testing.assert_close(program(batch), pruned(batch), atol=1e-4, rtol=1e-4)


def test_onnx_runtime_models_are_timed_round_robin(resnet, tmp_path):
    model, x, prof = resnet
    pruned = ap.apply_plan(model, ap.uniform_plan(prof, ap.Budget(flops=0.5), round_to=simd_round_to()), example_input=x)
    for name, m in (("dense", model), ("pruned", pruned)):
        write_onnx(m, torch.randn(2, *x.shape[1:]), tmp_path / f"{name}.onnx")
    settings = LatencySettings(batch_size=4, threads=1, repeats=6, warmup=1)
    measured = measure_onnx_many([tmp_path / "dense.onnx", tmp_path / "pruned.onnx"], x, settings, rounds=3)
    assert [m.repeats for m in measured] == [6, 6]
    assert all(0 < m.p10_ms <= m.median_ms <= m.p90_ms for m in measured)


def test_simd_round_to_matches_this_cpu():
    flags = next((line.split(":", 1)[1].split() for line in open("/proc/cpuinfo") if line.startswith("flags")), [])
    expected = 16 if "avx512f" in flags else 8 if ("avx2" in flags or "avx" in flags) else 4
    assert simd_round_to("cpu") == expected
    assert simd_round_to("cuda") == 8
