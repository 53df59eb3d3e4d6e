import json

import numpy as np
import pytest
import torch
from conftest import run_cli

import autoprune as ap
from autoprune import models, pruning
from autoprune.task import dense_model


def _members(profile, name):
    return set(profile.group(name).members)


@pytest.fixture(scope="module")
def resnet20_profile():
    model, x = dense_model("cifar10-resnet20", pretrained=False)
    return model, x, ap.profile_model(model, x)


def test_resnet20_couples_residual_channels_per_stage(resnet20_profile):
    _, _, prof = resnet20_profile
    # 3 residual groups (one per stage) + one group per block's first conv
    assert len(prof.groups) == 3 + 9
    stage1 = _members(prof, "conv1")
    assert {"conv1:out", "layer1.0.conv2:out", "layer1.1.conv2:out", "layer1.2.conv2:out"} <= stage1
    assert {"layer1.0.conv1:in", "layer2.0.conv1:in", "layer2.0.shortcut.0:in"} <= stage1
    stage2 = next(g for g in prof.groups if "layer2.0.shortcut.0:out" in g.members)
    assert {"layer2.0.conv2:out", "layer2.1.conv2:out", "layer2.2.conv2:out"} <= set(stage2.members)
    for block in ("layer1.0", "layer2.1", "layer3.2"):
        inner = _members(prof, f"{block}.conv1")
        assert {m for m in inner if m.endswith(":out")} == {f"{block}.conv1:out", f"{block}.bn1:out"}


def test_classifier_and_input_are_never_pruned(resnet20_profile):
    _, _, prof = resnet20_profile
    assert "fc" in prof.ignored_layers
    everything = {m for g in prof.groups for m in g.members}
    assert "fc:out" not in everything
    assert "conv1:in" not in everything


def test_resnet56_and_plain20_group_counts():
    model, x = dense_model("cifar10-resnet56", pretrained=False)
    assert len(ap.profile_model(model, x).groups) == 3 + 27
    model, x = dense_model("cifar10-plain20", pretrained=False)
    prof = ap.profile_model(model, x)
    assert len(prof.groups) == 19  # no shortcuts: every conv but none coupled
    assert all(len([m for m in g.members if m.endswith(":out") and "conv" in m]) == 1 for g in prof.groups)


def test_mobilenetv2_couples_depthwise_with_expansion():
    model, x = dense_model("cifar10-mobilenetv2", pretrained=False)
    prof = ap.profile_model(model, x)
    group = next(g for g in prof.groups if "features.2.conv.1.0:out" in g.members)
    assert "features.2.conv.0.0:out" in group.members  # the 1x1 expansion feeding the depthwise conv


@pytest.mark.parametrize("task", ["cifar10-resnet20", "cifar10-resnet56", "cifar10-mobilenetv2", "cifar10-vgg16", "digits-cnn"])
def test_analytic_cost_equals_torch_pruning_count(task):
    model, x = dense_model(task, pretrained=False)
    prof = ap.profile_model(model, x)
    assert prof.cost.macs(np.zeros(len(prof.groups))) == pytest.approx(prof.macs, rel=1e-9)
    rng = np.random.default_rng(1)
    for _ in range(3):
        kept = {g.name: int(rng.integers(1, g.channels + 1)) for g in prof.groups}
        pruned = pruning.prune_copy(model, x, kept)
        macs, params = ap.count_macs_params(pruned, x)
        assert prof.macs_of(kept) == pytest.approx(macs, rel=0.005)
        assert prof.params_of(kept) == pytest.approx(params, rel=0.005)


def test_group_shares_and_fingerprint(resnet20_profile):
    model, x, prof = resnet20_profile
    assert 0.95 < sum(g.macs_share for g in prof.groups) <= 1.0
    again = ap.profile_model(model, x)
    assert again.fingerprint == prof.fingerprint
    other, x56 = dense_model("cifar10-resnet56", pretrained=False)
    assert ap.profile_model(other, x56).fingerprint != prof.fingerprint


def test_profile_rejects_batched_example_input():
    with pytest.raises(ap.ConfigError, match="batch size 1"):
        ap.profile_model(models.DigitsCNN(), torch.zeros(4, 1, 8, 8))


def test_profile_cli_prints_table_json_and_the_cpu_channel_block():
    from autoprune.latency import simd_round_to

    table = run_cli("profile", "--task", "fashionmnist-resnet20")
    assert table.returncode == 0, table.stderr
    assert "layer3.0.conv1" in table.stdout and f"blocks of {simd_round_to()}" in table.stdout
    as_json = run_cli("profile", "--task", "fashionmnist-resnet20", "--json")
    assert as_json.returncode == 0, as_json.stderr
    data = json.loads(as_json.stdout)
    assert len(data["groups"]) == len(ap.profile_model(*dense_model("fashionmnist-resnet20", pretrained=False)).groups)
