"""A user task whose score function returns NaN (a real user bug)."""

import dataclasses

import autoprune as ap


def make_task(workdir=None) -> ap.Task:
    base = ap.load_task("digits-cnn", workdir=workdir)
    return dataclasses.replace(base, name="nan-digits", score_fn=lambda logits, targets: float("nan"))
