"""Grouped convolutions, attention heads, layers left whole and models refused (#13)."""

import numpy as np
import pytest
import torch
from architectures import FixedReshape, TinyResNeXt, TinyViT
from conftest import REPO

import autoprune as ap
from autoprune import pruning
from autoprune.budget import resolve_bounds

X = torch.zeros(1, 1, 8, 8)


def _check_plan(model, profile, plan):
    """Prune ``model`` to ``plan``, run it, and return the pruned copy; MACs must match the profile."""
    pruned = pruning.prune_copy(model, X, plan.kept)
    with torch.no_grad():
        assert pruned(torch.randn(3, 1, 8, 8)).shape == (3, 10)
    counted, _ = pruning.count_macs_params(pruned, X)
    assert abs(profile.macs_of(plan.kept) - counted) <= 0.005 * counted
    return pruned


def test_grouped_convolutions_lose_channels_evenly_from_every_group():
    torch.manual_seed(0)
    model = TinyResNeXt().eval()
    profile = ap.profile_model(model, X)
    grouped = [g for g in profile.groups if g.divisor > 1]
    assert grouped and all(g.divisor == 4 for g in grouped)
    for budget in (0.7, 0.5, 0.3):
        plan = ap.uniform_plan(profile, ap.Budget(flops=budget))
        assert plan.metrics["flops_ratio"] <= budget
        for g in grouped:
            assert plan.kept[g.name] % 4 == 0 and plan.kept[g.name] >= 4
        pruned = _check_plan(model, profile, plan)
        convs = [m for m in pruned.modules() if isinstance(m, torch.nn.Conv2d) and m.groups > 1]
        assert all(m.groups == 4 and m.in_channels % 4 == 0 for m in convs)


def test_grouped_importance_removes_the_same_positions_from_every_block():
    scores = np.tile(np.array([5.0, 1.0, 3.0, 0.5]), 3)  # 3 blocks of 4 channels
    assert pruning._block_indices(scores, 12, 3, 6) == [1, 3, 5, 7, 9, 11]
    unit_scores = np.repeat(np.array([2.0, 0.1, 1.0]), 2)  # 1 block of 3 units of 2 channels
    assert pruning._block_indices(unit_scores, 6, 1, 2, unit=2) == [2, 3]


def test_attention_is_pruned_by_whole_heads_and_the_embedding_is_left_whole():
    torch.manual_seed(0)
    model = TinyViT().eval()
    profile = ap.profile_model(model, X)
    by_name = {g.name: g for g in profile.groups}
    heads = [g for g in profile.groups if g.kind == "heads"]
    assert [g.name for g in heads] == ["blocks.0.attn.qkv", "blocks.1.attn.qkv"]
    assert all(g.channels == 96 and g.unit == 8 and g.divisor == 3 and g.step == 24 for g in heads)
    assert {"blocks.0.fc1", "blocks.1.fc1"} <= set(by_name)  # MLP hidden width: the other kind
    embedding = [g for g in profile.groups if g.embedding]
    assert len(embedding) == 1 and "blocks.0.attn.qkv:in" in embedding[0].members
    assert resolve_bounds(profile)[embedding[0].name] == (0.0, 0.0)

    plan = ap.uniform_plan(profile, ap.Budget(flops=0.6))
    assert plan.kept[embedding[0].name] == embedding[0].channels
    assert any(plan.kept[g.name] < 96 for g in heads)
    pruned = _check_plan(model, profile, plan)
    modules = dict(pruned.named_modules())
    for g in heads:
        attention = modules[g.name.rpartition(".")[0]]
        assert attention.num_heads == plan.kept[g.name] // 24 >= 1
        assert attention.head_dim == 8 and modules[g.name].out_features == plan.kept[g.name]
    assert model.blocks[0].attn.num_heads == 4  # the dense model is untouched


def test_heads_with_the_lowest_importance_are_the_ones_removed():
    torch.manual_seed(0)
    model = TinyViT().eval()
    qkv = model.blocks[0].attn.qkv
    with torch.no_grad():  # head 2 of q, k and v gets tiny weights: it must be the head that goes
        for block in range(3):
            qkv.weight[block * 32 + 16 : block * 32 + 24] *= 1e-3
    scores = pruning.channel_scores(model, X, pruning.make_importance("l1"))
    pruned = pruning.prune_copy(model, X, {"blocks.0.attn.qkv": 72}, scores)
    kept_rows = pruned.blocks[0].attn.qkv.weight
    expected = torch.cat([qkv.weight[b * 32 : b * 32 + 32][[*range(16), *range(24, 32)]] for b in range(3)])
    assert torch.equal(kept_rows, expected)


def test_a_search_space_can_ask_for_the_embedding_width():
    torch.manual_seed(0)
    profile = ap.profile_model(TinyViT().eval(), X)
    name = next(g.name for g in profile.groups if g.embedding)
    space = ap.SearchSpace.model_validate({"task": "x", "groups": {"include": ["*"]}})
    assert space.groups.bounds(profile)[name] == (0.0, 0.0)
    space = ap.SearchSpace.model_validate({"task": "x", "groups": {"include": ["*", name]}})
    assert space.groups.bounds(profile)[name] == (0.0, 0.8)


def test_no_plan_empties_a_group_whatever_the_ratio_range():
    torch.manual_seed(0)
    model = TinyViT().eval()
    profile = ap.profile_model(model, X)
    bounds = {g.name: (0.0, 0.99) for g in profile.groups}
    plan = ap.uniform_plan(profile, ap.Budget(flops=0.05), bounds=bounds)
    for g in profile.groups:
        assert plan.kept[g.name] >= g.step
    _check_plan(model, profile, plan)
    with pytest.raises(ap.ConfigError, match="must keep at least"):
        pruning.prune_copy(model, X, {"blocks.0.attn.qkv": 0})


def test_a_layer_that_cannot_be_pruned_is_left_whole_with_the_reason():
    torch.manual_seed(0)
    model = FixedReshape().eval()
    profile = ap.profile_model(model, X)
    assert profile.names == ["first"]
    (name, why), = profile.left_whole
    assert name == "fixed" and "Conv2d" in why and "16 channels" in why
    assert profile.to_dict()["left_whole"][0]["group"] == "fixed"
    _check_plan(model, profile, ap.uniform_plan(profile, ap.Budget(flops=0.7)))


def test_a_model_torch_pruning_cannot_trace_is_refused_cleanly():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.shufflenet_v2_x0_5(num_classes=10).eval()
    with pytest.raises(ap.UnsupportedModelError, match="Torch-Pruning cannot trace the channel dependencies"):
        ap.profile_model(model, torch.zeros(1, 3, 32, 32))


def test_a_model_with_nothing_prunable_is_refused_naming_the_layers():
    class OnlyFixed(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fixed = torch.nn.Conv2d(1, 16, 3, padding=1)
            self.head = torch.nn.Linear(8, 10)

        def forward(self, x):
            return self.head(self.fixed(x).view(x.shape[0], 8, -1).mean(dim=2))

    with pytest.raises(ap.UnsupportedModelError, match=r"No group .* can be pruned.*fixed \(Conv2d, 16 channels\)"):
        ap.profile_model(OnlyFixed().eval(), X)


@pytest.mark.parametrize("task", ["architectures:tiny_vit", "architectures:tiny_resnext"])
def test_user_task_searches_and_exports_end_to_end(task, workdir, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "tests"))
    space = tmp_path / "space.yaml"
    space.write_text(f"task: {task}\nbudget: {{flops: 0.6}}\nstrategy: {{name: optuna, trials: 5, seed: 0}}\n")
    result = ap.search(str(space), workdir=workdir, show_progress=False)
    assert result.best_result.macs_ratio <= 0.6
    out = tmp_path / "export"
    report = ap.export_study(result.study_name, out, finetune_epochs=1, workdir=workdir)
    assert report.searched.macs_ratio <= 0.6
    assert {"plan.json", "model.pt", "report.json"} <= {p.name for p in out.iterdir()}
    dense = __import__("architectures").TinyViT() if "vit" in task else __import__("architectures").TinyResNeXt()
    pruned, plan = ap.load_pruned(out / "model.pt", dense)
    assert plan.kept == report.plan.kept
    assert plan.provenance["task_spec"] == task
    from autoprune.cli import run  # apply finds the user task from the plan alone

    assert run(["apply", "--plan", str(out / "plan.json"), "--out", str(tmp_path / "applied.pt"),
                "--workdir", str(workdir)]) == 0
    applied, _ = ap.load_pruned(tmp_path / "applied.pt", dense)
    assert sum(p.numel() for p in applied.parameters()) == sum(p.numel() for p in pruned.parameters())
    with torch.no_grad():
        assert pruned(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


def test_groups_that_break_only_together_at_their_minimum_leave_the_later_one_whole():
    class NeedsTenChannels(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = torch.nn.Conv2d(1, 16, 3, padding=1)
            self.b = torch.nn.Conv2d(1, 16, 3, padding=1)
            self.head = torch.nn.Linear(32, 10)

        def forward(self, x):
            y = torch.cat([self.a(x), self.b(x)], dim=1)
            if y.shape[1] < 10:
                raise RuntimeError("needs at least 10 channels")
            return self.head(y.mean(dim=(2, 3)))

    profile = ap.profile_model(NeedsTenChannels().eval(), X)
    assert profile.names == ["a"]
    (name, why), = profile.left_whole
    assert name == "b" and "not with the groups before it" in why and "needs at least 10 channels" in why
