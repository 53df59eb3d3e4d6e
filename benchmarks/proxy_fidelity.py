"""Does the candidate score a search maximizes rank plans the way fine-tuning does?

A search can only beat the uniform plan after fine-tuning if its score (the proxy: accuracy after
pruning and BatchNorm recalibration, optionally after a few SGD steps) orders plans the way their
fine-tuned accuracy does. This benchmark measures that for each proxy setting:

1. sample random plans at the budget, score them with the default proxy and keep plans spread over
   its whole range, plus the uniform and global plans and plans near uniform;
2. score each kept plan with every proxy (``finetune_steps`` 0, 25, 100 by default);
3. fine-tune each plan with the search-quality benchmark's recipe and score it on the *validation*
   split (all of it; the test split is never read, so choosing a proxy from this is not test tuning);
4. report Kendall's tau and Spearman's rho between each proxy and fine-tuned accuracy, the
   fine-tuned accuracy of each proxy's top plan, and the fine-tuning noise (one plan, several seeds).

    python benchmarks/proxy_fidelity.py                      # fashionmnist-resnet20, flops 0.3 and 0.5
    python benchmarks/proxy_fidelity.py --budgets 0.5 --plans 12 --local 0

Writes benchmarks/results/proxy_fidelity.{json,md}. Finished fine-tunes are cached in the workdir,
so a killed run resumes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from scipy import stats

sys.path.insert(0, str(Path(__file__).parent))
import autoprune as ap  # noqa: E402
from _machine import machine_info, write_results  # noqa: E402
from autoprune.evaluate import Fidelity  # noqa: E402
from autoprune.export import prune_and_finetune  # noqa: E402
from autoprune.train import score_model  # noqa: E402
from search_quality import shipped_space  # noqa: E402



def _spread(scores: list[float], n: int) -> list[int]:
    """Indices of ``n`` samples at evenly spaced ranks of ``scores``, best and worst included."""
    order = np.argsort(scores)
    picks = np.unique(np.round(np.linspace(0, len(order) - 1, n)).astype(int))
    return [int(order[i]) for i in picks]


def candidate_plans(task: ap.Task, space: ap.SearchSpace, budget: float, *, samples: int, keep: int,
                    local: int, local_sigma: float, seed: int) -> dict[str, ap.Plan]:
    profile = ap.profile_model(task)
    bounds = space.groups.bounds(profile)
    round_to = space.groups.round_to
    target = ap.Budget(flops=budget)
    ev = space.evaluation
    default = ap.Evaluator(task, calibration_batches=ev.calibration_batches, val_samples=ev.val_samples,
                           importance=ev.importance, seed=seed, profile=profile)
    rng = np.random.default_rng(seed)
    plans, scores = [], []
    for _ in range(samples):
        raw = {name: float(rng.uniform(lo, hi)) for name, (lo, hi) in bounds.items() if hi > lo}
        plan = ap.project(profile, raw, target, bounds=bounds, round_to=round_to)
        plans.append(plan)
        scores.append(default.evaluate(plan).val_score)
    chosen = {f"random-{i}": plans[i] for i in _spread(scores, keep)}
    uniform = ap.uniform_plan(profile, target, bounds=bounds, round_to=round_to)
    chosen["uniform"] = uniform
    chosen["global"] = ap.global_plan(profile, target, default.scores, bounds=bounds, round_to=round_to)
    # Plans near the uniform one: is there a better plan close to it that a search could find?
    for i in range(local):
        raw = {name: float(np.clip(uniform.ratios[name] + rng.normal(0.0, local_sigma), lo, hi))
               for name, (lo, hi) in bounds.items() if hi > lo}
        chosen[f"near-uniform-{i}"] = ap.project(profile, raw, target, bounds=bounds, round_to=round_to)
    return chosen


def run(args: argparse.Namespace) -> dict:
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="autoprune-fidelity-"))
    cache_path = workdir / "fidelity_cache.json"
    cache: dict[str, float] = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    task = ap.load_task(args.task, workdir=workdir)
    space = shipped_space(args.task)
    ev = space.evaluation
    val_batches = list(task.val_loader)
    out = []
    for budget in args.budgets:
        start = time.perf_counter()
        plans = candidate_plans(task, space, budget, samples=args.samples, keep=args.plans, local=args.local,
                                local_sigma=args.local_sigma, seed=args.seed)
        print(f"flops={budget}: {len(plans)} plans chosen from {args.samples} random samples "
              f"({time.perf_counter() - start:.0f} s)", flush=True)
        # Proxies by name: "steps=N" (N SGD steps after recalibration, the single-fidelity proxy) and
        # "rung=N" (a multi-fidelity trial's score at rung N: one cosine schedule over all rungs,
        # with distillation, so a rung's score is what a stopped trial would have been judged on).
        proxies: dict[str, dict[str, float]] = {}
        proxy_seconds: dict[str, float] = {}
        for steps in args.proxy_steps:
            evaluator = ap.Evaluator(task, calibration_batches=ev.calibration_batches, val_samples=ev.val_samples,
                                     finetune_steps=steps, importance=ev.importance, seed=args.seed)
            results = {label: evaluator.evaluate(plan) for label, plan in plans.items()}
            proxies[f"steps={steps}"] = {label: r.val_score for label, r in results.items()}
            proxy_seconds[f"steps={steps}"] = statistics.mean(r.seconds for r in results.values())
            print(f"  proxy finetune_steps={steps}: {proxy_seconds[f'steps={steps}']:.1f} s per plan", flush=True)
        if args.fidelity_rungs:
            evaluator = ap.Evaluator(task, calibration_batches=ev.calibration_batches, val_samples=ev.val_samples,
                                     importance=ev.importance, seed=args.seed,
                                     fidelity=Fidelity(rungs=tuple(args.fidelity_rungs), distill=True))
            at_rung: dict[int, dict[str, float]] = {r: {} for r in args.fidelity_rungs}
            seconds = []
            for label, plan in plans.items():
                result = evaluator.evaluate(plan, on_step=lambda step, score, label=label: at_rung[step].__setitem__(label, score))
                seconds.append(result.seconds)
            for rung in args.fidelity_rungs:
                proxies[f"rung={rung}"] = at_rung[rung]
                proxy_seconds[f"rung={rung}"] = statistics.mean(seconds)  # the whole trial: all rungs
            print(f"  fidelity rungs {args.fidelity_rungs}: {statistics.mean(seconds):.1f} s per plan", flush=True)

        def finetuned(label: str, seed: int) -> float:
            distill = "|distill" if args.distill else ""
            key = f"{args.task}|{budget}|{label}|{seed}|{args.finetune_epochs}|{args.seed}|{args.samples}{distill}"
            if key not in cache:
                model = prune_and_finetune(task, plans[label], epochs=args.finetune_epochs, importance=ev.importance,
                                           seed=seed, show_progress=False, distill=args.distill)
                cache[key] = score_model(model, val_batches, task.score_fn)
                cache_path.write_text(json.dumps(cache, indent=1))
                print(f"  {label:10s} seed {seed}: fine-tuned val {cache[key]:.4f}", flush=True)
            return cache[key]

        after = {label: finetuned(label, args.seed) for label in plans}
        labels = list(plans)
        near = [label for label in labels if label.startswith("near-uniform")] + ["uniform"]
        y = [after[label] for label in labels]
        rows = []
        for proxy in proxies:
            x = [proxies[proxy][label] for label in labels]
            top = max(labels, key=lambda label: proxies[proxy][label])
            row = {
                "proxy": proxy, "seconds_per_plan": proxy_seconds[proxy],
                "kendall_tau": float(stats.kendalltau(x, y).statistic),
                "spearman_rho": float(stats.spearmanr(x, y).statistic),
                "top_plan": top, "top_plan_finetuned": after[top],
            }
            if len(near) > 2:  # does the proxy still rank plans that differ only a little?
                row["kendall_tau_near_uniform"] = float(stats.kendalltau(
                    [proxies[proxy][label] for label in near], [after[label] for label in near]).statistic)
            rows.append(row)
        # Fine-tuning noise: the same plan, other seeds; a proxy cannot rank finer than this.
        noise_labels = ["uniform", max(labels, key=lambda label: proxies["steps=0"][label])]
        noise = {label: [finetuned(label, s) for s in [args.seed, *args.noise_seeds]] for label in noise_labels}
        out.append({
            "budget": budget, "plans": {label: {"kept": plans[label].kept, "macs_ratio": plans[label].metrics.get("macs_ratio"),
                                                "proxies": {proxy: proxies[proxy][label] for proxy in proxies},
                                                "finetuned_val": after[label]} for label in labels},
            "proxies": rows, "best_finetuned": max(y), "best_finetuned_plan": max(labels, key=after.get),
            "best_near_uniform_minus_uniform_points": 100 * (max(after[label] for label in near) - after["uniform"]),
            "finetune_noise": {label: {"values": v, "std": statistics.stdev(v)} for label, v in noise.items()},
        })
    return {"budgets": out, "val_images": sum(len(y) for _, y in val_batches), "workdir": str(workdir)}


def markdown(payload: dict) -> str:
    m, s = payload["machine"], payload["settings"]
    lines = [
        f"Measured on {m['cpu']} ({m['cores']} cores, torch {m['versions']['torch']}), {payload['date']}. "
        f"Task {s['task']}; {s['plans']} plans at evenly spaced ranks of the default proxy among {s['samples']} random "
        f"samples, plus uniform, global and {s['local']} plans near uniform (ratios perturbed by a normal "
        f"of std {s['local_sigma']}, then projected onto the budget). Each plan fine-tuned {s['finetune_epochs']} epoch(s) with the search-quality "
        f"recipe (distillation {'on' if s.get('distill') else 'off'}) and scored on the whole validation split ({payload['val_images']:,} images); the test split is not read.",
        "",
        "| MACs budget | proxy | s per plan | Kendall tau | Spearman rho | Kendall tau near uniform | proxy's top plan | its fine-tuned val | best fine-tuned val | uniform fine-tuned val |",
        "|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    for b in payload["budgets"]:
        uniform = b["plans"]["uniform"]["finetuned_val"]
        for r in b["proxies"]:
            lines.append(
                f"| {b['budget']} | {r.get('proxy', 'steps=' + str(r.get('finetune_steps')))} | {r['seconds_per_plan']:.1f} | {r['kendall_tau']:+.2f} | "
                f"{r['spearman_rho']:+.2f} | {r.get('kendall_tau_near_uniform', float('nan')):+.2f} | {r['top_plan']} | {100 * r['top_plan_finetuned']:.2f} | "
                f"{100 * b['best_finetuned']:.2f} | {100 * uniform:.2f} |"
            )
    lines += [""] + [f"- flops={b['budget']}: best plan after fine-tuning: {b['best_finetuned_plan']}; best near-uniform "
                     f"plan minus uniform: {b['best_near_uniform_minus_uniform_points']:+.2f} points"
                     for b in payload["budgets"]]
    lines += ["", "Fine-tuning noise (the same plan fine-tuned with different seeds, validation accuracy %):", ""]
    for b in payload["budgets"]:
        for label, n in b["finetune_noise"].items():
            values = ", ".join(f"{100 * v:.2f}" for v in n["values"])
            lines.append(f"- flops={b['budget']} {label}: {values} (std {100 * n['std']:.2f})")
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="fashionmnist-resnet20")
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.3, 0.5])
    parser.add_argument("--samples", type=int, default=60, help="random plans scored with the default proxy")
    parser.add_argument("--plans", type=int, default=10, help="of those, plans kept at evenly spaced ranks")
    parser.add_argument("--local", type=int, default=10, help="plans sampled near the uniform plan")
    parser.add_argument("--local-sigma", type=float, default=0.1, help="std of their ratio perturbation")
    parser.add_argument("--proxy-steps", nargs="+", type=int, default=[0, 25, 100])
    parser.add_argument("--finetune-epochs", type=float, default=1.0)
    parser.add_argument("--distill", action="store_true", help="fine-tune every plan from the dense model's logits")
    parser.add_argument("--fidelity-rungs", nargs="*", type=int, default=[],
                        help="also score each plan at these multi-fidelity rungs (SGD steps, distilled), e.g. 0 100 400")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--noise-seeds", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    if 0 not in args.proxy_steps:
        parser.error("--proxy-steps must include 0 (the default proxy, which chooses the plans)")
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    raw = run(args)
    payload = {
        "benchmark": "proxy_fidelity", "date": time.strftime("%Y-%m-%d"), "machine": machine_info(),
        "settings": {k: v for k, v in vars(args).items() if k not in ("workdir", "threads")},
        "wall_seconds": time.perf_counter() - start, **raw,
    }
    stem = "proxy_fidelity" if args.task == "fashionmnist-resnet20" else f"proxy_fidelity_{args.task}"
    write_results(stem, payload, markdown(payload))


if __name__ == "__main__":
    main()
