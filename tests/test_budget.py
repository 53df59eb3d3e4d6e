import numpy as np
import pytest

import autoprune as ap
from autoprune import pruning
from autoprune.task import dense_model

BUDGETS = [0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]


@pytest.fixture(scope="module", params=["fashionmnist-resnet20", "cifar10-resnet56", "digits-cnn"])
def model_profile(request):
    model, x = dense_model(request.param, pretrained=False)
    return model, x, ap.profile_model(model, x)


def test_projected_plans_meet_flops_budget_within_one_percent(model_profile):
    model, x, prof = model_profile
    rng = np.random.default_rng(0)
    # Each draw prunes the model and counts it: about 2 s on ResNet-56 (30 groups), so one draw
    # per budget there, three on the small models.
    draws = 1 if len(prof.groups) > 20 else 3
    for budget in BUDGETS:
        for _ in range(draws):
            raw = {g.name: float(rng.uniform(0.0, 0.8)) for g in prof.groups}
            plan = ap.project(prof, raw, ap.Budget(flops=budget))
            counted, _ = ap.count_macs_params(ap.apply_plan(model, plan, example_input=x, importance="random"), x)
            ratio = counted / prof.macs
            assert ratio <= budget, (budget, ratio)
            assert ratio >= 0.99 * budget, (budget, ratio)
            assert plan.metrics["flops"] == pytest.approx(counted, rel=0.005)


def test_params_budget_absolute_value(model_profile):
    model, x, prof = model_profile
    limit = 0.45 * prof.params
    plan = ap.project(prof, {g.name: 0.3 for g in prof.groups}, ap.Budget(params=limit))
    _, params = ap.count_macs_params(ap.apply_plan(model, plan, example_input=x), x)
    assert 0.99 * limit <= params <= limit


def test_projection_keeps_the_shape_of_the_raw_vector():
    model, x = dense_model("fashionmnist-resnet20", pretrained=False)
    prof = ap.profile_model(model, x)
    names = prof.names
    raw = {n: (0.7 if i % 2 else 0.1) for i, n in enumerate(names)}
    plan = ap.project(prof, raw, ap.Budget(flops=0.5))
    high = np.mean([plan.ratios[n] for i, n in enumerate(names) if i % 2])
    low = np.mean([plan.ratios[n] for i, n in enumerate(names) if not i % 2])
    assert high - low > 0.3


def test_round_to_keeps_channel_multiples(model_profile):
    _, _, prof = model_profile
    plan = ap.project(prof, {g.name: 0.5 for g in prof.groups}, ap.Budget(flops=0.5), round_to=8)
    for name, (dense, kept) in plan.channels.items():
        assert kept % 8 == 0 or kept == dense
    assert plan.metrics["flops_ratio"] <= 0.5


def test_infeasible_budget_is_refused_naming_the_reachable_range(model_profile):
    _, _, prof = model_profile
    with pytest.raises(ap.InfeasibleBudgetError, match=r"between 0\.\d+ and 1\.0000"):
        ap.project(prof, {}, ap.Budget(flops=0.001), bounds={n: (0.0, 0.5) for n in prof.names})


def test_bad_budgets_are_refused():
    for kwargs in ({}, {"flops": 0.5, "params": 0.5}, {"flops": -1.0}, {"flops": float("nan")}):
        with pytest.raises(ap.BudgetError):
            ap.Budget(**kwargs)
    with pytest.raises(ap.BudgetError, match="Unknown budget metric 'macs'"):
        ap.Budget.parse("macs=0.5")
    assert ap.Budget.parse("flops=0.25") == ap.Budget(flops=0.25)


def test_uniform_and_global_baselines_meet_the_budget(model_profile):
    model, x, prof = model_profile
    budget = ap.Budget(flops=0.5)
    uniform = ap.uniform_plan(prof, budget)
    ratios = list(uniform.ratios.values())
    assert max(ratios) - min(ratios) < 0.2  # one ratio for all, up to channel rounding
    scores = pruning.channel_scores(model, x, pruning.L1Importance())
    glob = ap.global_plan(prof, budget, scores)
    for plan in (uniform, glob):
        assert 0.99 * 0.5 <= plan.metrics["flops_ratio"] <= 0.5
    assert glob.provenance["strategy"] == "global"


def test_raw_ratios_outside_bounds_are_refused(model_profile):
    _, _, prof = model_profile
    with pytest.raises(ap.ConfigError, match="outside their allowed ranges"):
        ap.project(prof, {prof.names[0]: 0.95}, ap.Budget(flops=0.5))
    with pytest.raises(ap.ConfigError, match="unknown groups"):
        ap.project(prof, {"nope": 0.1}, ap.Budget(flops=0.5))
