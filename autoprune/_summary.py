"""The summary ``autoprune search`` prints: one shape for every strategy.

The chosen plan (or, for a Pareto search, the front as a table), its val score labelled as the
search measured it (before export's fine-tuning) beside the dense model and both baselines at the
same budget, its costs, the latency check of a latency search (with a warning line when the
budget is missed), then where the study and its MLflow runs are and how to export.
"""

from __future__ import annotations

from collections.abc import Sequence

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ._finish import SearchResult
from .errors import redact
from .evaluate import TrialResult
from .plan import Plan

__all__ = ["print_search_result", "val_score_label", "FRONT_ROWS"]

#: Rows of a Pareto front shown; a longer front is thinned evenly, ends kept.
FRONT_ROWS = 12


def val_score_label(result: TrialResult) -> str:
    """What a search's val score is: a candidate score, not the exported model's."""
    if result.finetune_steps:
        return f"val score after {result.finetune_steps} fine-tuning steps (before export's fine-tuning)"
    return "val score before fine-tuning (BatchNorm recalibrated only)"


def _thinned(front: Sequence[tuple[Plan, TrialResult]], rows: int) -> list[tuple[Plan, TrialResult]]:
    if len(front) <= rows:
        return list(front)
    picks = sorted({round(i * (len(front) - 1) / (rows - 1)) for i in range(rows)})
    return [front[i] for i in picks]


def _plan_table(result: SearchResult) -> Table:
    plan = result.best_plan
    table = Table(title=f"best plan of study {escape(result.study_name)} (trial {plan.provenance.get('trial')})")
    sparse = plan.mode == "sparsity"
    table.add_column("weight tensor" if sparse else "group")
    table.add_column("weights" if sparse else "channels", justify="right")
    table.add_column("zeroed" if sparse else "removed", justify="right")
    for name, (dense, kept) in plan.channels.items():
        table.add_row(escape(name), f"{dense} -> {kept}", f"{plan.ratios[name]:.1%}")
    return table


def _front_table(result: SearchResult) -> Table:
    front = sorted(result.pareto, key=lambda p: p[1].macs_ratio)
    shown = _thinned(front, FRONT_ROWS)
    more = f", {len(shown)} shown" if len(shown) < len(front) else ""
    table = Table(title=f"Pareto front of study {escape(result.study_name)}: {len(front)} plans{more} "
                        "(val score before fine-tuning)")
    for column in ("trial", "MACs ratio", "params ratio", "val score"):
        table.add_column(column, justify="right")
    timed = any(r.latency_ms is not None for _, r in shown)
    if timed:
        table.add_column("latency ms (predicted)", justify="right")
    for plan, r in shown:
        row = [str(plan.provenance.get("trial")), f"{r.macs_ratio:.3f}", f"{r.params_ratio:.3f}", f"{r.val_score:.4f}"]
        table.add_row(*row, *([f"{r.latency_ms:.3f}" if r.latency_ms is not None else "-"] if timed else []))
    return table


def print_search_result(console: Console, result: SearchResult) -> None:
    """Print ``result`` as ``autoprune search`` ends."""
    if result.best_plan is None or result.best_result is None:
        console.print(f"study {escape(result.study_name)}: no finished trial yet")
        return
    best, pareto = result.best_result, result.objective == "pareto"
    console.print(_front_table(result) if pareto else _plan_table(result))
    baselines = "".join(f", {k} baseline {v:.4f}" for k, v in result.baselines.items())
    which = f"highest on the front (trial {result.best_plan.provenance.get('trial')})" if pareto else "best plan"
    console.print(f"{val_score_label(best)}: {which} {best.val_score:.4f} (dense {result.dense_score:.4f}{baselines} "
                  "at the same budget)", highlight=False)
    if best.nonzeros is not None and best.size_bytes is not None:
        pattern = result.best_plan.pattern
        console.print(f"nonzero weights {best.nonzeros:,.0f} = {best.nonzeros_ratio:.3f} of dense ({pattern}); "
                      f"compressed size {best.size_bytes:,.0f} bytes = {best.size_ratio:.3f} of dense", highlight=False)
    else:
        console.print(f"MACs {best.macs:,.0f} = {best.macs_ratio:.3f} of dense; params {best.params_ratio:.3f} of dense",
                      highlight=False)
    if result.latency is not None:
        for line in result.latency.lines():
            console.print(escape(line), highlight=False)
        miss = result.latency.miss()
        if miss is not None:
            console.print(f"[bold red]warning:[/bold red] {escape(miss)}", highlight=False)
    console.print(f"{result.n_finished} finished trials in study [bold]{escape(result.study_name)}[/bold] "
                  f"({escape(redact(result.storage_url))})")
    console.print(f"MLflow: experiment {result.experiment!r}, run {result.mlflow_run_id} at "
                  f"{escape(redact(result.tracking_uri))}; browse with `autoprune ui`")
    if pareto:
        console.print(f"export a plan of the front: autoprune export --study {escape(result.study_name)} --out exported/ "
                      "--budget flops=<MACs ratio>", highlight=False)
    else:
        console.print(f"export: autoprune export --study {escape(result.study_name)} --out exported/", highlight=False)
    if result.stopped_early:
        console.print(f"[yellow]stopped after the current trial ({result.n_finished} finished); resume by running "
                      f"the same command again (it continues study {escape(result.study_name)})[/yellow]")
