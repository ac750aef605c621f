"""`mer bench`: measure the compute kernels on this machine."""

from __future__ import annotations

import json
from typing import Optional

import numba
import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="Measure the compute kernels on this machine.", no_args_is_help=True)
console = Console()


@app.callback()
def bench() -> None:
    """Measure the compute kernels on this machine."""
    # A callback keeps `kernel` a named subcommand although it is the only one.


@app.command()
def kernel(
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
    threads: Optional[int] = typer.Option(
        None, "--threads", min=1,
        help="Threads for the all-cores runs (default: numba's thread count, normally the CPU count).",
    ),
    repeats: int = typer.Option(
        7, "--repeats", min=1,
        help="Timed rounds. Each round calls every case once, and the median over rounds is reported.",
    ),
) -> None:
    """Time one Mixtral q4_0 expert's SwiGLU against the time to read its bytes from RAM."""
    from mer_pipeline.bench_kernel import run_kernel_benchmark  # imports numba kernels

    limit = numba.config.NUMBA_NUM_THREADS
    threads = limit if threads is None else threads
    if threads > limit:
        raise typer.BadParameter(f"{threads} threads requested; numba allows at most {limit} (NUMBA_NUM_THREADS)")
    result = run_kernel_benchmark(threads, repeats)
    if as_json:
        print(json.dumps(result, indent=2))
        return
    _print_table(result)


def _print_table(result: dict) -> None:
    machine = result["machine"]
    console.print(
        f"{machine['cpu_model']}, {machine['cores']} cores, {machine['memory_bytes'] / 2**30:.1f} GiB; "
        f"expert {result['expert_bytes']:,} bytes; median of {result['repeats']} rounds",
        highlight=False,
    )
    table = Table("measurement", "threads", "ms", "GB/s", "x floor")
    gb_per_s = result["gb_per_s"]
    floor_ms = result["floor_ms"]
    threads = result["threads"]
    table.add_row("read floor", str(threads), f"{floor_ms:.2f}", f"{gb_per_s['floor']:.1f}", "1.00")
    table.add_row("read floor", "1", f"{result['floor_one_thread_ms']:.2f}",
                  f"{gb_per_s['floor_one_thread']:.1f}", f"{result['floor_one_thread_ms'] / floor_ms:.2f}")
    for n_tokens in (1, 8):
        for name, n_threads in (("all_cores", threads), ("one_thread", 1)):
            key = f"batch{n_tokens}_{name}"
            table.add_row(f"swiglu q4_0 batch {n_tokens}", str(n_threads), f"{result[key + '_ms']:.2f}",
                          f"{gb_per_s[key]:.1f}", f"{result[key + '_ms'] / floor_ms:.2f}")
    console.print(table)
    targets = result["targets"]
    console.print(
        f"batch 1 / floor = {result['ratio_to_floor']:.2f} (target <= {targets['batch1_to_floor_max']}: "
        f"{'met' if targets['batch1_to_floor_met'] else 'missed'})\n"
        f"batch 8 / batch 1 = {result['batch8_to_batch1']:.2f} (target <= {targets['batch8_to_batch1_max']}: "
        f"{'met' if targets['batch8_to_batch1_met'] else 'missed'})\n"
        f"fresh process ready in {result['ready_s']:.2f} s (target <= {targets['ready_s_max']} s: "
        f"{'met' if targets['ready_s_met'] else 'missed'})",
        highlight=False,
    )
