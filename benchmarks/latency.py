"""Measured speedup against MACs reduction, for uniform and searched plans.

For digits-cnn, fashionmnist-resnet20 and the CIFAR models (random weights where no checkpoint
or data exists: latency does not depend on the weights) at MACs budgets 0.75, 0.5 and 0.25:
the dense and pruned latency (median of repeated runs, fixed batch size and threads), the MACs
reduction and the measured speedup, for the uniform plan, the global-ranking plan and (where the
task has trained weights and data) the best plan of a short TPE search. Also the latency
predictor's error on those plans. Writes benchmarks/results/latency.json and latency.md.
Target: at MACs 0.5, speedup >= 0.8x the MACs reduction (2x fewer MACs -> >= 1.6x faster).

    python benchmarks/latency.py [--batch-size 32] [--threads 1] [--search-trials 30]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import autoprune as ap  # noqa: E402
from _machine import machine_info  # noqa: E402
from autoprune import pruning  # noqa: E402
from autoprune.latency import LatencySettings, build_predictor, measure_many  # noqa: E402
from autoprune.task import dense_model  # noqa: E402

RESULTS = Path(__file__).parent / "results"
TASKS = ["digits-cnn", "fashionmnist-resnet20", "cifar10-resnet20", "cifar10-resnet56", "cifar10-plain20",
         "cifar10-vgg16", "cifar10-mobilenetv2"]
SEARCHABLE = {"digits-cnn", "fashionmnist-resnet20"}
BUDGETS = (0.75, 0.5, 0.25)


def _model(name: str, workdir: Path) -> tuple[torch.nn.Module, torch.Tensor, bool]:
    try:
        model, x = dense_model(name, workdir=workdir, pretrained=True)
        return model, x, True
    except ap.AutopruneError:
        model, x = dense_model(name, pretrained=False)
        return model, x, False


def _searched_plan(name: str, budget: float, trials: int, workdir: Path) -> ap.Plan | None:
    if name not in SEARCHABLE or trials <= 0:
        return None
    try:
        result = ap.search("search_spaces/default.yaml" if name == "digits-cnn" else f"search_spaces/{name}.yaml",
                           budget=f"flops={budget}", n_trials=trials, study=f"latency-bench-{name}-{budget}",
                           workdir=workdir, show_progress=False)
    except ap.AutopruneError as exc:
        print(f"  no search for {name}: {exc}")
        return None
    return result.best_plan


def run(args: argparse.Namespace) -> dict:
    settings = LatencySettings(batch_size=args.batch_size, threads=args.threads, repeats=args.repeats, warmup=3)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="autoprune-latency-bench-"))
    rows = []
    for name in TASKS:
        start = time.perf_counter()
        model, x, trained = _model(name, workdir)
        profile = ap.profile_model(model, x)
        scores = pruning.channel_scores(model, x, pruning.L1Importance())
        plans: list[tuple[str, float, ap.Plan]] = []
        for b in BUDGETS:
            budget = ap.Budget(flops=b)
            plans.append(("uniform", b, ap.uniform_plan(profile, budget)))
            plans.append(("global", b, ap.global_plan(profile, budget, scores)))
            searched = _searched_plan(name, b, args.search_trials, workdir) if trained else None
            if searched is not None:
                plans.append(("tpe", b, searched))
        predictor = build_predictor(model, x, profile, settings, cache_dir=workdir / "latency",
                                    check_plans=[p.kept for _, _, p in plans])
        pruned_models = [pruning.prune_copy(model, x, plan.kept) for _, _, plan in plans]
        dense, *measurements = measure_many([model, *pruned_models], x, settings, rounds=args.rounds)
        for (kind, b, plan), pruned, measured, predicted, checked_ms in zip(
                plans, pruned_models, measurements, predictor.check.predicted_ms, predictor.check.measured_ms):
            macs, _ = ap.count_macs_params(pruned, x)
            reduction = profile.macs / macs
            speedup = dense.median_ms / measured.median_ms
            rows.append({
                "task": name, "weights": "trained" if trained else "random", "plan": kind, "budget": b,
                "macs_ratio": macs / profile.macs, "macs_reduction": reduction,
                "dense_ms": dense.median_ms, "dense_spread_ms": dense.spread_ms,
                "pruned_ms": measured.median_ms, "pruned_spread_ms": measured.spread_ms,
                "speedup": speedup, "speedup_over_macs_reduction": speedup / reduction,
                "predicted_ms": predicted, "predictor_error": abs(predicted - checked_ms) / checked_ms,
            })
            print(f"{name:22s} {kind:7s} flops={b:<5} MACs x{reduction:5.2f}  speedup x{speedup:5.2f}  "
                  f"({speedup / reduction:.2f} of MACs)  predictor error {rows[-1]['predictor_error']:.1%}")
        print(f"  {name}: {time.perf_counter() - start:.0f} s")
    at_half = [r for r in rows if r["budget"] == 0.5]
    summary = {
        "target": "speedup >= 0.8 x MACs reduction at flops=0.5",
        "met": {f"{r['task']}/{r['plan']}": r["speedup_over_macs_reduction"] >= 0.8 for r in at_half},
        "predictor_median_error": sorted(r["predictor_error"] for r in rows)[len(rows) // 2],
    }
    return {"benchmark": "latency", "machine": machine_info(), "settings": settings.to_dict(),
            "results": rows, "summary": summary}


def markdown(payload: dict) -> str:
    s = payload["settings"]
    lines = [
        f"Latency on {payload['machine']['cpu']} ({s['device']}, batch {s['batch_size']}, {s['threads']} thread(s), "
        f"median of {s['repeats']} runs per model, dense and pruned models timed round-robin so that the "
        "machine's speed drift cancels).",
        "",
        "| task | weights | plan | MACs budget | MACs reduction | dense ms | pruned ms | speedup | speedup / MACs reduction | predictor error |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in payload["results"]:
        lines.append(
            f"| {r['task']} | {r['weights']} | {r['plan']} | {r['budget']} | {r['macs_reduction']:.2f}x | "
            f"{r['dense_ms']:.2f} | {r['pruned_ms']:.2f} | {r['speedup']:.2f}x | {r['speedup_over_macs_reduction']:.2f} | "
            f"{r['predictor_error']:.1%} |"
        )
    lines += ["", f"Predictor median absolute error: {payload['summary']['predictor_median_error']:.1%}.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=5, help="round-robin rounds over dense and pruned models")
    parser.add_argument("--search-trials", type=int, default=30)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    payload = run(args)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "latency.json").write_text(json.dumps(payload, indent=2) + "\n")
    (RESULTS / "latency.md").write_text(markdown(payload))
    print(markdown(payload))


if __name__ == "__main__":
    main()
