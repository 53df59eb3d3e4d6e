"""A user task whose score function fails on chosen calls: a real user bug, for crash tests."""

import autoprune as ap

_state = {"calls": 0, "fail_on": set()}


def reset(fail_on_calls: set[int]) -> None:
    _state.update(calls=0, fail_on=set(fail_on_calls))


def _score(logits, targets) -> float:
    _state["calls"] += 1
    if _state["calls"] in _state["fail_on"]:
        raise RuntimeError("simulated crash inside the user's score function")
    return float((logits.argmax(1) == targets).float().mean())


def make_task(workdir=None) -> ap.Task:
    import dataclasses

    base = ap.load_task("digits-cnn", workdir=workdir)
    return dataclasses.replace(base, name="crashing-digits", score_fn=_score)
