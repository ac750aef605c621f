"""`mer store`: create, import, inspect and verify expert stores.

Exit codes: 0 success; 1 `verify` found bad checksums; 2 invalid input (a source or store
that breaks a rule, an output path that exists), with one error line and no traceback.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from mer_pipeline.importers import SourceError, import_checkpoint
from mer_pipeline.quant import DTYPES, LayoutError, expert_layout
from mer_pipeline.store import Store, StoreError, open_store, verify_store
from mer_pipeline.store_writer import StoreWriteError
from mer_pipeline.synth import SynthConfig, write_synth_store

logger = logging.getLogger(__name__)

app = typer.Typer(help="Create, import, inspect and verify expert stores.", no_args_is_help=True)
stderr = Console(stderr=True)
DEFAULTS = SynthConfig()
INPUT_ERRORS = (SourceError, StoreError, StoreWriteError, LayoutError)


def _fail(exc: Exception) -> typer.Exit:
    # Messages contain shapes such as [E, 2 * d_ff, d_model], which rich would read as markup.
    stderr.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
    return typer.Exit(2)


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TransferSpeedColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=stderr,
    )


def _check_dtype(value: str) -> str:
    if value not in DTYPES:
        raise typer.BadParameter(f"{value!r} is not one of {', '.join(DTYPES)}")
    return value


@app.callback()
def _configure_logging() -> None:
    # `mer` may have configured logging already; only a bare `python -m` run needs this.
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")


@app.command()
def synth(
    out: Path = typer.Argument(..., help="Directory to create; must not exist unless --force."),
    layers: int = typer.Option(DEFAULTS.n_layers, "--layers", help="Number of MoE layers."),
    experts: int = typer.Option(DEFAULTS.n_experts, "--experts", help="Experts per layer."),
    top_k: int = typer.Option(DEFAULTS.top_k, "--top-k", help="Experts the router picks per token."),
    d_model: int = typer.Option(DEFAULTS.d_model, "--d-model", help="Hidden size (row length of gate and up)."),
    d_ff: int = typer.Option(DEFAULTS.d_ff, "--d-ff", help="Expert FFN size (row length of down)."),
    dtype: str = typer.Option(DEFAULTS.dtype, "--dtype", callback=_check_dtype, help="q4_0, q8_0 or f32."),
    seed: int = typer.Option(DEFAULTS.seed, "--seed", help="Random seed; the same seed gives the same bytes."),
    force: bool = typer.Option(False, "--force", help="Replace an existing store at OUT."),
    full_model: bool = typer.Option(False, "--full-model", help="Also write random dense tensors, so the whole model runs."),
    vocab_size: int = typer.Option(DEFAULTS.vocab_size, "--vocab-size", help="Vocabulary size (with --full-model)."),
    heads: int = typer.Option(DEFAULTS.n_heads, "--heads", help="Attention query heads (with --full-model)."),
    kv_heads: int = typer.Option(DEFAULTS.n_kv_heads, "--kv-heads", help="Attention KV heads (with --full-model)."),
) -> None:
    """Write a store of random experts (normal, std 1/sqrt(row length)); dense tensors only with --full-model."""
    config = SynthConfig(layers, experts, top_k, d_model, d_ff, dtype, seed, full_model, vocab_size, heads, kv_heads)
    try:
        config.validate()
        region_bytes = expert_layout(d_model, d_ff, dtype).region_bytes
        with _progress() as progress:
            task = progress.add_task("synth", total=layers * experts * region_bytes)
            store = write_synth_store(out, config, force=force,
                                      on_expert=lambda _id: progress.advance(task, region_bytes))
    except INPUT_ERRORS as exc:
        raise _fail(exc) from None
    stderr.print(f"wrote {store.path}: {store.n_experts_total} experts of {store.region_bytes} bytes")


@app.command("import")
def import_(
    src: Path = typer.Argument(..., help="A .gguf file, a .safetensors file, or a directory of safetensors shards."),
    out: Path = typer.Argument(..., help="Directory to create; must not exist unless --force."),
    dtype: str = typer.Option("q4_0", "--dtype", callback=_check_dtype,
                              help="Store dtype: q4_0, q8_0 or f32. Matching GGUF blocks are repacked bit-exactly."),
    config: Path | None = typer.Option(None, "--config", help="config.json for a safetensors source."),
    top_k: int | None = typer.Option(None, "--top-k", help="Experts per token; overrides the source's value."),
    force: bool = typer.Option(False, "--force", help="Replace an existing store at OUT."),
) -> None:
    """Import a Mixtral checkpoint: experts to experts.bin, everything else to dense.gguf."""
    try:
        with _progress() as progress:
            task = progress.add_task("import", total=None)

            def on_expert(expert_id: int, n_total: int) -> None:
                progress.update(task, total=n_total, completed=expert_id + 1)

            store = import_checkpoint(src, out, dtype=dtype, config=config, top_k=top_k, force=force,
                                      on_expert=on_expert)
    except INPUT_ERRORS as exc:
        raise _fail(exc) from None
    stderr.print(f"wrote {store.path}: {store.n_experts_total} experts of {store.region_bytes} bytes")


def _summary(store: Store) -> dict[str, Any]:
    manifest = store.manifest
    dense = manifest.get("dense")
    return {
        "path": str(store.path),
        "format_version": manifest["format_version"],
        "dtype": store.dtype,
        "model": store.model,
        "experts": store.n_experts_total,
        "region_bytes": store.region_bytes,
        "payload_bytes": store.layout.payload_bytes,
        "files": manifest.get("files"),
        "source": store.source,
        "dense": None if not dense else {
            "file": dense["file"], "naming": dense.get("naming"), "tensors": len(dense.get("tensors", [])),
        },
    }


@app.command()
def info(
    store_path: Path = typer.Argument(..., metavar="STORE", help="Store directory."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Print a store's model config, dtype, sizes and source."""
    try:
        store = open_store(store_path)
    except INPUT_ERRORS as exc:
        raise _fail(exc) from None
    summary = _summary(store)
    if as_json:
        typer.echo(json.dumps(summary, indent=1))
        return
    typer.echo(f"store        {summary['path']}")
    typer.echo(f"dtype        {summary['dtype']}")
    typer.echo(f"experts      {summary['experts']} x {summary['region_bytes']} bytes "
               f"({summary['payload_bytes']} payload)")
    for key, value in summary["model"].items():
        typer.echo(f"model.{key:<20} {value}")
    source = summary["source"] or {}
    typer.echo(f"source       {source.get('kind')} {source.get('path') or ''}")
    if source.get("sha256"):
        typer.echo(f"source.sha256 {source['sha256']}")
    dense = summary["dense"]
    typer.echo("dense        none" if dense is None else
               f"dense        {dense['file']}: {dense['tensors']} tensors, {dense['naming']} names")


@app.command()
def verify(store_path: Path = typer.Argument(..., metavar="STORE", help="Store directory.")) -> None:
    """Check every expert's checksum; exit 1 and name each bad expert if any differ."""
    try:
        store = open_store(store_path)
        with _progress() as progress:
            task = progress.add_task("verify", total=store.n_experts_total * store.region_bytes)
            result = verify_store(store, on_progress=lambda n_bytes: progress.advance(task, n_bytes))
    except INPUT_ERRORS as exc:
        raise _fail(exc) from None
    for bad in result.bad_experts:
        typer.echo(f"bad {bad.describe()}", err=True)
    for bad in result.bad_files:
        typer.echo(f"bad {bad.describe()}", err=True)
    if not result.ok:
        typer.echo(f"{len(result.bad_experts)} bad experts, {len(result.bad_files)} bad files in {store.path}",
                   err=True)
        raise typer.Exit(1)
    typer.echo(f"ok: {store.n_experts_total} experts verified in {store.path}")
