"""The generate loop: prefill the prompt, then decode one token at a time, and summarize the run.

Time to first token covers the prefill forward pass and choosing the first token. Decode
covers every later token: one forward pass of the previous token each. With the
pipeline, the I/O and worker counters are read before prefill, after the first token
and at the end, so prefill and decode each get their own hit rate, I/O share and bytes
read per token. A token is a token through all layers.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import numpy as np

from mer_pipeline.histograms import merge_encoded, summarize_all
from mer_pipeline.model import LocalExperts, MixtralModel, ModelError, PipelineExperts
from mer_pipeline.runtime import PipelineInfo
from mer_pipeline.stream import PipelineStats, _delta, _worker_totals, collect_stats

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Generation:
    prompt_ids: list[int]
    generated_ids: list[int]
    # float32 [prompt + generated - 1, vocab], row i the logits at position i. The logits
    # that chose generated token j are row len(prompt_ids) - 1 + j.
    logits: np.ndarray
    stop_reason: str
    summary: dict[str, Any]


def sample(logits: np.ndarray, temperature: float, rng: np.random.Generator) -> int:
    """Return argmax for temperature 0, else a draw from softmax(logits / temperature)."""
    if temperature <= 0:
        return int(np.argmax(logits))
    scaled = logits.astype(np.float64) / temperature
    probs = np.exp(scaled - scaled.max())
    return int(rng.choice(len(probs), p=probs / probs.sum()))


def _eos_ids(eos: Any) -> set[int]:
    if eos is None:
        return set()
    return {int(e) for e in eos} if isinstance(eos, list) else {int(eos)}


def generate(model: MixtralModel, prompt_ids: list[int], max_new_tokens: int, *, temperature: float = 0.0,
             seed: int = 0, stop_at_eos: bool = True, capacity: int | None = None,
             pipeline: PipelineInfo | None = None) -> Generation:
    """Generate up to `max_new_tokens` tokens after the prompt.

    Stops early at an end-of-sequence token (when `stop_at_eos`) or when the KV cache is
    full. `capacity` is the KV cache's size in positions (default: prompt + new tokens,
    at most the model's context). `pipeline` adds the pipeline's counters to the summary.
    """
    config = model.config
    if not prompt_ids:
        raise ModelError("the prompt is empty; give at least one token id")
    if max_new_tokens < 1:
        raise ModelError(f"max_new_tokens ({max_new_tokens}) must be at least 1")
    if len(prompt_ids) > config.context_length:
        raise ModelError(f"the prompt has {len(prompt_ids)} tokens, longer than the context of {config.context_length}")
    capacity = capacity or min(config.context_length, len(prompt_ids) + max_new_tokens - 1)
    cache = model.new_cache(capacity)
    model.check_tokens(prompt_ids, cache)
    rng = np.random.default_rng(seed)
    eos = _eos_ids(config.eos_token_id) if stop_at_eos else set()
    snapshots = [_snapshot(model, pipeline)]

    start_s = time.perf_counter()
    prompt_logits = model.forward(list(prompt_ids), cache)
    generated = [sample(prompt_logits[-1], temperature, rng)]
    first_token_s = time.perf_counter()
    snapshots.append(_snapshot(model, pipeline))

    rows = [prompt_logits]
    step_s = []
    stop_reason = "max_new_tokens"
    decode_start_s = time.perf_counter()
    while len(generated) < max_new_tokens:
        if generated[-1] in eos:
            stop_reason = "eos"
            break
        if cache.length >= cache.capacity:
            stop_reason = "context_full"
            break
        step_start_s = time.perf_counter()
        logits = model.forward([generated[-1]], cache)
        rows.append(logits)
        generated.append(sample(logits[-1], temperature, rng))
        step_s.append(time.perf_counter() - step_start_s)
    decode_s = time.perf_counter() - decode_start_s
    if stop_reason == "max_new_tokens" and generated[-1] in eos:
        stop_reason = "eos"
    snapshots.append(_snapshot(model, pipeline))

    timing = {
        "prompt_tokens": len(prompt_ids),
        "generated_tokens": len(generated),
        "time_to_first_token_s": first_token_s - start_s,
        "prefill_tokens_per_s": len(prompt_ids) / (first_token_s - start_s),
        "decode_tokens": len(step_s),
        "decode_s": decode_s,
        "decode_tokens_per_s": len(step_s) / decode_s if step_s else 0.0,
        "decode_step_ms": _percentiles_ms(step_s),
    }
    summary = summarize(model, pipeline, snapshots, timing, stop_reason)
    return Generation(list(prompt_ids), generated, np.concatenate(rows, axis=0), stop_reason, summary)


def _percentiles_ms(values_s: list[float]) -> dict[str, float]:
    if not values_s:
        return {}
    ms = np.asarray(values_s) * 1e3
    return {"p50": float(np.percentile(ms, 50)), "p95": float(np.percentile(ms, 95)), "max": float(ms.max())}


@dataclasses.dataclass
class _Snapshot:
    backend: dict[str, int]
    pipeline: PipelineStats | None


def _snapshot(model: MixtralModel, pipeline: PipelineInfo | None) -> _Snapshot:
    return _Snapshot(dict(model.experts.counters), collect_stats(pipeline) if pipeline is not None else None)


def _phase(before: _Snapshot, after: _Snapshot, tokens: int) -> dict[str, Any]:
    """Counters of one phase (prefill or decode): hits, reads, I/O share and bytes read per token."""
    if after.pipeline is None:
        read_bytes = after.backend.get("read_bytes", 0) - before.backend.get("read_bytes", 0)
        reads = after.backend.get("reads", 0) - before.backend.get("reads", 0)
        hits = after.backend.get("resident_hits", 0) - before.backend.get("resident_hits", 0)
        lookups = reads + hits
        return {"lookups": lookups, "hits": hits, "hit_rate": hits / lookups if lookups else 0.0,
                "read_bytes": read_bytes, "read_bytes_per_token": read_bytes / tokens if tokens else 0.0,
                "io_share": None}
    io_a, io_b = after.pipeline.io.counters, before.pipeline.io.counters
    workers_a, workers_b = _worker_totals(after.pipeline.compute), _worker_totals(before.pipeline.compute)
    lookups = _delta(io_a, io_b, "lookups")
    hits = _delta(io_a, io_b, "hits")
    read_bytes = _delta(io_a, io_b, "io_bytes")

    lease_wait_us = _delta(workers_a, workers_b, "lease_wait_us")
    compute_us = _delta(workers_a, workers_b, "compute_us")
    busy_us = lease_wait_us + compute_us
    io_busy_us = _delta(io_a, io_b, "io_busy_us")
    return {
        "lookups": lookups,
        "hits": hits,
        "hit_rate": hits / lookups if lookups else 0.0,
        "read_bytes": read_bytes,
        "read_bytes_per_token": read_bytes / tokens if tokens else 0.0,
        "io_share": lease_wait_us / busy_us if busy_us else 0.0,
        "io_wait_ms_per_token": lease_wait_us / 1e3 / tokens if tokens else 0.0,
        "compute_ms_per_token": compute_us / 1e3 / tokens if tokens else 0.0,
        "io_mib_per_s": read_bytes / 2**20 / (io_busy_us / 1e6) if io_busy_us else 0.0,
        "prefetch_issued": _delta(io_a, io_b, "prefetch_issued"),
        "prefetch_useful": _delta(io_a, io_b, "prefetch_useful"),
        "prefetch_wasted": _delta(io_a, io_b, "prefetch_wasted"),
    }


def summarize(model: MixtralModel, pipeline: PipelineInfo | None, snapshots: list[_Snapshot],
              timing: dict[str, Any], stop_reason: str) -> dict[str, Any]:
    before, after_prefill, after = snapshots
    prefill = _phase(before, after_prefill, timing["prompt_tokens"])
    decode = _phase(after_prefill, after, timing["decode_tokens"])
    whole = _phase(before, after, timing["prompt_tokens"] + timing["decode_tokens"])
    summary: dict[str, Any] = {
        **timing,
        "stop_reason": stop_reason,
        "hit_rate": whole["hit_rate"],
        "io_share": whole["io_share"],
        "read_bytes_per_token": whole["read_bytes_per_token"],
        "prefill": prefill,
        "decode": decode,
        "backend": "pipeline" if pipeline is not None else "local",
        "backend_counters": dict(model.experts.counters),
        "lookahead": {**model.lookahead_stats.as_dict(), "hinted_distances": model.hinted_distances()},
        "layers": model.config.n_layers,
    }
    if pipeline is not None:
        stats = after.pipeline
        encoded = [stats.io.histograms, stats.compute.histograms]
        encoded += [w["histograms"] for w in stats.compute.counters.get("workers", {}).values()]
        summary["stages"] = summarize_all(merge_encoded(encoded))
        summary["pool_slots"] = pipeline.pool_slots
        summary["workers"] = len(pipeline.worker_cpus)
        summary["io_path"] = stats.io.counters.get("io_path", "unknown")
    else:
        summary["stages"] = {}
    return summary


def make_backend(store, pipeline: PipelineInfo | None):
    """Return the expert backend: the pipeline's when one is given, else in-process experts."""
    if pipeline is None:
        return LocalExperts(store)
    return PipelineExperts(pipeline, store.shape.n_experts, store.shape.d_model)
