"""Exporting a search's best plan: the fine-tuned pruned model, its deployable forms and a report.

``export_study`` runs as stages: load what the study recorded, fine-tune the searched and the
uniform plan with one recipe, measure them into a typed :class:`ExportReport`, write the bundle
(a directory that appears whole or not at all), log it to the search's MLflow run.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import optuna
import torch
from torch import nn

from . import pruning
from ._bundle import built_whole, check_out_dir
from ._compare import ScoreDifference, paired_difference
from ._export_figures import write_export_figures
from ._latency_check import LatencyBudgetWarning, LatencyCheck
from ._onnx import batch_dim, check_onnx, onnx_runtime_latency, write_onnx
from ._report import ExportReport, LatencyReport, ModelRow, report_markdown, uniform_wins_on_val
from ._workdir import resolve_workdir, searched_workdir
from .budget import Budget, uniform_plan
from .errors import ConfigError, StudyError, short
from .latency import build_predictor, measure_many, simd_round_to
from .plan import Plan, check_plan_matches
from .precision import resolve_precision
from .profile import ModelProfile
from .pruned import PRUNED_FORMAT, load_pruned, save_pruned
from .settings import SearchSettings, latency_settings, searched_in_memory
from .space import LatencySpec
from .sparsity import SparseExportReport, profile_for
from .study import StoredTrial, best_trial, default_storage_url, load_study, read_record
from .task import Task, load_task
from .train import Distillation, FinetuneSchedule, predict, score_model, train_model

__all__ = [
    "EXPORT_CHOICES", "PRUNED_FORMAT", "uniform_wins_on_val", "save_pruned", "load_pruned", "export_study",
    "ExportReport", "prune_and_finetune", "write_deployables", "write_onnx", "parse_schedule",
]

EXPORT_CHOICES = ("search", "val")
#: Distillation settings of export's fine-tuning with ``distill=True`` (Hinton et al.'s usual values).
DISTILL_TEMPERATURE, DISTILL_ALPHA = 4.0, 0.9


def parse_schedule(text: str) -> int:
    """``oneshot`` -> 1 step; ``iterative:K`` -> K prune/fine-tune steps (see :class:`FinetuneSchedule`)."""
    return FinetuneSchedule.parse(text).steps


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
    distill: bool = False,
    precision: str = "fp32",
) -> nn.Module:
    """Prune ``task.model`` to ``plan`` in ``steps`` equal steps, fine-tuning after each.

    One step is one-shot pruning then ``epochs`` of fine-tuning. With K steps each group loses
    1/K of its pruned channels per step, re-ranked on the current weights, with ``epochs / K``
    of fine-tuning between steps (iterative pruning). BatchNorm is recalibrated after every cut.
    Fine-tuning uses the task's recipe at a tenth of its learning rate, cosine-decayed; with
    ``distill`` the loss distills the dense model's logits (temperature 4, weight 0.9), and
    ``precision`` ``bf16`` trains under bf16 autocast. The returned model is float32, NCHW.
    """
    from .evaluate import recalibrate_batchnorm, sample_calibration_batches

    x = task.example_input
    calibration = sample_calibration_batches(task.train_loader.dataset, calibration_batches, seed=seed)
    recipe = replace(task.recipe, lr=task.recipe.lr / 10)
    criterion = pruning.make_importance(importance, seed=seed)
    teacher = Distillation(task.model, DISTILL_TEMPERATURE, DISTILL_ALPHA) if distill else None
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
                        description=f"fine-tune step {step}/{steps}", show_progress=show_progress,
                        distill=teacher, precision=precision)  # type: ignore[arg-type]
    return model.eval().to(memory_format=torch.contiguous_format)


def write_deployables(
    model: nn.Module, example_input: torch.Tensor, out_dir: Path, *, batch_size: int = 8, atol: float = 1e-4
) -> dict[str, Any]:
    """Write ``model.pt2`` (torch.export) and ``model.onnx``, checking each against PyTorch.

    Both are run on one random batch of ``batch_size`` and their outputs compared with the
    PyTorch model's (max absolute difference <= ``atol``). ONNX needs the ``onnx`` extra
    (onnx, onnxscript); its check needs onnxruntime. What could not be written is reported with
    the reason instead of failing the export.
    """
    model = model.eval()
    torch.manual_seed(0)
    batch = torch.randn(batch_size, *example_input.shape[1:])
    with torch.no_grad():
        expected = model(batch)
    formats: dict[str, Any] = {}
    try:
        program = torch.export.export(model, (batch,), dynamic_shapes=({0: batch_dim()},))
        torch.export.save(program, out_dir / "model.pt2")
        loaded = torch.export.load(out_dir / "model.pt2").module()
        with torch.no_grad():
            diff = float((loaded(batch) - expected).abs().max())
        formats["torch_export"] = {"file": "model.pt2", "max_abs_diff": diff, "matches": diff <= atol}
    except Exception as exc:  # an exotic user model torch.export cannot trace
        formats["torch_export"] = {"error": f"{type(exc).__name__}: {short(exc)}"}
    try:
        write_onnx(model, batch, out_dir / "model.onnx")
        formats["onnx"] = {"file": "model.onnx", **check_onnx(out_dir / "model.onnx", batch, expected, atol=atol)}
    except ImportError:
        formats["onnx"] = {"error": "onnx is not installed (pip install 'autoprune[onnx]')"}
    except Exception as exc:
        formats["onnx"] = {"error": f"{type(exc).__name__}: {short(exc)}"}
    return formats


# -- the stages of export_study ------------------------------------------------------------------


@dataclass(frozen=True)
class _Inputs:
    study: optuna.Study
    settings: SearchSettings
    task: Task
    profile: ModelProfile
    chosen: StoredTrial
    budget: Budget  # the budget the uniform plan is made for
    tracking_uri: str | None
    latency_check: LatencyCheck | None  # how the search's best plans measured after the search
    picked_within: Budget | None = None  # export's --budget, when the trial was picked under one


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
    distill: bool = False,
    precision: str = "fp32",
    show_progress: bool = True,
    task: Task | None = None,
) -> ExportReport | SparseExportReport:
    """Export a search's best feasible plan, its fine-tuned pruned model and a report.

    Writes ``plan.json``, ``model.pt`` (and ``model.pt2``/``model.onnx``), ``report.json`` and
    ``report.md`` into ``out`` (created whole or not at all), and logs them to the search's MLflow
    parent run. The report puts the pruned model's test-split score next to the uniform
    baseline's at the same budget with the same fine-tuning. With ``budget`` (e.g. ``flops=0.3``)
    the best trial at or under that budget is exported: how a Pareto search serves any budget.

    ``choose`` says which of the two fine-tuned models is written: ``search`` (the search's best
    plan) or ``val`` (whichever scores higher on the validation split after fine-tuning; the
    search's plan on a tie). ``distill`` fine-tunes both from the dense model's logits;
    ``precision`` (``auto | fp32 | bf16``) is that of the fine-tuning. ``task`` is the
    :class:`~autoprune.Task` to prune instead of the one the study recorded; a study searched on a
    task object (``ap.search(task=task)``) needs that object again.

    A sparsity search (``mode: sparsity``) is exported by :func:`autoprune.sparsity.export_sparse`:
    its models are fine-tuned with their zeros held (``schedule`` may also be ``polynomial:...``,
    gradual pruning), ``model.pt`` is the compressed file, and the report gives bytes and sparsity.
    """
    plan_schedule = FinetuneSchedule.parse(schedule)
    if choose not in EXPORT_CHOICES:
        raise ConfigError(f"--choose {choose!r} is not allowed; use one of: {', '.join(EXPORT_CHOICES)}.")
    if not isinstance(finetune_epochs, (int, float)) or not math.isfinite(finetune_epochs) or finetune_epochs < 0:
        raise ConfigError(f"--finetune-epochs must be a finite number >= 0, got {finetune_epochs}.")
    out_dir = Path(out).resolve()
    check_out_dir(out_dir)
    inputs = _load_inputs(study_name, storage=storage, budget=budget, workdir=workdir, data_root=data_root,
                          tracking_uri=tracking_uri, task=task)
    chosen_precision = resolve_precision(precision, model=inputs.task.model, example_input=inputs.task.example_input)
    if inputs.settings.space.mode == "sparsity":
        from .sparsity import export_sparse

        return export_sparse(inputs, out_dir, finetune_epochs=finetune_epochs, schedule=plan_schedule,
                             choose=choose, distill=distill, precision=chosen_precision, show_progress=show_progress,
                             workdir=workdir)
    if plan_schedule.kind == "polynomial":
        raise ConfigError(f"--schedule {plan_schedule} raises weight sparsity gradually and needs a sparsity search "
                          "(mode: sparsity); this study prunes channels (mode: channels): use oneshot or iterative:K.")
    searched_model, uniform_plan_, uniform_model = _finetune_pair(
        inputs, epochs=finetune_epochs, schedule=plan_schedule, distill=distill, precision=chosen_precision,
        show_progress=show_progress)
    report, plan, model = _measure(inputs, out_dir, searched_model, uniform_plan_, uniform_model,
                                   finetune_epochs=finetune_epochs, schedule=plan_schedule, choose=choose,
                                   distill=distill, precision=chosen_precision)
    report = _write_bundle(out_dir, report, model, plan, inputs)
    report = replace(report, mlflow_location=_log_export(inputs, report, workdir))
    for miss in report.latency_misses():
        warnings.warn(miss, LatencyBudgetWarning, stacklevel=2)
    return report


def _load_inputs(study_name: str, *, storage: str | None, budget: str | None, workdir: str | os.PathLike[str] | None,
                 data_root: str | os.PathLike[str] | None, tracking_uri: str | None,
                 task: Task | None = None) -> _Inputs:
    """The study, its settings, the task and the trial to export; refuses what cannot be exported."""
    from .tracking import check_tracking_uri

    if tracking_uri is not None:
        check_tracking_uri(tracking_uri)
    home = resolve_workdir(workdir) if storage else searched_workdir(workdir, command="export")
    study = load_study(study_name, storage or default_storage_url(home))
    record = read_record(study)
    settings = SearchSettings.from_dict(record.settings)
    if tracking_uri is None and record.tracking_uri and ":***@" in record.tracking_uri:
        raise ConfigError(
            f"Study {study_name!r} tracked into {record.tracking_uri}, whose password autoprune does not store; pass "
            "--tracking-uri with the credentials (or set MLFLOW_TRACKING_USERNAME/PASSWORD and give the URL "
            "without them) so the export can be logged to the search's MLflow run."
        )
    space = settings.space
    limit = Budget.parse(budget) if budget else None
    if limit is not None and space.mode == "sparsity":
        raise ConfigError(f"export --budget picks among a Pareto search's trials by MACs; study {study_name!r} is a "
                          "sparsity search (mode: sparsity), whose trials all meet its own budget: leave --budget out.")
    if limit is not None and limit.metric != "flops":
        raise ConfigError("export --budget picks among trials by MACs; give it as flops=FRACTION.")
    if task is None:
        if searched_in_memory(record.settings):
            raise ConfigError(
                f"Study {study_name!r} searched the ap.Task object {space.task!r} built in Python, which was not "
                "stored; export it from Python with the same object: ap.export_study("
                f"{study_name!r}, out, task=task)."
            )
        task = load_task(space.task_spec, data_root=data_root or settings.data_root,
                         workdir=workdir or settings.workdir)
    profile = profile_for(task, mode=space.mode, pattern=space.pattern)
    max_ratio = limit.fraction(profile) if limit else None
    chosen = best_trial(study, max_macs_ratio=max_ratio)
    if chosen is None:
        raise StudyError(
            f"Study {study_name!r} has no finished trial" + (f" within {limit}" if limit else "")
            + "; run `autoprune search` first (or raise --budget)."
        )
    check_plan_matches(chosen.plan, [(g.name, g.channels) for g in profile.groups], what=f"task {task.name!r}",
                       input_shape=tuple(task.example_input.shape))  # a task object given may not be the searched one
    trial_budget = Budget(flops=chosen.result.macs_ratio) if max_ratio else space.budget_obj
    check = LatencyCheck.from_dict(record.latency_check) if record.latency_check else None
    return _Inputs(study, settings, task, profile, chosen, trial_budget, tracking_uri or record.tracking_uri, check,
                   limit)


def _finetune_pair(inputs: _Inputs, *, epochs: float, schedule: FinetuneSchedule, distill: bool, precision: str,
                   show_progress: bool) -> tuple[nn.Module, Plan, nn.Module]:
    """The searched plan and the uniform plan at the same budget, fine-tuned with one recipe."""
    space, task, profile = inputs.settings.space, inputs.task, inputs.profile
    predictor = None
    if inputs.budget.is_latency:  # the same latency table the search used (cached under the workdir)
        predictor = build_predictor(task.model, task.example_input, profile, latency_settings(space),
                                    cache_dir=Path(inputs.settings.workdir) / "latency")
    uniform = uniform_plan(profile, inputs.budget, bounds=space.groups.bounds(profile), round_to=space.groups.round_to,
                           latency=predictor)
    common = dict(epochs=epochs, steps=schedule.steps, importance=space.evaluation.importance,
                  seed=space.strategy.seed, show_progress=show_progress, distill=distill, precision=precision)
    searched_model = prune_and_finetune(task, inputs.chosen.plan, **common)  # type: ignore[arg-type]
    uniform_model = prune_and_finetune(task, uniform, **common)  # type: ignore[arg-type]
    return searched_model, uniform, uniform_model


@dataclass(frozen=True)
class _Scored:
    """A model's report row, and its outputs on the report's split and the validation split (the
    paired comparisons resample them)."""

    row: ModelRow
    split: tuple[torch.Tensor, torch.Tensor]  # logits, targets
    val: tuple[torch.Tensor, torch.Tensor] | None


def _row(model: nn.Module, task: Task, loader: Any, dense: tuple[float, float] | None, finetuned: bool) -> _Scored:
    macs, params = pruning.count_macs_params(model, task.example_input)
    outputs = predict(model, loader)
    val = predict(model, task.val_loader) if finetuned else None
    subsets = {name: score_model(model, subset, task.score_fn) for name, subset in task.test_subsets.items()} \
        if task.test_loader is not None else {}
    row = ModelRow(
        macs=macs, params=params, score=float(task.score_fn(*outputs)),
        val_score=float(task.score_fn(*val)) if val is not None else None, subsets=subsets,
        macs_ratio=macs / dense[0] if dense else 1.0, params_ratio=params / dense[1] if dense else 1.0,
    )
    return _Scored(row, outputs, val)


def _differences(task: Task, split: str, dense: _Scored, searched: _Scored,
                 uniform: _Scored) -> dict[str, ScoreDifference]:
    """Searched minus uniform and minus dense on the report's split, and searched minus uniform on
    the validation split after fine-tuning, each with its paired-bootstrap interval. Skipped where
    the loader does not give the examples in one order (the pairs would not be pairs)."""
    def paired(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> ScoreDifference | None:
        return paired_difference(a[0], b[0], a[1], task.score_fn) if torch.equal(a[1], b[1]) else None

    found = {f"{split}_searched_minus_uniform": paired(searched.split, uniform.split),
             f"{split}_searched_minus_dense": paired(searched.split, dense.split),
             "val_searched_minus_uniform": paired(searched.val, uniform.val) if searched.val and uniform.val else None}
    return {name: d for name, d in found.items() if d is not None}


def _measure(inputs: _Inputs, out_dir: Path, searched_model: nn.Module, uniform: Plan, uniform_model: nn.Module, *,
             finetune_epochs: float, schedule: FinetuneSchedule, choose: str, distill: bool,
             precision: str) -> tuple[ExportReport, Plan, nn.Module]:
    """Score the three models, choose the one to write, time it against the dense model."""
    task, study_name = inputs.task, inputs.settings.study_name
    loader, split = (task.test_loader, "test") if task.test_loader is not None else (task.val_loader, "val")
    dense_scored = _row(task.model, task, loader, None, finetuned=False)
    dense = dense_scored.row
    searched_scored = _row(searched_model, task, loader, (dense.macs, dense.params), finetuned=True)
    uniform_scored = _row(uniform_model, task, loader, (dense.macs, dense.params), finetuned=True)
    searched, uniform_row = searched_scored.row, uniform_scored.row
    plan, model, exported = inputs.chosen.plan, searched_model, "searched"
    if choose == "val" and uniform_wins_on_val(searched.val_score, uniform_row.val_score):
        plan, model, exported = uniform.with_provenance(study=study_name), uniform_model, "uniform"
    row = searched if exported == "searched" else uniform_row
    space = inputs.settings.space
    settings = latency_settings(space)
    dense_latency, pruned_latency = measure_many([task.model, model], task.example_input, settings)
    block = simd_round_to(settings.device)
    budget = space.budget_obj
    # A fraction of dense is judged against the dense model timed now, beside the pruned one.
    limit = (budget.value * dense_latency.median_ms if budget.is_fraction else budget.value) if budget.is_latency else None
    latency = LatencyReport(
        settings=settings, dense_ms=dense_latency.median_ms, dense_spread_ms=dense_latency.spread_ms,
        pruned_ms=pruned_latency.median_ms, pruned_spread_ms=pruned_latency.spread_ms,
        macs_reduction=dense.macs / row.macs, simd_channels=block,
        unaligned_groups=tuple(sorted(name for name, kept in plan.kept.items() if kept % block)),
        budget=str(budget) if limit is not None else None, limit_ms=limit,
        tolerance=(space.latency or LatencySpec()).tolerance,
    )
    plan = plan.with_metrics(**{f"{split}_score_finetuned": row.score, "val_score_finetuned": row.val_score})
    report = ExportReport(
        out_dir=out_dir, plan=plan, trial=inputs.chosen.number, study=study_name, task=inputs.settings.space.task_label,
        strategy=inputs.chosen.plan.provenance.get("strategy"), budget=inputs.chosen.plan.budget,
        finetune_epochs=finetune_epochs, schedule=str(schedule), split=split, dense=dense, searched=searched,
        uniform=uniform_row, val_score_before_finetune=inputs.chosen.result.val_score, choose=choose,
        exported=exported, latency=latency, precision=precision, latency_budget=inputs.latency_check,
        differences=_differences(task, split, dense_scored, searched_scored, uniform_scored),
        distill={"temperature": DISTILL_TEMPERATURE, "alpha": DISTILL_ALPHA} if distill else None,
        picked_within=str(inputs.picked_within) if inputs.picked_within else None,
    )
    return report, plan, model


def _write_bundle(out_dir: Path, report: ExportReport, model: nn.Module, plan: Plan, inputs: _Inputs) -> ExportReport:
    """Write the export into a directory beside ``out_dir`` and rename it there whole."""
    task = inputs.task
    with built_whole(out_dir) as tmp:
        plan.save(tmp / "plan.json")
        save_pruned(model, plan, tmp / "model.pt")
        formats = write_deployables(model, task.example_input, tmp)
        latency = report.latency
        if "file" in formats["onnx"] and latency is not None:
            latency = replace(latency, onnxruntime=onnx_runtime_latency(task.model, tmp / "model.onnx",
                                                                        task.example_input, latency.settings))
        budget = inputs.settings.space.budget_obj
        marked = inputs.picked_within.fraction(inputs.profile) if inputs.picked_within else (
            budget.value if budget.metric == "flops" and budget.is_fraction else None)
        figures = write_export_figures(
            tmp, inputs.study, inputs.chosen, plan=plan, exported=report.exported, budget_fraction=marked,
            title=f"{report.task}, study {report.study} (budget {inputs.picked_within or budget})")
        report = replace(report, formats=formats, latency=latency, figures=figures)
        (tmp / "report.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        (tmp / "report.md").write_text(report_markdown(report))
    return report


def _log_export(inputs: _Inputs, report: ExportReport, workdir: str | os.PathLike[str] | None) -> str | None:
    """The bundle and its scores onto the search's MLflow parent run; where it went, in words.

    Each export gets its own artifact folder, ``export/<n>-<out dir name>``, and logs its scores at
    step ``n``: a second export of a study sits beside the first instead of overwriting it.
    """
    record = read_record(inputs.study)
    if not (record.mlflow_run_id and inputs.tracking_uri):
        return None
    from .tracking import Tracker

    tracker = Tracker(inputs.tracking_uri, record.experiment or inputs.settings.space.display_name,
                      artifact_root=resolve_workdir(workdir) / "mlartifacts")
    number = len(tracker.artifact_folders(record.mlflow_run_id, "export")) + 1
    folder = f"export/{number}-{re.sub(r'[^A-Za-z0-9._-]+', '_', report.out_dir.name)}"
    for path in sorted(report.out_dir.iterdir()):
        tracker.log_file(record.mlflow_run_id, path, folder)
    split, lat = report.split, report.latency
    ort = (lat.onnxruntime or {}) if lat is not None else {}
    tracker.log_metrics(record.mlflow_run_id, {
        f"export_{split}_score_best": report.searched.score, f"export_{split}_score_uniform": report.uniform.score,
        f"export_{split}_score_dense": report.dense.score, "export_val_score_best": report.searched.val_score,
        "export_val_score_uniform": report.uniform.val_score,
        **({"export_latency_ms_dense": lat.dense_ms, "export_latency_ms_pruned": lat.pruned_ms,
            "export_speedup": lat.speedup} if lat is not None else {}),
        **({"export_speedup_onnxruntime": ort["speedup"]} if "speedup" in ort else {}),
    }, step=number)
    return f"MLflow run {record.mlflow_run_id}, artifacts {folder}/"
