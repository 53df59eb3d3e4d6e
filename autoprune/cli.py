"""The ``autoprune`` command line: search, export, apply, profile, train, ui.

User mistakes (any :class:`~autoprune.errors.AutopruneError`) print one message and exit with
status 2, never a traceback.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import warnings
from dataclasses import replace
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ._workdir import resolve_workdir, searched_workdir
from .errors import AutopruneError, ConfigError, redact
from .space import AGENTS, SAMPLERS
from .strategies import STRATEGY_NAMES

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

    if threads is not None and threads < 1:
        raise ConfigError(f"--threads must be a positive integer (torch threads), got {threads}.")
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
    """Show the prunable groups of a task's model, their channels and share of MACs (a sparsity
    space's: its weight tensors)."""
    from .space import load_space
    from .sparsity import profile_for
    from .task import builtin_task_names, dense_model, load_task

    if task and space:
        raise ConfigError("Give either --task or --space, not both.")
    loaded = load_space(space) if space else None
    name = task or (loaded.task if loaded else load_space("default").task)
    mode, pattern = (loaded.mode, loaded.pattern) if loaded else ("channels", "unstructured")
    if name in builtin_task_names():
        model, example_input = dense_model(name, workdir=workdir, pretrained=False)
        prof = replace(profile_for(model, example_input, mode=mode, pattern=pattern), task=name)
    else:
        # Profiles need no trained weights: a declared task's model is not trained for one.
        prof = profile_for(load_task(name, data_root=data_root, workdir=workdir, pretrained=False), mode=mode,
                           pattern=pattern)
    if as_json:
        typer.echo(json.dumps(prof.to_dict(), indent=2))
        return
    sparse = mode == "sparsity"
    table = Table(title=f"{prof.task}: {len(prof.groups)} {'weight tensors' if sparse else 'prunable groups'}, "
                        f"{prof.macs / 1e6:.2f} M MACs, {prof.params / 1e6:.3f} M params (MACs as Torch-Pruning counts them)")
    table.add_column("#", justify="right")
    table.add_column("layer" if sparse else "group (root layer)")
    table.add_column("weights" if sparse else "channels", justify="right")
    table.add_column("MACs share", justify="right")
    table.add_column("prunes")
    table.add_column("layers coupled")
    for i, g in enumerate(prof.groups):
        members = ", ".join(m for m in g.members if m.endswith(":out"))
        unit = (f"heads of {g.unit}" if g.kind == "heads" else f"{g.divisor} blocks" if g.divisor > 1
                else f"weights ({pattern})" if sparse else "channels")
        if g.embedding:
            unit += " (embedding: whole unless asked)"
        table.add_row(str(i), escape(g.name), str(g.channels), f"{g.macs_share:.1%}", unit, escape(members))
    console.print(table)
    for group, why in prof.left_whole:
        console.print(f"left {'dense' if sparse else 'whole'}: {escape(why)}")
    if sparse:  # weights are zeroed in place: no channel is removed, and dense kernels keep their speed
        return
    console.print(f"never pruned: {escape(', '.join(prof.ignored_layers) or '-')} (and the input layer's input channels)")
    from .latency import simd_round_to

    console.print(f"this CPU computes channels in blocks of {simd_round_to('cpu')}: for real speedups on it, search "
                  f"with `groups: {{round_to: {simd_round_to('cpu')}}}` (see README, Latency).")


@app.command()
def apply(
    plan: Annotated[Path, typer.Option("--plan", help="Plan JSON file (schema autoprune.plan/1, or /2 for sparsity plans).")],
    out: Annotated[Path, typer.Option("--out", help="Where to write the pruned model (.pt).")],
    task: Annotated[Optional[str], typer.Option("--task", help="Task whose dense model to prune (default: the plan's).")] = None,
    importance: Annotated[str, typer.Option("--importance", help="l1, l2, taylor, bn_scale or random (sparsity plans: not bn_scale).")] = "l1",
    recalibrate: Annotated[bool, typer.Option(
        "--recalibrate/--no-recalibrate",
        help="Re-estimate BatchNorm statistics on 16x64 training images, as the search scored the plan.")] = True,
    workdir: WorkdirOpt = None,
    data_root: DataRootOpt = None,
) -> None:
    """Prune a task's dense model by a plan and save the physically smaller model.

    The model is not fine-tuned (``autoprune export`` fine-tunes); its BatchNorm statistics are
    re-estimated on training images unless --no-recalibrate.
    """
    from .export import save_pruned
    from .plan import Plan, StaleBatchNormWarning, apply_plan
    from .pruning import count_macs_params
    from .task import load_task

    if out.is_dir():
        raise ConfigError(f"--out {out} is a directory; give the path of the .pt file to write, e.g. {out / 'pruned.pt'}.")
    parent = next((p for p in out.resolve().parents if p.exists()), None)
    if parent is None or not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {out} cannot be written: {parent} is not a writable directory.")
    loaded_plan = Plan.load(plan)
    # A searched plan remembers the task as the search loaded it (a user task's module:function).
    spec = loaded_plan.provenance.get("task_spec")
    name = task or (spec if isinstance(spec, (str, dict)) and spec else None) or loaded_plan.task
    if not name:
        raise ConfigError(f"Plan {plan} names no task; pass --task.")
    loaded = load_task(name, data_root=data_root, workdir=workdir)
    batches = [next(iter(loaded.train_loader))] if importance == "taylor" else None
    from .evaluate import sample_calibration_batches

    calibration = sample_calibration_batches(loaded.train_loader.dataset, 16) if recalibrate else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", StaleBatchNormWarning)  # --no-recalibrate was asked for
        pruned = apply_plan(loaded.model, loaded_plan, example_input=loaded.example_input, importance=importance,
                            ignored_layers=loaded.ignored_layers, batches=batches, calibration_batches=calibration)
    dense_macs, dense_params = count_macs_params(loaded.model, loaded.example_input)
    macs, params = count_macs_params(pruned, loaded.example_input)
    save_pruned(pruned, loaded_plan, out)
    if loaded_plan.mode == "sparsity":  # same shapes: the counts that change are the nonzeros
        console.print(f"sparsified {loaded.name} ({loaded_plan.pattern}): nonzero weights {loaded_plan.metrics.get('nonzeros', 0):,.0f} "
                      f"({loaded_plan.metrics.get('nonzeros_ratio', 1):.3f} of dense), written compressed")
    else:
        console.print(f"pruned {loaded.name}: MACs {dense_macs:,} -> {macs:,} ({macs / dense_macs:.3f}), "
                      f"params {dense_params:,} -> {params:,} ({params / dense_params:.3f})")
    calibrated = (f"BatchNorm recalibrated on {sum(len(x) for x, _ in calibration)} training images"
                  if calibration else "BatchNorm statistics left as the dense model's (--no-recalibrate)")
    console.print(f"{calibrated}; not fine-tuned (autoprune export fine-tunes)")
    console.print(f"saved to {out} (load it with ap.load_pruned(path, dense_model))")


@app.command()
def train(
    task: Annotated[str, typer.Option("--task", help="Built-in task to train (a user task brings its own trained model).")],
    epochs: Annotated[Optional[float], typer.Option("--epochs", help="Epochs (default: the task's recipe).")] = None,
    seed: Annotated[int, typer.Option("--seed", min=0, max=2**32 - 1, help="Seed of the initialization and the batch order (0..2**32-1).")] = 0,
    threads: Annotated[Optional[int], typer.Option("--threads", help="torch threads (default: all cores).")] = None,
    precision: Annotated[str, typer.Option("--precision", help="auto, fp32 or bf16 (bf16 autocast + channels-last; auto: bf16 where measured faster).")] = "auto",
    workdir: WorkdirOpt = None,
    data_root: DataRootOpt = None,
) -> None:
    """Train a built-in task's dense model (SGD+momentum, cosine LR) and cache its checkpoint.

    A stopped run (Ctrl-C, kill) resumes from its last finished epoch when run again with the same
    task, epochs and seed.
    """
    from .task import train_task

    _set_threads(threads)
    path, meta = train_task(task, epochs=epochs, data_root=str(data_root) if data_root else None,
                            workdir=workdir, seed=seed, precision=precision)
    subsets = "".join(f", {k.removeprefix('test_').removesuffix('_accuracy')} test images {v:.4f}"
                      for k, v in meta.items() if k.startswith("test_") and k.endswith("_accuracy") and k != "test_accuracy")
    console.print(f"{task}: val accuracy {meta['val_accuracy']:.4f}, test accuracy {meta['test_accuracy']:.4f}"
                  f"{subsets} after {meta['epochs']} epochs ({meta['precision']}); checkpoint {path}")


@app.command()
def search(
    space: Annotated[str, typer.Option("--space", help="Search space YAML (path or name in search_spaces/).")] = "default",
    task: Annotated[Optional[str], typer.Option("--task", help="Task instead of the space's: a built-in name or package.module:function.")] = None,
    strategy: Annotated[Optional[str], typer.Option("--strategy", help=f"{', '.join(STRATEGY_NAMES)}.")] = None,
    sampler: Annotated[Optional[str], typer.Option("--sampler", help=f"Optuna sampler: {', '.join(SAMPLERS)}.")] = None,
    agent: Annotated[Optional[str], typer.Option("--agent", help=f"RL agent: {', '.join(AGENTS)}.")] = None,
    budget: Annotated[Optional[str], typer.Option("--budget", help="flops=0.5 (MACs fraction), params=0.4, latency_ms=3.0 or latency=0.5 (fraction of dense); with --mode sparsity nonzeros=0.1 (weights kept) or size=0.15 (compressed bytes); absolute counts >= 1 allowed.")] = None,
    mode: Annotated[Optional[str], typer.Option("--mode", help="channels (prune channels; default) or sparsity (zero single weights per layer).")] = None,
    pattern: Annotated[Optional[str], typer.Option("--pattern", help="Sparsity pattern: unstructured or 2:4.")] = None,
    objective: Annotated[Optional[str], typer.Option("--objective", help="score (default) or pareto (maximize score, minimize MACs).")] = None,
    trials: Annotated[Optional[int], typer.Option("--trials", help="Finished trials the study should have in total.")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Seed of the plan sequence (0..2**32-1; default: the space's).")] = None,
    study: Annotated[Optional[str], typer.Option("--study", help="Study name; the same name resumes.")] = None,
    storage: Annotated[Optional[str], typer.Option("--storage", help="Optuna storage URL (default sqlite under the workdir).")] = None,
    tracking_uri: Annotated[Optional[str], typer.Option("--tracking-uri", help="MLflow tracking URI (default sqlite:///<workdir>/mlflow.db).")] = None,
    workers: Annotated[int, typer.Option("--workers", help="Worker processes sharing the study on this machine.")] = 1,
    threads: Annotated[Optional[int], typer.Option("--threads", help="torch threads per worker (default: all cores, shared among --workers).")] = None,
    workdir: WorkdirOpt = None,
    data_root: DataRootOpt = None,
) -> None:
    """Search pruning ratios under a budget; every trial is tracked in MLflow."""
    from .search import search as run_search

    with _latency_warnings_as_lines():
        result = run_search(
            space, task=task, strategy=strategy, sampler=sampler, agent=agent, budget=budget, objective=objective,
            mode=mode, pattern=pattern, n_trials=trials, seed=seed, study=study, storage=storage, tracking_uri=tracking_uri, workers=workers,
            threads=threads, workdir=workdir, data_root=data_root,
        )
    _print_search_result(result)
    if result.stopped_early:
        raise typer.Exit(130)


@contextlib.contextmanager
def _latency_warnings_as_lines() -> Iterator[None]:
    """Show latency warnings as one ``warning:`` line each (not Python's file:line form); others as usual."""
    from ._latency_check import LatencyBudgetWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", LatencyBudgetWarning)
        try:
            yield
        finally:
            for w in caught:
                if issubclass(w.category, LatencyBudgetWarning):
                    err_console.print(f"[yellow]warning:[/yellow] {escape(str(w.message))}", highlight=False)
                else:
                    warnings.showwarning(w.message, w.category, w.filename, w.lineno)


def _print_search_result(result) -> None:  # noqa: ANN001 - SearchResult
    from ._summary import print_search_result

    print_search_result(console, result)


@app.command()
def export(
    study: Annotated[str, typer.Option("--study", help="Study to export the best plan of.")],
    out: Annotated[Path, typer.Option("--out", help="New directory for plan.json, model.pt/.pt2/.onnx, report.md/json.")],
    storage: Annotated[Optional[str], typer.Option("--storage", help="Optuna storage URL the search used.")] = None,
    finetune_epochs: Annotated[float, typer.Option("--finetune-epochs", help="Fine-tuning epochs (cosine LR).")] = 1.0,
    schedule: Annotated[str, typer.Option("--schedule", help="oneshot, iterative:K (K prune/fine-tune steps), or for sparsity searches polynomial:begin=0.0,end=0.75,power=3 (gradual).")] = "oneshot",
    budget: Annotated[Optional[str], typer.Option("--budget", help="Pick the best trial within flops=F (Pareto searches).")] = None,
    tracking_uri: Annotated[Optional[str], typer.Option("--tracking-uri")] = None,
    choose: Annotated[str, typer.Option(
        "--choose", help="Model to write: search (the search's best plan) or val (the better of it and the "
        "uniform plan on the validation split after fine-tuning).")] = "search",
    distill: Annotated[bool, typer.Option(
        "--distill/--no-distill", help="Fine-tune both pruned models from the dense model's logits (knowledge "
        "distillation, temperature 4, weight 0.9) as well as the labels.")] = False,
    precision: Annotated[str, typer.Option("--precision", help="Fine-tuning precision: auto, fp32 or bf16 (bf16 autocast where the device has it; auto: where measured faster).")] = "fp32",
    threads: Annotated[Optional[int], typer.Option("--threads", help="torch threads (default: all cores).")] = None,
    workdir: WorkdirOpt = None,
    data_root: DataRootOpt = None,
) -> None:
    """Export the best plan of a study with its fine-tuned pruned model and a report."""
    from .export import export_study

    _set_threads(threads)
    with _latency_warnings_as_lines():
        report = export_study(study, out, storage=storage, finetune_epochs=finetune_epochs, schedule=schedule,
                              budget=budget, workdir=workdir, data_root=data_root, tracking_uri=tracking_uri,
                              choose=choose, distill=distill, precision=precision)
    console.print((report.out_dir / "report.md").read_text(), markup=False)  # Markdown: [text](file) is no tag
    console.print(f"wrote {report.out_dir}: {', '.join(sorted(p.name for p in report.out_dir.iterdir()))}")
    if report.mlflow_location:
        console.print(f"logged to {report.mlflow_location}", highlight=False)


@app.command()
def studies(
    storage: Annotated[Optional[str], typer.Option("--storage", help="Optuna storage URL (default sqlite:///<workdir>/optuna.db).")] = None,
    workdir: WorkdirOpt = None,
) -> None:
    """List the searches of a workdir (or --storage): task, strategy, budget, finished trials, the best
    validation score before fine-tuning (and its MACs ratio, or nonzeros ratio for a sparsity
    search), dates."""
    from ._catalog import list_studies
    from ._storage import check_storage_url, default_storage_url

    url = check_storage_url(storage) if storage else default_storage_url(searched_workdir(workdir, command="studies"))
    found = list_studies(url)
    columns = ("study", "task", "strategy", "budget", "trials", "best val score", "started", "last trial")

    def when(moment: object) -> str:
        return moment.strftime("%Y-%m-%d %H:%M") if moment is not None else "-"  # type: ignore[attr-defined]

    rows = []
    for s in found:
        budget = ", ".join(f"{k}={v:g}" for k, v in (s.budget or {}).items()) or "-"
        if s.best_val_score is None:
            best = "-"
        elif s.mode == "sparsity" and s.best_nonzeros_ratio is not None:
            best = f"{s.best_val_score:.4f} at nonzeros {s.best_nonzeros_ratio:.3f}"
        else:
            best = f"{s.best_val_score:.4f} at MACs {s.best_macs_ratio:.3f}"
        trials = f"{s.trials}/{s.planned}" if s.planned else str(s.trials)
        rows.append((s.name, s.task or "-", s.strategy or "-", budget, trials, best, when(s.started),
                     when(s.last_finished)))
    title = f"{len(found)} search(es) in {escape(redact(url))}"
    # A table wide enough to hold the names whole, else one block per study: folded names and
    # squeezed columns are unreadable, and the names are what --study takes.
    widths = [max(len(column), *(len(row[i]) for row in rows)) for i, column in enumerate(columns)]
    if console.width >= 1 + sum(width + 3 for width in widths):  # each cell: padding and a border
        table = Table(title=title)
        for column in columns:
            table.add_column(column, justify="right" if column == "trials" else "left", no_wrap=True)
        for row in rows:
            table.add_row(*map(escape, row))
        console.print(table)
    else:
        console.print(title, highlight=False)
        for row in rows:
            console.print(f"\n[bold]{escape(row[0])}[/bold]", highlight=False, soft_wrap=True)
            for column, value in zip(columns[1:], row[1:]):
                console.print(f"  {column + ':':<16}{escape(value)}", highlight=False, soft_wrap=True)
    if found:
        console.print(f"export one with `autoprune export --study {escape(found[-1].name)} --out exported/`", highlight=False)


@app.command()
def ui(
    tracking_uri: Annotated[Optional[str], typer.Option("--tracking-uri", help="Backend store (default sqlite:///<workdir>/mlflow.db).")] = None,
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="TCP port of the UI.")] = 5000,
    host: Annotated[str, typer.Option("--host", help="Interface to bind; 127.0.0.1 keeps it private.")] = "127.0.0.1",
    workdir: WorkdirOpt = None,
) -> None:
    """Start the MLflow UI on the search's tracking store (Ctrl-C stops it)."""
    import signal
    import subprocess

    from .tracking import check_tracking_uri, default_tracking_uri, list_experiments

    home = resolve_workdir(workdir, create=False)
    if tracking_uri is None and not (home / "mlflow.db").is_file():
        # An empty UI (and a new empty workdir) would hide that the searches live elsewhere.
        raise ConfigError(f"No searches tracked in {home}: it has no mlflow.db. Run `autoprune ui` where you ran "
                          "`autoprune search`, or point --workdir (or AUTOPRUNE_HOME, or --tracking-uri) at its runs.")
    uri = check_tracking_uri(tracking_uri) if tracking_uri else default_tracking_uri(home)
    _check_port_free(host, port)
    if host not in ("127.0.0.1", "localhost", "::1"):
        err_console.print(f"[yellow]warning: binding to {host} exposes the MLflow UI (and its data) to the network[/yellow]")
    server = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port)]
    if not uri.startswith("http"):
        server += ["--default-artifact-root", (home / "mlartifacts").as_uri()]
    server += ["--workers", "1"]
    # The UI only browses runs: no background job runner (a dozen extra processes otherwise).
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    console.print(f"MLflow UI at http://{host}:{port} (backend {redact(uri)}); Ctrl-C stops it", highlight=False)
    for name, experiment_id in list_experiments(uri)[:10]:
        console.print(f"  runs of {escape(name)}: http://{host}:{port}/#/experiments/{experiment_id}/runs", highlight=False)
    # In its own process group under a watchdog: stopping the UI stops the server's workers too,
    # and a `ui` killed with SIGKILL still takes the server down with it.
    watchdog = [sys.executable, "-m", "autoprune._watchdog", str(os.getpid()), "--", *server]
    proc = subprocess.Popen(watchdog, env=env, start_new_session=True)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill` stops it as cleanly as Ctrl-C
    signal.signal(signal.SIGINT, signal.default_int_handler)
    stopped_by_user = False
    try:
        code = proc.wait()
    except KeyboardInterrupt:
        stopped_by_user, code = True, 0
    finally:
        _stop_process_group(proc)
    if not stopped_by_user:
        # MLflow's server exits 0 even when it could not bind its port.
        raise AutopruneError(f"the MLflow UI stopped by itself (exit status {code}); see its output above. "
                             f"Is port {port} on {host} free? Choose another with --port.")


def _check_port_free(host: str, port: int) -> None:
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ConfigError(f"--host {host!r} is not an address of this machine ({exc}).") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        try:
            probe.bind(address)
        except OSError as exc:
            raise ConfigError(f"--port {port}: {host}:{port} cannot be bound ({exc.strerror or exc}); another "
                              "program (perhaps another `autoprune ui`) uses it. Choose another with --port.") from None


def _stop_process_group(proc) -> None:  # noqa: ANN001 - subprocess.Popen
    import signal
    import subprocess

    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _usage_error_types() -> tuple[tuple[type[BaseException], ...], tuple[type[BaseException], ...]]:
    """(usage errors, aborts) of click and of the click that newer typer releases bundle.

    typer >= 0.22 raises its own copy of click's exceptions (``typer.TyperException`` is their
    public base), which ``click.ClickException`` does not catch; both must end as a usage
    message and exit status 2, never a traceback.
    """
    import click

    usage: tuple[type[BaseException], ...] = (click.exceptions.ClickException,)
    bundled = getattr(typer, "TyperException", None)
    if isinstance(bundled, type) and not issubclass(bundled, click.exceptions.ClickException):
        usage += (bundled,)
    aborts = tuple({click.exceptions.Abort, typer.Abort})
    return usage, aborts


def run(argv: list[str] | None = None) -> int:
    """Run the CLI on ``argv`` and return the exit status; user mistakes give 2 and one message."""
    usage_errors, aborts = _usage_error_types()
    command = typer.main.get_command(app)
    try:
        code = command.main(args=argv, prog_name="autoprune", standalone_mode=False)
    except AutopruneError as exc:
        # Messages quote user input (keys, values, paths), which must not be read as rich markup.
        err_console.print(f"[bold red]error:[/bold red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        return 2
    except aborts:
        err_console.print("aborted")
        return 130
    except usage_errors as exc:
        exc.show()  # type: ignore[attr-defined]
        return int(getattr(exc, "exit_code", 2))
    except KeyboardInterrupt:
        err_console.print("interrupted")
        return 130
    return code if isinstance(code, int) else 0


def main() -> None:
    """Console entry point."""
    sys.exit(run())


if __name__ == "__main__":  # pragma: no cover
    main()
