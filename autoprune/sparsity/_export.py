"""Exporting a sparsity search: fine-tune the searched and the uniform plan with their zeros held,
measure size, sparsity, scores and latency, write the compressed model, log it to MLflow.

:func:`autoprune.export.export_study` loads the study and the task as for channels and hands the
rest here when the search's mode is ``sparsity``; the bundle is written as whole as channel
exports' (``plan.json``, ``model.pt`` compressed, ``report.json``, ``report.md``, figures).
"""

from __future__ import annotations

import copy
import io
import json
import os
import re
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .. import plots
from .._bundle import built_whole
from .._compare import ScoreDifference, paired_difference
from .._report import uniform_wins_on_val
from .._timing import LatencySettings, measure_many, round_robin
from .._workdir import resolve_workdir
from ..budget import uniform_plan
from ..errors import short
from ..plan import Plan
from ..task import Task
from ..train import Distillation, FinetuneSchedule, predict, score_model
from ._finetune import sparsify_and_finetune
from ._format import load_sparse, payload_bytes, save_sparse, sparse_payload
from ._mask import measured_sparsity
from ._profile import SparsityProfile
from ._report import SparseExportReport, SparseLatency, SparseModelRow, sparse_report_markdown

if TYPE_CHECKING:
    from ..export import _Inputs

__all__ = ["export_sparse", "cuda_semi_structured_latency"]

#: Images per batch when timing 2:4 kernels on a GPU: one image is too little work to show a GEMM's speed.
_CUDA_BATCH = 256


def export_sparse(inputs: _Inputs, out_dir: Path, *, finetune_epochs: float, schedule: FinetuneSchedule, choose: str,
                  distill: bool, precision: str, show_progress: bool,
                  workdir: str | os.PathLike[str] | None) -> SparseExportReport:
    """The sparsity half of :func:`autoprune.export.export_study` (arguments as there)."""
    from ..export import DISTILL_ALPHA, DISTILL_TEMPERATURE
    from ..settings import latency_settings  # settings reads the space, which reads this package's rules

    task, space = inputs.task, inputs.settings.space
    profile = inputs.profile
    assert isinstance(profile, SparsityProfile)  # export_study profiles a sparsity search's task this way
    uniform = uniform_plan(profile, inputs.budget, bounds=space.groups.bounds(profile))
    teacher = Distillation(task.model, DISTILL_TEMPERATURE, DISTILL_ALPHA) if distill else None
    common: dict[str, Any] = dict(epochs=finetune_epochs, schedule=schedule, importance=space.evaluation.importance,
                                  seed=space.strategy.seed, show_progress=show_progress, distill=teacher,
                                  precision=precision)
    searched_model = sparsify_and_finetune(task, inputs.chosen.plan, profile, **common)
    uniform_model = sparsify_and_finetune(task, uniform, profile, **common)

    loader, split = (task.test_loader, "test") if task.test_loader is not None else (task.val_loader, "val")
    outputs = {name: predict(m, loader) for name, m in (("dense", task.model), ("searched", searched_model),
                                                          ("uniform", uniform_model))}
    vals = {name: predict(m, task.val_loader) for name, m in (("searched", searched_model), ("uniform", uniform_model))}
    searched_plan = inputs.chosen.plan
    rows = {"dense": _row(task, task.model, None, profile, outputs["dense"], None),
            "searched": _row(task, searched_model, searched_plan, profile, outputs["searched"], vals["searched"]),
            "uniform": _row(task, uniform_model, uniform, profile, outputs["uniform"], vals["uniform"])}
    plan, model, exported = searched_plan, searched_model, "searched"
    if choose == "val" and uniform_wins_on_val(rows["searched"].val_score or 0.0, rows["uniform"].val_score or 0.0):
        plan, model, exported = uniform.with_provenance(study=inputs.settings.study_name), uniform_model, "uniform"
    plan = plan.with_metrics(**{f"{split}_score_finetuned": rows[exported].score,
                                "val_score_finetuned": rows[exported].val_score})
    report = SparseExportReport(
        out_dir=out_dir, plan=plan, trial=inputs.chosen.number, study=inputs.settings.study_name,
        task=space.task_label, strategy=searched_plan.provenance.get("strategy"), budget=searched_plan.budget,
        pattern=profile.pattern, finetune_epochs=finetune_epochs, schedule=str(schedule), split=split,
        dense=rows["dense"], searched=rows["searched"], uniform=rows["uniform"],
        val_score_before_finetune=inputs.chosen.result.val_score, choose=choose, exported=exported,
        round_trip_exact=False, latency=_latency(task, model, plan, latency_settings(space)), precision=precision,
        distill={"temperature": DISTILL_TEMPERATURE, "alpha": DISTILL_ALPHA} if distill else None,
        differences=_differences(task, split, outputs, vals),
    )
    report = _write_bundle(out_dir, report, model, plan, task, profile)
    return replace(report, mlflow_location=_log_export(inputs, report, workdir))


def _file_bytes(payload: Any) -> int:
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.tell()


def _row(task: Task, model: nn.Module, plan: Plan | None, profile: SparsityProfile,
         outputs: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor] | None) -> SparseModelRow:
    """A model's row: scores, measured sparsity, and the bytes of its file (compressed for a sparse
    model; the plain state dict, as ``torch.save`` writes it, for the dense one)."""
    layers = measured_sparsity(model, profile)
    nonzeros = int(sum(round((1 - s) * g.channels) for s, g in zip(layers.values(), profile.groups)))
    if plan is None:
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        file_bytes, payload = _file_bytes(state), int(sum(t.numel() * t.element_size() for t in state.values()))
    else:
        compressed = sparse_payload(model, plan, profile=profile)
        file_bytes, payload = _file_bytes(compressed), payload_bytes(compressed)
    subsets = {name: score_model(model, subset, task.score_fn) for name, subset in task.test_subsets.items()} \
        if task.test_loader is not None else {}
    return SparseModelRow(
        score=float(task.score_fn(*outputs)), val_score=float(task.score_fn(*val)) if val is not None else None,
        nonzeros=nonzeros, sparsity=1 - nonzeros / profile.nonzeros, layer_sparsity=layers, file_bytes=file_bytes,
        payload_bytes=payload, subsets=subsets)


def _differences(task: Task, split: str, outputs: dict[str, tuple[torch.Tensor, torch.Tensor]],
                 vals: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, ScoreDifference]:
    def paired(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> ScoreDifference | None:
        return paired_difference(a[0], b[0], a[1], task.score_fn) if torch.equal(a[1], b[1]) else None

    found = {f"{split}_searched_minus_uniform": paired(outputs["searched"], outputs["uniform"]),
             f"{split}_searched_minus_dense": paired(outputs["searched"], outputs["dense"]),
             "val_searched_minus_uniform": paired(vals["searched"], vals["uniform"])}
    return {name: d for name, d in found.items() if d is not None}


def _latency(task: Task, model: nn.Module, plan: Plan, settings: LatencySettings) -> SparseLatency:
    dense, sparse = measure_many([task.model, model], task.example_input, settings)
    return SparseLatency(settings=settings, cpu_dense_ms=dense.median_ms, cpu_sparse_ms=sparse.median_ms,
                         cpu_dense_spread_ms=dense.spread_ms, cpu_sparse_spread_ms=sparse.spread_ms,
                         cuda=cuda_semi_structured_latency(task.model, model, plan, task.example_input))


def cuda_semi_structured_latency(dense: nn.Module, sparse: nn.Module, plan: Plan,
                                 example_input: torch.Tensor) -> dict[str, Any]:
    """Dense against 2:4 latency on a CUDA GPU in fp16, the sparse model's 2:4 linear layers
    converted to torch's semi-structured tensors; ``{"error": why}`` where that cannot be measured."""
    if plan.pattern != "2:4":
        return {"error": "the plan is unstructured; GPU sparse tensor cores run the 2:4 pattern only"}
    if not torch.cuda.is_available():
        return {"error": "no CUDA GPU here; torch's 2:4 semi-structured kernels need an NVIDIA GPU (Ampere or newer)"}
    try:
        from torch.sparse import to_sparse_semi_structured

        device = torch.device("cuda")
        fast, slow = copy.deepcopy(sparse).half().to(device).eval(), copy.deepcopy(dense).half().to(device).eval()
        modules = dict(fast.named_modules())
        converted, skipped = [], {}
        for name, (total, kept) in plan.channels.items():
            if kept >= total:
                continue
            module = modules[name]
            if not isinstance(module, nn.Linear):
                skipped[name] = "a convolution; torch's semi-structured sparsity covers linear layers"
                continue
            try:
                module.weight = nn.Parameter(to_sparse_semi_structured(module.weight.detach()), requires_grad=False)
                converted.append(name)
            except Exception as exc:  # shapes the kernels refuse (too few rows or columns)
                skipped[name] = short(exc)
        settings = LatencySettings(batch_size=_CUDA_BATCH, device="cuda", repeats=50)
        x = example_input.expand(_CUDA_BATCH, *example_input.shape[1:]).contiguous().to(device).half()
        slow_ms, fast_ms = round_robin([slow, fast], x, settings, rounds=5)
        return {"dense_ms": slow_ms.median_ms, "sparse_ms": fast_ms.median_ms, "batch_size": _CUDA_BATCH,
                "converted": converted, "skipped": skipped, "device": torch.cuda.get_device_name(0)}
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {short(exc)}"}


def _write_bundle(out_dir: Path, report: SparseExportReport, model: nn.Module, plan: Plan, task: Task,
                  profile: SparsityProfile) -> SparseExportReport:
    """Write the export beside ``out_dir`` and rename it there whole; check the compressed file
    loads back exactly."""
    with built_whole(out_dir) as tmp:
        plan.save(tmp / "plan.json")
        save_sparse(model, plan, tmp / "model.pt", profile=profile)
        loaded, _ = load_sparse(tmp / "model.pt", task.model, ignored_layers=tuple(task.ignored_layers))
        exact = all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
        row = replace(report.exported_row, file_bytes=(tmp / "model.pt").stat().st_size)
        report = replace(report, round_trip_exact=exact, **{report.exported: row})
        fig = plots.plan_ratios(dict(row.layer_sparsity), title=f"exported plan ({report.exported}): fraction of "
                                                                 "weights zeroed per layer, as measured")
        try:
            fig.savefig(tmp / "sparsity_per_layer.png", dpi=100)
        finally:
            plots.close(fig)
        report = replace(report, figures={"sparsity_per_layer.png": "the exported model's sparsity per layer"})
        (tmp / "report.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        (tmp / "report.md").write_text(sparse_report_markdown(report))
    return report


def _log_export(inputs: _Inputs, report: SparseExportReport, workdir: str | os.PathLike[str] | None) -> str | None:
    """The bundle and its numbers onto the search's MLflow parent run, in its own artifact folder
    ``export/<n>-<out dir name>`` with its metrics at step ``n`` (as channel exports are logged)."""
    from ..study import read_record
    from ..tracking import Tracker

    record = read_record(inputs.study)
    if not (record.mlflow_run_id and inputs.tracking_uri):
        return None
    tracker = Tracker(inputs.tracking_uri, record.experiment or inputs.settings.space.display_name,
                      artifact_root=resolve_workdir(workdir) / "mlartifacts")
    number = len(tracker.artifact_folders(record.mlflow_run_id, "export")) + 1
    folder = f"export/{number}-{re.sub(r'[^A-Za-z0-9._-]+', '_', report.out_dir.name)}"
    for path in sorted(report.out_dir.iterdir()):
        tracker.log_file(record.mlflow_run_id, path, folder)
    split, lat = report.split, report.latency
    tracker.log_metrics(record.mlflow_run_id, {
        f"export_{split}_score_best": report.searched.score, f"export_{split}_score_uniform": report.uniform.score,
        f"export_{split}_score_dense": report.dense.score, "export_val_score_best": report.searched.val_score,
        "export_val_score_uniform": report.uniform.val_score, "export_sparsity": report.exported_row.sparsity,
        "export_file_bytes": report.exported_row.file_bytes, "export_dense_file_bytes": report.dense.file_bytes,
        "export_size_ratio": report.size_ratio, "export_latency_ms_dense": lat.cpu_dense_ms,
        "export_latency_ms_sparse": lat.cpu_sparse_ms, "export_speedup": lat.cpu_speedup,
        **({"export_speedup_cuda_2_4": lat.cuda["dense_ms"] / lat.cuda["sparse_ms"]} if "sparse_ms" in lat.cuda else {}),
    }, step=number)
    return f"MLflow run {record.mlflow_run_id}, artifacts {folder}/"
