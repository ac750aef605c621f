"""Overlap of expert reads and compute: achieved tokens/s against the compute-only and
I/O-only bounds, measured in the same run.

The store holds Mixtral-shaped q4_0 experts (d_model 4096, d_ff 14336, 8 layers x 8
experts, about 6.3 GB). The benchmark streams the first 8 layers of the bundled Mixtral
decode trace through the pipeline, with the pool at each cache share and each
configuration (eviction policy, predictor, prefetch admission, and whether workers
compute on an expert while it is read or only after). Per run it reports the
hit rate, the share of would-be misses that prefetch hid fully or partly, io_share and
tokens/s, and:

    compute-only bound  tokens/s of the same tokens with every expert resident
    I/O-only bound      tokens / (would-be misses x expert bytes / read bandwidth), where
                        would-be misses = demand misses + hits on prefetched experts and the
                        read bandwidth is the I/O daemon's during the run (bytes read / time
                        with reads in flight); a standalone read of 8 experts with the same
                        engine is reported too
    bound ratio         tokens/s / min(compute-only, I/O-only)

Baseline `mmap`: one process maps the store file and runs the same kernel on the mapped
expert regions (2 kernel threads), with the memory limit of the pool emulated by an LRU
of resident experts: an expert that leaves it is dropped with madvise(MADV_DONTNEED) and
posix_fadvise(POSIX_FADV_DONTNEED), so its next use faults it in from the disk again.

Each configuration runs `--repeats` times, alternating; medians and ranges are printed.

    .venv/bin/python benchmarks/bench_overlap.py [--store DIR] [--tokens 12] [--repeats 3] [--json]

Without --store a store is written under /var/tmp and deleted at the end.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import mmap
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from mer_pipeline import kernels
from mer_pipeline.config import IoConfig
from mer_pipeline.expert_reader import ExpertRead, ExpertReader
from mer_pipeline.main_job import BUNDLED_TRACE, launched_pipeline
from mer_pipeline.store import Store, open_store
from mer_pipeline.stream import collect_stats, stream_trace
from mer_pipeline.synth import SynthConfig, write_synth_store
from mer_pipeline.trace import Trace, TokenRouting, load_trace

SHARES = (0.25, 0.5)
WARMUP_TOKENS = 3
BANDWIDTH_EXPERTS = 8
# name -> (eviction, predictor, prefetch_max_inflight, prefetch_deadline_slack,
# compute_during_read). `lru/none/after-read` is a plain expert cache: LRU, no prefetch,
# the kernel starts once the whole expert is read.
CONFIGS = {
    "lru/none/after-read": ("lru", "none", 2, 1.0, False),
    "lru/none": ("lru", "none", 2, 1.0, True),
    "layer/none": ("layer", "none", 2, 1.0, True),
    "layer/transition": ("layer", "transition", 2, 1.0, True),
    "layer/transition/after-read": ("layer", "transition", 2, 1.0, False),
    "layer/transition-unlimited": ("layer", "transition", 64, 0.0, True),
}
DEFAULT_CONFIGS = ("lru/none/after-read", "layer/transition/after-read", "layer/none", "layer/transition")
COUNTERS = (
    "lookups", "hits", "misses", "misses_hidden", "misses_partly_hidden", "misses_not_hidden",
    "prefetch_issued", "prefetch_useful", "prefetch_wasted", "prefetch_skipped_inflight",
    "prefetch_skipped_late", "io_bytes", "io_busy_us",
)


def first_layers(trace: Trace, n_layers: int, tokens: slice) -> Trace:
    """Return the trace cut to the layers below `n_layers` and the tokens in `tokens`."""
    kept = []
    for token in trace.tokens[tokens]:
        cells = [(layer, experts, probs) for layer, experts, probs in zip(token.layers, token.experts, token.probs) if layer < n_layers]
        kept.append(TokenRouting(token.problem, token.token_idx, [c[0] for c in cells], [c[1] for c in cells], [c[2] for c in cells]))
    return Trace(n_layers, trace.n_experts, trace.top_k, kept, 0)


def topology_file(directory: Path, eviction: str, predictor: str, max_inflight: int, slack: float, during_read: bool) -> Path:
    path = directory / "overlap.toml"
    path.write_text(
        "numa_node = 0\n"
        f'[io]\neviction = "{eviction}"\nprefetch_max_inflight = {max_inflight}\nprefetch_deadline_slack = {slack}\n'
        f'[predictor]\nkind = "{predictor}"\n'
        f"[workers]\ncompute_during_read = {'true' if during_read else 'false'}\n"
    )
    return path


def run_pipeline(store_path: Path, tmp: Path, slots: int, config: tuple, warmup: Trace, measured: Trace, passes: int = 1) -> dict:
    """Launch a pipeline, stream the warm-up tokens, then the measured ones; return the
    measured pass's summary with the I/O daemon's counter deltas."""
    topology = topology_file(tmp, *config)
    socket_dir = tmp / f"pipeline-{time.monotonic_ns()}"
    with launched_pipeline(store_path, socket_dir, ["--topology", str(topology), "--slots", str(slots)]) as info:
        stream_trace(info, warmup, None, None, progress=False)
        for _ in range(passes):
            before = collect_stats(info).io.counters
            _, summary = stream_trace(info, measured, None, None, progress=False)
            after = collect_stats(info).io.counters
    summary["io"] = {key: int(after.get(key, 0)) - int(before.get(key, 0)) for key in COUNTERS}
    return summary


def read_bandwidth_bytes_per_s(store: Store) -> float:
    """Read BANDWIDTH_EXPERTS expert regions with the daemon's read engine; return bytes/s."""
    entries = store.experts[:BANDWIDTH_EXPERTS]
    buffers = [mmap.mmap(-1, store.region_bytes) for _ in entries]
    reader = ExpertReader(IoConfig(), sorted({store.data_path(e) for e in entries}))
    try:
        started_s = time.perf_counter()
        for index, (entry, buffer) in enumerate(zip(entries, buffers)):
            reader.submit(ExpertRead(tag=index, path=store.data_path(entry), offset=entry.offset, length=entry.length, dest=memoryview(buffer)))
        if not reader.wait_idle(120.0):
            raise RuntimeError("bandwidth reads did not finish within 120 s")
        elapsed_s = time.perf_counter() - started_s
    finally:
        reader.close()
        for buffer in buffers:
            buffer.close()
    return sum(e.length for e in entries) / elapsed_s


def run_mmap(store: Store, measured: Trace, warmup: Trace, capacity: int) -> dict:
    """Run the kernel on mmap'ed expert regions with an LRU memory limit of `capacity` experts."""
    kernels.set_num_threads(2)
    paths = {store.data_path(e) for e in store.experts}
    if len(paths) != 1:
        raise RuntimeError(f"the mmap baseline expects one data file, the store has {len(paths)}")
    path = paths.pop()
    page = mmap.PAGESIZE
    fd = os.open(path, os.O_RDONLY)
    try:
        mapped = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        data = np.frombuffer(mapped, dtype=np.uint8)
        x = np.random.default_rng(0).standard_normal(store.shape.d_model, dtype=np.float32)
        resident: collections.OrderedDict[int, None] = collections.OrderedDict()

        def drop(expert_id: int) -> None:
            entry = store.entry(expert_id)
            start = entry.offset - entry.offset % page
            mapped.madvise(mmap.MADV_DONTNEED, start, entry.offset + entry.length - start)
            os.posix_fadvise(fd, start, entry.offset + entry.length - start, os.POSIX_FADV_DONTNEED)

        def stream(trace: Trace) -> tuple[float, int, int]:
            hits = lookups = 0
            started_s = time.perf_counter()
            for token in trace.tokens:
                for layer, experts in zip(token.layers, token.experts):
                    for expert in experts:
                        expert_id = layer * store.shape.n_experts + expert
                        lookups += 1
                        if expert_id in resident:
                            hits += 1
                            resident.move_to_end(expert_id)
                        else:
                            if len(resident) >= capacity:
                                victim, _ = resident.popitem(last=False)
                                drop(victim)
                            resident[expert_id] = None
                        entry = store.entry(expert_id)
                        kernels.swiglu(data[entry.offset:entry.offset + entry.length], store.layout, x)
            return time.perf_counter() - started_s, hits, lookups

        stream(warmup)
        elapsed_s, hits, lookups = stream(measured)
        del data
        mapped.close()
    finally:
        os.close(fd)
    return {"tokens_per_s": len(measured.tokens) / elapsed_s, "hit_rate": hits / lookups}


@dataclasses.dataclass
class Samples:
    values: dict[str, list[float]] = dataclasses.field(default_factory=lambda: collections.defaultdict(list))

    def add(self, key: str, value: float) -> None:
        self.values[key].append(value)

    def summary(self) -> dict[str, dict[str, float]]:
        return {
            key: {"median": statistics.median(v), "min": min(v), "max": max(v), "n": len(v)}
            for key, v in self.values.items()
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, help="an existing store of 8 layers x 8 experts (kept)")
    parser.add_argument("--tokens", type=int, default=12, help="measured tokens per run (after 3 warm-up tokens)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each configuration")
    parser.add_argument(
        "--configs", default=",".join(DEFAULT_CONFIGS), help=f"comma-separated configurations to run, of: {', '.join(CONFIGS)}"
    )
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args()
    # SIGTERM unwinds like Ctrl-C, so the pipeline in flight is stopped and its shared
    # memory and temporary store are removed.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    names = args.configs.split(",")
    unknown = [name for name in names if name not in CONFIGS]
    if unknown:
        parser.error(f"--configs: unknown configuration {unknown[0]!r}; choose from {', '.join(CONFIGS)}")

    with tempfile.TemporaryDirectory(prefix="mer-bench-overlap-", dir="/var/tmp") as tmp_name:
        tmp = Path(tmp_name)
        store_path = args.store
        if store_path is None:
            store_path = tmp / "store"
            write_synth_store(store_path, SynthConfig(n_layers=8, n_experts=8, top_k=2, d_model=4096, d_ff=14336, dtype="q4_0"))
        store = open_store(store_path)
        n_layers, n_experts = store.shape.n_layers, store.shape.n_experts
        trace = load_trace(BUNDLED_TRACE)
        warmup = first_layers(trace, n_layers, slice(0, WARMUP_TOKENS))
        measured = first_layers(trace, n_layers, slice(WARMUP_TOKENS, WARMUP_TOKENS + args.tokens))
        n_total = n_layers * n_experts
        samples = Samples()

        for repeat in range(args.repeats):
            samples.add("read_bandwidth_mib_per_s", read_bandwidth_bytes_per_s(store) / 2**20)
            everything = run_pipeline(store_path, tmp, n_total, CONFIGS["layer/none"], measured, measured)
            samples.add("compute_only_tokens_per_s", everything["tokens_per_s"])
            for share in SHARES:
                slots = int(n_total * share)
                mmap_result = run_mmap(store, measured, warmup, slots)
                samples.add(f"{share}/mmap/tokens_per_s", mmap_result["tokens_per_s"])
                samples.add(f"{share}/mmap/hit_rate", mmap_result["hit_rate"])
                for name in names:
                    summary = run_pipeline(store_path, tmp, slots, CONFIGS[name], warmup, measured)
                    io = summary["io"]
                    would_miss = io["misses"] + io["misses_hidden"]
                    key = f"{share}/{name}"
                    samples.add(f"{key}/tokens_per_s", summary["tokens_per_s"])
                    samples.add(f"{key}/hit_rate", summary["hit_rate"])
                    samples.add(f"{key}/io_share", summary["io_share"])
                    samples.add(f"{key}/would_miss", would_miss)
                    samples.add(f"{key}/hidden", io["misses_hidden"] / would_miss if would_miss else 0.0)
                    samples.add(f"{key}/partly_hidden", io["misses_partly_hidden"] / would_miss if would_miss else 0.0)
                    samples.add(f"{key}/read_gib", io["io_bytes"] / 2**30)
                    misses = summary["misses"]
                    samples.add(f"{key}/computed_during_read", summary["computed_during_read"] / misses if misses else 0.0)
                    lead = summary["stages"].get("prefetch_lead", {}).get("p50_us", 0.0)
                    read = summary["stages"].get("prefetch_read", {}).get("p50_us", 0.0)
                    samples.add(f"{key}/prefetch_lead_p50_ms", lead / 1000)
                    samples.add(f"{key}/prefetch_read_p50_ms", read / 1000)
                    bandwidth = io["io_bytes"] / (io["io_busy_us"] / 1e6) if io["io_busy_us"] else float("inf")
                    samples.add(f"{key}/run_read_mib_per_s", bandwidth / 2**20)
                    io_only = len(measured.tokens) / (would_miss * store.region_bytes / bandwidth) if would_miss else float("inf")
                    samples.add(f"{key}/io_only_tokens_per_s", io_only)
                    bound = min(io_only, samples.values["compute_only_tokens_per_s"][-1])
                    samples.add(f"{key}/bound_ratio", summary["tokens_per_s"] / bound)
                    if not args.json:
                        print(
                            f"repeat={repeat} share={share} {name:>26} tok/s={summary['tokens_per_s']:.3f} "
                            f"hit={summary['hit_rate']:.3f} hidden={samples.values[key + '/hidden'][-1]:.2f} "
                            f"bound_ratio={samples.values[key + '/bound_ratio'][-1]:.2f}",
                            flush=True,
                        )
            if not args.json:
                # The medians so far, so an interrupted run still leaves a summary.
                print(json.dumps({"after_repeat": repeat, "samples": samples.summary()}), flush=True)
    result = {
        "tokens": len(measured.tokens),
        "repeats": args.repeats,
        "cpus": len(os.sched_getaffinity(0)),
        "region_bytes": store.region_bytes,
        "samples": samples.summary(),
    }
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        for key, stats in result["samples"].items():
            print(f"{key:>52}  median={stats['median']:.3f}  range={stats['min']:.3f}-{stats['max']:.3f}  n={stats['n']}")


if __name__ == "__main__":
    main()
