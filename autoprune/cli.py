"""The ``autoprune`` command line: search, export, apply, profile, train, ui.

User mistakes (any :class:`~autoprune.errors.AutopruneError`) print one message and exit with
status 2, never a traceback.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from .errors import AutopruneError, ConfigError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Search per-layer structured-pruning ratios under a FLOPs (MACs), params or latency budget.",
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)

WorkdirOpt = Annotated[
    Optional[Path], typer.Option("--workdir", help="Where runs write (default ./autoprune-runs or $AUTOPRUNE_HOME).")
]
DataRootOpt = Annotated[
    Optional[Path], typer.Option("--data-root", help="Directory with datasets that do not ship offline (CIFAR-10); or $AUTOPRUNE_DATA.")
]


def _set_threads(threads: int | None) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)


@app.command()
def profile(
    task: Annotated[Optional[str], typer.Option("--task", help="Built-in task name or package.module:function.")] = None,
    space: Annotated[Optional[str], typer.Option("--space", help="Search space file whose task to profile.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the profile as JSON.")] = False,
    workdir: WorkdirOpt = None,
    data_root: DataRootOpt = None,
) -> None:
    """Show the prunable groups of a task's model, their channels and share of MACs."""
    from .profile import profile_model
    from .space import load_space
    from .task import builtin_task_names, dense_model, load_task

    if task and space:
        raise ConfigError("Give either --task or --space, not both.")
    name = task or (load_space(space).task if space else load_space("default").task)
    if name in builtin_task_names():
        model, example_input = dense_model(name, workdir=workdir, pretrained=False)
        prof = replace(profile_model(model, example_input), task=name)
    else:
        prof = profile_model(load_task(name, data_root=data_root, workdir=workdir))
    if as_json:
        typer.echo(json.dumps(prof.to_dict(), indent=2))
        return
    table = Table(title=f"{name}: {len(prof.groups)} prunable groups, {prof.macs / 1e6:.2f} M MACs, "
                        f"{prof.params / 1e6:.3f} M params (MACs as Torch-Pruning counts them)")
    table.add_column("#", justify="right")
    table.add_column("group (root layer)")
    table.add_column("channels", justify="right")
    table.add_column("MACs share", justify="right")
    table.add_column("layers coupled")
    for i, g in enumerate(prof.groups):
        members = ", ".join(m for m in g.members if m.endswith(":out"))
        table.add_row(str(i), g.name, str(g.channels), f"{g.macs_share:.1%}", members)
    console.print(table)
    console.print(f"never pruned: {', '.join(prof.ignored_layers) or '-'} (and the input layer's input channels)")


@app.command()
def apply(
    plan: Annotated[Path, typer.Option("--plan", help="Plan JSON file (schema autoprune.plan/1).")],
    out: Annotated[Path, typer.Option("--out", help="Where to write the pruned model (.pt).")],
    task: Annotated[Optional[str], typer.Option("--task", help="Task whose dense model to prune (default: the plan's).")] = None,
    importance: Annotated[str, typer.Option("--importance", help="l1, l2, taylor, bn_scale or random.")] = "l1",
    workdir: WorkdirOpt = None,
    data_root: DataRootOpt = None,
) -> None:
    """Prune a task's dense model by a plan and save the physically smaller model."""
    from .export import save_pruned
    from .plan import Plan, apply_plan
    from .pruning import count_macs_params
    from .task import load_task

    loaded_plan = Plan.load(plan)
    name = task or loaded_plan.task
    if not name:
        raise ConfigError(f"Plan {plan} names no task; pass --task.")
    loaded = load_task(name, data_root=data_root, workdir=workdir)
    batches = [next(iter(loaded.train_loader))] if importance == "taylor" else None
    pruned = apply_plan(loaded.model, loaded_plan, example_input=loaded.example_input, importance=importance,
                        ignored_layers=loaded.ignored_layers, batches=batches)
    dense_macs, dense_params = count_macs_params(loaded.model, loaded.example_input)
    macs, params = count_macs_params(pruned, loaded.example_input)
    save_pruned(pruned, loaded_plan, out)
    console.print(f"pruned {name}: MACs {dense_macs:,} -> {macs:,} ({macs / dense_macs:.3f}), "
                  f"params {dense_params:,} -> {params:,} ({params / dense_params:.3f})")
    console.print(f"saved to {out} (loads with torch.load(weights_only=True); see autoprune.export.load_pruned)")


@app.command()
def train(
    task: Annotated[str, typer.Option("--task", help="Built-in task to train.")],
    epochs: Annotated[Optional[float], typer.Option("--epochs", help="Epochs (default: the task's recipe).")] = None,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    threads: Annotated[Optional[int], typer.Option("--threads", help="torch threads (default: all cores).")] = None,
    workdir: WorkdirOpt = None,
    data_root: DataRootOpt = None,
) -> None:
    """Train a built-in task's dense model (SGD+momentum, cosine LR) and cache its checkpoint."""
    from .task import train_task

    _set_threads(threads)
    path, meta = train_task(task, epochs=epochs, data_root=str(data_root) if data_root else None,
                            workdir=workdir, seed=seed)
    console.print(f"{task}: val accuracy {meta['val_accuracy']:.4f}, test accuracy {meta['test_accuracy']:.4f} "
                  f"after {meta['epochs']} epochs; checkpoint {path}")


def main() -> None:
    """Console entry point: user mistakes exit 2 with one message, no traceback."""
    import click

    command = typer.main.get_command(app)
    try:
        code = command.main(standalone_mode=False)
    except AutopruneError as exc:
        err_console.print(f"[bold red]error:[/bold red] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except click.exceptions.Abort:
        err_console.print("aborted")
        sys.exit(130)
    except click.exceptions.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":  # pragma: no cover
    main()
