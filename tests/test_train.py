"""The training recipe: resumable from its last finished epoch, and bf16 autocast."""

from __future__ import annotations

import pytest
import torch

import autoprune as ap
from autoprune.precision import bf16_supported, resolve_precision
from autoprune.train import TrainRecipe, score_model, train_model


class _Interrupt(Exception):
    pass


def _fresh(digits_task):
    torch.manual_seed(0)
    return ap.models.DigitsCNN()


def test_resumed_training_reproduces_the_uninterrupted_run(digits_task, tmp_path):
    recipe = TrainRecipe(epochs=3, lr=0.05, batch_size=64)
    loader = digits_task.train_loader
    whole = train_model(_fresh(digits_task), loader, epochs=3, recipe=recipe, seed=1, show_progress=False)

    state = tmp_path / "state.pt"

    def stop_after_first(epoch: int, model: torch.nn.Module) -> None:
        if epoch == 1:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        train_model(_fresh(digits_task), loader, epochs=3, recipe=recipe, seed=1, show_progress=False,
                    state_path=state, on_epoch=stop_after_first)
    assert state.is_file()
    # A different model start proves the weights come from the saved state, not from the init.
    restarted = ap.models.DigitsCNN()
    resumed = train_model(restarted, loader, epochs=3, recipe=recipe, seed=1, show_progress=False, state_path=state)
    assert not state.exists()  # removed once training ends
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_state_of_another_recipe_is_not_resumed(digits_task, tmp_path):
    state = tmp_path / "state.pt"
    recipe = TrainRecipe(epochs=2, lr=0.05, batch_size=64)

    def stop(epoch: int, model: torch.nn.Module) -> None:
        raise _Interrupt

    with pytest.raises(_Interrupt):
        train_model(_fresh(digits_task), digits_task.train_loader, epochs=2, recipe=recipe, seed=1,
                    show_progress=False, state_path=state, on_epoch=stop)
    other = TrainRecipe(epochs=2, lr=0.01, batch_size=64)
    fresh = train_model(_fresh(digits_task), digits_task.train_loader, epochs=2, recipe=other, seed=1,
                        show_progress=False, state_path=state)
    plain = train_model(_fresh(digits_task), digits_task.train_loader, epochs=2, recipe=other, seed=1,
                        show_progress=False)
    for a, b in zip(fresh.state_dict().values(), plain.state_dict().values()):
        assert torch.equal(a, b)


def test_unreadable_training_state_is_refused(digits_task, tmp_path):
    state = tmp_path / "state.pt"
    state.write_bytes(b"not a checkpoint")
    with pytest.raises(ap.CheckpointError, match="delete it"):
        train_model(_fresh(digits_task), digits_task.train_loader, epochs=1, recipe=TrainRecipe(), seed=0,
                    show_progress=False, state_path=state)


def test_precision_names_are_checked():
    with pytest.raises(ap.ConfigError, match="auto, fp32, bf16"):
        resolve_precision("fp16")
    assert resolve_precision("fp32") == "fp32"


@pytest.mark.skipif(not bf16_supported("cpu"), reason="this CPU has no bf16 instructions")
def test_bf16_training_learns_like_fp32(digits_task):
    recipe = TrainRecipe(epochs=4, lr=0.05, batch_size=64)
    scores = {}
    for precision in ("fp32", "bf16"):
        model = train_model(_fresh(digits_task), digits_task.train_loader, epochs=4, recipe=recipe, seed=0,
                            show_progress=False, precision=precision)
        scores[precision] = score_model(model, digits_task.val_loader)
        assert model.conv1.weight.dtype == torch.float32  # autocast keeps float32 weights
    assert scores["bf16"] > 0.9 and abs(scores["bf16"] - scores["fp32"]) < 0.03


def test_bf16_is_refused_where_the_cpu_lacks_it(monkeypatch):
    import autoprune.precision as precision

    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx2"}))
    with pytest.raises(ap.ConfigError, match="bfloat16 instructions"):
        resolve_precision("bf16")
    assert resolve_precision("auto") == "fp32"
