"""Every torchvision classification model through autoprune: profile, prune three plans, check.

For each model of ``torchvision.models.list_models(module=torchvision.models)`` with random weights,
10 classes and a small input: profile it (seconds), then for the uniform plan, the global plan and
a random plan projected onto half the MACs, prune a copy (milliseconds per candidate), run it, and
compare Torch-Pruning's count of its MACs with the analytic cost model (relative error). A model
autoprune cannot prune is expected to be refused with a clear message at profile time; anything
else is a failure. Each model runs in its own process (a crash or hang stays contained).

    python benchmarks/zoo.py                       # all models -> benchmarks/results/zoo.{json,md}
    python benchmarks/zoo.py --models resnet50 vit_b_16 --input 224
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import machine_info, write_results  # noqa: E402

BUDGET = 0.5
#: Input sizes where 64x64 is too small for the architecture (or its positional embeddings).
_INPUT = {"inception_v3": 96, "googlenet": 64, "maxvit_t": 224}
#: Vision transformers take their image size as a constructor argument: small, multiple of the patch.
_VIT_IMAGE = {"vit_b_16": 64, "vit_b_32": 64, "vit_l_16": 64, "vit_l_32": 64, "vit_h_14": 56}


def build(name: str, input_size: int | None = None):  # noqa: ANN201 - (model, example input)
    import torch
    import torchvision

    kwargs: dict[str, Any] = {"num_classes": 10, "weights": None}
    size = input_size or _INPUT.get(name, 64)
    if name in _VIT_IMAGE and input_size is None:
        size = _VIT_IMAGE[name]
        kwargs["image_size"] = size
    if name in ("googlenet", "inception_v3"):
        kwargs.update(aux_logits=False, init_weights=False)
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, **kwargs)
    _normalize_activations(model, size)
    return model.eval(), torch.zeros(1, 3, size, size)


def _normalize_activations(model, size: int) -> None:  # noqa: ANN001
    """BatchNorm statistics estimated on random images, as a trained model has them: with the
    defaults (mean 0, variance 1) activations of a random network fade layer after layer and every
    output is the classifier's bias, which would make any pruning look exact (the check of
    ``_exactness``)."""
    import torch

    # Some classifiers start at zero (torchvision's ViT): every output would be 0, any pruning exact.
    for m in model.modules():
        if isinstance(m, torch.nn.Linear) and not m.weight.any():
            torch.nn.init.normal_(m.weight, std=0.02, generator=torch.Generator().manual_seed(2))
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches below
    model.train()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(4, 3, size, size, generator=generator))


def check_model(name: str, input_size: int | None = None, threads: int = 1) -> dict[str, Any]:
    """Profile ``name`` and prune its uniform, global and a random plan at MACs 0.5."""
    import numpy as np
    import torch

    import autoprune as ap
    from autoprune import pruning

    torch.set_num_threads(threads)
    row: dict[str, Any] = {"model": name}
    model, x = build(name, input_size)
    row["input"] = int(x.shape[-1])
    row["params_m"] = sum(p.numel() for p in model.parameters()) / 1e6
    start = time.perf_counter()
    try:
        profile = ap.profile_model(model, x)
    except ap.AutopruneError as exc:
        return {**row, "status": "refused", "reason": str(exc)[:400], "profile_s": time.perf_counter() - start}
    row.update(profile_s=time.perf_counter() - start, groups=len(profile.groups), dense_macs=profile.macs)
    scores = pruning.channel_scores(model, x, pruning.make_importance("l1"))
    budget = ap.Budget(flops=BUDGET)
    rng = np.random.default_rng(0)
    plans = {
        "uniform": ap.uniform_plan(profile, budget),
        "global": ap.global_plan(profile, budget, scores),
        "random": ap.project(profile, {g.name: float(rng.uniform(0, 0.8)) for g in profile.groups}, budget),
    }
    # A search traces the model once (the evaluator's Surgeon) and cuts every candidate from it:
    # that per-candidate cut is what prune_ms measures.
    start = time.perf_counter()
    surgeon = pruning.Surgeon(model, x)
    row["surgeon_s"] = time.perf_counter() - start
    worst, prune_ms = 0.0, []
    for label, plan in plans.items():
        start = time.perf_counter()
        pruned = surgeon.prune(plan.kept, scores)
        prune_ms.append(1000 * (time.perf_counter() - start))
        with torch.no_grad():
            out = pruned(x)
        if tuple(out.shape) != (1, 10):
            return {**row, "status": "fails", "reason": f"{label} plan: output shape {tuple(out.shape)}"}
        counted, _ = pruning.count_macs_params(pruned, x)
        analytic = profile.macs_of(plan.kept)
        error = abs(analytic - counted) / counted
        worst = max(worst, error)
        if counted > BUDGET * profile.macs * (1 + 1e-9) and error <= 0.005:
            return {**row, "status": "fails", "reason": f"{label} plan counts {counted / profile.macs:.3f} of dense MACs"}
    row.update(prune_ms=float(np.median(prune_ms)), macs_error=worst,
               status="ok" if worst <= 0.005 else "fails")
    if worst > 0.005:
        row["reason"] = f"analytic MACs {worst:.2%} off Torch-Pruning's count"
        return row
    exact = _exactness(surgeon, plans["uniform"].kept, scores, x)
    row.update(exact)
    if exact["exact_error"] > pruning.EXACT_TOLERANCE:
        row.update(status="fails", reason=f"the pruned model differs from the dense one with those channels zeroed "
                                          f"(relative error {exact['exact_error']:.1e}): wrong channels coupled")
    return row


def _exactness(surgeon, kept, scores, x) -> dict[str, Any]:  # noqa: ANN001
    """Whether the pruned model computes what the dense model computes with the removed channels
    zeroed (on the groups where zeroing is equivalent to removing: none feeding a LayerNorm)."""
    import torch

    from autoprune import pruning

    checkable = {name: k for name, k in kept.items() if surgeon.zeroable(name)}
    x = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))  # the example input is all zeros
    error = pruning.pruning_error(surgeon, checkable, x, scores)
    return {"exact_groups": len(checkable), "exact_error": error}


def _run(name: str, input_size: int | None, threads: int, queue: multiprocessing.Queue) -> None:
    try:
        queue.put(check_model(name, input_size, threads))
    except Exception as exc:  # a failure of autoprune on this model: recorded, not raised
        queue.put({"model": name, "status": "fails", "reason": f"{type(exc).__name__}: {str(exc)[:300]}",
                   "traceback": traceback.format_exc()[-2000:]})


def run_isolated(name: str, input_size: int | None, threads: int, timeout: float) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_run, args=(name, input_size, threads, queue))
    start = time.perf_counter()
    proc.start()
    proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        proc.join()
        return {"model": name, "status": "fails", "reason": f"did not finish in {timeout:.0f} s"}
    try:
        row = queue.get(timeout=5)
    except Exception:
        row = {"model": name, "status": "fails", "reason": f"process died (exit code {proc.exitcode})"}
    row["wall_s"] = time.perf_counter() - start
    return row


def markdown(rows: list[dict[str, Any]]) -> str:
    supported = sum(r["status"] == "ok" for r in rows)
    refused = sum(r["status"] == "refused" for r in rows)
    lines = [
        f"# torchvision zoo: {supported} of {len(rows)} supported, {refused} refused cleanly, "
        f"{len(rows) - supported - refused} failing",
        "",
        f"Random weights, 10 classes; uniform, global and a random plan at MACs {BUDGET}. Profile seconds, "
        "median milliseconds to prune one candidate from the traced model (a deep copy and the cuts, as in "
        "a search), worst analytic-vs-counted MACs error; exactness: the uniform plan's pruned model against "
        "the dense one with the removed channels zeroed, on the groups where zeroing equals removing (not "
        "feeding a LayerNorm): checked groups of all, and the largest output difference relative to the output.",
        "",
        "| model | input | params (M) | groups | profile s | prune ms | MACs error | exact (groups, error) | status |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r.get('reason', '')[:120]}"
        lines.append(
            f"| {r['model']} | {r.get('input', '')} | {r.get('params_m', 0):.1f} | {r.get('groups', '')} | "
            f"{r.get('profile_s', 0):.1f} | {r.get('prune_ms', 0):.0f} | "
            + (f"{r['macs_error']:.2%}" if "macs_error" in r else "") + " | "
            + (f"{r['exact_groups']}/{r['groups']}, {r['exact_error']:.0e}" if "exact_error" in r else "")
            + f" | {status} |")
    return "\n".join(lines) + "\n"


def _family(name: str) -> str:
    head = name.split("_")[0]
    return "wide_resnet" if head == "wide" else head.rstrip("0123456789") or head


README = Path(__file__).resolve().parent.parent / "README.md"
_START, _END = "<!-- zoo table: benchmarks/zoo.py --readme -->", "<!-- end of zoo table -->"


def readme_table(rows: list[dict[str, Any]]) -> str:
    """The README's "Supported architectures" table: one row per family of the zoo results."""
    families: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        families.setdefault(_family(r["model"]), []).append(r)
    supported = sum(r["status"] == "ok" for r in rows)
    lines = [
        _START,
        f"{supported} of {len(rows)} torchvision classification models supported "
        f"({supported / len(rows):.0%}); the rest are refused at profile time with the reason. Every supported "
        "model is checked exact: its pruned copy computes what the dense model computes with the removed "
        "channels zeroed (relative output difference under 1e-3; groups feeding a LayerNorm, where zeroing "
        "is not removing, are left out of that check).",
        "",
        "| family | models | status | groups | profile s | prune ms | worst MACs error | worst exactness error |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for family, members in families.items():
        ok = [r for r in members if r["status"] == "ok"]
        span = (lambda key, fmt: f"{fmt(min(r[key] for r in ok))}-{fmt(max(r[key] for r in ok))}" if ok else "")
        reasons = sorted({r.get("reason", "")[:90] for r in members if r["status"] != "ok"})
        refused = sum(r["status"] == "refused" for r in members)
        failing = len(members) - len(ok) - refused
        status = "ok" if len(ok) == len(members) else (
            ", ".join(part for part in (f"{len(ok)} ok" if ok else "", f"{refused} refused" if refused else "",
                                        f"{failing} FAILING" if failing else "") if part) + ": " + " / ".join(reasons))
        lines.append(
            f"| {family} | {', '.join(r['model'] for r in members)} | {status} | {span('groups', str)} | "
            f"{span('profile_s', lambda v: f'{v:.1f}')} | {span('prune_ms', lambda v: f'{v:.0f}')} | "
            + (f"{max(r['macs_error'] for r in ok):.2%}" if ok else "") + " | "
            + (f"{max(r['exact_error'] for r in ok):.0e}" if ok and all("exact_error" in r for r in ok) else "") + " |")
    lines.append(_END)
    return "\n".join(lines)


def update_readme(rows: list[dict[str, Any]]) -> None:
    text = README.read_text()
    start, end = text.index(_START), text.index(_END) + len(_END)
    README.write_text(text[:start] + readme_table(rows) + text[end:])


def main() -> None:
    import torchvision

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--readme", action="store_true",
                        help="only rewrite README.md's table from benchmarks/results/zoo.json")
    parser.add_argument("--models", nargs="*", help="model names (default: every classification model)")
    parser.add_argument("--input", type=int, default=None, help="input size (default: 64, larger where needed)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per model")
    parser.add_argument("--out", default="zoo", help="results file stem under benchmarks/results/")
    args = parser.parse_args()
    if args.readme:
        import json

        update_readme(json.loads((Path(__file__).resolve().parent / "results" / "zoo.json").read_text())["rows"])
        return
    names = args.models or torchvision.models.list_models(module=torchvision.models)
    rows = []
    for name in names:
        row = run_isolated(name, args.input, args.threads, args.timeout)
        rows.append(row)
        print(f"{name}: {row['status']} {row.get('reason', '')[:160]} ({row.get('wall_s', 0):.0f} s)", flush=True)
    write_results(args.out, {"machine": machine_info(), "budget": BUDGET, "rows": rows}, markdown(rows))


if __name__ == "__main__":
    main()
