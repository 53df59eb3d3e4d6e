"""What `pip install .` ships: a wheel that works away from the repository (#16)."""

import subprocess
import sys
import zipfile

from conftest import REPO


def test_the_wheel_ships_search_spaces_and_checkpoints_and_runs_outside_the_repository(tmp_path):
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
