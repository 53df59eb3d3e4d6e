"""Run a command that must not outlive the process that started it.

``python -m autoprune._watchdog PARENT_PID -- COMMAND...`` starts COMMAND in this process's
process group and ends the whole group when PARENT_PID goes away, even by SIGKILL, which leaves
the parent no chance to clean up: `autoprune ui` runs the MLflow server through it so that a
killed `ui` never leaves a server (and its workers) holding the port. SIGTERM or SIGINT to the
watchdog ends the group the same way. Exits with COMMAND's status.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

_POLL_SECONDS = 0.5
_GRACE_SECONDS = 10.0


def _end_group(child: subprocess.Popen) -> None:
    group = os.getpgid(0)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the group signal below reaches this process too
    try:
        os.killpg(group, signal.SIGTERM)
        child.wait(timeout=_GRACE_SECONDS)
    except (subprocess.TimeoutExpired, ProcessLookupError):
        pass
    finally:
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--" or not argv[0].isdigit():
        print("usage: python -m autoprune._watchdog PARENT_PID -- COMMAND...", file=sys.stderr)
        return 2
    parent = int(argv[0])
    child = subprocess.Popen(argv[2:])
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while child.poll() is None:
        if stopping or os.getppid() != parent:
            _end_group(child)
            return 130 if stopping else 1
        time.sleep(_POLL_SECONDS)
    return child.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
