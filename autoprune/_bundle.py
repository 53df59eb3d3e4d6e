"""An export's output directory: refused before any work when it cannot be written, and built
beside its final place then renamed there whole, so a killed export never leaves half an --out."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ._workdir import pid_alive
from .errors import ConfigError

__all__ = ["check_out_dir", "built_whole"]


def check_out_dir(out_dir: Path) -> None:
    """Refuse, before any fine-tuning, an --out that exists or cannot be created; clear what a
    killed export of the same --out left behind."""
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ConfigError(f"--out {out_dir} already exists and is not empty; choose a new directory.")
    parent = next((p for p in out_dir.parents if p.exists()), None)
    if parent is None or not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {out_dir} cannot be created: {parent or out_dir.anchor} is not a writable "
                          "directory. Choose an --out under a directory you can write.")
    if out_dir.parent.is_dir():
        prefix = _partial_prefix(out_dir)
        for leftover in out_dir.parent.glob(f"{prefix}*"):
            pid = leftover.name[len(prefix):].split("-", 1)[0]
            if leftover.is_dir() and pid.isdigit() and not pid_alive(int(pid)):
                shutil.rmtree(leftover, ignore_errors=True)


@contextmanager
def built_whole(out_dir: Path) -> Iterator[Path]:
    """Yield a new directory beside ``out_dir`` to write into; renamed to ``out_dir`` when the block
    ends, removed when it raises."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_partial_prefix(out_dir)}{os.getpid()}-", dir=out_dir.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the export is as shareable as any file
    try:
        yield tmp
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _partial_prefix(out_dir: Path) -> str:
    # The export is built beside --out under this name plus the builder's pid, then renamed.
    return f".{out_dir.name}.partial-"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
