"""`mer run`: the main job on built-in defaults, and a context manager that runs mer-launch
as a child process (used by `mer run`, the tests and the benchmarks)."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

from mer_pipeline import wire
from mer_pipeline.client import DaemonClient, DaemonTimeout
from mer_pipeline.runtime import LAUNCHER_SOCKET, PIPELINE_FILE, PipelineInfo
from mer_pipeline.store import StoreError, open_store
from mer_pipeline.stream import stream_trace
from mer_pipeline.trace import load_trace

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
BUNDLED_TRACE = Path(__file__).resolve().parent / "data" / "humaneval-decode.jsonl"

# The default store: the trace's 32 layers x 8 experts (top-2), small enough to make in
# well under a minute on 2 cores, big enough (about 400 MiB) that reads really happen.
DEFAULT_SHAPE = {"n_layers": 32, "n_experts": 8, "top_k": 2, "d_model": 512, "d_ff": 1792, "dtype": "q4_0", "seed": 0}
LAUNCH_TIMEOUT_S = 180.0


class PipelineStartError(RuntimeError):
    """mer-launch exited or did not become ready."""


def default_store_path() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    s = DEFAULT_SHAPE
    name = f"default-l{s['n_layers']}-e{s['n_experts']}-d{s['d_model']}-f{s['d_ff']}-{s['dtype']}-s{s['seed']}"
    return cache / "mer" / "stores" / name


def ensure_default_store(progress: bool = True) -> Path:
    """Return the default store, making it on first use."""
    from rich.progress import Progress

    from mer_pipeline.synth import SynthConfig, write_synth_store

    path = default_store_path()
    try:
        open_store(path)
        return path
    except StoreError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    s = DEFAULT_SHAPE
    config = SynthConfig(
        n_layers=s["n_layers"], n_experts=s["n_experts"], top_k=s["top_k"], d_model=s["d_model"],
        d_ff=s["d_ff"], dtype=s["dtype"], seed=s["seed"],
    )
    log.info("making the default store path=%s", path)
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("making the default store", total=config.n_layers * config.n_experts)
        write_synth_store(path, config, force=True, on_expert=lambda _: bar.advance(task))
    return path


def _control(info: PipelineInfo, command: str, timeout_s: float = 2.0) -> wire.ControlReply | None:
    client = DaemonClient(info.endpoint(LAUNCHER_SOCKET), "launcher")
    try:
        reply = client.request(wire.ControlRequest(client.next_id(), command, ""), timeout_s)
    except DaemonTimeout:
        return None
    finally:
        client.close()
    return reply if isinstance(reply, wire.ControlReply) else None


@contextlib.contextmanager
def launched_pipeline(store: Path, socket_dir: Path, extra_args: list[str] | None = None, log_path: Path | None = None) -> Iterator[PipelineInfo]:
    """Run mer-launch as a child until the block ends; yield the pipeline once every
    daemon is running. Always stops the launcher, which removes the pool and sockets."""
    command = [sys.executable, "-m", "launch", "--topology", "numa0", "--store", str(store), "--socket-dir", str(socket_dir)]
    command += extra_args or []
    log_path = log_path or socket_dir.parent / f"{socket_dir.name}-launcher.log"
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen(command, cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        info = _wait_running(process, socket_dir, log_path)
        yield info
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_running(process: subprocess.Popen, socket_dir: Path, log_path: Path) -> PipelineInfo:
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    pipeline_file = socket_dir / PIPELINE_FILE
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise PipelineStartError(f"mer-launch exited with status {process.returncode}; its output:\n{_tail(log_path)}")
        if pipeline_file.is_file():
            info = PipelineInfo.load(pipeline_file)
            reply = _control(info, "status")
            if reply is not None and all(d["state"] == "running" for d in reply.payload["daemons"].values()):
                return info
        time.sleep(0.2)
    raise PipelineStartError(f"mer-launch did not report every daemon running within {LAUNCH_TIMEOUT_S:.0f} s; its output:\n{_tail(log_path)}")


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def run_main_job(tokens: int | None = None, pool_share: float = 0.5, progress: bool = True) -> dict:
    store_path = ensure_default_store(progress=progress)
    store = open_store(store_path)
    slots = max(4, int(store.n_experts_total * pool_share))
    trace = load_trace(BUNDLED_TRACE, n_layers=store.shape.n_layers, n_experts=store.shape.n_experts)
    with tempfile.TemporaryDirectory(prefix="mer-run-") as tmp:
        socket_dir = Path(tmp) / "pipeline"
        with launched_pipeline(store_path, socket_dir, ["--slots", str(slots)]) as info:
            _, summary = stream_trace(info, trace, None, tokens, progress=progress)
    summary["store"] = str(store_path)
    return summary
