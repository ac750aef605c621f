"""The generate loop and `mer generate`, in process and through a real pipeline."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from mer_pipeline.generate import generate, make_backend
from mer_pipeline.importers import import_checkpoint
from mer_pipeline.main_job import launched_pipeline
from mer_pipeline.model import LocalExperts, load_model

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def reference(hf_tiny):
    return json.loads((hf_tiny / "full_mixtral_gen.json").read_text())


@pytest.fixture(scope="module")
def stores(fixtures, tmp_path_factory):
    fixture = fixtures["full"]
    root = tmp_path_factory.mktemp("stores")
    return {dtype: import_checkpoint(fixture["path"], root / dtype, dtype=dtype, config=fixture["config_path"])
            for dtype in ("f32", "q4_0")}


def test_greedy_decode_matches_reference(stores, reference):
    store = stores["f32"]
    model = load_model(store, LocalExperts(store))
    n_new = len(reference["generated_ids"])
    result = generate(model, reference["prompt_ids"], n_new, stop_at_eos=False)
    assert result.generated_ids == reference["generated_ids"]

    n_prompt = len(reference["prompt_ids"])
    assert result.logits.shape == (n_prompt + n_new - 1, 48)
    step_logits = result.logits[n_prompt - 1 :]
    expected = np.array(reference["step_logits"]).reshape(n_new, -1)
    assert np.abs(step_logits - expected).max() < TOLERANCE


def test_generate_stops_at_eos(stores, reference):
    store = stores["f32"]
    model = load_model(store, LocalExperts(store))
    result = generate(model, reference["prompt_ids"], 8)
    # The reference's second token is the config's eos_token_id (20).
    assert result.generated_ids == reference["generated_ids"][:2]
    assert result.stop_reason == "eos"
    assert result.summary["generated_tokens"] == 2
    assert result.summary["prompt_tokens"] == 3


def test_pipeline_logits_independent_of_cache(stores, reference, tmp_path):
    """q4_0 experts through real pipelines with 3 and 8 slots give the same bits as in process."""
    store = stores["q4_0"]
    prompt = reference["prompt_ids"] + [5, 9, 33]
    local = generate(load_model(store, LocalExperts(store)), prompt, 4, stop_at_eos=False)
    runs = []
    for slots in (3, 8):
        with launched_pipeline(store.path, tmp_path / f"sock-{slots}", ["--slots", str(slots)]) as info:
            backend = make_backend(store, info)
            try:
                runs.append(generate(load_model(store, backend), prompt, 4, stop_at_eos=False, pipeline=info))
            finally:
                backend.close()
    for run in runs:
        assert np.array_equal(run.logits, local.logits)
        assert run.generated_ids == local.generated_ids
    small, large = runs
    assert small.summary["backend"] == "pipeline"
    assert small.summary["prefill"]["lookups"] > 0
    assert small.summary["decode"]["read_bytes"] > 0
    assert small.summary["hit_rate"] < large.summary["hit_rate"]
    assert "compute_expert" in small.summary["stages"]


def _mer(*args):
    command = [sys.executable, "-c", "from mer_pipeline.cli import main; main()", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def test_cli_generate_local_json(stores, reference, tmp_path):
    logits_path = tmp_path / "logits.npy"
    ids = ",".join(map(str, reference["prompt_ids"]))
    done = _mer("generate", "--store", str(stores["f32"].path), "--prompt-ids", ids, "--max-new-tokens", "4",
                "--ignore-eos", "--local", "--json", "--logits-out", str(logits_path))
    assert done.returncode == 0, done.stderr
    output = json.loads(done.stdout)
    assert output["generated_ids"] == reference["generated_ids"]
    assert output["summary"]["decode_tokens"] == 3
    assert np.load(logits_path).shape == (6, 48)


@pytest.mark.parametrize("args, message", [
    (["--prompt-ids", "1,48"], "token id 48 at position 1 is outside the vocabulary 0..47"),
    (["--prompt-ids", "1,x"], "is not a comma-separated list of integers"),
    (["--prompt", "hello"], "has no tokenizer"),
])
def test_cli_generate_bad_input(stores, args, message):
    done = _mer("generate", "--store", str(stores["f32"].path), "--local", *args)
    assert done.returncode == 2
    assert message in done.stderr
