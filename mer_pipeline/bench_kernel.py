"""Benchmark of the SwiGLU kernel on one Mixtral-shaped q4_0 expert.

The yardstick is the memory-read floor: the time that all threads need to read the
expert's bytes from RAM once (a parallel sum over them as uint64). The expert
contains random tile bytes with float16 scales between 0.002 and 0.02. The kernel's
speed does not depend on the values, so the benchmark skips gguf quantization.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import numba
import numpy as np
from numba import njit, prange

from mer_pipeline import kernels, quant

MIXTRAL_D_MODEL = 4096
MIXTRAL_D_FF = 14336
TARGET_BATCH1_TO_FLOOR = 1.5
TARGET_BATCH8_TO_BATCH1 = 6.0
TARGET_READY_S = 1.0
# Script of a fresh process that gets ready to compute: import the kernels, load them
# from numba's disk cache, and compute one small expert.
READY_SCRIPT = (
    "import numpy as np\n"
    "from mer_pipeline import kernels, quant\n"
    "kernels.warmup()\n"
    "layout = quant.expert_layout(64, 128, 'q4_0')\n"
    "kernels.swiglu(np.zeros(layout.region_bytes, np.uint8), layout, np.ones(64, np.float32))\n"
)
SUM_CHUNKS = 256


@njit(parallel=True, cache=True)
def _sum_words(words):
    """Return the wrapping sum of a uint64 array, read once in SUM_CHUNKS parallel chunks."""
    n_words = words.shape[0]
    chunk = -(-n_words // SUM_CHUNKS)
    partial = np.zeros(SUM_CHUNKS, np.uint64)
    for c in prange(SUM_CHUNKS):
        total = np.uint64(0)
        for i in range(c * chunk, min(n_words, (c + 1) * chunk)):
            total += words[i]
        partial[c] = total
    return partial.sum()


def synthetic_expert(d_model: int, d_ff: int, seed: int = 0) -> tuple[quant.ExpertLayout, np.ndarray]:
    """Return a q4_0 expert layout and a region of random tiles with sane float16 scales."""
    layout = quant.expert_layout(d_model, d_ff, "q4_0")
    rng = np.random.default_rng(seed)
    region = rng.integers(0, 256, layout.region_bytes, dtype=np.uint8)
    tiles = region[:layout.payload_bytes].reshape(-1, quant.TILE_BYTES["q4_0"])
    scales = rng.uniform(0.002, 0.02, (tiles.shape[0], quant.INTERLEAVE_ROWS)).astype(np.float16)
    tiles[:, :quant.SCALES_BYTES] = scales.view(np.uint8)
    region[layout.payload_bytes:] = 0
    return layout, region


def time_calls(function: Callable[[], object], repeats: int) -> list[float]:
    """Call `function` once untimed, then `repeats` times; return each call's seconds."""
    function()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        seconds.append(time.perf_counter() - start)
    return seconds


def time_cases_round_robin(cases: dict[str, tuple[int, Callable[[], object]]], repeats: int) -> dict[str, list[float]]:
    """Time each case (thread count, function) `repeats` times, one call of each case per round.

    Taking turns spreads a burst of load from other processes over all cases
    instead of letting it distort one of them.
    """
    for n_threads, function in cases.values():
        kernels.set_num_threads(n_threads)
        function()
    seconds: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, (n_threads, function) in cases.items():
            kernels.set_num_threads(n_threads)
            start = time.perf_counter()
            function()
            seconds[name].append(time.perf_counter() - start)
    return seconds


def time_ready_s(repeats: int) -> list[float]:
    """Return wall seconds for fresh interpreters to run READY_SCRIPT, the first run untimed."""
    command = [sys.executable, "-c", READY_SCRIPT]
    return time_calls(lambda: subprocess.run(command, check=True), repeats)


def machine_info() -> dict:
    cpu_model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    memory_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {"cpu_model": cpu_model, "cores": os.cpu_count(), "memory_bytes": memory_bytes}


def run_kernel_benchmark(threads: int, repeats: int, ready_repeats: int = 3) -> dict:
    """Measure the read floor, SwiGLU at batch 1 and 8 on one thread and on `threads`,
    and the ready time of a fresh process. Times are medians over `repeats` rounds."""
    kernels.warmup()
    layout, region = synthetic_expert(MIXTRAL_D_MODEL, MIXTRAL_D_FF)
    expert_bytes = layout.payload_bytes
    words = region[:expert_bytes - expert_bytes % 8].view(np.uint64)
    rng = np.random.default_rng(1)
    batches = {n: rng.standard_normal((n, layout.d_model)).astype(np.float32) for n in (1, 8)}

    def swiglu_call(n_tokens: int) -> Callable[[], object]:
        return lambda: kernels.swiglu(region, layout, batches[n_tokens])

    cases = {
        "floor": (threads, lambda: _sum_words(words)),
        "floor_one_thread": (1, lambda: _sum_words(words)),
        "batch1_all_cores": (threads, swiglu_call(1)),
        "batch1_one_thread": (1, swiglu_call(1)),
        "batch8_all_cores": (threads, swiglu_call(8)),
        "batch8_one_thread": (1, swiglu_call(8)),
    }
    seconds = time_cases_round_robin(cases, repeats)
    kernels.set_num_threads(threads)
    ready_s = statistics.median(time_ready_s(ready_repeats))

    median_ms = {f"{name}_ms": statistics.median(values) * 1e3 for name, values in seconds.items()}
    ratio_to_floor = median_ms["batch1_all_cores_ms"] / median_ms["floor_ms"]
    batch8_to_batch1 = median_ms["batch8_all_cores_ms"] / median_ms["batch1_all_cores_ms"]
    return {
        "machine": machine_info(),
        "threads": threads,
        "repeats": repeats,
        "expert_bytes": expert_bytes,
        **median_ms,
        "min_ms": {name: min(values) * 1e3 for name, values in seconds.items()},
        "gb_per_s": {name[:-3]: expert_bytes / value / 1e6 for name, value in median_ms.items()},
        "ratio_to_floor": ratio_to_floor,
        "batch8_to_batch1": batch8_to_batch1,
        "ready_s": ready_s,
        "targets": {
            "batch1_to_floor_max": TARGET_BATCH1_TO_FLOOR,
            "batch1_to_floor_met": ratio_to_floor <= TARGET_BATCH1_TO_FLOOR,
            "batch8_to_batch1_max": TARGET_BATCH8_TO_BATCH1,
            "batch8_to_batch1_met": batch8_to_batch1 <= TARGET_BATCH8_TO_BATCH1,
            "ready_s_max": TARGET_READY_S,
            "ready_s_met": ready_s <= TARGET_READY_S,
        },
        "numba_threading_layer": numba.threading_layer(),
    }
