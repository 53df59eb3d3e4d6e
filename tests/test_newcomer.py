"""A newcomer's first hour (#16 items 12 and 15): what export writes and says, where a resumed
search picks up, and commands run in the wrong place or on the wrong kind of task that say so
instead of creating an empty workdir or contradicting themselves."""

from __future__ import annotations

from autoprune.cli import run


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    code = run(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_train_of_a_user_task_says_it_brings_its_own_model(capsys, tmp_path):
    code, out, err = _cli(capsys, "train", "--task", "user_tasks:make_task", "--workdir", str(tmp_path / "home"))
    message = " ".join(err.split())
    assert code == 2 and "Traceback" not in out + err
    assert "'user_tasks:make_task' is a user task, which brings its own trained model" in message
    assert "autoprune search --task user_tasks:make_task" in message
    assert "Unknown task" not in message and "or give a user task" not in message  # no self-contradiction
    assert not (tmp_path / "home").exists()

