"""Shared fixtures: real tasks on small models, one trained digits model per test session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# 2 cores on the machines CI runs on. Beside a long job on one core (a CIFAR training), run the
# tests on the other with AUTOPRUNE_TEST_THREADS=1: two threads on one free core spin at every
# barrier and run ten times slower.
torch.set_num_threads(int(os.environ.get("AUTOPRUNE_TEST_THREADS", "2")))
sys.path.insert(0, str(Path(__file__).parent))  # user-task modules for `package.module:function` tests

REPO = Path(__file__).resolve().parent.parent


def _fashion_mnist_missing() -> bool:
    from autoprune.data import DataNotFoundError, _fashion_dir

    try:
        _fashion_dir(None)
    except DataNotFoundError:
        return True
    return False


#: For tests that read Fashion-MNIST: skipped with the way to get it when it is absent.
needs_fashion_mnist = pytest.mark.skipif(
    _fashion_mnist_missing(),
    reason="Fashion-MNIST is not installed: apt-get install dataset-fashion-mnist (Debian), or put its "
           "four IDX files under AUTOPRUNE_DATA",
)


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


#: The bytes of the empty MLflow store (set by the mlflow_template fixture).
_EMPTY_STORE: dict[str, bytes] = {}


@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty MLflow SQLite store, created once per session.

    Creating a store runs MLflow's schema migrations, 2-3 s on these machines; every test that
    searches in a fresh workdir would pay that again (minutes over the suite). A copy of a migrated
    empty store is the same store MLflow would have created.
    """
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    _EMPTY_STORE["bytes"] = path.read_bytes()
    return path


@pytest.fixture
def workdir(tmp_path: Path, session_workdir: Path, digits_task, mlflow_template: Path) -> Path:
    """A fresh workdir that already holds the trained digits checkpoint and an empty MLflow store."""
    import shutil

    home = tmp_path / "home"
    shutil.copytree(session_workdir / "checkpoints", home / "checkpoints")
    shutil.copyfile(mlflow_template, home / "mlflow.db")
    return home


def nothing_written(workdir: Path) -> bool:
    """No study and no tracked run in ``workdir``: no optuna.db, and mlflow.db absent or still the
    empty store the ``workdir`` fixture put there (byte for byte)."""
    store = workdir / "mlflow.db"
    untouched = not store.exists() or store.read_bytes() == _EMPTY_STORE.get("bytes")
    return untouched and not (workdir / "optuna.db").exists()


def mlflow_runs(workdir: Path, experiment: str = "digits-cnn"):
    """(parent runs, child runs) of an experiment in the workdir's MLflow SQLite store."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=5000)
    parents = [r for r in runs if r.data.tags.get("autoprune.kind") == "search"]
    children = [r for r in runs if r.data.tags.get("autoprune.kind") == "trial"]
    return client, parents, children


def _pg_binaries() -> Path | None:
    import glob
    import shutil as _shutil

    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if Path(candidate, "initdb").exists():
            return Path(candidate)
    found = _shutil.which("initdb")
    return Path(found).parent if found else None


@pytest.fixture(scope="session")
def postgres_url(tmp_path_factory: pytest.TempPathFactory):
    """A real PostgreSQL server on loopback for the session (installed by .ci/run when missing)."""
    import socket
    import time as _time

    bindir = _pg_binaries()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries are not installed (.ci/run installs Debian's postgresql)")
    import shutil as _shutil
    import tempfile

    # Not under pytest's tmp dir: as root that is private, and the server runs as user postgres.
    data = Path(tempfile.mkdtemp(prefix="autoprune-pgdata-"))
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        subprocess.run(["chown", "-R", "postgres:postgres", str(data)], check=True)
        as_user = ["runuser", "-u", "postgres", "--"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    subprocess.run([*as_user, str(bindir / "initdb"), "-D", str(data), "-U", "autoprune", "--auth=trust", "-E", "UTF8"],
                   check=True, capture_output=True)
    subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-l", str(data / "log"), "-w", "-o",
                    f"-p {port} -k {data} -c listen_addresses=127.0.0.1 -c max_connections=200", "start"],
                   check=True, capture_output=True)
    try:
        deadline = _time.time() + 30
        while _time.time() < deadline:
            done = subprocess.run([str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "autoprune",
                                   "autoprune"], capture_output=True)
            if done.returncode == 0:
                break
            _time.sleep(0.5)
        yield f"postgresql+psycopg://autoprune@127.0.0.1:{port}/autoprune"
    finally:
        subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"], capture_output=True)
        _shutil.rmtree(data, ignore_errors=True)


@pytest.fixture
def mlflow_server(tmp_path: Path):
    """A real MLflow tracking server on loopback, with its own SQLite backend."""
    import signal
    import socket
    import time as _time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "server-artifacts")],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = _time.time() + 90
        while _time.time() < deadline:
            try:
                if urllib.request.urlopen(url + "/health", timeout=2).status == 200:
                    break
            except OSError:
                _time.sleep(0.5)
        else:
            pytest.fail("mlflow server did not start")
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
