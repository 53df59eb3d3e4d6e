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


def test_a_model_torch_pruning_cannot_trace_is_refused_cleanly(monkeypatch):
    torchvision = pytest.importorskip("torchvision")
    from torchvision.models import shufflenetv2

    def permuted_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
        # The channel shuffle spelled with permute, which autoprune does not map: Torch-Pruning
        # then fails on it (ZeroDivisionError), as it did on every shuffle before.
        b, c, h, w = x.shape
        return x.view(b, groups, c // groups, h, w).permute(0, 2, 1, 3, 4).reshape(b, c, h, w)

    monkeypatch.setattr(shufflenetv2, "channel_shuffle", permuted_shuffle)
    model = torchvision.models.shufflenet_v2_x0_5(num_classes=10).eval()
    with pytest.raises(ap.UnsupportedModelError, match="Torch-Pruning cannot trace the channel dependencies"):
        ap.profile_model(model, torch.zeros(1, 3, 32, 32))


@pytest.mark.parametrize("move", ["roll", "flip"])
def test_a_group_whose_channels_move_unseen_is_left_whole_not_pruned_wrongly(move):
    class Moves(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.Conv2d(8, 8, 1)
            self.head = torch.nn.Linear(8, 10)

        def forward(self, x):
            y = self.a(x)
            # Torch-Pruning passes these through as if every channel stayed in place: the pruned
            # copy runs and counts right, but b would lose the wrong inputs.
            y = torch.roll(y, 1, dims=1) if move == "roll" else y.flip(1)
            return self.head(self.b(y).mean((2, 3)))

    torch.manual_seed(0)
    model = Moves().eval()
    assert pruning.pruning_error(pruning.Surgeon(model, X), {"a": 6}, torch.randn(2, 1, 8, 8)) > 1e-2
    profile = ap.profile_model(model, X)
    assert profile.names == ["b"]
    assert "changes what the rest of the model computes" in dict(profile.left_whole)["a"]


def _random_input_matches(pruned, zeroed, shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = pruned(x), zeroed(x)
    assert (b[0] - b[1]).abs().max() > 0.1 * b.abs().max()  # a check that could fail: outputs depend on the input
    return float((a - b).abs().max() / b.abs().max())


def test_channel_shuffles_couple_the_right_channels_and_leave_the_trunk_whole():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.shufflenet_v2_x0_5(num_classes=10).train()
    for m in model.modules():  # BatchNorm statistics as a trained model has them (else outputs fade to the bias)
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
    with torch.no_grad():
        model(torch.randn(8, 3, 32, 32))
    model.eval()
    x = torch.zeros(1, 3, 32, 32)
    profile = ap.profile_model(model, x)
    whole = dict(profile.left_whole)
    # Branch outputs enter the shuffle: they must lose the same positions in both halves, which a
    # group cannot say, so they stay whole; the branches' inner widths and conv1/conv5 are pruned.
    assert "stage2.3.branch2.5" in whole and "channel shuffle" in whole["stage2.3.branch2.5"]
    assert {"conv1.0", "conv5.0", "stage2.0.branch2.3", "stage4.3.branch2.3"} <= set(profile.names)
    plan = ap.uniform_plan(profile, ap.Budget(flops=0.5))
    surgeon = pruning.Surgeon(model, x)
    counted, _ = pruning.count_macs_params(surgeon.prune(plan.kept), x)
    assert abs(profile.macs_of(plan.kept) - counted) <= 0.005 * counted and counted <= 0.5 * profile.macs
    assert _random_input_matches(surgeon.prune(plan.kept), surgeon.zeroed_copy(plan.kept), (2, 3, 32, 32)) < 1e-4
    # Pruned anyway, a trunk group (identity or not) breaks the function: why it is left whole.
    trunk = {"stage4.3.branch2.5": 94}
    assert _random_input_matches(surgeon.prune(trunk), surgeon.zeroed_copy(trunk), (2, 3, 32, 32)) > 1e-2


def _tiny_torchvision_vit():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=16, patch_size=4, num_layers=2, num_heads=4,
                                                 hidden_dim=32, mlp_dim=64, num_classes=10)
    torch.nn.init.normal_(model.heads.head.weight, std=0.5)  # torchvision starts it at zero
    return model.eval(), torch.zeros(1, 3, 16, 16)


def test_torchvision_attention_is_pruned_by_whole_heads_exactly():
    from autoprune.pruning._attention import HeadPrunedMultiheadAttention

    model, x = _tiny_torchvision_vit()
    profile = ap.profile_model(model, x)
    heads = [g for g in profile.groups if g.kind == "heads"]
    names = [f"encoder.layers.encoder_layer_{i}.self_attention" for i in range(2)]
    assert [g.name for g in heads] == names
    assert all(g.channels == 96 and g.unit == 8 and g.divisor == 3 and not g.embedding for g in heads)
    # In network order: each layer's heads before its MLP.
    assert profile.names.index(names[1]) < profile.names.index("encoder.layers.encoder_layer_1.mlp.0")
    scores = pruning.channel_scores(model, x, pruning.make_importance("l1"))
    kept = {names[0]: 48, names[1]: 24, "encoder.layers.encoder_layer_1.mlp.0": 32}  # 2 and 1 of 4 heads
    surgeon = pruning.Surgeon(model, x)
    pruned = surgeon.prune(kept, scores)
    attention = [m for m in pruned.modules() if isinstance(m, torch.nn.MultiheadAttention)]
    assert [type(m) for m in attention] == [HeadPrunedMultiheadAttention] * 2
    assert [(m.num_heads, m.head_dim, m.embed_dim, m.in_proj_weight.shape[0]) for m in attention] == [
        (2, 8, 32, 48), (1, 8, 32, 24)]
    counted, params = pruning.count_macs_params(pruned, x)
    assert abs(profile.macs_of(kept) - counted) <= 1e-9 * counted and params == profile.params_of(kept)
    assert _random_input_matches(pruned, surgeon.zeroed_copy(kept, scores), (3, 3, 16, 16)) < 1e-5
    # The removed heads are the least important ones.
    per_head = scores[names[0]][:96 // 3:8]
    kept_rows = attention[0].in_proj_weight[:16]
    dense_q = model.encoder.layers.encoder_layer_0.self_attention.in_proj_weight[:32].reshape(4, 8, 32)
    kept_heads = [h for h in range(4) if any(torch.equal(dense_q[h], kept_rows[i * 8:(i + 1) * 8]) for i in range(2))]
    assert sorted(kept_heads) == sorted(np.argsort(per_head)[2:].tolist())


def test_head_pruned_attention_saves_loads_and_restores_in_place(tmp_path):
    from autoprune.pruning._attention import HeadPrunedMultiheadAttention

    model, x = _tiny_torchvision_vit()
    profile = ap.profile_model(model, x)
    plan = ap.uniform_plan(profile, ap.Budget(flops=0.6))
    assert any(plan.kept[g.name] < g.channels for g in profile.groups if g.kind == "heads")
    pruned = ap.apply_plan(model, plan)
    ap.save_pruned(pruned, plan, tmp_path / "model.pt")
    loaded, _ = ap.load_pruned(tmp_path / "model.pt", model)
    batch = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(batch), pruned(batch))
    # need_weights=True (the other path through the pruned attention) computes the same output.
    attention = next(m for m in pruned.modules() if isinstance(m, HeadPrunedMultiheadAttention))
    tokens = torch.randn(2, 5, 32)
    with torch.no_grad():
        fast, _ = attention(tokens, tokens, tokens, need_weights=False)
        slow, weights = attention(tokens, tokens, tokens, need_weights=True)
    assert torch.allclose(fast, slow, atol=1e-6) and weights.shape == (2, 5, 5)
    surgeon = pruning.Surgeon(model, x)
    with surgeon.pruned_in_place(plan.kept):
        pass
    assert all(type(m) is torch.nn.MultiheadAttention for m in model.modules() if isinstance(m, torch.nn.MultiheadAttention))


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
