"""Dispatch overhead of the pipeline at Mixtral shape: the time a task spends outside
the kernel (messages, lease, copies) against the kernel's own time.

Makes a store of one layer of 8 Mixtral-shaped q4_0 experts (d_model 4096, d_ff 14336,
about 790 MB) unless --store is given, launches numa0 with every expert resident, streams
a warm-up pass and then N tokens of a uniform top-2 routing, and reports the medians of
the compute daemon's task round trip and the workers' kernel time.

    .venv/bin/python benchmarks/bench_dispatch.py [--store DIR] [--tokens 40] [--workers N] [--json]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path

from mer_pipeline.main_job import launched_pipeline
from mer_pipeline.store import open_store
from mer_pipeline.stream import stream_trace
from mer_pipeline.synth import SynthConfig, write_synth_store
from mer_pipeline.trace import synthetic_trace


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, help="an existing store with at least 1 layer of 8 experts")
    parser.add_argument("--tokens", type=int, default=40, help="measured tokens (after a warm-up pass)")
    parser.add_argument("--workers", type=int, default=0, help="compute workers (0: one per CPU, as numa0 does)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="mer-bench-dispatch-", dir="/var/tmp") as tmp:
        store_path = args.store
        if store_path is None:
            store_path = Path(tmp) / "store"
            write_synth_store(store_path, SynthConfig(n_layers=1, n_experts=8, top_k=2, d_model=4096, d_ff=14336, dtype="q4_0"))
        store = open_store(store_path)
        trace = synthetic_trace("uniform", 1, store.shape.n_experts, 2, args.tokens, seed=1)
        warmup = synthetic_trace("uniform", 1, store.shape.n_experts, 2, 8, seed=2)
        socket_dir = Path(tmp) / "pipeline"
        slots = store.shape.n_experts
        with launched_pipeline(store_path, socket_dir, ["--slots", str(slots), "--predictor", "none", "--workers", str(args.workers)]) as info:
            stream_trace(info, warmup, None, None, progress=False)
            _, summary = stream_trace(info, trace, None, None, progress=False)

    stages = summary["stages"]
    round_trip_us = stages["task_round_trip"]["p50_us"]
    kernel_us = stages["compute_expert"]["p50_us"]
    result = {
        "machine": {"cpu": cpu_model(), "cores": len(__import__("os").sched_getaffinity(0))},
        "tokens": summary["tokens"],
        "workers": summary["workers"],
        "hit_rate": summary["hit_rate"],
        "task_round_trip_p50_us": round_trip_us,
        "kernel_p50_us": kernel_us,
        "overhead_p50_us": stages["task_overhead"]["p50_us"],
        "overhead_share": stages["task_overhead"]["p50_us"] / kernel_us,
        "lease_wait_p50_us": stages["lease_wait"]["p50_us"],
        "note": "p50s include the warm-up pass; overhead = round trip - kernel time, per task (messages, lease, copies)",
    }
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        for key, value in result.items():
            print(f"{key:>24}  {value}")


if __name__ == "__main__":
    main()
