"""What `pip install .` ships: a wheel that works away from the repository (#16)."""

import shutil
import subprocess
import sys
import zipfile

from conftest import REPO


def test_the_wheel_ships_search_spaces_and_checkpoints_and_runs_outside_the_repository(tmp_path, session_workdir,
                                                                                       digits_task):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(REPO)],
                   check=True, capture_output=True, timeout=300)
    (wheel,) = wheels.glob("autoprune-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    spaces = {p.name for p in (REPO / "search_spaces").glob("*.yaml")}
    assert "default.yaml" in spaces
    assert {f"autoprune/search_spaces/{name}" for name in spaces} <= names
    assert {f"autoprune/checkpoints/{p.name}" for p in (REPO / "autoprune" / "checkpoints").glob("*.pt")} <= names

    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = "import autoprune as ap; s = ap.load_space('default'); print(ap.__file__, s.task)"
    done = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(str(target)) and done.stdout.split()[-1] == "digits-cnn"
    # `autoprune search` from an empty directory, as a user runs it after `pip install .` (the digits
    # model this session trained is put where the search caches it, to skip training it again).
    shutil.copytree(session_workdir / "checkpoints", elsewhere / "autoprune-runs" / "checkpoints")
    env = {"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    searched = subprocess.run([sys.executable, "-m", "autoprune.cli", "search", "--trials", "2"], cwd=elsewhere,
                              capture_output=True, text=True, timeout=600, env=env)
    assert searched.returncode == 0, searched.stderr[-2000:]
    assert "2 finished trials" in searched.stdout and (elsewhere / "autoprune-runs" / "mlflow.db").is_file()
