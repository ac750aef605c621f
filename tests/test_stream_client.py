"""A client of a stopped pipeline fails at once with the reason, not after the request time-out."""

import os
import subprocess
import sys
import time

import pytest

from mer_pipeline import wire
from mer_pipeline.client import DaemonClient
from mer_pipeline.config import PipelineConfig
from mer_pipeline.runtime import COMPUTE_SOCKET, PIPELINE_FILE, PipelineInfo
from mer_pipeline.stream import StreamError, pipeline_stop_reason, resumable_request


def exited_pid() -> int:
    """Return the pid of a process that has exited and been reaped."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def pipeline_info(socket_dir, launcher_pid: int) -> PipelineInfo:
    return PipelineInfo(
        config=PipelineConfig(name="gone"),
        socket_dir=str(socket_dir),
        store="",
        pool_data_name="",
        pool_table_name="",
        pool_slots=0,
        slot_bytes=0,
        worker_cpus=[],
        launcher_pid=launcher_pid,
    )


def test_pipeline_stop_reasons(tmp_path):
    (tmp_path / PIPELINE_FILE).write_text("{}")
    assert pipeline_stop_reason(pipeline_info(tmp_path, os.getpid())) is None
    dead = exited_pid()
    assert pipeline_stop_reason(pipeline_info(tmp_path, dead)) == f"its launcher (pid {dead}) has exited"
    (tmp_path / PIPELINE_FILE).unlink()
    assert "was removed" in pipeline_stop_reason(pipeline_info(tmp_path, os.getpid()))


def test_request_to_stopped_pipeline_fails_fast(tmp_path):
    info = pipeline_info(tmp_path, exited_pid())
    client = DaemonClient(info.endpoint(COMPUTE_SOCKET), "compute")
    started_s = time.monotonic()
    try:
        with pytest.raises(StreamError, match="the pipeline stopped .*has exited.*mer-launch"):
            resumable_request(info, client, wire.StatsRequest(client.next_id()), timeout_s=60.0)
    finally:
        client.close()
    assert time.monotonic() - started_s < 10.0
