"""Saving and loading physically pruned models without unpickling arbitrary objects.

A pruned model file holds the plan (JSON text) and the pruned state dict, nothing else, so it
loads with ``torch.load(weights_only=True)``. The architecture is rebuilt by applying the plan's
channel counts to the task's dense architecture, then the saved weights are loaded into it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import pruning
from .latency import LatencySettings, build_predictor, measure_many, measure_onnx_many, simd_round_to
from ._workdir import pid_alive, resolve_workdir
from .errors import CheckpointError, ConfigError, PlanError, StudyError, short
from .plan import Plan, check_plan_matches
from .task import Task

__all__ = [
    "EXPORT_CHOICES", "PRUNED_FORMAT", "uniform_wins_on_val", "save_pruned", "load_pruned", "export_study", "ExportReport", "prune_and_finetune",
    "write_deployables", "write_onnx",
]

PRUNED_FORMAT = "autoprune.pruned/1"
EXPORT_CHOICES = ("search", "val")


def uniform_wins_on_val(searched_val: float, uniform_val: float) -> bool:
    """``--choose val``'s rule: the uniform plan replaces the searched one only if it scores strictly
    higher on the validation split after the same fine-tuning."""
    return uniform_val > searched_val


def save_pruned(model: nn.Module, plan: Plan, path: str | os.PathLike[str]) -> Path:
    """Write ``{"format", "plan", "state_dict"}`` atomically to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload: dict[str, Any] = {
        "format": PRUNED_FORMAT,
        "plan": plan.to_json(indent=None),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_pruned(
    path: str | os.PathLike[str], dense_model: nn.Module, *, ignored_layers: tuple[str, ...] = ()
) -> tuple[nn.Module, Plan]:
    """Rebuild a pruned model saved by :func:`save_pruned` on top of its dense architecture.

    ``dense_model`` supplies the architecture only (its weights are replaced); it is not modified.
    """
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"Pruned model file {path} does not exist.") from None
    except Exception as exc:
        raise CheckpointError(
            f"{path} is not a pruned model saved by autoprune ({type(exc).__name__}); it must load "
            "with torch.load(weights_only=True)."
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != PRUNED_FORMAT:
        raise CheckpointError(f"{path} is not a pruned model of format {PRUNED_FORMAT!r}.")
    plan = Plan.from_json(payload["plan"], source=f"the plan inside {path}")
    example = torch.zeros(plan.input_shape)
    groups = pruning.find_groups(dense_model, example, ignored_layers)
    check_plan_matches(plan, [(g.name, g.channels) for g in groups])
    model = pruning.prune_copy(dense_model, example, plan.kept)
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        raise PlanError(f"{path}: saved weights do not fit the plan's architecture ({str(exc)[:200]}).") from None
    return model.eval(), plan


# ----------------------------------------------------------------------------------------------
# Exporting a search's best plan


@dataclass(frozen=True)
class ExportReport:
    """What ``autoprune export`` wrote and measured (also ``report.json``)."""

    out_dir: Path
    plan: Plan
    trial: int
    data: dict[str, Any]


def parse_schedule(text: str) -> int:
    """``oneshot`` -> 1 step; ``iterative:K`` -> K prune/fine-tune steps."""
    if text == "oneshot":
        return 1
    kind, _, steps = text.partition(":")
    if kind == "iterative" and steps.isdigit() and int(steps) >= 1:
        return int(steps)
    raise ConfigError(f"--schedule {text!r} is not allowed; use oneshot or iterative:K with K >= 1.")


def prune_and_finetune(
    task: Task,
    plan: Plan,
    *,
    epochs: float,
    steps: int = 1,
    importance: str = "l1",
    seed: int = 0,
    calibration_batches: int = 16,
    show_progress: bool = True,
) -> nn.Module:
    """Prune ``task.model`` to ``plan`` in ``steps`` equal steps, fine-tuning after each.

    One step is one-shot pruning then ``epochs`` of fine-tuning. With K steps each group loses
    1/K of its pruned channels per step, re-ranked on the current weights, with ``epochs / K``
    of fine-tuning between steps (iterative pruning). BatchNorm is recalibrated after every cut.
    Fine-tuning uses the task's recipe at a tenth of its learning rate, cosine-decayed.
    """
    from .evaluate import recalibrate_batchnorm
    from .train import train_model

    x = task.example_input
    generator = torch.Generator().manual_seed(seed)
    calibration_loader = torch.utils.data.DataLoader(task.train_loader.dataset, batch_size=64, shuffle=True,
                                                     generator=generator)
    calibration = [b for _, b in zip(range(calibration_batches), calibration_loader)]
    recipe = replace(task.recipe, lr=task.recipe.lr / 10)
    criterion = pruning.make_importance(importance, seed=seed)
    model = task.model
    for step in range(1, steps + 1):
        kept = {name: dense - round((dense - keep) * step / steps) for name, (dense, keep) in plan.channels.items()}
        scores = pruning.channel_scores(model, x, criterion, ignored_layers=task.ignored_layers,
                                        batches=calibration[:4])
        current = pruning.find_groups(model, x, task.ignored_layers)
        current_channels = {g.name: g.channels for g in current}
        model = pruning.prune_copy(model, x, {n: k for n, k in kept.items() if k < current_channels[n]}, scores)
        recalibrate_batchnorm(model, [b for b, _ in calibration])
        if epochs > 0:
            train_model(model, task.train_loader, epochs=epochs / steps, recipe=recipe, seed=seed + step,
                        description=f"fine-tune step {step}/{steps}", show_progress=show_progress)
    return model.eval()


def write_deployables(
    model: nn.Module, example_input: torch.Tensor, out_dir: Path, *, batch_size: int = 8, atol: float = 1e-4
) -> dict[str, Any]:
    """Write ``model.pt2`` (torch.export) and ``model.onnx``, checking each against PyTorch.

    Both are run on one random batch of ``batch_size`` and their outputs compared with the
    PyTorch model's (max absolute difference <= ``atol``). ONNX needs the ``onnx`` extra
    (onnx, onnxscript); its check and ONNX Runtime latency need onnxruntime. What could not be
    written is reported with the reason instead of failing the export.
    """
    model = model.eval()
    torch.manual_seed(0)
    batch = torch.randn(batch_size, *example_input.shape[1:])
    with torch.no_grad():
        expected = model(batch)
    formats: dict[str, Any] = {}
    dynamic = ({0: torch.export.Dim("batch", min=1, max=65536)},)  # any batch size at deployment
    try:
        program = torch.export.export(model, (batch,), dynamic_shapes=dynamic)
        torch.export.save(program, out_dir / "model.pt2")
        loaded = torch.export.load(out_dir / "model.pt2").module()
        with torch.no_grad():
            diff = float((loaded(batch) - expected).abs().max())
        formats["torch_export"] = {"file": "model.pt2", "max_abs_diff": diff, "matches": diff <= atol}
    except Exception as exc:  # an exotic user model torch.export cannot trace
        formats["torch_export"] = {"error": f"{type(exc).__name__}: {short(exc)}"}
    try:
        write_onnx(model, batch, out_dir / "model.onnx")
        formats["onnx"] = {"file": "model.onnx"}
    except ImportError:
        formats["onnx"] = {"error": "onnx is not installed (pip install 'autoprune[onnx]')"}
    except Exception as exc:
        formats["onnx"] = {"error": f"{type(exc).__name__}: {short(exc)}"}
    if "file" in formats["onnx"]:
        try:
            import onnxruntime as ort

            session = ort.InferenceSession(str(out_dir / "model.onnx"), providers=["CPUExecutionProvider"])
            name = session.get_inputs()[0].name
            got = session.run(None, {name: batch.numpy()})[0]
            diff = float(np.abs(got - expected.numpy()).max())
            formats["onnx"].update(max_abs_diff=diff, matches=diff <= atol)
        except ImportError:
            formats["onnx"]["check"] = "onnxruntime is not installed; outputs not compared"
    return formats


def write_onnx(model: nn.Module, batch: torch.Tensor, path: Path) -> None:
    """Write ``model`` as ONNX with a dynamic batch dimension (input ``input``, output ``output``).

    Raises ImportError without the ``onnx`` extra.
    """
    import onnx  # noqa: F401  (torch.onnx needs it)

    dynamic = ({0: torch.export.Dim("batch", min=1, max=65536)},)
    torch.onnx.export(model.eval(), (batch,), str(path), input_names=["input"], output_names=["output"],
                      dynamo=True, verbose=False, dynamic_shapes=dynamic)


def _onnx_runtime_latency(dense: nn.Module, pruned_onnx: Path, example_input: torch.Tensor,
                          settings: LatencySettings) -> dict[str, float] | dict[str, str]:
    """Dense and pruned latency under ONNX Runtime, timed round-robin, or why it was not measured."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return {"error": "onnxruntime is not installed (pip install 'autoprune[onnx]')"}
    if settings.device != "cpu":
        return {"error": "ONNX Runtime latency is measured on the CPU only"}
    with tempfile.TemporaryDirectory(prefix="autoprune-dense-onnx-") as tmp:
        dense_onnx = Path(tmp) / "dense.onnx"
        try:
            write_onnx(dense, torch.randn(2, *example_input.shape[1:]), dense_onnx)
        except Exception as exc:
            return {"error": f"the dense model could not be exported: {type(exc).__name__}"}
        dense_ms, pruned_ms = (m.median_ms for m in measure_onnx_many([dense_onnx, pruned_onnx], example_input, settings))
    return {"dense_ms": dense_ms, "pruned_ms": pruned_ms, "speedup": dense_ms / pruned_ms}


def export_study(
    study_name: str,
    out: str | os.PathLike[str],
    *,
    storage: str | None = None,
    finetune_epochs: float = 1.0,
    schedule: str = "oneshot",
    budget: str | None = None,
    workdir: str | os.PathLike[str] | None = None,
    data_root: str | os.PathLike[str] | None = None,
    tracking_uri: str | None = None,
    choose: str = "search",
    show_progress: bool = True,
) -> ExportReport:
    """Export a search's best feasible plan, its fine-tuned pruned model and a report.

    Writes ``plan.json``, ``model.pt``, ``report.json`` and ``report.md`` into ``out`` (created
    whole or not at all), and logs the report to the search's MLflow parent run. The report puts
    the pruned model's test-split score next to the uniform baseline's at the same budget with
    the same fine-tuning. With ``budget`` (e.g. ``flops=0.3``) the best trial at or under that
    budget is exported: how a Pareto search serves any budget.

    ``choose`` says which of the two fine-tuned models is written: ``search`` (the search's best
    plan) or ``val`` (whichever scores higher on the validation split after fine-tuning; the
    search's plan on a tie). The search ranks candidates before fine-tuning, and on some tasks
    fine-tuning reverses the ranking (see ``benchmarks/proxy_fidelity.py``); ``val`` guards
    against that without reading the test split.
    """
    from .budget import Budget, uniform_plan
    from .profile import profile_model
    from .pruning import count_macs_params
    from .search import SearchSettings, latency_settings
    from .tracking import check_tracking_uri
    from .study import ATTR_MLFLOW_RUN, ATTR_PLAN, ATTR_RESULT, best_trial, default_storage_url, load_study
    from .task import load_task
    from .train import score_model

    steps = parse_schedule(schedule)
    if choose not in EXPORT_CHOICES:
        raise ConfigError(f"--choose {choose!r} is not allowed; use one of: {', '.join(EXPORT_CHOICES)}.")
    if not isinstance(finetune_epochs, (int, float)) or not math.isfinite(finetune_epochs) or finetune_epochs < 0:
        raise ConfigError(f"--finetune-epochs must be a finite number >= 0, got {finetune_epochs}.")
    out_dir = Path(out).resolve()
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ConfigError(f"--out {out_dir} already exists and is not empty; choose a new directory.")
    _check_writable_parent(out_dir)
    _remove_abandoned_partials(out_dir)
    if tracking_uri is not None:
        check_tracking_uri(tracking_uri)
    home = resolve_workdir(workdir)
    study = load_study(study_name, storage or default_storage_url(home))
    settings = SearchSettings.from_dict(study.user_attrs["settings"])
    stored_uri = study.user_attrs.get("tracking_uri")
    if tracking_uri is None and stored_uri and ":***@" in stored_uri:
        raise ConfigError(
            f"Study {study_name!r} tracked into {stored_uri}, whose password autoprune does not store; pass "
            "--tracking-uri with the credentials (or set MLFLOW_TRACKING_USERNAME/PASSWORD and give the URL "
            "without them) so the export can be logged to the search's MLflow run."
        )
    space = settings.space
    limit = Budget.parse(budget) if budget else None
    if limit is not None and limit.metric != "flops":
        raise ConfigError("export --budget picks among trials by MACs; give it as flops=FRACTION.")
    task = load_task(space.task, data_root=data_root or settings.data_root, workdir=workdir or settings.workdir)
    profile = profile_model(task)
    max_ratio = limit.fraction(profile) if limit else None
    best = best_trial(study, max_macs_ratio=max_ratio)
    if best is None:
        raise StudyError(
            f"Study {study_name!r} has no finished trial" + (f" within {limit}" if limit else "")
            + "; run `autoprune search` first (or raise --budget)."
        )
    plan = Plan.from_dict(best.user_attrs[ATTR_PLAN], source=f"trial {best.number} of study {study_name!r}")
    trial_budget = Budget(flops=best.user_attrs[ATTR_RESULT]["macs_ratio"]) if max_ratio else space.budget_obj
    importance = space.evaluation.importance
    seed = space.strategy.seed

    model = prune_and_finetune(task, plan, epochs=finetune_epochs, steps=steps, importance=importance, seed=seed,
                               show_progress=show_progress)
    bounds = space.groups.bounds(profile)
    predictor = None
    if trial_budget.is_latency:  # the same latency table the search used (cached under the workdir)
        predictor = build_predictor(task.model, task.example_input, profile, latency_settings(space),
                                    cache_dir=Path(settings.workdir) / "latency")
    uniform = uniform_plan(profile, trial_budget, bounds=bounds, round_to=space.groups.round_to, latency=predictor)
    uniform_model = prune_and_finetune(task, uniform, epochs=finetune_epochs, steps=steps, importance=importance,
                                       seed=seed, show_progress=show_progress)
    test_loader = task.test_loader or task.val_loader
    split = "test" if task.test_loader is not None else "val"
    x = task.example_input
    dense_macs, dense_params = count_macs_params(task.model, x)
    macs, params = count_macs_params(model, x)
    uniform_macs, uniform_params = count_macs_params(uniform_model, x)
    data: dict[str, Any] = {
        "study": study_name, "trial": best.number, "task": space.task, "budget": plan.budget,
        "strategy": plan.provenance.get("strategy"), "finetune_epochs": finetune_epochs, "schedule": schedule,
        "score_split": split,
        "dense": {"macs": dense_macs, "params": dense_params, "score": score_model(task.model, test_loader, task.score_fn)},
        "pruned": {"macs": macs, "params": params, "macs_ratio": macs / dense_macs, "params_ratio": params / dense_params,
                   "score": score_model(model, test_loader, task.score_fn),
                   "val_score_before_finetune": best.user_attrs[ATTR_RESULT]["val_score"]},
        "uniform": {"macs": uniform_macs, "params": uniform_params, "macs_ratio": uniform_macs / dense_macs,
                    "score": score_model(uniform_model, test_loader, task.score_fn)},
    }
    data["pruned"]["score_minus_uniform"] = data["pruned"]["score"] - data["uniform"]["score"]
    data["pruned"]["val_score_finetuned"] = score_model(model, task.val_loader, task.score_fn)
    data["uniform"]["val_score_finetuned"] = score_model(uniform_model, task.val_loader, task.score_fn)
    data["choose"] = choose
    uniform_better = uniform_wins_on_val(data["pruned"]["val_score_finetuned"], data["uniform"]["val_score_finetuned"])
    data["exported"] = "searched"
    if choose == "val" and uniform_better:
        data["exported"] = "uniform"
        plan, model = uniform.with_provenance(study=study_name), uniform_model
    exported = data["pruned"] if data["exported"] == "searched" else data["uniform"]
    settings = latency_settings(space)
    dense_latency, pruned_latency = measure_many([task.model, model], x, settings)
    data["latency"] = {
        "settings": settings.to_dict(),
        "dense_ms": dense_latency.median_ms, "dense_spread_ms": dense_latency.spread_ms,
        "pruned_ms": pruned_latency.median_ms, "pruned_spread_ms": pruned_latency.spread_ms,
        "speedup": dense_latency.median_ms / pruned_latency.median_ms,
        "macs_reduction": dense_macs / exported["macs"],
        "simd_channels": simd_round_to(settings.device),
    }
    data["latency"]["unaligned_groups"] = sorted(
        name for name, kept in plan.kept.items() if kept % data["latency"]["simd_channels"])
    plan = plan.with_metrics(**{f"{split}_score_finetuned": exported["score"],
                                "val_score_finetuned": exported["val_score_finetuned"]})

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_partial_prefix(out_dir)}{os.getpid()}-", dir=out_dir.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the export is as shareable as any file
    try:
        plan.save(tmp / "plan.json")
        save_pruned(model, plan, tmp / "model.pt")
        data["formats"] = write_deployables(model, x, tmp)
        if "file" in data["formats"]["onnx"]:
            data["latency"]["onnxruntime"] = _onnx_runtime_latency(task.model, tmp / "model.onnx", x, settings)
        (tmp / "report.json").write_text(json.dumps(data, indent=2) + "\n")
        (tmp / "report.md").write_text(_report_markdown(data))
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    run_id = study.user_attrs.get(ATTR_MLFLOW_RUN)
    uri = tracking_uri or stored_uri
    if run_id and uri:
        from .tracking import Tracker

        tracker = Tracker(uri, study.user_attrs.get("experiment", space.display_name),
                          artifact_root=home / "mlartifacts")
        for path in sorted(out_dir.iterdir()):
            tracker.log_file(run_id, path, "export")
        tracker.log_metrics(run_id, {f"export_{split}_score_best": data["pruned"]["score"],
                                     f"export_{split}_score_uniform": data["uniform"]["score"],
                                     f"export_{split}_score_dense": data["dense"]["score"],
                                     "export_val_score_best": data["pruned"]["val_score_finetuned"],
                                     "export_val_score_uniform": data["uniform"]["val_score_finetuned"],
                                     "export_latency_ms_dense": data["latency"]["dense_ms"],
                                     "export_latency_ms_pruned": data["latency"]["pruned_ms"],
                                     "export_speedup": data["latency"]["speedup"],
                                     **({"export_speedup_onnxruntime": ort["speedup"]}
                                        if "speedup" in (ort := data["latency"].get("onnxruntime", {})) else {})})
    return ExportReport(out_dir=out_dir, plan=plan, trial=best.number, data=data)


def _partial_prefix(out_dir: Path) -> str:
    # The export is built beside --out under this name plus the builder's pid, then renamed.
    return f".{out_dir.name}.partial-"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _check_writable_parent(out_dir: Path) -> None:
    """Refuse, before any fine-tuning, an --out whose directory cannot be created or written."""
    parent = next((p for p in out_dir.parents if p.exists()), None)
    if parent is None or not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {out_dir} cannot be created: {parent or out_dir.anchor} is not a writable "
                          "directory. Choose an --out under a directory you can write.")


def _remove_abandoned_partials(out_dir: Path) -> None:
    """Delete half-built exports of --out that a killed export left behind (their builder is gone)."""
    if not out_dir.parent.is_dir():
        return
    prefix = _partial_prefix(out_dir)
    for leftover in out_dir.parent.glob(f"{prefix}*"):
        pid = leftover.name[len(prefix):].split("-", 1)[0]
        if leftover.is_dir() and pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(leftover, ignore_errors=True)


def _report_markdown(d: dict[str, Any]) -> str:
    split = d["score_split"]
    rows = [
        ("dense", d["dense"]["macs"], 1.0, d["dense"]["params"], d["dense"]["score"]),
        (f"searched (trial {d['trial']})", d["pruned"]["macs"], d["pruned"]["macs_ratio"], d["pruned"]["params"], d["pruned"]["score"]),
        ("uniform baseline", d["uniform"]["macs"], d["uniform"]["macs_ratio"], d["uniform"]["params"], d["uniform"]["score"]),
    ]
    vals = ["", f"{d['pruned']['val_score_finetuned']:.4f}", f"{d['uniform']['val_score_finetuned']:.4f}"]
    lines = [
        f"# autoprune export: {d['task']}, study {d['study']}",
        "",
        f"Budget {d['budget']}; best plan from {d['strategy']}; both pruned models fine-tuned "
        f"{d['finetune_epochs']} epoch(s), schedule {d['schedule']}; scores on the {split} split. MACs as Torch-Pruning counts them.",
        "",
        f"| model | MACs | MACs ratio | params | {split} score | val score |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    lines += [f"| {n} | {m:,.0f} | {r:.3f} | {p:,.0f} | {s:.4f} | {v} |" for (n, m, r, p, s), v in zip(rows, vals)]
    diff = d["pruned"]["score_minus_uniform"]
    lines += ["", f"Searched minus uniform: {diff:+.4f} ({'better' if diff > 0 else 'not better'} than the uniform baseline)."]
    if d["exported"] == "uniform":
        lines.append("Exported: the uniform plan, which scores higher on the validation split after fine-tuning (--choose val).")
    elif d["choose"] == "val":
        lines.append("Exported: the searched plan, which scores at least as high on the validation split after fine-tuning.")
    elif uniform_wins_on_val(d["pruned"]["val_score_finetuned"], d["uniform"]["val_score_finetuned"]):
        lines.append("Exported: the searched plan, although the uniform plan scores higher on the validation split after "
                     "fine-tuning; `--choose val` would export that one instead.")
    lines.append("")
    lat = d.get("latency")
    if lat:
        s = lat["settings"]
        lines += [
            f"## Latency ({s['device']}, batch {s['batch_size']}, {s['threads']} thread(s), median of {s['repeats']})",
            "",
            "| model | ms per batch | spread (p90-p10) |",
            "|---|---:|---:|",
            f"| dense | {lat['dense_ms']:.3f} | {lat['dense_spread_ms']:.3f} |",
            f"| pruned | {lat['pruned_ms']:.3f} | {lat['pruned_spread_ms']:.3f} |",
        ]
        ort = lat.get("onnxruntime", {})
        if "pruned_ms" in ort:
            lines += [f"| dense, ONNX Runtime | {ort['dense_ms']:.3f} | |", f"| pruned, ONNX Runtime | {ort['pruned_ms']:.3f} | |"]
        lines += ["", f"Measured speedup {lat['speedup']:.2f}x (PyTorch)"
                  + (f", {ort['speedup']:.2f}x (ONNX Runtime)" if "speedup" in ort else "")
                  + f" for a {lat['macs_reduction']:.2f}x MACs reduction."]
        if "error" in ort:
            lines.append(f"ONNX Runtime latency not measured: {ort['error']}.")
        if lat.get("unaligned_groups"):
            lines.append(
                f"{len(lat['unaligned_groups'])} group(s) keep a channel count that is not a multiple of "
                f"{lat['simd_channels']}, this device's vector width; kernels pad them, so their MACs cut buys "
                f"less time. Search with `groups: {{round_to: {lat['simd_channels']}}}` for a faster model.")
        lines.append("")
    formats = d.get("formats") or {}
    for name, info in formats.items():
        if "file" in info:
            check = f"outputs match PyTorch (max abs diff {info['max_abs_diff']:.1e})" if "max_abs_diff" in info else info.get("check", "")
            lines.append(f"- {info['file']} ({name}): {check}")
        else:
            lines.append(f"- {name}: not written ({info['error']})")
    lines.append("")
    return "\n".join(lines)
