"""Weight sparsity (mode: sparsity, #15): the profile, budgets and projection, masked evaluation,
the search with every strategy, and MLflow's record of it."""

import json

import numpy as np
import optuna
import pytest
import torch
from conftest import REPO, mlflow_runs

import autoprune as ap
from autoprune.evaluate import Fidelity
from autoprune.space import _validate
from autoprune.sparsity import (
    WeightMasker,
    compress_state,
    global_magnitude_plan,
    lamp_plan,
    lamp_scores,
    measured_sparsity,
    payload_bytes,
    profile_weights,
    weight_scores,
)
from autoprune.study import completed_trials

SPACE = str(REPO / "search_spaces" / "digits-sparsity.yaml")
# Searches here run one torch thread: digits candidates are too small to share between two.


@pytest.fixture(scope="module")
def sparse_profile(digits_task):
    return profile_weights(digits_task)


@pytest.fixture(scope="module")
def sparse_evaluator(digits_task, sparse_profile):
    return ap.Evaluator(digits_task, profile=sparse_profile)


def _random_raw(profile, rng, high=0.99):
    return {g.name: float(rng.uniform(0.0, high)) for g in profile.groups}


def test_profile_has_one_dimension_per_weight_tensor_with_exact_linear_costs(digits_task, sparse_profile,
                                                                          sparse_evaluator):
    model = digits_task.model
    layers = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert sparse_profile.names == layers  # the classifier included
    assert [g.channels for g in sparse_profile.groups] == [dict(model.named_modules())[n].weight.numel() for n in layers]
    assert all(g.kind == "weights" and g.unit == 1 for g in sparse_profile.groups)
    dense_macs, dense_params = ap.count_macs_params(model, digits_task.example_input)
    assert sparse_profile.macs == dense_macs and sparse_profile.params == dense_params
    assert sparse_profile.dense_bytes == sum(t.numel() * t.element_size() for t in model.state_dict().values())
    rng = np.random.default_rng(0)
    for _ in range(3):
        plan = ap.project(sparse_profile, _random_raw(sparse_profile, rng), ap.Budget(nonzeros=0.3))
        masked = sparse_evaluator.build(plan)
        nonzero = sum(int((dict(masked.named_modules())[n].weight != 0).sum()) for n in layers)
        assert nonzero == plan.metrics["nonzeros"]  # exactly the plan's counts are nonzero
        nonzero_params = sum(int((p != 0).sum()) for p in masked.parameters())
        assert nonzero_params == pytest.approx(plan.metrics["params"], abs=2)  # trained biases are nonzero
        sparse_keys = {f"{n}.weight" for n in layers}
        # The size model is the compressed file's tensor bytes, to the byte.
        assert plan.metrics["size_bytes"] == payload_bytes(compress_state(masked.state_dict(), sparse_keys))
        assert masked.conv2.weight.shape == model.conv2.weight.shape  # masked, not cut


@pytest.mark.parametrize("budget", ["nonzeros=0.5", "nonzeros=0.1", "nonzeros=0.05", "nonzeros=20000", "size=0.2",
                                    "size=0.12", "size=100000"])
def test_every_plan_meets_the_budget_within_half_a_percent(sparse_profile, sparse_evaluator, budget):
    b = ap.Budget.parse(budget)
    limit = b.limit(sparse_profile)
    value = "nonzeros" if b.metric == "nonzeros" else "size_bytes"
    rng = np.random.default_rng(1)
    plans = [ap.project(sparse_profile, _random_raw(sparse_profile, rng), b) for _ in range(10)]
    plans += [ap.uniform_plan(sparse_profile, b), global_magnitude_plan(sparse_profile, b, sparse_evaluator.scores),
              lamp_plan(sparse_profile, b, sparse_evaluator.scores)]
    for plan in plans:
        assert plan.mode == "sparsity"
        assert limit * 0.995 <= plan.metrics[value] <= limit, (plan.provenance, plan.metrics[value], limit)


def test_projection_scales_every_tensors_density_by_one_factor(sparse_profile):
    # Raw ratios 0.5 and 0.8 are densities 0.5 and 0.2; at 10% of the weights both shrink by one
    # factor (2.5 : 1 kept) instead of one shift in ratio, which would pin the second at 0.99.
    raw = {g.name: (0.5 if i % 2 else 0.8) for i, g in enumerate(sparse_profile.groups)}
    plan = ap.project(sparse_profile, raw, ap.Budget(nonzeros=0.1))
    density = {n: 1 - plan.ratios[n] for n in raw}
    sparse, dense = [density[n] for n in raw if raw[n] == 0.8], [density[n] for n in raw if raw[n] == 0.5]
    assert max(density.values()) < 0.5 and min(density.values()) > 0.011  # none at a bound
    assert min(dense) / max(sparse) == pytest.approx(2.5, rel=0.02)
    assert max(dense) / min(sparse) == pytest.approx(2.5, rel=0.02)


def test_uniform_global_and_lamp_allocate_differently(sparse_profile, sparse_evaluator):
    b = ap.Budget(nonzeros=0.1)
    uniform = ap.uniform_plan(sparse_profile, b)
    ratios = list(uniform.ratios.values())
    assert max(ratios) - min(ratios) < 0.01  # one ratio everywhere (up to one weight of rounding)
    glob = global_magnitude_plan(sparse_profile, b, sparse_evaluator.scores)
    lamp = lamp_plan(sparse_profile, b, sparse_evaluator.scores)
    assert glob.kept != lamp.kept != uniform.kept
    # Both rankings keep the small first convolution denser than the large middle layers.
    for plan in (glob, lamp):
        assert plan.ratios["conv1"] < plan.ratios["conv3"]
    # On the dense model's own weights, a ranked allocation beats uniform at 90% before fine-tuning.
    assert sparse_evaluator.evaluate(glob).val_score > sparse_evaluator.evaluate(uniform).val_score + 0.1


def test_lamp_scores_are_normalized_within_each_layer():
    scores = {"a": np.array([3.0, 1.0, 2.0, 0.0]), "b": np.array([100.0, 50.0])}
    lamp = lamp_scores(scores)
    assert lamp["a"].max() == 1.0 and lamp["b"].max() == 1.0  # every layer keeps its largest weight
    assert list(np.argsort(lamp["a"])) == list(np.argsort(scores["a"]))  # order within a layer is kept
    assert lamp["a"][2] == pytest.approx(4 / (4 + 9))  # w^2 / sum of the squares at or above it
    assert lamp["b"][1] == pytest.approx(2500 / 12500)


def test_the_2_4_pattern_keeps_two_of_every_four_along_the_input_dimension(digits_task):
    profile = profile_weights(digits_task, pattern="2:4")
    assert "conv1" not in profile.names  # rows of 9 weights cannot hold 2:4
    assert dict(profile.left_whole)["conv1"].endswith("not a multiple of 4, so 2:4 cannot apply")
    plan = ap.uniform_plan(profile, ap.Budget(nonzeros=0.6))
    assert plan.pattern == "2:4" and ap.Plan.from_json(plan.to_json()) == plan
    assert all(kept in (dense, dense // 2) for dense, kept in plan.channels.values())
    assert plan.metrics["nonzeros"] <= 0.6 * profile.nonzeros
    evaluator = ap.Evaluator(digits_task, profile=profile)
    model = evaluator.build(plan)
    for name, (dense, kept) in plan.channels.items():
        w = dict(model.named_modules())[name].weight.detach()
        rows = (w.reshape(w.shape[0], -1) != 0).reshape(w.shape[0], -1, 4).sum(-1)
        assert (rows == (2 if kept < dense else 4)).all(), name
    with pytest.raises(ap.PlanError, match="under the 2:4 pattern a layer keeps all of them or half"):
        WeightMasker(digits_task.model, profile=profile, scores=evaluator.scores).masks({"fc1": 100})


def test_masked_candidates_keep_shapes_and_hold_their_zeros_through_finetuning(digits_task, sparse_profile):
    dense_state = {k: v.clone() for k, v in digits_task.model.state_dict().items()}
    evaluator = ap.Evaluator(digits_task, profile=sparse_profile, fidelity=Fidelity(rungs=(0, 20)))
    plan = ap.uniform_plan(sparse_profile, ap.Budget(nonzeros=0.2))
    seen = []
    result = evaluator.evaluate(plan, on_step=lambda step, score: seen.append(step))
    assert seen == [0, 20] and result.finetune_steps == 20 and result.nonzeros == plan.metrics["nonzeros"]
    model = evaluator.build(plan)  # fine-tuned 20 SGD steps with momentum and weight decay
    sparsity = measured_sparsity(model, sparse_profile)
    for name, ratio in plan.ratios.items():
        assert sparsity[name] == pytest.approx(ratio, abs=1e-12), name
    assert all(torch.equal(v, dense_state[k]) for k, v in digits_task.model.state_dict().items())  # untouched


@pytest.mark.parametrize("criterion", ["taylor", "random"])
def test_named_criteria_rank_single_weights(digits_task, sparse_profile, criterion):
    batches = [next(iter(digits_task.train_loader))]
    scores = weight_scores(digits_task.model, sparse_profile, criterion, batches=batches)
    magnitude = weight_scores(digits_task.model, sparse_profile, "l1")
    assert {k: v.shape for k, v in scores.items()} == {k: v.shape for k, v in magnitude.items()}
    assert not np.array_equal(scores["conv2"], magnitude["conv2"])
    evaluator = ap.Evaluator(digits_task, profile=sparse_profile, importance=criterion)
    assert 0.0 <= evaluator.evaluate(ap.uniform_plan(sparse_profile, ap.Budget(nonzeros=0.5))).val_score <= 1.0


def test_apply_plan_masks_a_copy_and_plans_are_refused_across_modes(digits_task, digits_profile, sparse_profile,
                                                                   digits_evaluator, sparse_evaluator):
    plan = ap.uniform_plan(sparse_profile, ap.Budget(nonzeros=0.25))
    calibration = [x for x, _ in list(digits_task.train_loader)[:2]]
    model = ap.apply_plan(digits_task.model, ap.Plan.from_json(plan.to_json()), calibration_batches=calibration)
    assert measured_sparsity(model, sparse_profile) == pytest.approx(dict(plan.ratios), abs=1e-12)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in digits_task.model.parameters())
    with pytest.raises(ap.ConfigError, match="a sparsity plan but this evaluator scores mode: channels"):
        digits_evaluator.evaluate(plan)
    with pytest.raises(ap.ConfigError, match="a channels plan but this evaluator scores mode: sparsity"):
        sparse_evaluator.evaluate(ap.uniform_plan(digits_profile, ap.Budget(flops=0.5)))
    with pytest.raises(ap.BudgetError, match=r"flops=0.5 is not allowed in mode: sparsity .*allowed: nonzeros=, size="):
        ap.uniform_plan(sparse_profile, ap.Budget(flops=0.5))
    with pytest.raises(ap.BudgetError, match=r"size=0.2 is not allowed in mode: channels .*allowed: flops=, params="):
        ap.uniform_plan(digits_profile, ap.Budget(size=0.2))


def test_plan_files_of_both_schemas_load(digits_profile, sparse_profile):
    channel_plan = ap.uniform_plan(digits_profile, ap.Budget(flops=0.5))
    data = json.loads(channel_plan.to_json())
    assert data["schema"] == "autoprune.plan/1" and "mode" not in data  # channel plans are written as before
    assert ap.Plan.from_dict(data).mode == "channels"
    sparse = json.loads(ap.uniform_plan(sparse_profile, ap.Budget(nonzeros=0.5)).to_json())
    assert sparse["schema"] == "autoprune.plan/2" and sparse["mode"] == "sparsity" and "counts" in sparse
    assert sparse["pattern"] == "unstructured" and sparse["metrics"]["nonzeros_ratio"] <= 0.5
    with pytest.raises(ap.PlanError, match="unknown keys 'channels'"):
        ap.Plan.from_dict({**sparse, "channels": sparse["counts"]})
    with pytest.raises(ap.PlanError, match="missing required keys: mode"):
        ap.Plan.from_dict({k: v for k, v in sparse.items() if k != "mode"})
    with pytest.raises(ap.PlanError, match="key 'pattern': must be one of unstructured, 2:4"):
        ap.Plan.from_dict({**sparse, "pattern": "1:2"})


@pytest.mark.parametrize("space, key, words", [
    ({"mode": "sparsity", "budget": {"flops": 0.5}}, "budget", "flops=0.5 is not allowed in mode: sparsity"),
    ({"mode": "sparsity", "budget": {"params": 0.5}}, "budget", "allowed: nonzeros=, size="),
    ({"budget": {"nonzeros": 0.1}}, "budget", "nonzeros=0.1 is not allowed in mode: channels"),
    ({"budget": {"size": 0.2}}, "budget", "allowed: flops=, params=, latency_ms=, latency="),
    ({"pattern": "2:4"}, "pattern", "pattern '2:4' places the zeros of weight sparsity and needs mode: sparsity"),
    ({"strategy": {"name": "lamp"}}, "strategy", "strategy 'lamp' ranks single weights"),
    ({"mode": "sparsity", "budget": {"nonzeros": 0.1}, "strategy": {"objective": "pareto"}}, "strategy",
     "objective 'pareto' trades the val score against MACs"),
    ({"mode": "sparsity", "budget": {"nonzeros": 0.1}, "groups": {"round_to": 8}}, "groups",
     "round_to=8 rounds channel counts; in mode: sparsity"),
    ({"mode": "sparsity", "pattern": "2:4", "budget": {"nonzeros": 0.6}, "groups": {"ratio": [0.6, 0.9]}}, "groups",
     "must include 0.5"),
    ({"mode": "sparsity", "budget": {"nonzeros": 0.1}, "evaluation": {"importance": "bn_scale"}}, "evaluation",
     "importance 'bn_scale' ranks channels"),
    ({"mode": "sparsity", "budget": {"nonzeros": 0.1}, "latency": {}}, "latency", "remove it"),
    ({"mode": "weights"}, "mode", "value 'weights' is not allowed"),
])
def test_spaces_that_mix_the_modes_are_refused_naming_key_and_mode(space, key, words):
    with pytest.raises(ap.ConfigError) as caught:
        _validate(space, source="space")
    assert f"key '{key}'" in str(caught.value) and words in str(caught.value)


def test_a_space_file_reads_pattern_2_4_unquoted_and_defaults_the_ratio_range(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("task: digits-cnn\nmode: sparsity\npattern: 2:4\nbudget: {nonzeros: 0.6}\n")
    space = ap.load_space(path)
    assert space.pattern == "2:4"  # YAML 1.1 would read 2:4 as the base-60 integer 124
    assert space.groups.ratio_range(space.mode) == (0.0, 0.99)
    assert ap.load_space("default").groups.ratio_range("channels") == (0.0, 0.8)


def test_profile_of_a_sparsity_space_lists_its_weight_tensors(capsys, tmp_path):
    from autoprune.cli import run

    path = tmp_path / "s.yaml"
    path.write_text("task: digits-cnn\nmode: sparsity\npattern: 2:4\nbudget: {nonzeros: 0.6}\n")
    assert run(["profile", "--space", str(path), "--json", "--workdir", str(tmp_path / "home")]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["mode"] == "sparsity" and data["pattern"] == "2:4"
    assert [g["name"] for g in data["groups"]] == ["conv2", "conv3", "fc1", "fc"]
    assert [g["kind"] for g in data["groups"]] == ["weights"] * 4 and data["left_whole"][0]["group"] == "conv1"


def test_a_sparsity_search_runs_every_baseline_and_tpe_and_tracks_sparsity_per_layer(workdir, capsys):
    result = ap.search(SPACE, n_trials=6, workdir=workdir, show_progress=False, threads=1)
    # The README tells a reader to export this study by this name.
    assert result.study_name == "digits-sparsity-optuna-tpe-nonzeros0.1"
    assert f"autoprune export --study {result.study_name} --out sparse/" in (REPO / "README.md").read_text()
    study = optuna.load_study(study_name=result.study_name, storage=result.storage_url)
    trials = completed_trials(study)
    assert [t.user_attrs.get("baseline") for t in trials[:3]] == ["uniform", "global", "lamp"]
    limit = 0.1 * profile_weights(ap.load_task("digits-cnn", workdir=workdir)).nonzeros
    for t in trials:
        assert 0.995 * limit <= t.user_attrs["result"]["nonzeros"] <= limit
        assert t.user_attrs["plan"]["mode"] == "sparsity"
    assert result.best_result.val_score >= max(result.baselines.values())
    assert set(result.baselines) == {"uniform", "global", "lamp"}
    client, parents, children = mlflow_runs(workdir, "digits-sparsity")
    assert len(children) == 6
    for run in children:
        layer_metrics = {k for k in run.data.metrics if k.startswith("sparsity.")}
        assert layer_metrics == {f"sparsity.{n}" for n in ("conv1", "conv2", "conv3", "fc1", "fc")}
        assert {"nonzeros", "nonzeros_ratio", "size_bytes", "size_ratio"} <= set(run.data.metrics)
        with open(client.download_artifacts(run.info.run_id, "plan.json")) as f:
            plan = ap.Plan.from_json(f.read())
        assert plan.mode == "sparsity"
        assert run.data.metrics["sparsity.conv2"] == pytest.approx(plan.ratios["conv2"])
    parent = client.get_run(parents[0].info.run_id)
    assert parent.data.params["mode"] == "sparsity"
    assert {"uniform_val_score", "global_val_score", "lamp_val_score"} <= set(parent.data.metrics)
    # `autoprune studies` gives a sparsity search's best by the nonzeros its budget counts, not MACs.
    from autoprune._catalog import list_studies

    (summary,) = list_studies(result.storage_url)
    assert summary.mode == "sparsity"
    assert summary.best_nonzeros_ratio == pytest.approx(result.best_result.nonzeros_ratio) and summary.best_nonzeros_ratio <= 0.1
    from autoprune.cli import run as cli

    assert cli(["studies", "--workdir", str(workdir)]) == 0
    printed = capsys.readouterr().out
    assert f"at nonzeros {summary.best_nonzeros_ratio:.3f}" in printed and "at MACs" not in printed


def test_the_rl_environment_steps_through_weight_tensors_under_a_sparsity_budget(session_workdir, digits_task):
    import gymnasium

    env = gymnasium.make("autoprune/Pruning-v0", task="digits-cnn", budget={"nonzeros": 0.1}, workdir=session_workdir)
    assert env.unwrapped.stepped_names == ["conv1", "conv2", "conv3", "fc1", "fc"]
    limit = 0.1 * profile_weights(digits_task).nonzeros
    rng = np.random.default_rng(0)
    for _ in range(3):  # whatever the actions, AMC's clipping and the projection meet the budget
        env.reset(seed=0)
        done = False
        while not done:
            _, reward, done, _, info = env.step(rng.uniform(-1, 1, size=1).astype(np.float32))
        assert 0.995 * limit <= info["plan"].metrics["nonzeros"] <= limit and reward == -(1 - info["result"].val_score)


def test_every_strategy_searches_a_size_budget_unchanged(workdir):
    # One workdir for all: its MLflow store is set up once.
    for strategy, trials in (("rl", 3), ("random", 2), ("lamp", 1), ("global", 1)):
        result = ap.search(SPACE, strategy=strategy, budget="size=0.15", n_trials=trials, workdir=workdir,
                           show_progress=False, threads=1)
        study = optuna.load_study(study_name=result.study_name, storage=result.storage_url)
        sizes = [t.user_attrs["result"]["size_ratio"] for t in completed_trials(study)]
        assert len(sizes) == trials and all(0.15 * 0.995 <= s <= 0.15 for s in sizes), (strategy, sizes)
        if strategy in ("lamp", "global"):
            assert result.best_plan.provenance["strategy"] == strategy
        if strategy == "rl":  # its first episodes play the three baseline plans, each coming out as itself
            assert [t.user_attrs.get("baseline") for t in completed_trials(study)] == ["uniform", "global", "lamp"]
