import json
import warnings

import pytest
import torch

import autoprune as ap
import autoprune.models
from autoprune.export import load_pruned, save_pruned
from autoprune.task import dense_model


@pytest.fixture(scope="module")
def resnet():
    model, x = dense_model("fashionmnist-resnet20", pretrained=False)
    prof = ap.profile_model(model, x)
    plan = ap.project(prof, {g.name: 0.2 + 0.05 * i for i, g in enumerate(prof.groups)}, ap.Budget(flops=0.4))
    return model, x, prof, plan


def test_plan_json_round_trips(resnet, tmp_path):
    *_, plan = resnet
    assert ap.Plan.from_json(plan.to_json()) == plan
    path = plan.save(tmp_path / "plan.json")
    assert ap.Plan.load(path) == plan
    data = json.loads(path.read_text())
    assert data["schema"] == "autoprune.plan/1"
    assert set(data) >= {"task", "model_fingerprint", "budget", "ratios", "channels", "metrics", "provenance"}
    assert all(0 <= r < 1 for r in data["ratios"].values())


def test_apply_plan_builds_a_smaller_model_and_leaves_the_input_untouched(resnet):
    model, x, prof, plan = resnet
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for importance in ap.IMPORTANCE_NAMES:
        batches = [(torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,)))]
        pruned = ap.apply_plan(model, plan, example_input=x, importance=importance, batches=batches)
        modules = dict(pruned.named_modules())
        for name, (dense, kept) in plan.channels.items():
            assert modules[name].out_channels == kept
        assert pruned(x).shape == (1, 10)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())


def test_l1_keeps_the_channels_with_largest_norm():
    model, x = dense_model("digits-cnn", pretrained=False)
    important = list(range(0, 128, 2))
    with torch.no_grad():
        model.fc1.weight[important] *= 100.0  # make half of fc1's units clearly the largest
    prof = ap.profile_model(model, x)
    plan = ap.Plan.from_kept(prof, {"fc1": len(important)})
    pruned = ap.apply_plan(model, plan, example_input=x, importance="l1")
    torch.testing.assert_close(pruned.fc1.weight, model.fc1.weight[important])
    torch.testing.assert_close(pruned.fc.weight, model.fc.weight[:, important])
    shuffled = ap.apply_plan(model, plan, example_input=x, importance="random")
    assert not torch.equal(shuffled.fc1.weight, pruned.fc1.weight)


def test_a_plan_for_another_model_is_refused_naming_groups(resnet):
    *_, plan = resnet
    other = ap.models.cifar_resnet(56, in_channels=1)
    with pytest.raises(ap.PlanMismatchError, match=r"the model has group 'layer1\.3\.conv1'"):
        ap.apply_plan(other, plan)
    with pytest.raises(ap.PlanMismatchError, match=r"input shape \(1, 1, 28, 28\) does not fit"):
        ap.apply_plan(dense_model("cifar10-resnet56", pretrained=False)[0], plan)
    digits, xd = dense_model("digits-cnn", pretrained=False)
    with pytest.raises(ap.PlanMismatchError, match="is not a group of the model"):
        ap.apply_plan(digits, plan, example_input=xd)


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"schema": "autoprune.plan/1", "ratios": {', "not valid JSON"),
        ('{"schema": "other/9"}', "unknown plan schema"),
        ('{"schema": "autoprune.plan/1", "ratios": {}}', "missing required keys"),
        ("[1, 2]", "a JSON object"),
    ],
)
def test_corrupt_plan_files_are_refused(tmp_path, text, message):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(ap.PlanError, match=message):
        ap.Plan.load(path)


def test_pruned_model_file_loads_without_pickle(resnet, tmp_path):
    model, x, prof, plan = resnet
    pruned = ap.apply_plan(model, plan, example_input=x)
    path = save_pruned(pruned, plan, tmp_path / "pruned.pt")
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"format", "plan", "state_dict"}
    loaded, loaded_plan = load_pruned(path, model)
    assert loaded_plan == plan
    torch.testing.assert_close(loaded(x), pruned(x))


def test_apply_recalibrates_batchnorm_as_the_search_scored_the_plan(workdir, tmp_path, capsys):
    from autoprune.cli import run

    task = ap.load_task("digits-cnn", workdir=workdir)
    profile = ap.profile_model(task)
    plan = ap.uniform_plan(profile, ap.Budget(flops=0.3))
    plan_file = tmp_path / "plan.json"
    plan.save(plan_file)
    scores = {}
    for flag in ("--recalibrate", "--no-recalibrate"):
        out = tmp_path / f"{flag}.pt"
        assert run(["apply", "--plan", str(plan_file), "--out", str(out), flag, "--workdir", str(workdir)]) == 0
        printed = " ".join(capsys.readouterr().out.split())
        assert ("recalibrated on 1024 training images" in printed) == (flag == "--recalibrate")
        assert "not fine-tuned" in printed
        pruned, _ = ap.load_pruned(out, task.model)
        with torch.no_grad():
            scores[flag] = sum(float((pruned(x).argmax(1) == y).sum()) for x, y in task.val_loader) / len(
                task.val_loader.dataset)
    searched = ap.Evaluator(task).evaluate(plan).val_score
    assert abs(scores["--recalibrate"] - searched) <= 0.02
    assert scores["--recalibrate"] > scores["--no-recalibrate"] + 0.02


def test_apply_plan_warns_of_stale_batchnorm_without_calibration_batches(resnet):
    model, x, prof, _ = resnet
    plan = ap.uniform_plan(prof, ap.Budget(flops=0.5))
    with pytest.warns(ap.StaleBatchNormWarning, match="calibration_batches"):
        ap.apply_plan(model, plan, example_input=x)
    batches = [torch.randn(8, *x.shape[1:]) for _ in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", ap.StaleBatchNormWarning)
        pruned = ap.apply_plan(model, plan, example_input=x, calibration_batches=batches)
    bn = next(m for m in pruned.modules() if isinstance(m, torch.nn.BatchNorm2d))
    dense_bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert not torch.allclose(bn.running_var, dense_bn.running_var[: bn.num_features])
