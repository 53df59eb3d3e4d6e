"""Shared fixtures: real tasks on small models, one trained digits model per test session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

torch.set_num_threads(2)
sys.path.insert(0, str(Path(__file__).parent))  # user-task modules for `package.module:function` tests

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def session_workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A workdir shared by the session so the digits model is trained once (about 5 s)."""
    path = tmp_path_factory.mktemp("autoprune-home")
    os.environ["AUTOPRUNE_HOME"] = str(path)
    return path


@pytest.fixture(scope="session")
def digits_task(session_workdir: Path):
    import autoprune as ap

    return ap.load_task("digits-cnn", workdir=session_workdir)


@pytest.fixture(scope="session")
def digits_profile(digits_task):
    import autoprune as ap

    return ap.profile_model(digits_task)


@pytest.fixture(scope="session")
def digits_evaluator(digits_task, digits_profile):
    import autoprune as ap

    return ap.Evaluator(digits_task, profile=digits_profile)


def run_cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 600):
    """Run the real `autoprune` console script in a subprocess."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "autoprune.cli", *args],
        capture_output=True, text=True, env=full_env, cwd=cwd or REPO, timeout=timeout,
    )


@pytest.fixture
def workdir(tmp_path: Path, session_workdir: Path, digits_task) -> Path:
    """A fresh workdir that already holds the trained digits checkpoint."""
    import shutil

    home = tmp_path / "home"
    shutil.copytree(session_workdir / "checkpoints", home / "checkpoints")
    return home


def mlflow_runs(workdir: Path, experiment: str = "digits-cnn"):
    """(parent runs, child runs) of an experiment in the workdir's MLflow SQLite store."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=5000)
    parents = [r for r in runs if r.data.tags.get("autoprune.kind") == "search"]
    children = [r for r in runs if r.data.tags.get("autoprune.kind") == "trial"]
    return client, parents, children
