import pytest
import torch

import autoprune as ap


def test_recalibrated_batchnorm_beats_stale_statistics(digits_task, digits_profile, digits_evaluator):
    plan = ap.uniform_plan(digits_profile, ap.Budget(flops=0.3))
    stale = ap.Evaluator(digits_task, calibration_batches=0, profile=digits_profile).evaluate(plan)
    fresh = digits_evaluator.evaluate(plan)
    assert fresh.val_score > stale.val_score + 0.05


def test_evaluation_is_deterministic_and_counts_match(digits_task, digits_profile, digits_evaluator):
    plan = ap.project(digits_profile, {g.name: 0.5 for g in digits_profile.groups}, ap.Budget(flops=0.4))
    first, second = digits_evaluator.evaluate(plan), digits_evaluator.evaluate(plan)
    assert first.val_score == second.val_score
    again = ap.Evaluator(digits_task, profile=digits_profile).evaluate(plan)
    assert again.val_score == first.val_score
    macs, params = ap.count_macs_params(digits_evaluator.build(plan), digits_task.example_input)
    assert first.macs == pytest.approx(macs, rel=0.005)
    assert first.params == pytest.approx(params, rel=0.005)
    assert first.macs_ratio <= 0.4


def test_dense_plan_scores_like_the_dense_model(digits_profile, digits_evaluator):
    dense_plan = ap.Plan.from_kept(digits_profile, {})
    assert digits_evaluator.evaluate(dense_plan).val_score == pytest.approx(digits_evaluator.dense_score, abs=0.02)
    assert digits_evaluator.dense_score > 0.9  # the trained digits CNN


def test_scores_on_validation_not_test(digits_task, digits_profile):
    ev = ap.Evaluator(digits_task, profile=digits_profile, val_samples=100)
    assert ev.val_samples == 100
    val_first = next(iter(digits_task.val_loader))[0][:100]
    assert torch.equal(torch.cat([x for x, _ in ev._val_batches]), val_first)


def test_finetune_steps_and_taylor_run(digits_task, digits_profile):
    plan = ap.uniform_plan(digits_profile, ap.Budget(flops=0.3))
    res = ap.Evaluator(digits_task, profile=digits_profile, finetune_steps=5, importance="taylor").evaluate(plan)
    assert 0.0 <= res.val_score <= 1.0


def test_bad_evaluator_settings(digits_task, digits_profile):
    with pytest.raises(ap.ConfigError):
        ap.Evaluator(digits_task, profile=digits_profile, calibration_batches=-1)
    with pytest.raises(ap.ConfigError, match="Unknown importance criterion 'l3'"):
        ap.Evaluator(digits_task, profile=digits_profile, importance="l3")


def test_non_finite_scores_are_refused(digits_task, digits_profile):
    import dataclasses

    broken = dataclasses.replace(digits_task, score_fn=lambda logits, y: float("nan"))
    ev = ap.Evaluator(broken, profile=digits_profile)
    with pytest.raises(ap.TaskError, match="must be finite"):
        ev.evaluate(ap.uniform_plan(digits_profile, ap.Budget(flops=0.5)))
