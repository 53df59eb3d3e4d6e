"""Weight sparsity (mode: sparsity, #15): per-layer allocations against uniform sparsity.

For each task and sparsity (the fraction of the prunable weights set to zero; budget
``nonzeros=1-sparsity``) a search of ``--trials`` candidate evaluations (TPE, or the
``--sampler`` named) picks a plan; the search's study also holds the uniform, global-magnitude
and LAMP plans at the same budget (its first trials). Each of the four plans is then fine-tuned
with one identical recipe, once one-shot and once gradually
(``polynomial:begin=0,end=0.75,power=3``), and scored on the test split (used for nothing else);
the compressed file of every fine-tuned model is measured against the dense file.
Every trial of every study is checked against its budget (nonzeros at or below it, within 0.5%).

Targets (#15): at sparsity 0.9, the searched plan >= global magnitude and >= LAMP after identical
fine-tuning, and >= uniform + 1 point; at 0.95, searched - uniform >= 3 points; the compressed
file at 0.9 <= 20% of the dense file's bytes.

Writes benchmarks/results/sparsity.{json,md}, with the tasks and sparsities in the name when they
are not the defaults and the sampler when it is not TPE (``--quick``: sparsity_quick.*, digits-cnn
only, two sparsities, a few trials: a check that the benchmark runs end to end, not a
measurement). Studies and finished fine-tunes are kept in the workdir (default ./autoprune-runs/sparsity-bench), so an
interrupted run resumes where it stopped. Dense checkpoints are looked up in <workdir>/checkpoints
and among those autoprune ships (fashionmnist-resnet20); cifar10-resnet20 needs CIFAR-10 under
--data-root (or AUTOPRUNE_DATA) and its trained checkpoint, ``autoprune train --task
cifar10-resnet20 --workdir <workdir>``, or that file copied there; a task without them is skipped
with the reason.

    python benchmarks/sparsity.py [--tasks fashionmnist-resnet20 cifar10-resnet20]
        [--sparsities 0.5 0.8 0.9 0.95] [--trials 100] [--sampler tpe] [--epochs 1] [--seeds 0]
        [--workdir DIR]
    python benchmarks/sparsity.py --quick
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import torch

sys.path.insert(0, str(Path(__file__).parent))
import autoprune as ap  # noqa: E402
from _machine import machine_info, write_results  # noqa: E402
from autoprune.sparsity import profile_weights, sparse_payload, sparsify_and_finetune  # noqa: E402
from autoprune.study import best_trial, stored_trials  # noqa: E402
from autoprune.train import FinetuneSchedule, score_model  # noqa: E402

BASELINES = ("uniform", "global", "lamp")
SCHEDULES = {"oneshot": "oneshot", "gradual": "polynomial:begin=0.0,end=0.75,power=3"}
FULL = {"tasks": ["fashionmnist-resnet20", "cifar10-resnet20"], "sparsities": [0.5, 0.8, 0.9, 0.95], "trials": 100}
QUICK = {"tasks": ["digits-cnn"], "sparsities": [0.5, 0.9], "trials": 8}


def _load(name: str, workdir: Path, data_root: str | None) -> ap.Task | None:
    try:
        return ap.load_task(name, workdir=workdir, data_root=data_root)
    except ap.TaskError as exc:  # no data, or (CIFAR-10) no trained checkpoint yet
        print(f"{name}: skipped ({exc})", flush=True)
        return None


def _file_bytes(payload: Any) -> int:
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.tell()


def _plans(study: optuna.Study, sampler: str) -> dict[str, ap.Plan]:
    """The four plans of a study: its baseline trials, and the best trial (which may be one of them),
    under the sampler's name."""
    plans = {t.baseline: t.plan for t in stored_trials(study) if t.baseline in BASELINES}
    best = best_trial(study)
    if best is not None:
        plans[sampler] = best.plan
    return plans


def _budget_check(study: optuna.Study, limit: float) -> dict[str, Any]:
    counts = [t.result.nonzeros for t in stored_trials(study)]
    worst_over = max((c - limit) / limit for c in counts)
    worst_under = max((limit - c) / limit for c in counts)
    return {"trials": len(counts), "all_at_or_below": worst_over <= 0, "farthest_below": worst_under,
            "within_half_percent": worst_over <= 0 and worst_under <= 0.005}


def run(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    cache_path = workdir / "sparsity_cache.json"
    cache: dict[str, dict[str, Any]] = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    rows, studies = [], []
    for name in args.tasks:
        task = _load(name, workdir, args.data_root)
        if task is None:
            continue
        profile = profile_weights(task)
        dense_state = {k: v.detach().cpu() for k, v in task.model.state_dict().items()}
        dense_bytes = _file_bytes(dense_state)
        dense_test = score_model(task.model, task.test_loader, task.score_fn)
        for sparsity in args.sparsities:
            budget = f"nonzeros={1 - sparsity:.6g}"
            study_name = f"sparsity-bench-{name}-s{sparsity:g}-{args.sampler}-{args.trials}-seed{args.seed}"
            start = time.perf_counter()
            result = ap.search("digits-sparsity", task=name, budget=budget, n_trials=args.trials, seed=args.seed,
                               sampler=args.sampler, study=study_name, workdir=workdir, data_root=args.data_root,
                               show_progress=False, threads=args.threads)
            study = optuna.load_study(study_name=study_name, storage=result.storage_url)
            check = _budget_check(study, (1 - sparsity) * profile.nonzeros)
            studies.append({"task": name, "sparsity": sparsity, "study": study_name, "budget": budget,
                            "search_seconds": time.perf_counter() - start, **check})
            candidate = {t.baseline: t.result.val_score for t in stored_trials(study) if t.baseline}
            candidate[args.sampler] = result.best_result.val_score if result.best_result else None
            for strategy, plan in _plans(study, args.sampler).items():
                for label, schedule in SCHEDULES.items():
                    for seed in args.seeds:
                        # A searched plan that is a baseline's plan is that baseline's fine-tune.
                        tuned_as = plan.provenance.get("strategy") if strategy == args.sampler else strategy
                        tuned_as = tuned_as if tuned_as in BASELINES else strategy
                        key = f"{name}|{sparsity:g}|{tuned_as}|{label}|{args.epochs:g}|{args.trials}|{args.seed}|{seed}"
                        if key not in cache:
                            model = sparsify_and_finetune(task, plan, profile, epochs=args.epochs,
                                                          schedule=FinetuneSchedule.parse(schedule), seed=seed,
                                                          show_progress=False)
                            cache[key] = {
                                "test_score": score_model(model, task.test_loader, task.score_fn),
                                "file_bytes": _file_bytes(sparse_payload(model, plan, profile=profile)),
                                "nonzeros": plan.metrics["nonzeros"], "trial": plan.provenance.get("trial"),
                                "plan_strategy": plan.provenance.get("strategy"),
                            }
                            tmp = cache_path.with_suffix(".tmp")
                            tmp.write_text(json.dumps(cache, indent=1))
                            os.replace(tmp, cache_path)
                            print(f"{name} s={sparsity:g} {strategy:7s} {label:8s} seed {seed}: test "
                                  f"{cache[key]['test_score']:.4f}", flush=True)
                        rows.append({"task": name, "sparsity": sparsity, "strategy": strategy, "schedule": label,
                                     "seed": seed, "val_score_before_finetune": candidate.get(strategy),
                                     "dense_test_score": dense_test, "dense_file_bytes": dense_bytes,
                                     "size_ratio": cache[key]["file_bytes"] / dense_bytes, **cache[key]})
    return {"rows": rows, "studies": studies}


def _mean(rows: list[dict[str, Any]], **match: Any) -> float | None:
    values = [r["test_score"] for r in rows if all(r[k] == v for k, v in match.items())]
    return statistics.fmean(values) if values else None


def targets(rows: list[dict[str, Any]], searched: str) -> list[dict[str, Any]]:
    """The issue's targets for the ``searched`` plan (the sampler's name), per task and schedule,
    in points of test accuracy."""
    strategies, x = (*BASELINES, searched), searched
    out = []
    for task in sorted({r["task"] for r in rows}):
        for schedule in SCHEDULES:
            at = {s: {st: _mean(rows, task=task, sparsity=s, strategy=st, schedule=schedule) for st in strategies}
                  for s in (0.9, 0.95)}
            if all(v is not None for v in at[0.9].values()):
                a = at[0.9]
                out.append({"task": task, "schedule": schedule,
                            "target": f"s=0.9: {x} >= global, >= LAMP, >= uniform + 1",
                            f"{x}_minus_global": 100 * (a[x] - a["global"]),
                            f"{x}_minus_lamp": 100 * (a[x] - a["lamp"]),
                            f"{x}_minus_uniform": 100 * (a[x] - a["uniform"]),
                            "met": a[x] >= a["global"] and a[x] >= a["lamp"] and a[x] - a["uniform"] >= 0.01})
            if at[0.95][x] is not None and at[0.95]["uniform"] is not None:
                gap = at[0.95][x] - at[0.95]["uniform"]
                out.append({"task": task, "schedule": schedule, "target": f"s=0.95: {x} >= uniform + 3",
                            f"{x}_minus_uniform": 100 * gap, "met": gap >= 0.03})
        sizes = [r["size_ratio"] for r in rows if r["task"] == task and r["sparsity"] == 0.9]
        if sizes:
            out.append({"task": task, "schedule": "-", "target": "s=0.9: compressed file <= 20% of dense",
                        "largest_size_ratio": max(sizes), "met": max(sizes) <= 0.2})
    return out


def markdown(result: dict[str, Any], args: argparse.Namespace) -> str:
    rows = result["rows"]
    lines = [f"Test accuracy (%) after {args.epochs:g} epoch(s) of identical fine-tuning, mean over seeds "
             f"{', '.join(map(str, args.seeds))}; {args.sampler} searched {args.trials} candidates per budget "
             "(adaptive-BN val score). Size: compressed file over the dense model's file.", "",
             "| task | sparsity | strategy | val score before fine-tuning | one-shot | gradual | size |",
             "|---|---:|---|---:|---:|---:|---:|"]
    order = (*BASELINES, args.sampler)
    keys = sorted({(r["task"], r["sparsity"], r["strategy"]) for r in rows},
                  key=lambda k: (k[0], k[1], order.index(k[2])))
    for task, sparsity, strategy in keys:
        mine = [r for r in rows if (r["task"], r["sparsity"], r["strategy"]) == (task, sparsity, strategy)]
        val = mine[0]["val_score_before_finetune"]
        cells = [_mean(mine, schedule=s) for s in SCHEDULES]
        picked = mine[0]["plan_strategy"]
        label = strategy
        if strategy == args.sampler and picked in BASELINES:
            label = f"{strategy} (its best is the {picked} baseline)"
        lines.append(f"| {task} | {sparsity:g} | {label} | {val:.4f} | "
                     + " | ".join(f"{100 * c:.2f}" if c is not None else "-" for c in cells)
                     + f" | {max(r['size_ratio'] for r in mine):.1%} |")
    dense = {r["task"]: r["dense_test_score"] for r in rows}
    lines += ["", "Dense test accuracy: " + ", ".join(f"{t} {100 * s:.2f}%" for t, s in dense.items()) + ".", ""]
    checks = result["studies"]
    ok = all(s["within_half_percent"] for s in checks)
    lines.append(f"Budget projection: {sum(s['trials'] for s in checks)} trials in {len(checks)} studies, every "
                 f"one's nonzeros at or below its budget and within 0.5% of it: {'yes' if ok else 'NO'}.")
    lines += ["", "| target | task | schedule | measured | met |", "|---|---|---|---|---|"]
    for t in result["targets"]:
        measured = ", ".join(f"{k} {v:+.2f}" if "minus" in k else f"{k} {v:.1%}"
                             for k, v in t.items() if "_minus_" in k or k.startswith("largest"))
        lines.append(f"| {t['target']} | {t['task']} | {t['schedule']} | {measured} | {'yes' if t['met'] else 'no'} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="digits-cnn, two sparsities, 8 trials: a smoke run")
    parser.add_argument("--tasks", nargs="+")
    parser.add_argument("--sparsities", nargs="+", type=float)
    parser.add_argument("--trials", type=int)
    parser.add_argument("--epochs", type=float, default=1.0, help="fine-tuning epochs of every plan")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="fine-tuning seeds")
    parser.add_argument("--seed", type=int, default=0, help="the search's seed")
    parser.add_argument("--sampler", default="tpe", choices=["tpe", "cmaes", "gp", "random", "qmc"],
                        help="the search's Optuna sampler")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", default=str(Path("autoprune-runs") / "sparsity-bench"))
    parser.add_argument("--data-root", default=None)
    args = parser.parse_args()
    preset = QUICK if args.quick else FULL
    args.tasks = args.tasks or preset["tasks"]
    args.sparsities = args.sparsities or preset["sparsities"]
    args.trials = args.trials or preset["trials"]
    torch.set_num_threads(args.threads)
    result = run(args)
    result["targets"] = targets(result["rows"], args.sampler)
    settings = {k: v for k, v in vars(args).items() if k not in ("workdir", "data_root")}
    payload = {"benchmark": "sparsity", "machine": machine_info(), "settings": settings, **result}
    write_results(_results_name(args, preset), payload, markdown(result, args))


def _results_name(args: argparse.Namespace, preset: dict[str, Any]) -> str:
    """``sparsity`` for the default run; a run on other tasks or sparsities says which in its name,
    so that it does not overwrite the default table."""
    name = "sparsity_quick" if args.quick else "sparsity"
    if args.tasks != preset["tasks"]:
        name += "_" + "-".join(args.tasks)
    if args.sparsities != preset["sparsities"]:
        name += "_s" + "-".join(f"{s:g}" for s in args.sparsities)
    if args.sampler != "tpe":
        name += f"_{args.sampler}"
    return name


if __name__ == "__main__":
    main()
