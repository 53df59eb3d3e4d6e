"""What a sparsity export measured, typed, and how ``report.md`` and ``report.json`` show it.

Size is the point of weight sparsity, so the report leads with bytes: the dense model's file, the
compressed file, and the tensors inside it that the search's size model predicts. Latency is
reported as measured, with what to expect: dense CPU kernels multiply the zeros like any other
weight, so the sparse model runs as fast as the dense one there; only torch's semi-structured
(2:4) kernels on a CUDA GPU skip them, and only in linear layers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._compare import ScoreDifference
from .._report import budget_text
from .._timing import LatencySettings
from ..plan import Plan

__all__ = ["SparseModelRow", "SparseLatency", "SparseExportReport", "sparse_report_markdown"]


@dataclass(frozen=True)
class SparseModelRow:
    """One model of a sparsity export (dense, searched or uniform), measured on the model itself.

    Attributes:
        score: the task's score on the report's split; ``val_score`` after fine-tuning (None: dense).
        nonzeros: nonzero weights of the prunable tensors; ``sparsity`` the fraction that is zero.
        layer_sparsity: tensor -> the fraction of its weights that is zero.
        file_bytes: the model file (the dense state dict for the dense model; the compressed file
            for a sparse one); ``payload_bytes`` the tensors inside it (what ``size=`` budgets count).
        subsets: score on each named part of the test split.
    """

    score: float
    val_score: float | None
    nonzeros: int
    sparsity: float
    layer_sparsity: Mapping[str, float]
    file_bytes: int
    payload_bytes: int
    subsets: Mapping[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"score": self.score, "val_score_finetuned": self.val_score, "nonzeros": self.nonzeros,
                "sparsity": self.sparsity, "layer_sparsity": dict(self.layer_sparsity), "file_bytes": self.file_bytes,
                "payload_bytes": self.payload_bytes, **({"subsets": dict(self.subsets)} if self.subsets else {})}


@dataclass(frozen=True)
class SparseLatency:
    """Dense against sparse latency (ms per batch), as measured.

    ``cpu_*``: both models in PyTorch on this CPU, timed round-robin (dense kernels: zeros cost
    what any weight costs). ``cuda``: fp16 on a CUDA GPU with the 2:4 layers converted to torch's
    semi-structured sparse tensors (``dense_ms``, ``sparse_ms``, ``batch_size``, ``converted`` and
    ``skipped`` layers), or ``{"error": why not measured}``.
    """

    settings: LatencySettings
    cpu_dense_ms: float
    cpu_sparse_ms: float
    cpu_dense_spread_ms: float
    cpu_sparse_spread_ms: float
    cuda: Mapping[str, Any]

    @property
    def cpu_speedup(self) -> float:
        return self.cpu_dense_ms / self.cpu_sparse_ms

    def to_dict(self) -> dict[str, Any]:
        return {"settings": self.settings.to_dict(), "cpu": {
            "dense_ms": self.cpu_dense_ms, "sparse_ms": self.cpu_sparse_ms, "dense_spread_ms": self.cpu_dense_spread_ms,
            "sparse_spread_ms": self.cpu_sparse_spread_ms, "speedup": self.cpu_speedup}, "cuda_2_4": dict(self.cuda)}


@dataclass(frozen=True)
class SparseExportReport:
    """What ``autoprune export`` wrote and measured for a sparsity search (``report.json``).

    Attributes:
        out_dir, plan, trial, study, task, strategy, budget, pattern: what was exported, from where.
        finetune_epochs, schedule, distill, precision: how both sparse models were fine-tuned.
        split: the split ``score`` is measured on (``test``, or ``val`` for tasks without one).
        dense, searched, uniform: the three models' rows.
        val_score_before_finetune: the searched plan's candidate score during the search.
        choose, exported: ``--choose`` and which model was written (``searched`` or ``uniform``).
        round_trip_exact: whether ``model.pt``, loaded back, equals the exported model bit for bit.
        latency: dense against sparse latency.
        differences: paired-bootstrap 95% intervals of score differences (as the channel report's).
        figures: PNG files beside the report, with what each shows.
        mlflow_location: the MLflow run and artifact folder of this export.
    """

    out_dir: Path
    plan: Plan
    trial: int
    study: str
    task: str
    strategy: str | None
    budget: Mapping[str, float] | None
    pattern: str
    finetune_epochs: float
    schedule: str
    split: str
    dense: SparseModelRow
    searched: SparseModelRow
    uniform: SparseModelRow
    val_score_before_finetune: float
    choose: str
    exported: str
    round_trip_exact: bool
    latency: SparseLatency
    precision: str = "fp32"
    distill: Mapping[str, float] | None = None
    differences: Mapping[str, ScoreDifference] = field(default_factory=dict)
    figures: Mapping[str, str] = field(default_factory=dict)
    mlflow_location: str | None = None

    mode = "sparsity"

    @property
    def exported_row(self) -> SparseModelRow:
        return self.searched if self.exported == "searched" else self.uniform

    @property
    def size_ratio(self) -> float:
        """The exported compressed file's bytes over the dense model file's."""
        return self.exported_row.file_bytes / self.dense.file_bytes

    def latency_misses(self) -> list[str]:
        return []  # a sparsity search has no latency budget

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": "sparsity", "study": self.study, "trial": self.trial, "task": self.task, "budget": self.budget,
            "strategy": self.strategy, "pattern": self.pattern, "finetune_epochs": self.finetune_epochs,
            "schedule": self.schedule, "score_split": self.split, "choose": self.choose, "exported": self.exported,
            "dense": self.dense.to_dict(), "pruned": {**self.searched.to_dict(),
                                                      "val_score_before_finetune": self.val_score_before_finetune,
                                                      "planned_sparsity": dict(self.plan.ratios)},
            "uniform": self.uniform.to_dict(), "size_ratio": self.size_ratio,
            "round_trip_exact": self.round_trip_exact, "latency": self.latency.to_dict(),
            "precision": self.precision, "distill": dict(self.distill) if self.distill is not None else None,
            "differences": {name: d.to_dict() for name, d in self.differences.items()}, "figures": dict(self.figures),
        }


def _kb(n: int) -> str:
    return f"{n / 1024:,.1f} KiB"


def sparse_report_markdown(r: SparseExportReport) -> str:
    """The report as ``report.md`` shows it."""
    split, d = r.split, r.dense
    distill = (f"distilled from the dense model (temperature {r.distill['temperature']:g}, weight {r.distill['alpha']:g})"
               if r.distill else "without distillation")
    lines = [
        f"# autoprune export: {r.task}, study {r.study} (weight sparsity, {r.pattern})", "",
        f"Budget {budget_text(r.budget)}; best plan from {r.strategy}; both sparse models fine-tuned "
        f"{r.finetune_epochs} epoch(s) with their zeros held, schedule {r.schedule}, {distill}, {r.precision}; "
        f"scores on the {split} split. Sparsity is measured on the models as written (exact zeros).", "",
        f"| model | {split} score | val score, fine-tuned | nonzero weights | sparsity | file | tensors in it |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in (("dense", d), (f"searched (trial {r.trial})", r.searched), ("uniform baseline", r.uniform)):
        val = f"{row.val_score:.4f}" if row.val_score is not None else ""
        lines.append(f"| {name} | {row.score:.4f} | {val} | {row.nonzeros:,} | {row.sparsity:.1%} | "
                     f"{_kb(row.file_bytes)} | {_kb(row.payload_bytes)} |")
    e = r.exported_row
    lines += [
        "", f"The compressed `model.pt` ({r.exported} plan) is {_kb(e.file_bytes)}, {r.size_ratio:.1%} of the dense "
        f"model's file ({_kb(d.file_bytes)}): a bitmask and the nonzero values per sparse tensor, the rest dense. "
        + ("It loads back bit for bit" if r.round_trip_exact else "**It did NOT load back exactly**")
        + " with `ap.load_pruned(path, dense_model)` (`torch.load(weights_only=True)`).",
        f"The search scored trial {r.trial} {r.val_score_before_finetune:.4f} on the validation split before "
        "fine-tuning (its candidate score).", "",
    ]
    for label, key in (("Searched minus uniform", f"{split}_searched_minus_uniform"),
                       ("Searched minus dense", f"{split}_searched_minus_dense")):
        diff = r.differences.get(key)
        plain = r.searched.score - (r.uniform.score if "uniform" in key else d.score)
        lines.append(f"- {label} on the {split} split: "
                     + (f"{diff.describe()}." if diff else f"{plain:+.4f} (the loader's order varies: no interval)."))
    if r.exported == "uniform":
        lines.append("- Exported: the uniform plan, which scores higher on the validation split after fine-tuning "
                     "(--choose val).")
    lines += ["", "## Sparsity per layer", "", "| layer | planned | measured, exported model |", "|---|---:|---:|"]
    lines += [f"| {name} | {r.plan.ratios[name]:.1%} | {e.layer_sparsity[name]:.1%} |" for name in r.plan.ratios]
    lat = r.latency
    s = lat.settings
    lines += [
        "", f"## Latency ({s.device}, batch {s.batch_size}, {s.threads} thread(s), median of {s.repeats})", "",
        "| model | ms per batch | spread (p90-p10) |", "|---|---:|---:|",
        f"| dense | {lat.cpu_dense_ms:.3f} | {lat.cpu_dense_spread_ms:.3f} |",
        f"| sparse (dense kernels) | {lat.cpu_sparse_ms:.3f} | {lat.cpu_sparse_spread_ms:.3f} |", "",
        f"Measured speedup {lat.cpu_speedup:.2f}x. Dense CPU kernels multiply zeros like any other weight, so "
        "unstructured or 2:4 sparsity makes the model smaller, not faster, here; channel pruning "
        "(mode: channels) is what speeds up dense hardware.",
    ]
    cuda = lat.cuda
    if "sparse_ms" in cuda:
        lines.append(f"On the CUDA GPU, fp16, batch {cuda['batch_size']}: dense {cuda['dense_ms']:.3f} ms, 2:4 "
                     f"semi-structured {cuda['sparse_ms']:.3f} ms ({cuda['dense_ms'] / cuda['sparse_ms']:.2f}x), "
                     f"with {len(cuda['converted'])} linear layer(s) converted"
                     + (f"; left dense: {', '.join(f'{k} ({v})' for k, v in cuda['skipped'].items())}"
                        if cuda.get("skipped") else "") + ".")
    else:
        lines.append(f"2:4 sparse tensor cores: not measured ({cuda.get('error', 'unknown reason')}).")
    lines.append("")
    if r.figures:
        lines += ["## Figures", "", *[f"![{caption}]({name})" for name, caption in r.figures.items()], ""]
    return "\n".join(lines)
