"""The `mer` command's observability options and the `mer trace-stats` command; cli.py
registers them and this module does the work."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from mer_pipeline import wire
from mer_pipeline.client import DaemonTimeout
from mer_pipeline.observe.plots import PlotError, plot_latency
from mer_pipeline.observe.stages import merged_stages
from mer_pipeline.observe.timeline import collect_spans, write_trace
from mer_pipeline.observe.trace_stats import plot_trace_stats, print_trace_stats, trace_stats
from mer_pipeline.observe.watch import watch
from mer_pipeline.runtime import PipelineInfo
from mer_pipeline.stream import PipelineStats
from mer_pipeline.trace import TraceError, load_trace

BUNDLED_TRACE = Path(__file__).resolve().parent.parent / "data" / "humaneval-decode.jsonl"


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(2)


def watch_view(info: PipelineInfo, duration_s: Optional[float], console: Console) -> None:
    """`mer stats --watch`."""
    if duration_s is not None and duration_s <= 0:
        raise _fail(f"--duration-s ({duration_s}) must be positive")
    watch(info, duration_s, console=console)


def write_stats_plot(info: PipelineInfo, collected: PipelineStats, path: Path, console: Console) -> None:
    """`mer stats --plot FILE`: plot the same snapshot the text and JSON show."""
    try:
        processes = collect_spans(info)
        plot_latency(merged_stages(collected), processes, path)
    except (PlotError, DaemonTimeout, wire.WireError, OSError, ValueError) as exc:
        raise _fail(str(exc))
    console.print(f"plot written to {path}", highlight=False)


def start_clock() -> int:
    """Return the span clock's now, to pass to write_timeline after a run."""
    return time.monotonic_ns()


def write_timeline(info: PipelineInfo, path: Path, since_ns: int, quiet: bool = False) -> None:
    """`--trace-out FILE`: write the run's spans as a Chrome trace (Perfetto, chrome://tracing)."""
    counts = write_trace(info, path, since_ns)
    if not quiet:
        typer.echo(
            f"timeline written to {path}: {counts['spans']} spans, {counts['flows']} flows, {counts['processes']} processes "
            f"(at most {counts['span_capacity']} spans per process)",
            err=True,
        )


def trace_stats_command(
    file: Path = typer.Argument(BUNDLED_TRACE, help="routing trace (JSON lines); default: the bundled Mixtral trace"),
    layers: int = typer.Option(32, help="layers in the trace"),
    experts: int = typer.Option(8, help="experts per layer in the trace"),
    plot: Optional[Path] = typer.Option(None, help="also draw popularity, co-activation and reuse distance to this image file (needs the plot extra)"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """Per-layer expert popularity, adjacent-layer co-activation and reuse distance of a routing trace."""
    try:
        stats = trace_stats(load_trace(file, n_layers=layers, n_experts=experts))
        if plot:
            plot_trace_stats(stats, plot)
    except (TraceError, PlotError, OSError) as exc:
        raise _fail(str(exc))
    console = Console()
    if as_json:
        print(json.dumps(stats, indent=1))
    else:
        print_trace_stats(stats, console)
    if plot:
        Console(stderr=True).print(f"plot written to {plot}", highlight=False)
