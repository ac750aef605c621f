"""A corrupt or truncated store fails only the requests for the bad experts, with an
error naming them, and the pipeline keeps serving the rest."""

import os

import numpy as np
import pytest

from mer_pipeline import wire
from mer_pipeline.client import DaemonClient
from mer_pipeline.main_job import launched_pipeline
from mer_pipeline.runtime import COMPUTE_SOCKET
from mer_pipeline.store import open_store
from mer_pipeline.synth import SynthConfig, write_synth_store


@pytest.fixture
def store(tmp_path):
    path = tmp_path / "store"
    write_synth_store(path, SynthConfig(n_layers=4, n_experts=8, top_k=2, d_model=64, d_ff=128, dtype="q4_0", seed=2))
    return path


def _expert(client, expert):
    x = np.ones((1, 64), dtype=np.float32)
    return client.request(wire.ExpertRequest(client.next_id(), expert, 1, wire.array_to_bytes(x)), 60.0)


def test_checksum_mismatch_fails_only_that_expert(store, tmp_path):
    entry = open_store(store).entry(9)
    with open(store / entry.file, "r+b") as f:
        f.seek(entry.offset + 100)
        byte = f.read(1)
        f.seek(entry.offset + 100)
        f.write(bytes([byte[0] ^ 0xFF]))
    with launched_pipeline(store, tmp_path / "sock", ["--slots", "8"]) as info:
        client = DaemonClient(info.endpoint(COMPUTE_SOCKET), "compute")
        try:
            assert isinstance(_expert(client, 8), wire.ExpertResult)
            failed = _expert(client, 9)
            assert isinstance(failed, wire.RequestFailed)
            assert "checksum" in failed.error
            assert "expert 9 (layer 1, expert 1)" in failed.error
            assert isinstance(_expert(client, 10), wire.ExpertResult)
            assert isinstance(_expert(client, 8), wire.ExpertResult)
        finally:
            client.close()


def test_truncated_under_running_daemon(store, tmp_path):
    layout_bytes = open_store(store).region_bytes
    with launched_pipeline(store, tmp_path / "sock", ["--slots", "8"]) as info:
        os.truncate(store / "experts.bin", 16 * layout_bytes)
        client = DaemonClient(info.endpoint(COMPUTE_SOCKET), "compute")
        try:
            failed = _expert(client, 20)
            assert isinstance(failed, wire.RequestFailed)
            assert "expert 20 (layer 2, expert 4)" in failed.error
            assert isinstance(_expert(client, 3), wire.ExpertResult)
        finally:
            client.close()
