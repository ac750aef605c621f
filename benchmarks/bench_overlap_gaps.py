"""The time of an overlap run: how long the device reads, and the gaps between reads.

It runs the default configuration (`layer/none`, workers computing during the read) on
the store of bench_overlap.py, with the pool at each cache share. It streams 3 warm-up
tokens and 8 measured ones, then reads the spans of the run (the ones `--trace-out`
writes). Between the start of the first measured token and the end of the last, it
prints:

    device busy      share of the time with at least one expert read in flight
    idle gaps        time with no read in flight: count, median and largest
    post-grant       median kernel time left after the lease is granted. On a miss, the
                     rest of the kernel ran during the read.
    verify tail      median and p90 checksum time after a read's last byte (the part of
                     the region not hashed while it arrived)

    .venv/bin/python benchmarks/bench_overlap_gaps.py --store DIR [--tokens 8]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_overlap import CONFIGS, SHARES, WARMUP_TOKENS, first_layers, topology_file  # noqa: E402

from mer_pipeline.main_job import BUNDLED_TRACE, launched_pipeline  # noqa: E402
from mer_pipeline.observe.timeline import collect_spans  # noqa: E402
from mer_pipeline.store import open_store  # noqa: E402
from mer_pipeline.stream import stream_trace  # noqa: E402
from mer_pipeline.trace import load_trace  # noqa: E402

CONFIG = "layer/none"


def busy_and_gaps(intervals: list[tuple[int, int]], start_ns: int, end_ns: int) -> tuple[int, list[int]]:
    """Return the time within [start_ns, end_ns] that `intervals` cover, and the gaps between them (ns)."""
    covered_ns = 0
    gaps_ns = []
    reached_ns = start_ns
    for begin_ns, finish_ns in sorted(intervals):
        begin_ns, finish_ns = max(begin_ns, start_ns), min(finish_ns, end_ns)
        if finish_ns <= reached_ns:
            continue
        if begin_ns > reached_ns:
            gaps_ns.append(begin_ns - reached_ns)
            covered_ns += finish_ns - begin_ns
        else:
            covered_ns += finish_ns - reached_ns
        reached_ns = finish_ns
    if end_ns > reached_ns:
        gaps_ns.append(end_ns - reached_ns)
    return covered_ns, gaps_ns


def measure(store_path: Path, tmp: Path, slots: int, tokens: int) -> dict:
    """Stream the measured tokens through a pipeline of `slots` slots; return its gap summary."""
    trace = load_trace(BUNDLED_TRACE)
    n_layers = open_store(store_path).shape.n_layers
    warmup = first_layers(trace, n_layers, slice(0, WARMUP_TOKENS))
    measured = first_layers(trace, n_layers, slice(WARMUP_TOKENS, WARMUP_TOKENS + tokens))
    topology = topology_file(tmp, *CONFIGS[CONFIG])
    with launched_pipeline(store_path, tmp / f"pipeline-{slots}", ["--topology", str(topology), "--slots", str(slots)]) as info:
        stream_trace(info, warmup, None, None, progress=False)
        since_ns = time.monotonic_ns()
        _, summary = stream_trace(info, measured, None, None, progress=False)
        spans = collect_spans(info, since_ns)

    token_spans = [s for s in spans["compute"]["spans"] if s[0] == "token" and s[2] >= since_ns]
    start_ns, end_ns = min(s[1] for s in token_spans), max(s[2] for s in token_spans)
    read_spans = [s for s in spans["io"]["spans"] if s[0] == "read" and s[2] >= start_ns and s[1] <= end_ns]
    busy_ns, gaps_ns = busy_and_gaps([(s[1], s[2]) for s in read_spans], start_ns, end_ns)
    verify_tail_ms = sorted(s[3].get("verify_tail_us", 0) / 1000 for s in read_spans)

    post_grant_ms = [
        (s[2] - s[1]) / 1e6
        for name, entry in spans.items() if name.startswith("worker:")
        for s in entry["spans"] if s[0] == "kernel" and s[2] >= start_ns
    ]
    return {
        "tokens_per_s": summary["tokens_per_s"],
        "hit_rate": summary["hit_rate"],
        "window_s": (end_ns - start_ns) / 1e9,
        "device_busy": busy_ns / (end_ns - start_ns),
        "gaps": len(gaps_ns),
        "gap_p50_ms": statistics.median(gaps_ns) / 1e6 if gaps_ns else 0.0,
        "gap_max_ms": max(gaps_ns) / 1e6 if gaps_ns else 0.0,
        "gaps_total_s": sum(gaps_ns) / 1e9,
        "post_grant_kernel_p50_ms": statistics.median(post_grant_ms),
        "verify_tail_p50_ms": statistics.median(verify_tail_ms) if verify_tail_ms else 0.0,
        "verify_tail_p90_ms": verify_tail_ms[int(0.9 * (len(verify_tail_ms) - 1))] if verify_tail_ms else 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, required=True, help="the store of bench_overlap.py (8 layers x 8 experts)")
    parser.add_argument("--tokens", type=int, default=8, help="measured tokens per run (after 3 warm-up tokens)")
    args = parser.parse_args()
    n_total = open_store(args.store).n_experts_total
    with tempfile.TemporaryDirectory(prefix="mer-bench-gaps-", dir="/var/tmp") as tmp_name:
        for share in SHARES:
            result = measure(args.store, Path(tmp_name), int(n_total * share), args.tokens)
            print(
                f"share={share} {CONFIG} tok/s={result['tokens_per_s']:.2f} hit={result['hit_rate']:.2f} "
                f"window={result['window_s']:.2f}s device_busy={result['device_busy']:.2f} "
                f"gaps={result['gaps']} gap_p50={result['gap_p50_ms']:.1f}ms gap_max={result['gap_max_ms']:.0f}ms "
                f"gaps_total={result['gaps_total_s']:.2f}s post_grant_kernel_p50={result['post_grant_kernel_p50_ms']:.1f}ms "
                f"verify_tail_p50={result['verify_tail_p50_ms']:.1f}ms verify_tail_p90={result['verify_tail_p90_ms']:.1f}ms",
                flush=True,
            )


if __name__ == "__main__":
    main()
