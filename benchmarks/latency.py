"""Measured speedup against MACs reduction, for uniform and searched plans.

For digits-cnn, fashionmnist-resnet20 and the CIFAR models (random weights where no checkpoint
or data exists: latency does not depend on the weights) at MACs budgets 0.75, 0.5 and 0.25:
the dense and pruned latency (median of repeated runs, fixed batch size and threads), the MACs
reduction and the measured speedup, for the uniform plan, the global-ranking plan and (where the
task has trained weights and data) the best plan of a short TPE search; each with channel counts
free (round_to 1) and rounded to the CPU's vector width (round_to = simd_round_to(), 16 on
AVX-512). Timed in PyTorch eager mode and, as deployed, under ONNX Runtime. Also the latency
predictor's error on those plans. Writes benchmarks/results/latency.json and latency.md.
Target: at MACs 0.5, speedup >= 0.8x the MACs reduction (2x fewer MACs -> >= 1.6x faster).

    python benchmarks/latency.py [--batch-size 32] [--threads 1] [--search-trials 30] [--round-to 1 16]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import autoprune as ap  # noqa: E402
from _machine import machine_info, write_results  # noqa: E402
from autoprune import pruning  # noqa: E402
from autoprune.budget import reachable_range  # noqa: E402
from autoprune._onnx import measure_onnx_many, write_onnx  # noqa: E402
from autoprune.latency import LatencySettings, build_predictor, measure_many, simd_round_to  # noqa: E402
from autoprune.task import dense_model  # noqa: E402

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


def _searched_plan(name: str, budget: float, round_to: int, trials: int, workdir: Path) -> ap.Plan | None:
    if name not in SEARCHABLE or trials <= 0:
        return None
    path = "search_spaces/default.yaml" if name == "digits-cnn" else f"search_spaces/{name}.yaml"
    space = ap.load_space(path).with_overrides(**{"groups.round_to": round_to})
    try:
        result = ap.search(space, budget=f"flops={budget}", n_trials=trials,
                           study=f"latency-bench-{name}-{budget}-r{round_to}", workdir=workdir, show_progress=False)
    except ap.AutopruneError as exc:
        print(f"  no search for {name}: {exc}")
        return None
    return result.best_plan


def _onnx_latency(models: list[torch.nn.Module], x: torch.Tensor, settings: LatencySettings, rounds: int,
                  folder: Path) -> list[float | None]:
    """Median ms of each model under ONNX Runtime (None where it could not be exported)."""
    paths: list[Path | None] = []
    for i, model in enumerate(models):
        path = folder / f"m{i}.onnx"
        try:
            write_onnx(model, torch.randn(2, *x.shape[1:]), path)
            paths.append(path)
        except Exception as exc:  # report, do not hide: the row shows no ONNX number
            print(f"  ONNX export failed: {type(exc).__name__}: {exc}")
            paths.append(None)
    timed = iter(m.median_ms for m in measure_onnx_many([p for p in paths if p], x, settings, rounds=rounds))
    return [next(timed) if p else None for p in paths]


def run(args: argparse.Namespace) -> dict:
    settings = LatencySettings(batch_size=args.batch_size, threads=args.threads, repeats=args.repeats, warmup=3)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="autoprune-latency-bench-"))
    round_tos = args.round_to or sorted({1, simd_round_to(settings.device)})
    rows, unreachable = [], []
    for name in args.tasks:
        start = time.perf_counter()
        model, x, trained = _model(name, workdir)
        profile = ap.profile_model(model, x)
        scores = pruning.channel_scores(model, x, pruning.L1Importance())
        plans: list[tuple[str, float, int, ap.Plan]] = []
        for b in BUDGETS:
            budget = ap.Budget(flops=b)
            for rt in round_tos:
                low, _ = reachable_range(profile, "flops", round_to=rt)
                if b < low:  # coarse channel steps cannot cut this far
                    unreachable.append({"task": name, "budget": b, "round_to": rt, "lowest_flops": low})
                    print(f"{name:22s} flops={b:<5} round_to={rt:<2} unreachable (lowest {low:.3f})", flush=True)
                    continue
                plans.append(("uniform", b, rt, ap.uniform_plan(profile, budget, round_to=rt)))
                plans.append(("global", b, rt, ap.global_plan(profile, budget, scores, round_to=rt)))
                searched = _searched_plan(name, b, rt, args.search_trials, workdir) if trained else None
                if searched is not None:
                    plans.append(("tpe", b, rt, searched))
        predictor = build_predictor(model, x, profile, settings, cache_dir=workdir / "latency",
                                    check_plans=[p.kept for *_, p in plans])
        pruned_models = [pruning.prune_copy(model, x, plan.kept) for *_, plan in plans]
        dense, *measurements = measure_many([model, *pruned_models], x, settings, rounds=args.rounds)
        folder = Path(tempfile.mkdtemp(prefix="onnx-", dir=workdir))
        ort_dense, *ort_pruned = _onnx_latency([model, *pruned_models], x, settings, args.rounds, folder)
        for (kind, b, rt, plan), pruned, measured, ort_ms, predicted, checked_ms in zip(
                plans, pruned_models, measurements, ort_pruned, predictor.check.predicted_ms, predictor.check.measured_ms):
            macs, _ = ap.count_macs_params(pruned, x)
            reduction = profile.macs / macs
            speedup = dense.median_ms / measured.median_ms
            ort_speedup = ort_dense / ort_ms if ort_dense and ort_ms else None
            rows.append({
                "task": name, "weights": "trained" if trained else "random", "plan": kind, "budget": b, "round_to": rt,
                "macs_ratio": macs / profile.macs, "macs_reduction": reduction,
                "dense_ms": dense.median_ms, "dense_spread_ms": dense.spread_ms,
                "pruned_ms": measured.median_ms, "pruned_spread_ms": measured.spread_ms,
                "speedup": speedup, "speedup_over_macs_reduction": speedup / reduction,
                "onnxruntime_dense_ms": ort_dense, "onnxruntime_pruned_ms": ort_ms,
                "onnxruntime_speedup": ort_speedup,
                "onnxruntime_speedup_over_macs_reduction": ort_speedup / reduction if ort_speedup else None,
                "predicted_ms": predicted, "predictor_error": abs(predicted - checked_ms) / checked_ms,
            })
            ort_text = f"ORT x{ort_speedup:5.2f} ({ort_speedup / reduction:.2f})" if ort_speedup else "ORT -"
            print(f"{name:22s} {kind:7s} flops={b:<5} round_to={rt:<2} MACs x{reduction:5.2f}  speedup x{speedup:5.2f} "
                  f"({speedup / reduction:.2f} of MACs)  {ort_text}  predictor error {rows[-1]['predictor_error']:.1%}",
                  flush=True)
        print(f"  {name}: {time.perf_counter() - start:.0f} s", flush=True)
    at_half = [r for r in rows if r["budget"] == 0.5]
    summary = {
        "target": "speedup >= 0.8 x MACs reduction at flops=0.5",
        "met_pytorch": {f"{r['task']}/{r['plan']}/round_to={r['round_to']}": r["speedup_over_macs_reduction"] >= 0.8
                        for r in at_half},
        "met_onnxruntime": {f"{r['task']}/{r['plan']}/round_to={r['round_to']}":
                            (r["onnxruntime_speedup_over_macs_reduction"] or 0) >= 0.8 for r in at_half},
        "predictor_median_error": sorted(r["predictor_error"] for r in rows)[len(rows) // 2],
    }
    return {"benchmark": "latency", "date": time.strftime("%Y-%m-%d"), "machine": machine_info(),
            "settings": {**settings.to_dict(), "rounds": args.rounds, "round_to": round_tos,
                         "simd_round_to": simd_round_to(settings.device)},
            "results": rows, "unreachable": unreachable, "summary": summary}


def markdown(payload: dict) -> str:
    s = payload["settings"]
    lines = [
        f"Latency on {payload['machine']['cpu']} ({s['device']}, batch {s['batch_size']}, {s['threads']} thread(s), "
        f"median of {s['repeats']} runs per model; dense and pruned models timed round-robin so that the "
        f"machine's speed drift cancels), {payload['date']}. `round_to` {s['simd_round_to']} is this CPU's float32 "
        "vector width. \"PyTorch\" is eager mode; \"ORT\" is the exported ONNX model under ONNX Runtime (CPU).",
        "",
        "| task | weights | plan | MACs budget | round_to | MACs reduction | PyTorch dense ms | PyTorch pruned ms "
        "| PyTorch speedup / MACs reduction | ORT dense ms | ORT pruned ms | ORT speedup / MACs reduction | predictor error |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in payload["results"]:
        ort = (f"{r['onnxruntime_dense_ms']:.2f} | {r['onnxruntime_pruned_ms']:.2f} | "
               f"{r['onnxruntime_speedup_over_macs_reduction']:.2f}") if r["onnxruntime_speedup"] else "- | - | -"
        lines.append(
            f"| {r['task']} | {r['weights']} | {r['plan']} | {r['budget']} | {r['round_to']} | {r['macs_reduction']:.2f}x | "
            f"{r['dense_ms']:.2f} | {r['pruned_ms']:.2f} | {r['speedup_over_macs_reduction']:.2f} | {ort} | "
            f"{r['predictor_error']:.1%} |"
        )
    for u in payload["unreachable"]:
        lines.append(f"| {u['task']} | | (unreachable) | {u['budget']} | {u['round_to']} | lowest MACs ratio "
                     f"{u['lowest_flops']:.3f} | | | | | | | |")
    lines += ["", f"Predictor (PyTorch eager) median absolute error: {payload['summary']['predictor_median_error']:.1%}.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=5, help="round-robin rounds over dense and pruned models")
    parser.add_argument("--search-trials", type=int, default=30)
    parser.add_argument("--round-to", type=int, nargs="+", default=None,
                        help="channel multiples to compare (default: 1 and this CPU's vector width)")
    parser.add_argument("--tasks", nargs="+", default=TASKS)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    payload = run(args)
    write_results("latency", payload, markdown(payload))


if __name__ == "__main__":
    main()
