"""What ``autoprune export`` measured, typed: the rows of the report, its latency section, and
the Markdown and JSON it is written as (``report.json`` keeps the layout of autoprune 0.1)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._compare import ScoreDifference
from ._latency_check import LatencyCheck, budget_verdict, relative_to_limit
from .budget import Budget
from .latency import LatencySettings
from .plan import Plan

__all__ = ["ModelRow", "LatencyReport", "ExportReport", "report_markdown", "uniform_wins_on_val", "budget_text"]


def uniform_wins_on_val(searched_val: float, uniform_val: float) -> bool:
    """``--choose val``'s rule: the uniform plan replaces the searched one only if it scores strictly
    higher on the validation split after the same fine-tuning."""
    return uniform_val > searched_val


@dataclass(frozen=True)
class ModelRow:
    """One model of the report (dense, searched or uniform).

    Attributes:
        macs, params: counted by Torch-Pruning on the model itself.
        score: the task's score on the report's split (test, or val for tasks without one).
        val_score: the validation score after fine-tuning (None for the dense model).
        subsets: score on each named part of the test split (CIFAR-10's ``lossless`` images).
        macs_ratio, params_ratio: over the dense model's.
    """

    macs: float
    params: float
    score: float
    val_score: float | None = None
    subsets: Mapping[str, float] = field(default_factory=dict)
    macs_ratio: float = 1.0
    params_ratio: float = 1.0


@dataclass(frozen=True)
class LatencyReport:
    """Dense and pruned latency, timed round-robin (ms per batch of ``settings``).

    For a study with a latency budget, ``limit_ms`` is that budget at this measurement (a
    fraction of the dense model as timed here) and ``tolerance`` the search's timing tolerance.
    """

    settings: LatencySettings
    dense_ms: float
    dense_spread_ms: float
    pruned_ms: float
    pruned_spread_ms: float
    macs_reduction: float
    simd_channels: int
    unaligned_groups: tuple[str, ...]
    onnxruntime: Mapping[str, Any] | None = None
    budget: str | None = None
    limit_ms: float | None = None
    tolerance: float = 0.0

    @property
    def speedup(self) -> float:
        return self.dense_ms / self.pruned_ms

    @property
    def budget_met(self) -> bool | None:
        """Whether the pruned model measured within the latency budget plus tolerance (None: no budget)."""
        return None if self.limit_ms is None else self.pruned_ms <= self.limit_ms * (1 + self.tolerance)

    def to_dict(self) -> dict[str, Any]:
        data = {
            "settings": self.settings.to_dict(), "dense_ms": self.dense_ms, "dense_spread_ms": self.dense_spread_ms,
            "pruned_ms": self.pruned_ms, "pruned_spread_ms": self.pruned_spread_ms, "speedup": self.speedup,
            "macs_reduction": self.macs_reduction, "simd_channels": self.simd_channels,
            "unaligned_groups": list(self.unaligned_groups),
        }
        if self.onnxruntime is not None:
            data["onnxruntime"] = dict(self.onnxruntime)
        if self.limit_ms is not None:
            data.update(budget=self.budget, limit_ms=self.limit_ms, tolerance=self.tolerance, budget_met=self.budget_met)
        return data


@dataclass(frozen=True)
class ExportReport:
    """What ``autoprune export`` wrote and measured (``report.json`` is :meth:`to_dict`).

    Attributes:
        out_dir: the directory written.
        plan: the plan of the exported model (searched, or uniform under ``--choose val``).
        trial: the study's trial the searched plan came from.
        study, task, strategy, budget: where the plan came from.
        picked_within: export's ``--budget`` (``flops=0.3``) the trial was picked under, if any.
        finetune_epochs, schedule, distill, precision: how both pruned models were fine-tuned.
        split: the split ``score`` is measured on (``test``, or ``val`` for tasks without one).
        dense, searched, uniform: the three models' rows.
        val_score_before_finetune: the searched plan's candidate score during the search.
        choose, exported: ``--choose`` and which model was written (``searched`` or ``uniform``).
        latency: dense and exported latency.
        formats: the deployable files written and how they compare with PyTorch.
        mlflow_location: the MLflow run and artifact folder of this export (each export its own).
        figures: the PNG files written beside the report (score against MACs with the exported plan
            marked, the plan's ratios per group), each with what it shows.
        latency_budget: how the search's best plans measured after a latency search.
        differences: ``<split>_searched_minus_uniform``, ``<split>_searched_minus_dense`` and
            ``val_searched_minus_uniform`` (after fine-tuning), each with a paired-bootstrap 95%
            interval: a difference whose interval spans 0 is within noise, not a win.
    """

    out_dir: Path
    plan: Plan
    trial: int
    study: str
    task: str
    strategy: str | None
    budget: Mapping[str, float] | None
    finetune_epochs: float
    schedule: str
    split: str
    dense: ModelRow
    searched: ModelRow
    uniform: ModelRow
    val_score_before_finetune: float
    choose: str
    exported: str
    latency: LatencyReport | None = None
    formats: Mapping[str, Any] = field(default_factory=dict)
    distill: Mapping[str, float] | None = None
    precision: str = "fp32"
    latency_budget: LatencyCheck | None = None
    differences: Mapping[str, ScoreDifference] = field(default_factory=dict)
    mlflow_location: str | None = None  # where the search's MLflow run keeps this export
    picked_within: str | None = None
    figures: Mapping[str, str] = field(default_factory=dict)  # PNG file beside report.md -> what it shows

    def latency_misses(self) -> list[str]:
        """Warnings for a latency budget missed, by the search's check or by this export's timing."""
        misses = []
        if self.latency_budget is not None and self.latency_budget.miss() is not None:
            misses.append(f"the search's {self.latency_budget.miss()}")
        lat = self.latency
        if lat is not None and lat.limit_ms is not None and not lat.budget_met:
            misses.append(f"latency budget {lat.budget} MISSED by the exported model: {lat.pruned_ms:.3f} ms per batch, "
                          f"{relative_to_limit(lat.pruned_ms, lat.limit_ms)} {lat.limit_ms:.3f} ms (tolerance "
                          f"{lat.tolerance:.1%}) as measured by this export")
        return misses

    @property
    def exported_row(self) -> ModelRow:
        return self.searched if self.exported == "searched" else self.uniform

    @property
    def data(self) -> dict[str, Any]:
        """The report as ``report.json`` holds it (the name autoprune 0.1 used)."""
        return self.to_dict()

    def to_dict(self) -> dict[str, Any]:
        s, u, d = self.searched, self.uniform, self.dense
        data: dict[str, Any] = {
            "study": self.study, "trial": self.trial, "task": self.task, "budget": self.budget,
            "strategy": self.strategy, "picked_within": self.picked_within,
            "finetune_epochs": self.finetune_epochs, "schedule": self.schedule,
            "score_split": self.split,
            "dense": {"macs": d.macs, "params": d.params, "score": d.score},
            "pruned": {"macs": s.macs, "params": s.params, "macs_ratio": s.macs_ratio, "params_ratio": s.params_ratio,
                       "score": s.score, "val_score_before_finetune": self.val_score_before_finetune,
                       "score_minus_uniform": s.score - u.score, "val_score_finetuned": s.val_score},
            "uniform": {"macs": u.macs, "params": u.params, "macs_ratio": u.macs_ratio, "score": u.score,
                        "val_score_finetuned": u.val_score},
            "choose": self.choose, "exported": self.exported,
        }
        if self.latency is not None:
            data["latency"] = self.latency.to_dict()
        data["formats"] = dict(self.formats)
        data["distill"] = dict(self.distill) if self.distill is not None else None
        data["precision"] = self.precision
        data["differences"] = {name: d.to_dict() for name, d in self.differences.items()}
        data["figures"] = dict(self.figures)
        if self.latency_budget is not None:
            data["latency_budget"] = self.latency_budget.to_dict()  # the search's check; "latency" has this export's
        if d.subsets:
            data["test_subsets"] = {name: {"dense": d.subsets[name], "pruned": s.subsets[name],
                                           "uniform": u.subsets[name]} for name in d.subsets}
        return data


def report_markdown(r: ExportReport) -> str:
    """The report as ``report.md`` shows it."""
    split = r.split
    rows = [("dense", r.dense, ""), (f"searched (trial {r.trial})", r.searched, f"{r.searched.val_score:.4f}"),
            ("uniform baseline", r.uniform, f"{r.uniform.val_score:.4f}")]
    subsets = list(r.dense.subsets)
    distill = (f"distilled from the dense model (temperature {r.distill['temperature']:g}, weight {r.distill['alpha']:g})"
               if r.distill else "without distillation")
    lines = [
        f"# autoprune export: {r.task}, study {r.study}",
        "",
        *[f"**WARNING: {miss}.**\n" for miss in r.latency_misses()],
        f"Budget {budget_text(r.budget)}"
        + (f" (the best trial within export --budget {r.picked_within})" if r.picked_within else "")
        + f"; best plan from {r.strategy}; both pruned models fine-tuned "
        f"{r.finetune_epochs} epoch(s), schedule {r.schedule}, {distill}, {r.precision}; scores on the {split} "
        "split. MACs as Torch-Pruning counts them.",
        "",
        f"| model | MACs | MACs ratio | params | {split} score |" + "".join(f" {split} {n} |" for n in subsets)
        + " val score, fine-tuned |",
        "|---|---:|---:|---:|---:|" + "---:|" * len(subsets) + "---:|",
    ]
    lines += [f"| {name} | {row.macs:,.0f} | {row.macs_ratio:.3f} | {row.params:,.0f} | {row.score:.4f} |"
              + "".join(f" {row.subsets[n]:.4f} |" for n in subsets) + f" {val} |" for name, row, val in rows]
    lines += ["", f"The search scored trial {r.trial} {r.val_score_before_finetune:.4f} on the validation split "
              "before fine-tuning (its candidate score).", ""]
    for label, key in (("Searched minus uniform", f"{split}_searched_minus_uniform"),
                       ("Searched minus dense", f"{split}_searched_minus_dense")):
        d = r.differences.get(key)
        plain = (r.searched.score - (r.uniform.score if "uniform" in key else r.dense.score))
        lines.append(f"- {label} on the {split} split: "
                     + (f"{d.describe()}." if d else f"{plain:+.4f} (the loader's order varies: no interval)."))
    val = r.differences.get("val_searched_minus_uniform")
    noise = f" (searched minus uniform on the validation split {val.describe()})" if val else ""
    if r.exported == "uniform":
        lines.append(f"- Exported: the uniform plan, which scores higher on the validation split after fine-tuning "
                     f"(--choose val){noise}.")
    elif r.choose == "val":
        lines.append(f"- Exported: the searched plan, which scores at least as high on the validation split after "
                     f"fine-tuning{noise}.")
    elif uniform_wins_on_val(r.searched.val_score, r.uniform.val_score):
        lines.append(f"- Exported: the searched plan, although the uniform plan scores higher on the validation split after "
                     f"fine-tuning{noise}; `--choose val` would export that one instead.")
    lines.append("")
    if r.latency is not None:
        lines += _latency_markdown(r.latency)
    if r.latency_budget is not None or (r.latency is not None and r.latency.limit_ms is not None):
        lines += _latency_budget_markdown(r)
    for name, info in r.formats.items():
        if "file" in info:
            lines.append(f"- {info['file']} ({name}): {_format_check(info)}")
        else:
            lines.append(f"- {name}: not written ({info['error']})")
    lines.append("")
    if r.figures:
        lines += ["## Figures", "", *[f"![{caption}]({name})" for name, caption in r.figures.items()], ""]
    return "\n".join(lines)


def budget_text(budget: Mapping[str, float] | None) -> str:
    """A budget as the command line writes it (``flops=0.5``), not as a Python dict."""
    return str(Budget.from_dict(budget)) if budget else "none"


def _format_check(info: Mapping[str, Any]) -> str:
    if "max_abs_diff" not in info:
        return str(info.get("check", "outputs not compared"))
    verdict = "outputs match PyTorch" if info.get("matches") else "OUTPUTS DIFFER from PyTorch beyond the tolerance"
    return f"{verdict} (max abs diff {info['max_abs_diff']:.1e})"


def _latency_budget_markdown(r: ExportReport) -> list[str]:
    """The latency budget as the search checked it and as this export measured it."""
    lines = ["## Latency budget", ""]
    if r.latency_budget is not None:
        lines += [f"- search: {line}" for line in r.latency_budget.lines()]
    lat = r.latency
    if lat is not None and lat.limit_ms is not None:
        lines.append(f"- this export: the exported model measured {lat.pruned_ms:.3f} ms against a limit of "
                     f"{lat.limit_ms:.3f} ms ({lat.budget}, the dense model measured {lat.dense_ms:.3f} ms here): "
                     f"{budget_verdict(lat.pruned_ms, lat.limit_ms, lat.tolerance)}")
    lines.append("")
    return lines


def _latency_markdown(lat: LatencyReport) -> list[str]:
    s = lat.settings
    lines = [
        f"## Latency ({s.device}, batch {s.batch_size}, {s.threads} thread(s), median of {s.repeats})",
        "",
        "| model | ms per batch | spread (p90-p10) |",
        "|---|---:|---:|",
        f"| dense | {lat.dense_ms:.3f} | {lat.dense_spread_ms:.3f} |",
        f"| pruned | {lat.pruned_ms:.3f} | {lat.pruned_spread_ms:.3f} |",
    ]
    ort = lat.onnxruntime or {}
    if "pruned_ms" in ort:
        lines += [f"| dense, ONNX Runtime | {ort['dense_ms']:.3f} | |", f"| pruned, ONNX Runtime | {ort['pruned_ms']:.3f} | |"]
    lines += ["", f"Measured speedup {lat.speedup:.2f}x (PyTorch)"
              + (f", {ort['speedup']:.2f}x (ONNX Runtime)" if "speedup" in ort else "")
              + f" for a {lat.macs_reduction:.2f}x MACs reduction."]
    if "error" in ort:
        lines.append(f"ONNX Runtime latency not measured: {ort['error']}.")
    if lat.unaligned_groups:
        lines.append(
            f"{len(lat.unaligned_groups)} group(s) keep a channel count that is not a multiple of "
            f"{lat.simd_channels}, this device's vector width; kernels pad them, so their MACs cut buys "
            f"less time. Search with `groups: {{round_to: {lat.simd_channels}}}` for a faster model.")
    lines.append("")
    return lines
