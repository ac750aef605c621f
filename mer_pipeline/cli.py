"""The `mer` command: stores, benchmarks, the main job, and the running pipeline's stats
and control."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from mer_pipeline import wire
from mer_pipeline.cli_bench import app as bench_app
from mer_pipeline.cli_generate import generate
from mer_pipeline.cli_store import app as store_app
from mer_pipeline.client import DaemonClient, DaemonTimeout
from mer_pipeline.config import ConfigError, load_config
from mer_pipeline.histograms import STAGES, merge_encoded, summarize_all
from mer_pipeline.observe import commands as observe
from mer_pipeline.runtime import LAUNCHER_SOCKET
from mer_pipeline.store import open_store
from mer_pipeline.stream import StreamError, collect_stats, load_pipeline, stream_trace
from mer_pipeline.trace import TraceError, load_trace, synthetic_trace

BUNDLED_TRACE = Path(__file__).resolve().parent / "data" / "humaneval-decode.jsonl"

app = typer.Typer(add_completion=False, no_args_is_help=True, help="MER: run Mixture-of-Experts models on CPU with experts streamed from SSD.")
app.add_typer(store_app, name="store")
app.add_typer(bench_app, name="bench")
ctl_app = typer.Typer(no_args_is_help=True, help="Control a running pipeline.")
app.add_typer(ctl_app, name="ctl")
app.command()(generate)
app.command("trace-stats")(observe.trace_stats_command)
console = Console(soft_wrap=True)


def _socket_dir(topology: str, socket_dir: Optional[str]) -> Path:
    if socket_dir:
        return Path(socket_dir)
    try:
        return load_config(topology).resolved_socket_dir()
    except ConfigError as exc:
        raise typer.BadParameter(str(exc)) from exc


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(2)


def print_summary(summary: dict) -> None:
    """Print a run summary as text, in the order a reader scans it."""
    lines = [
        ("tokens", f"{summary['tokens']} ({summary['layer_steps']} layer steps, {summary['skipped_layer_steps']} layer steps without routing in the trace skipped)"),
        ("tokens/s", f"{summary['tokens_per_s']:.2f}  (a token is a token through all of its layers)"),
        ("expert FFNs/s", f"{summary['expert_ffn_per_s']:.1f}"),
        ("cycle per token", f"mean {summary['cycle_us']['mean'] / 1000:.1f} ms, p50 {summary['cycle_us']['p50'] / 1000:.1f} ms"),
        ("lookups", f"{summary['lookups']} = {summary['hits']} hits + {summary['misses']} misses, hit rate {summary['hit_rate']:.3f}"),
        ("prefetch", f"issued {summary['prefetch_issued']}, useful {summary['prefetch_useful']}, wasted {summary['prefetch_wasted']}, late {summary['prefetch_late']}"),
        ("I/O", f"{summary['io_path']}: {summary['io_reads']} reads, {summary['io_bytes'] / 2**20:.1f} MiB, {summary['io_mib_per_s']:.0f} MiB/s while reading"),
        ("worker time", f"io wait {summary['io_wait_us_per_token'] / 1000:.1f} ms/token, compute {summary['compute_us_per_token'] / 1000:.1f} ms/token, io share {summary['io_share']:.2f}"),
        ("pool", f"{summary['pool_slots']} slots of {summary['experts_total']} experts ({summary['pinned']} pinned), {summary['dtype']}, eviction {summary['eviction']}, predictor {summary['predictor']}, {summary['workers']} workers"),
    ]
    if summary.get("restarted_during_run"):
        restarted = ", ".join(summary["restarted_during_run"])
        lines.append(("restarted", f"{restarted} restarted during the run; their counters cover only the time since"))
    for key, value in lines:
        console.print(f"{key:>16}  {value}", highlight=False)
    print_stages(summary["stages"])


def print_stages(stages: dict) -> None:
    table = Table(title="stage latency (us)", title_justify="left")
    for column in ("stage", "count", "p50", "p95", "p99", "max"):
        table.add_column(column, justify="right" if column != "stage" else "left")
    for stage, values in stages.items():
        table.add_row(stage, str(values["count"]), str(values["p50_us"]), str(values["p95_us"]), str(values["p99_us"]), str(values["max_us"]))
    console.print(table)


@app.command()
def stream(
    trace: Optional[Path] = typer.Option(None, help="routing trace (JSON lines); default: the bundled Mixtral trace"),
    synthetic: Optional[str] = typer.Option(None, help="instead of a file: uniform, zipf:S or markov:P"),
    layers: int = typer.Option(32, help="layers of a synthetic trace"),
    inputs: Optional[Path] = typer.Option(None, help=".npy float32 [tokens, d_model] of starting hidden states"),
    out: Optional[Path] = typer.Option(None, help="write the final hidden state of every token here (.npy)"),
    tokens: Optional[int] = typer.Option(None, help="replay only the first N tokens"),
    seed: int = typer.Option(0, help="seed of the random starting states when --inputs is not given"),
    as_json: bool = typer.Option(False, "--json", help="print the summary as JSON"),
    trace_out: Optional[Path] = typer.Option(None, help="write the run's timeline here as Chrome trace JSON (Perfetto, chrome://tracing)"),
    topology: str = typer.Option("numa0", help="find the running pipeline by its topology"),
    socket_dir: Optional[str] = typer.Option(None, help="find the running pipeline by its socket directory"),
) -> None:
    """Replay a routing trace through the running pipeline."""
    started_ns = observe.start_clock()
    try:
        info = load_pipeline(_socket_dir(topology, socket_dir))
        shape = open_store(info.store).shape
        if synthetic:
            routing = synthetic_trace(synthetic, layers, shape.n_experts, shape.top_k, tokens or 64, seed)
        else:
            routing = load_trace(trace or BUNDLED_TRACE, n_layers=shape.n_layers, n_experts=shape.n_experts)
        starts = np.load(inputs) if inputs else None
        outputs, summary = stream_trace(info, routing, starts, tokens, seed, progress=not as_json)
        if trace_out:
            observe.write_timeline(info, trace_out, started_ns, quiet=as_json)
    except (StreamError, TraceError, DaemonTimeout, wire.WireError, OSError, ValueError) as exc:
        raise _fail(str(exc))
    if out:
        np.save(out, outputs)
    if as_json:
        print(json.dumps(summary, indent=1))
    else:
        print_summary(summary)


@app.command()
def stats(
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
    watch: bool = typer.Option(False, "--watch", help="show a live view refreshed every second, until Ctrl-C or --duration-s"),
    duration_s: Optional[float] = typer.Option(None, help="with --watch: stop after this many seconds"),
    plot: Optional[Path] = typer.Option(None, help="also draw stage latency distributions and hit rate over time to this image file (needs the plot extra)"),
    topology: str = typer.Option("numa0", help="find the running pipeline by its topology"),
    socket_dir: Optional[str] = typer.Option(None, help="find the running pipeline by its socket directory"),
) -> None:
    """Print each stage's count, p50, p95, p99 and max for the running pipeline."""
    try:
        info = load_pipeline(_socket_dir(topology, socket_dir))
        if watch:
            observe.watch_view(info, duration_s, console)
            return
        collected = collect_stats(info)
    except (StreamError, DaemonTimeout, wire.WireError) as exc:
        raise _fail(str(exc))
    encoded = [collected.io.histograms, collected.compute.histograms]
    encoded += [w["histograms"] for w in collected.compute.counters.get("workers", {}).values()]
    stages = summarize_all(merge_encoded(encoded))
    counters = {"io": collected.io.counters, "compute": {k: v for k, v in collected.compute.counters.items() if k != "workers"}}
    counters["workers"] = {name: w["counters"] for name, w in collected.compute.counters.get("workers", {}).items()}
    if collected.predictor is not None:
        counters["predictor"] = collected.predictor.counters
    if plot:
        observe.write_stats_plot(info, collected, plot, Console(stderr=True))
    if as_json:
        print(json.dumps({"stages": stages, "stage_descriptions": STAGES, "counters": counters}, indent=1))
        return
    print_stages(stages)
    for daemon, values in counters.items():
        console.print(f"[bold]{daemon}[/bold] {json.dumps(values, sort_keys=True)}", highlight=False)


def _control(topology: str, socket_dir: Optional[str], command: str, target: str = "") -> wire.ControlReply:
    info = load_pipeline(_socket_dir(topology, socket_dir))
    client = DaemonClient(info.endpoint(LAUNCHER_SOCKET), "launcher")
    try:
        reply = client.request(wire.ControlRequest(client.next_id(), command, target), 10.0)
    finally:
        client.close()
    if not isinstance(reply, wire.ControlReply):
        raise StreamError(f"the launcher replied {reply.TYPE} to a control request")
    if not reply.ok:
        raise StreamError(reply.error)
    return reply


@ctl_app.command("status")
def ctl_status(
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
    topology: str = typer.Option("numa0", help="find the running pipeline by its topology"),
    socket_dir: Optional[str] = typer.Option(None, help="find the running pipeline by its socket directory"),
) -> None:
    """List each daemon with its pid, state, uptime and restarts."""
    try:
        payload = _control(topology, socket_dir, "status").payload
    except (StreamError, DaemonTimeout, wire.WireError) as exc:
        raise _fail(str(exc))
    if as_json:
        print(json.dumps(payload, indent=1))
        return
    table = Table(title=f"pipeline {payload['name']} (launcher pid {payload['launcher_pid']})", title_justify="left")
    for column in ("daemon", "pid", "state", "uptime_s", "restarts"):
        table.add_column(column)
    for name, daemon in payload["daemons"].items():
        table.add_row(name, str(daemon["pid"]), daemon["state"], f"{daemon['uptime_s']:.1f}", str(daemon["restarts"]))
    console.print(table)


@ctl_app.command("restart")
def ctl_restart(
    target: str = typer.Argument(..., help="io, predictor, compute or worker:N"),
    topology: str = typer.Option("numa0", help="find the running pipeline by its topology"),
    socket_dir: Optional[str] = typer.Option(None, help="find the running pipeline by its socket directory"),
) -> None:
    """Restart one daemon while the others keep running."""
    try:
        _control(topology, socket_dir, "restart", target)
    except (StreamError, DaemonTimeout, wire.WireError) as exc:
        raise _fail(str(exc))
    console.print(f"restart of {target} requested")


@ctl_app.command("stop")
def ctl_stop(
    topology: str = typer.Option("numa0", help="find the running pipeline by its topology"),
    socket_dir: Optional[str] = typer.Option(None, help="find the running pipeline by its socket directory"),
) -> None:
    """Stop the pipeline: every daemon exits and the launcher removes its segments and sockets."""
    try:
        _control(topology, socket_dir, "stop")
    except (StreamError, DaemonTimeout, wire.WireError) as exc:
        raise _fail(str(exc))
    console.print("stop requested")


@app.command()
def run(
    tokens: Optional[int] = typer.Option(None, help="replay only the first N tokens of the bundled trace"),
    pool_share: float = typer.Option(0.5, help="fraction of the store's experts that fit in the pool, 0 to 1"),
    as_json: bool = typer.Option(False, "--json", help="print the summary as JSON"),
) -> None:
    """The main job: make (once) a default q4_0 store, launch numa0, replay the bundled
    Mixtral routing trace, print the summary, stop."""
    from mer_pipeline.main_job import run_main_job

    try:
        summary = run_main_job(tokens=tokens, pool_share=pool_share, progress=not as_json)
    except (StreamError, TraceError, DaemonTimeout, wire.WireError, RuntimeError, OSError) as exc:
        raise _fail(str(exc))
    if as_json:
        print(json.dumps(summary, indent=1))
    else:
        print_summary(summary)


def main() -> None:
    app()
