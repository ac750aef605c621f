"""`mer generate`: run the whole model on a prompt and print the tokens and the run summary."""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import typer
from rich.console import Console

from mer_pipeline import wire
from mer_pipeline.client import DaemonTimeout
from mer_pipeline.config import ConfigError, load_config
from mer_pipeline.generate import Generation, generate as run_generate, make_backend
from mer_pipeline.main_job import PipelineStartError, launched_pipeline
from mer_pipeline.observe.timeline import write_trace
from mer_pipeline.model import ModelError, load_model
from mer_pipeline.model.tokenizer import load_tokenizer
from mer_pipeline.runtime import PipelineInfo
from mer_pipeline.store import StoreError, open_store
from mer_pipeline.stream import StreamError, load_pipeline

log = logging.getLogger(__name__)
console = Console()
ERRORS = (ModelError, StoreError, StreamError, DaemonTimeout, wire.WireError, PipelineStartError, ConfigError, OSError)


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise ModelError(f"--prompt-ids {text!r} is not a comma-separated list of integers") from None


@contextlib.contextmanager
def _pipeline(local: bool, launch: bool, store: Path, slots: Optional[int], topology: str,
              socket_dir: Optional[str]) -> Iterator[PipelineInfo | None]:
    if local:
        yield None
    elif launch:
        with tempfile.TemporaryDirectory(prefix="mer-generate-") as tmp:
            extra = ["--slots", str(slots)] if slots else []
            with launched_pipeline(store, Path(tmp) / "pipeline", extra) as info:
                yield info
    else:
        folder = Path(socket_dir) if socket_dir else load_config(topology).resolved_socket_dir()
        info = load_pipeline(folder)
        if Path(info.store).resolve() != store.resolve():
            raise ModelError(f"the running pipeline serves the store {info.store}, not {store}; "
                             "start one for this store or pass --launch")
        yield info


def print_generation(result: Generation, text: str | None) -> None:
    s = result.summary
    console.print(f"{'generated':>18}  {' '.join(map(str, result.generated_ids))}", highlight=False)
    if text is not None:
        console.print(f"{'text':>18}  {text!r}", highlight=False)
    lines = [
        ("prompt tokens", str(s["prompt_tokens"])),
        ("generated tokens", f"{s['generated_tokens']} (stopped: {s['stop_reason']})"),
        ("time to first", f"{s['time_to_first_token_s'] * 1e3:.1f} ms (prefill {s['prefill_tokens_per_s']:.2f} tokens/s)"),
        ("decode", f"{s['decode_tokens_per_s']:.3f} tokens/s over {s['decode_tokens']} tokens "
                   "(a token is a token through all layers)"),
        ("hit rate", f"{s['hit_rate']:.3f} (prefill {s['prefill']['hit_rate']:.3f}, decode {s['decode']['hit_rate']:.3f})"),
        ("I/O share", "n/a (local experts)" if s["io_share"] is None else
                      f"{s['io_share']:.2f} (prefill {s['prefill']['io_share']:.2f}, decode {s['decode']['io_share']:.2f})"),
        ("read per token", f"{s['read_bytes_per_token'] / 2**20:.1f} MiB (decode {s['decode']['read_bytes_per_token'] / 2**20:.1f} MiB)"),
        ("lookahead", f"precision {', '.join(f'{p:.2f}' for p in s['lookahead']['precision'])} at distances "
                      f"{s['lookahead']['distance']}, hinting {s['lookahead']['hinted_distances']}"),
    ]
    for key, value in lines:
        console.print(f"{key:>18}  {value}", highlight=False)
    if s["stages"]:
        from mer_pipeline.cli import print_stages

        print_stages(s["stages"])


def generate(
    store: Path = typer.Option(..., "--store", help="the expert store with dense tensors"),
    prompt_ids: Optional[str] = typer.Option(None, "--prompt-ids", help="prompt token ids, comma-separated: 1,2,3"),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="prompt text (needs the store's tokenizer)"),
    max_new_tokens: int = typer.Option(16, "--max-new-tokens", help="tokens to generate at most"),
    temperature: float = typer.Option(0.0, "--temperature", help="sampling temperature; 0 picks the most likely token"),
    seed: int = typer.Option(0, "--seed", help="seed of the sampler"),
    as_json: bool = typer.Option(False, "--json", help="print the tokens and the summary as JSON"),
    logits_out: Optional[Path] = typer.Option(None, "--logits-out",
                                              help="write float32 logits (.npy), one row per prompt position and per generated step"),
    local: bool = typer.Option(False, "--local", help="run the experts in this process, without a pipeline"),
    launch: bool = typer.Option(False, "--launch", help="start a pipeline for the store, run, and stop it"),
    slots: Optional[int] = typer.Option(None, "--slots", help="pool slots of the pipeline that --launch starts"),
    lookahead: str = typer.Option("auto", "--lookahead",
                                  help="layers ahead to prefetch from later routers: a number, or auto (by measured precision)"),
    ignore_eos: bool = typer.Option(False, "--ignore-eos", help="keep generating after an end-of-sequence token"),
    trace_out: Optional[Path] = typer.Option(None, "--trace-out",
                                             help="write a Chrome/Perfetto trace of the run's spans (not with --local)"),
    topology: str = typer.Option("numa0", help="find the running pipeline by its topology"),
    socket_dir: Optional[str] = typer.Option(None, help="find the running pipeline by its socket directory"),
) -> None:
    """Generate tokens with the whole model: prefill the prompt, then decode."""
    try:
        opened = open_store(store)
        tokenizer = None
        if (prompt is None) == (prompt_ids is None):
            raise ModelError("give exactly one of --prompt-ids and --prompt")
        if prompt is not None:
            tokenizer = load_tokenizer(opened)
            if tokenizer is None:
                raise ModelError(f"store {store} has no tokenizer (no tokenizer.json beside its checkpoint and no GGUF "
                                 "vocabulary); pass --prompt-ids instead")
            ids = tokenizer.encode(prompt)
        else:
            ids = _parse_ids(prompt_ids)
        if trace_out is not None and local:
            raise ModelError("--trace-out records the pipeline's spans; it cannot be used with --local")
        if lookahead != "auto" and not lookahead.isdigit():
            raise ModelError(f"--lookahead {lookahead!r} is neither a number of layers nor auto")
        with _pipeline(local, launch, store, slots, topology, socket_dir) as info:
            backend = make_backend(opened, info)
            started_ns = time.monotonic_ns()
            try:
                model = load_model(opened, backend, lookahead=lookahead if lookahead == "auto" else int(lookahead))
                result = run_generate(model, ids, max_new_tokens, temperature=temperature, seed=seed,
                                      stop_at_eos=not ignore_eos, pipeline=info)
            finally:
                backend.close()
            if trace_out is not None:
                write_trace(info, trace_out, started_ns)
    except ERRORS as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    if tokenizer is None and prompt_ids is not None:
        with contextlib.suppress(ModelError):
            tokenizer = load_tokenizer(opened)
    text = tokenizer.decode(result.generated_ids) if tokenizer is not None else None
    if logits_out:
        np.save(logits_out, result.logits.astype(np.float32))
    if as_json:
        print(json.dumps({"prompt_ids": result.prompt_ids, "generated_ids": result.generated_ids, "text": text,
                          "summary": result.summary}, indent=1))
    else:
        print_generation(result, text)
