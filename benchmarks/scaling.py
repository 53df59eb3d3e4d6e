"""Trials per minute with 1 and 2 worker processes sharing one study.

Runs the same search (default: fashionmnist-resnet20 at flops 0.5, 24 trials) with --workers 1
(2 torch threads) and --workers 2 (1 thread each) on this machine's SQLite storage, and, when a
PostgreSQL URL is given, with 2 separate `autoprune search` processes on it (as on two machines).
Writes benchmarks/results/scaling.json and .md.

    python benchmarks/scaling.py [--task fashionmnist-resnet20] [--trials 24] [--postgres URL]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna

sys.path.insert(0, str(Path(__file__).parent))
import autoprune as ap  # noqa: E402
from _machine import machine_info, write_results  # noqa: E402
from autoprune.study import completed_trials  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def _rate(study: optuna.Study) -> tuple[float, int]:
    trials = completed_trials(study)
    start = min(t.datetime_start for t in trials)
    end = max(t.datetime_complete for t in trials)
    return 60.0 * len(trials) / (end - start).total_seconds(), len(trials)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="fashionmnist-resnet20")
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--postgres", default=None, help="postgresql+psycopg://... to also time 2 processes on it")
    args = parser.parse_args()
    space = REPO / "search_spaces" / f"{args.task}.yaml"
    workdir = Path(tempfile.mkdtemp(prefix="autoprune-scaling-"))
    rows = []
    for workers in (1, 2):
        study = f"scaling-w{workers}"
        wall = time.perf_counter()
        result = ap.search(space, n_trials=args.trials, workers=workers, study=study, workdir=workdir, show_progress=False)
        wall = time.perf_counter() - wall
        per_minute, n = _rate(optuna.load_study(study_name=study, storage=result.storage_url))
        rows.append({"setup": f"{workers} worker process(es), sqlite", "workers": workers, "threads_per_worker": 2 // workers,
                     "trials": n, "trials_per_minute": per_minute, "wall_seconds_with_startup": wall})
        print(rows[-1], flush=True)
    if args.postgres:
        cmd = [sys.executable, "-m", "autoprune.cli", "search", "--space", str(space), "--trials", str(args.trials),
               "--study", "scaling-pg", "--storage", args.postgres, "--workdir", str(workdir), "--threads", "1"]
        wall = time.perf_counter()
        procs = [subprocess.Popen(cmd, env={**os.environ, "AUTOPRUNE_WORKER_HOST": f"m{i}"}, stdout=subprocess.DEVNULL)
                 for i in range(2)]
        for p in procs:
            p.wait()
        wall = time.perf_counter() - wall
        per_minute, n = _rate(optuna.load_study(study_name="scaling-pg", storage=args.postgres))
        rows.append({"setup": "2 separate processes, PostgreSQL", "workers": 2, "threads_per_worker": 1, "trials": n,
                     "trials_per_minute": per_minute, "wall_seconds_with_startup": wall})
        print(rows[-1], flush=True)
    payload = {"benchmark": "scaling", "task": args.task, "machine": machine_info(), "results": rows}
    lines = ["| setup | threads/worker | trials | trials/min | wall s (incl. start-up) |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['setup']} | {r['threads_per_worker']} | {r['trials']} | {r['trials_per_minute']:.1f} | "
              f"{r['wall_seconds_with_startup']:.0f} |" for r in rows]
    write_results("scaling", payload, f"{args.task}, {payload['machine']['cores']} cores:\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
