"""Candidate evaluations per minute (prune + BN recalibration + validation scoring).

Writes benchmarks/results/eval_throughput.json and .md. Targets on 2 CPU cores: digits-cnn
>= 300/min; fashionmnist-resnet20 with 16x64 calibration images and 2000 validation images
>= 12/min; cifar10-resnet56 with the same settings 100 candidates in under 15 minutes (#12).
Weights do not change the cost, so tasks without a trained checkpoint use random ones; CIFAR-10
tasks need the data under AUTOPRUNE_DATA and are skipped without it.

    python benchmarks/eval_throughput.py [--candidates 30] [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
import autoprune as ap  # noqa: E402
from _machine import machine_info, write_results  # noqa: E402

TARGETS = {"digits-cnn": 300.0, "fashionmnist-resnet20": 12.0, "cifar10-resnet20": None, "cifar10-resnet56": 100 / 15}


def _task(name: str, workdir: str | None) -> ap.Task | None:
    try:
        return ap.load_task(name, workdir=workdir)
    except ap.DataNotFoundError:
        return None
    except ap.TaskError:
        return ap.load_task(name, workdir=workdir, pretrained=False)


def measure(name: str, candidates: int, workdir: str | None) -> dict[str, object] | None:
    task = _task(name, workdir)
    if task is None:
        return None
    start = time.perf_counter()
    evaluator = ap.Evaluator(task, calibration_batches=16, calibration_batch_size=64, val_samples=2000)
    setup = time.perf_counter() - start
    rng = np.random.default_rng(0)
    budget = ap.Budget(flops=0.5)
    plans = [
        ap.project(evaluator.profile, {g.name: float(rng.uniform(0, 0.8)) for g in evaluator.profile.groups}, budget)
        for _ in range(candidates)
    ]
    evaluator.evaluate(plans[0])  # warm-up (allocator, thread pool)
    start = time.perf_counter()
    for plan in plans:
        evaluator.evaluate(plan)
    elapsed = time.perf_counter() - start
    per_minute = 60.0 * candidates / elapsed
    target = TARGETS.get(name)
    return {
        "task": name, "candidates": candidates, "seconds_per_candidate": elapsed / candidates,
        "evaluations_per_minute": per_minute, "target_per_minute": target,
        "meets_target": None if target is None else per_minute >= target,
        "setup_seconds": setup, "calibration_images": 16 * 64, "val_samples": evaluator.val_samples,
        "groups": len(evaluator.profile.groups), "dense_macs": evaluator.profile.macs, "budget": "flops=0.5",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [r for r in (measure(n, args.candidates, args.workdir) for n in TARGETS) if r is not None]
    payload = {"benchmark": "eval_throughput", "machine": machine_info(), "results": rows}
    lines = [
        "| task | evaluations/min | target | s/candidate | 100 candidates, min | calibration imgs | val samples |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        target = r["target_per_minute"]
        lines.append(
            f"| {r['task']} | {r['evaluations_per_minute']:.0f} | {f'{target:.1f}' if target else '-'} | "
            f"{r['seconds_per_candidate']:.3f} | {100 * r['seconds_per_candidate'] / 60:.1f} | "
            f"{r['calibration_images']} | {r['val_samples']} |"
        )
    write_results("eval_throughput", payload, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
