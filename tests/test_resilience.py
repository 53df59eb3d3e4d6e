"""Killed searches resume exactly; several workers share one study on PostgreSQL."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from conftest import REPO, mlflow_runs
from optuna.trial import TrialState

from autoprune.study import ATTR_MLFLOW_RUN, ATTR_WORKER, TrialSlots, completed_trials, fail_stale_trials, open_storage


def _slow_space(tmp_path: Path, steps: int = 40) -> Path:
    """The default space with fine-tuning steps, so a trial takes about a second."""
    data = yaml.safe_load((REPO / "search_spaces" / "default.yaml").read_text())
    data["evaluation"]["finetune_steps"] = steps
    path = tmp_path / "slow.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _start(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "autoprune.cli", "search", *args], cwd=REPO,
                            env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _study(name: str, storage: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=storage)


def _wait_for(predicate, timeout: float = 180.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if predicate():
                return
        except (KeyError, ValueError, optuna.exceptions.OptunaError):
            pass
        time.sleep(0.3)
    pytest.fail("timed out waiting for the search")


def _running_after(study_name: str, storage: str, complete: int):
    """True once ``complete`` trials finished and another is evaluating its candidate: its
    parameters are all sampled (the trial names its MLflow run only after that), so a kill now
    interrupts an evaluation, not the sampler between two parameters."""
    def check() -> bool:
        trials = _study(study_name, storage).get_trials(deepcopy=False)
        done = [t for t in trials if t.state == TrialState.COMPLETE]
        evaluating = [t for t in trials if t.state == TrialState.RUNNING and ATTR_MLFLOW_RUN in t.user_attrs]
        return len(done) >= complete and bool(evaluating)
    return check


def test_sigkill_mid_trial_then_rerun_resumes_without_losing_or_duplicating(workdir, tmp_path):
    space = _slow_space(tmp_path)
    storage = f"sqlite:///{workdir / 'optuna.db'}"
    args = ["--space", str(space), "--trials", "8", "--study", "killed", "--workdir", str(workdir)]
    proc = _start(*args)
    _wait_for(_running_after("killed", storage, 3))
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    before = _study("killed", storage).get_trials(deepcopy=False)
    killed = [t.number for t in before if t.state == TrialState.RUNNING]
    finished_before = {t.number for t in before if t.state == TrialState.COMPLETE}
    assert len(killed) == 1

    rerun = subprocess.run([sys.executable, "-m", "autoprune.cli", "search", *args], cwd=REPO,
                           capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    study = _study("killed", storage)
    complete = completed_trials(study)
    assert len(complete) == 8 and finished_before <= {t.number for t in complete}
    states = {t.number: t.state for t in study.get_trials(deepcopy=False)}
    assert states[killed[0]] == TrialState.FAIL
    retried = [t for t in complete if t.user_attrs.get("retry_of") == killed[0]]
    assert len(retried) == 1 and retried[0].params == next(t for t in before if t.number == killed[0]).params
    _, parents, children = mlflow_runs(workdir, "slow")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    by_trial = {}
    for run in children:
        by_trial.setdefault(int(run.data.tags["autoprune.trial"]), []).append(run.info.status)
    assert by_trial[killed[0]] == ["FAILED"]
    assert sum(s == ["FINISHED"] for s in by_trial.values()) == 8
    assert not any("RUNNING" in s for s in by_trial.values())


def test_ctrl_c_stops_after_the_current_trial_and_says_how_to_resume(workdir, tmp_path):
    storage = f"sqlite:///{workdir / 'optuna.db'}"
    proc = _start("--space", str(_slow_space(tmp_path)), "--trials", "30", "--study", "interrupted",
                  "--workdir", str(workdir))
    _wait_for(_running_after("interrupted", storage, 2))
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    assert "resume" in out and "Traceback" not in out
    trials = _study("interrupted", storage).get_trials(deepcopy=False)
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    assert 2 <= len([t for t in trials if t.state == TrialState.COMPLETE]) < 30
    _, parents, children = mlflow_runs(workdir, "slow")
    assert parents[0].info.status == "KILLED"
    assert all(c.info.status == "FINISHED" for c in children)


@pytest.mark.slow
def test_workers_on_postgres_share_one_study_and_tracking_server(workdir, tmp_path, postgres_url, mlflow_server):
    args = ["--space", str(_slow_space(tmp_path, steps=20)), "--trials", "12", "--study", "pg-shared",
            "--storage", postgres_url, "--tracking-uri", mlflow_server, "--workdir", str(workdir), "--threads", "1"]
    machines = [_start(*args, env={"AUTOPRUNE_WORKER_HOST": f"machine-{i}"}) for i in range(2)]
    outputs = [m.communicate(timeout=600)[0] for m in machines]
    assert [m.returncode for m in machines] == [0, 0], [o[-3000:] for o in outputs]
    study = _study("pg-shared", postgres_url)
    complete = completed_trials(study)
    assert len(complete) == 12 and len({t.number for t in complete}) == 12
    hosts = {t.user_attrs["worker"].split(":")[0] for t in complete}
    assert hosts == {"machine-0", "machine-1"}
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server)
    exp = client.get_experiment_by_name("slow")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("autoprune.kind") == "search"]
    children = [r for r in runs if r.data.tags.get("autoprune.kind") == "trial" and r.info.status == "FINISHED"]
    assert len(parents) == 1 and len(children) == 12


@pytest.mark.slow
def test_heartbeat_fails_a_dead_remote_workers_trial_and_retries_it(workdir, tmp_path, postgres_url):
    env = {"AUTOPRUNE_HEARTBEAT_INTERVAL": "1", "AUTOPRUNE_HEARTBEAT_GRACE": "3"}
    args = ["--space", str(_slow_space(tmp_path, steps=60)), "--trials", "6", "--study", "pg-heartbeat",
            "--storage", postgres_url, "--workdir", str(workdir)]
    doomed = _start(*args, env={**env, "AUTOPRUNE_WORKER_HOST": "machine-a"})
    _wait_for(_running_after("pg-heartbeat", postgres_url, 2))
    doomed.send_signal(signal.SIGKILL)
    doomed.wait(timeout=30)
    dead = [t.number for t in _study("pg-heartbeat", postgres_url).get_trials(deepcopy=False)
            if t.state == TrialState.RUNNING]
    time.sleep(4)  # past the grace period: the other machine cannot see the pid, only the silence
    survivor = subprocess.run([sys.executable, "-m", "autoprune.cli", "search", *args], cwd=REPO,
                              env={**os.environ, **env, "AUTOPRUNE_WORKER_HOST": "machine-b"},
                              capture_output=True, text=True, timeout=600)
    assert survivor.returncode == 0, survivor.stderr
    study = _study("pg-heartbeat", postgres_url)
    states = {t.number: t.state for t in study.get_trials(deepcopy=False)}
    assert dead and states[dead[0]] == TrialState.FAIL
    complete = completed_trials(study)
    assert len(complete) == 6
    assert any(t.system_attrs.get("failed_trial") == dead[0] for t in complete)


def test_a_worker_killed_before_its_first_heartbeat_does_not_hold_a_slot(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOPRUNE_HEARTBEAT_INTERVAL", "1")
    monkeypatch.setenv("AUTOPRUNE_HEARTBEAT_GRACE", "1")
    storage = open_storage(f"sqlite:///{tmp_path / 'optuna.db'}", heartbeat=True)
    study = optuna.create_study(study_name="silent", storage=storage, direction="maximize")
    # What a worker leaves when killed right after creating its trial: RUNNING, no heartbeat, no name.
    orphan = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    slots = TrialSlots(study, n_trials=2)
    named = slots.ask(distributions={"x": optuna.distributions.FloatDistribution(0, 1)})
    assert ATTR_WORKER in study.trials[named.number].user_attrs and slots.remaining() == 0
    fail_stale_trials(study)  # within the grace period: nothing happens
    assert study.trials[orphan.number].state == TrialState.RUNNING
    time.sleep(1.5)
    study.tell(named, 0.5)
    fail_stale_trials(study)
    states = {t.number: t.state for t in study.trials}
    assert states[orphan.number] == TrialState.FAIL and states[named.number] == TrialState.COMPLETE
    retried = [t for t in study.trials if t.state == TrialState.WAITING]
    assert [t.system_attrs.get("failed_trial") for t in retried] == [orphan.number]
    assert slots.remaining() == 1
