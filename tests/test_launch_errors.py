"""mer-launch rejects what this machine cannot run, with the value and the fix, and
gives up cleanly on a daemon that keeps crashing."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mer_pipeline import wire
from mer_pipeline.client import DaemonClient
from mer_pipeline.main_job import launched_pipeline
from mer_pipeline.runtime import LAUNCHER_SOCKET
from mer_pipeline.store import open_store
from mer_pipeline.synth import SynthConfig, write_synth_store

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("launch") / "store"
    write_synth_store(path, SynthConfig(n_layers=4, n_experts=8, top_k=2, d_model=64, d_ff=128, dtype="q4_0", seed=1))
    return path


def _launch(args, timeout=120):
    command = [sys.executable, "-m", "launch", *args]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def _topology(tmp_path, text):
    path = tmp_path / "custom.toml"
    path.write_text(text)
    return str(path)


def test_missing_cpu_named(store, tmp_path):
    cpu = max(os.sched_getaffinity(0)) + 1000
    result = _launch(["--topology", _topology(tmp_path, f"[io]\ncpus = [{cpu}]\n"), "--store", str(store), "--socket-dir", str(tmp_path / "s")])
    assert result.returncode == 2
    assert f"io.cpus names CPU {cpu}" in result.stderr


def test_missing_numa_node_named(store, tmp_path):
    result = _launch(["--topology", _topology(tmp_path, "numa_node = 63\n"), "--store", str(store), "--socket-dir", str(tmp_path / "s")])
    assert result.returncode == 2
    assert "NUMA node 63 does not exist" in result.stderr


def test_pool_larger_than_memory(tmp_path):
    # A manifest of Mixtral-shaped experts over a sparse data file: nothing is read
    # before the launcher checks the pool size against free memory.
    store = tmp_path / "huge"
    write_synth_store(store, SynthConfig(n_layers=1, n_experts=2, top_k=2, d_model=64, d_ff=128, dtype="q4_0"))
    manifest = json.loads((store / "manifest.json").read_text())
    region = 99_090_432
    manifest["model"].update(n_layers=64, n_experts=8, d_model=4096, d_ff=14336)
    manifest["experts"] = [
        {"layer": i // 8, "expert": i % 8, "file": "experts.bin", "offset": i * region, "length": region, "checksum": "0"}
        for i in range(512)
    ]
    for entry in manifest.get("files", []):
        entry["bytes"] = 512 * region
    (store / "manifest.json").write_text(json.dumps(manifest))
    os.truncate(store / "experts.bin", 512 * region)
    open_store(store)
    result = _launch(["--store", str(store), "--slots", "512", "--socket-dir", str(tmp_path / "s")])
    assert result.returncode == 2
    assert "the pool needs" in result.stderr
    assert "lower pool.slots or pool.memory_gib" in result.stderr


def test_same_name_twice_rejected(store, tmp_path):
    socket_dir = tmp_path / "shared"
    with launched_pipeline(store, socket_dir, ["--slots", "8"]) as info:
        result = _launch(["--store", str(store), "--slots", "8", "--socket-dir", str(socket_dir)])
        assert result.returncode == 2
        assert f"already running (launcher pid {info.launcher_pid}" in result.stderr
        # The rejected launcher must not have touched the running pipeline.
        assert (socket_dir / "pipeline.json").exists()
        client = DaemonClient(info.endpoint(LAUNCHER_SOCKET), "launcher")
        try:
            status = client.request(wire.ControlRequest(1, "status", ""), 10.0).payload
        finally:
            client.close()
        assert all(d["state"] == "running" for d in status["daemons"].values())


def test_crash_loop_gives_up_cleanly(store, tmp_path):
    topology = _topology(tmp_path, "[runtime]\nmax_restarts = 1\nrestart_window_s = 120.0\n")
    socket_dir = tmp_path / "crashy"
    log_path = tmp_path / "launcher.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "launch", "--topology", topology, "--store", str(store), "--slots", "8", "--socket-dir", str(socket_dir)],
        cwd=REPO, stdout=open(log_path, "wb"), stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 120
        killed = 0
        while process.poll() is None and time.monotonic() < deadline:
            try:
                client = DaemonClient(f"ipc://{socket_dir}/launcher.sock", "launcher")
                status = client.request(wire.ControlRequest(1, "status", ""), 2.0).payload
                client.close()
            except (TimeoutError, OSError):
                time.sleep(0.5)
                continue
            predictor = status["daemons"]["predictor"]
            if predictor["state"] == "running" and all(d["state"] == "running" for d in status["daemons"].values()):
                os.kill(predictor["pid"], signal.SIGKILL)
                killed += 1
            time.sleep(0.3)
        code = process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    output = log_path.read_text()
    assert code == 1
    assert killed == 2
    assert "the predictor daemon exited 2 times within runtime.restart_window_s=120 s (last: signal 9)" in output
    assert "pipeline stopped" in output
    assert not list(socket_dir.glob("*.sock"))
