"""Resumed and parallel searches never repeat a candidate, study names stay in the workdir,
credentials never reach the screen or the stores, and no child process outlives its parent."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import pytest
import yaml
from conftest import REPO, run_cli
from optuna.trial import TrialState

import autoprune as ap
from autoprune.cli import run
from autoprune.study import ATTR_BASELINE, ATTR_WORKER, completed_trials, open_storage

SPACE = REPO / "search_spaces" / "default.yaml"


def _study(result: ap.SearchResult) -> optuna.Study:
    return optuna.load_study(study_name=result.study_name, storage=result.storage_url)


def _candidates(study: optuna.Study) -> list[tuple[float, ...]]:
    return [tuple(sorted(t.params.items())) for t in completed_trials(study)]


@pytest.mark.parametrize("strategy", ["optuna", "random"])
def test_a_resumed_search_proposes_no_candidate_twice(workdir, strategy):
    first = ap.search(SPACE, strategy=strategy, n_trials=4, study="resumed", workdir=workdir, show_progress=False)
    resumed = ap.search(SPACE, strategy=strategy, n_trials=12, study="resumed", workdir=workdir, show_progress=False)
    candidates = _candidates(_study(resumed))
    assert first.n_finished == 4 and len(candidates) == 12
    # The sampler used to be rebuilt with the same seed on every run, replaying its stream.
    assert len(set(candidates)) == 12


def test_an_uninterrupted_search_is_fixed_by_its_seed(workdir, tmp_path):
    plans = []
    for name in ("a", "b"):
        result = ap.search(SPACE, strategy="random", n_trials=5, seed=3, study=name, workdir=workdir,
                           show_progress=False)
        plans.append([t.params for t in completed_trials(_study(result))])
    assert plans[0] == plans[1]
    other = ap.search(SPACE, strategy="random", n_trials=5, seed=4, study="c", workdir=workdir, show_progress=False)
    assert [t.params for t in completed_trials(_study(other))] != plans[0]


def test_two_workers_evaluate_every_candidate_and_each_baseline_once(workdir):
    slow = ap.load_space(SPACE).with_overrides(**{"evaluation.finetune_steps": 30})
    result = ap.search(slow, n_trials=10, workers=2, workdir=workdir, show_progress=False)
    study = _study(result)
    candidates = _candidates(study)
    assert len(candidates) == 10 and len(set(candidates)) == 10
    labels = [t.user_attrs.get(ATTR_BASELINE) for t in study.get_trials(deepcopy=False)]
    assert labels.count("uniform") == 1 and labels.count("global") == 1


def test_one_trial_leaves_no_baseline_waiting(workdir):
    result = ap.search(SPACE, n_trials=1, study="one", workdir=workdir, show_progress=False)
    states = [t.state for t in _study(result).get_trials(deepcopy=False)]
    assert states == [TrialState.COMPLETE]
    # Asked for more later, the search still runs the baseline it had no room for.
    again = ap.search(SPACE, n_trials=4, study="one", workdir=workdir, show_progress=False)
    labels = [t.user_attrs.get(ATTR_BASELINE) for t in completed_trials(_study(again))]
    assert labels[:2] == ["uniform", "global"] and len(labels) == 4
    assert not _study(again).get_trials(deepcopy=False, states=(TrialState.WAITING,))


def test_a_resume_waits_for_a_dead_remote_trial_instead_of_ending_short(workdir, monkeypatch):
    monkeypatch.setenv("AUTOPRUNE_HEARTBEAT_INTERVAL", "1")
    monkeypatch.setenv("AUTOPRUNE_HEARTBEAT_GRACE", "3")
    result = ap.search(SPACE, n_trials=3, study="remote", workdir=workdir, show_progress=False)
    storage = open_storage(result.storage_url, heartbeat=True)
    study = optuna.load_study(study_name="remote", storage=storage)
    # What a worker on another machine leaves when it dies mid-trial: RUNNING, a fresh heartbeat.
    dead = study.ask({"conv1": optuna.distributions.FloatDistribution(0.0, 0.8)})
    storage.record_heartbeat(dead._trial_id)
    dead.set_user_attr(ATTR_WORKER, "another-machine:4242")
    resumed = ap.search(SPACE, n_trials=4, study="remote", workdir=workdir, show_progress=False)
    assert resumed.n_finished == 4  # not 3, as when the dead trial's slot counted as taken
    states = {t.number: t.state for t in _study(resumed).get_trials(deepcopy=False)}
    assert states[dead.number] == TrialState.FAIL


def test_two_searches_started_together_on_a_fresh_workdir_both_succeed(tmp_path):
    home = tmp_path / "fresh"
    import shutil

    shutil.copytree(Path(os.environ["AUTOPRUNE_HOME"]) / "checkpoints", home / "checkpoints")
    procs = [subprocess.Popen([sys.executable, "-m", "autoprune.cli", "search", "--trials", "3", "--study", f"s{i}",
                               "--workdir", str(home), "--threads", "1"], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[-2000:] for o in outputs]


@pytest.mark.parametrize("name", ["../../escaped", "/tmp/absolute", "it's", "a/b", ".hidden", ""])
def test_study_names_that_would_leave_the_workdir_are_refused(capsys, workdir, tmp_path, name):
    code = run(["search", "--study", name, "--trials", "1", "--workdir", str(workdir)])
    out = "".join(capsys.readouterr())
    assert code == 2 and "not a valid study name" in out and "letters, digits" in out and "Traceback" not in out
    assert not (workdir / "optuna.db").exists() and not (tmp_path / "escaped").exists()


def test_passwords_are_masked_in_messages(capsys, workdir):
    code = run(["search", "--trials", "1", "--workdir", str(workdir),
                "--storage", "postgresql+psycopg://someone:PASSWORD123@127.0.0.1:9/db"])
    out = "".join(capsys.readouterr())
    assert code == 2 and "someone:***@127.0.0.1" in out and "PASSWORD123" not in out
    code = run(["search", "--trials", "1", "--workdir", str(workdir), "--tracking-uri", "http://me:SECRET9@127.0.0.1:9"])
    out = "".join(capsys.readouterr())
    assert code == 2 and "me:***@127.0.0.1" in out and "SECRET9" not in out


@pytest.mark.slow
def test_passwords_never_reach_the_output_or_the_study(workdir, postgres_url):
    # The test server trusts loopback connections, so any password is accepted and must be hidden.
    url = postgres_url.replace("autoprune@", "autoprune:HUNTER2@")
    done = run_cli("search", "--trials", "2", "--study", "secretive", "--storage", url, "--workdir", str(workdir))
    assert done.returncode == 0, done.stderr
    assert "HUNTER2" not in done.stdout + done.stderr and "autoprune:***@" in done.stdout
    study = optuna.load_study(study_name="secretive", storage=postgres_url)
    assert "HUNTER2" not in json.dumps(study.user_attrs)


def _children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _gone(pids: list[int], timeout: float) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        alive = [p for p in pids if Path(f"/proc/{p}").exists()
                 and " Z " not in Path(f"/proc/{p}/stat").read_text(errors="replace")[:200]]
        if not alive:
            return True
        time.sleep(0.5)
    return False


def test_workers_die_with_a_killed_coordinator(workdir, tmp_path):
    data = yaml.safe_load(SPACE.read_text())
    data["evaluation"]["finetune_steps"] = 40
    space = tmp_path / "slow.yaml"
    space.write_text(yaml.safe_dump(data))
    proc = subprocess.Popen([sys.executable, "-m", "autoprune.cli", "search", "--space", str(space), "--trials", "200",
                             "--workers", "2", "--workdir", str(workdir)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 180
        workers: list[int] = []
        while time.time() < deadline and len(workers) < 2:
            workers = [p for p in _children_of(proc.pid)
                       if "multiprocessing" in Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace")
                       and "resource_tracker" not in Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace")]
            time.sleep(0.5)
        assert len(workers) == 2
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        assert _gone(workers, timeout=20), "worker processes outlived their killed coordinator"
    finally:
        for p in _children_of(proc.pid):
            os.kill(p, signal.SIGKILL)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_mlflow_server_dies_with_a_killed_ui(workdir):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "autoprune.cli", "ui", "--workdir", str(workdir), "--port", str(port),
                             "--tracking-uri", f"sqlite:///{workdir / 'mlflow.db'}"],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline, status = time.time() + 120, None
        while time.time() < deadline and status != 200:
            try:
                status = urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status
            except OSError:
                time.sleep(1)
        assert status == 200
        watchdog = _children_of(proc.pid)
        group = os.getpgid(watchdog[0])
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        members = [int(e.name) for e in Path("/proc").iterdir() if e.name.isdigit() and _pgid(int(e.name)) == group]
        assert _gone(members + watchdog, timeout=30), "the MLflow server outlived the killed `autoprune ui`"
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
    finally:
        proc.kill()


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def test_ui_on_a_busy_port_fails(capsys, workdir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = run(["ui", "--workdir", str(workdir), "--port", str(port),
                    "--tracking-uri", f"sqlite:///{workdir / 'mlflow.db'}"])
    out = "".join(capsys.readouterr())
    assert code == 2 and f"--port {port}" in out and "Traceback" not in out


def test_ui_where_nothing_was_searched_says_so_and_creates_nothing(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("AUTOPRUNE_HOME", raising=False)
    code = run(["ui", "--port", str(_free_port())])
    err = capsys.readouterr().err
    assert code == 2 and "No searches tracked in" in err and "--workdir" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # no empty ./autoprune-runs left behind
