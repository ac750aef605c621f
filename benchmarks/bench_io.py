"""Throughput of the I/O daemon's read engine against fio on the same file.

Both read the whole file sequentially with O_DIRECT through io_uring, with the same
request size and queue depth. The engine reads it as expert regions of --region-mib
into a rotating set of page-aligned buffers, as the daemon reads into slots.

    .venv/bin/python benchmarks/bench_io.py --dir /tmp --size-gib 4 --repeats 3

fio must be on PATH (Debian: apt-get install fio).
"""

from __future__ import annotations

import argparse
import json
import logging
import mmap
import os
import select
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mer_pipeline.config import IoConfig  # noqa: E402
from mer_pipeline.expert_reader import ExpertRead, ExpertReader  # noqa: E402

MIB = 1024 * 1024
# Expert reads the engine keeps queued at once, each with its own buffer.
READS_IN_FLIGHT = 4


def make_file(path: Path, size_bytes: int) -> None:
    if path.exists() and path.stat().st_size == size_bytes:
        return
    chunk = os.urandom(64 * MIB)
    with open(path, "wb") as f:
        written = 0
        while written < size_bytes:
            part = chunk[: min(len(chunk), size_bytes - written)]
            f.write(part)
            written += len(part)
        f.flush()
        os.fsync(f.fileno())


def engine_mib_per_s(path: Path, size_bytes: int, region_bytes: int, config: IoConfig) -> tuple[float, str]:
    buffer = mmap.mmap(-1, region_bytes * READS_IN_FLIGHT)
    view = memoryview(buffer)
    reader = ExpertReader(config, [path])
    io_path = reader.io_path
    try:
        offsets = list(range(0, size_bytes - region_bytes + 1, region_bytes))
        free = list(range(READS_IN_FLIGHT))
        pending = 0
        started_s = time.perf_counter()
        while offsets or pending:
            while offsets and free:
                index = free.pop()
                start = index * region_bytes
                reader.submit(ExpertRead(index, path, offsets.pop(0), region_bytes, view[start : start + region_bytes]))
                pending += 1
            select.select([reader.fileno()], [], [], 5.0)
            for read in reader.reap():
                if read.error is not None:
                    raise RuntimeError(read.error)
                free.append(read.tag)
                pending -= 1
        elapsed_s = time.perf_counter() - started_s
        return reader.stats.io_bytes / MIB / elapsed_s, io_path
    finally:
        reader.close()
        view.release()
        buffer.close()


def fio_mib_per_s(path: Path, size_bytes: int, config: IoConfig) -> float:
    command = [
        "fio",
        "--name=bench_io",
        f"--filename={path}",
        "--rw=read",
        f"--bs={config.read_size_kib}k",
        f"--iodepth={config.ring_depth}",
        "--ioengine=io_uring",
        "--direct=1",
        f"--size={size_bytes}",
        "--output-format=json",
    ]
    result = subprocess.run(command, check=True, capture_output=True, text=True)
    job = json.loads(result.stdout)["jobs"][0]
    return job["read"]["bw_bytes"] / MIB


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default="/tmp", help="directory for the test file (on the filesystem to measure)")
    parser.add_argument("--size-gib", type=float, default=4.0, help="test file size in GiB")
    parser.add_argument("--region-mib", type=int, default=64, help="expert region size the engine reads, in MiB")
    parser.add_argument("--ring-depth", type=int, default=IoConfig.ring_depth, help="queue depth for both")
    parser.add_argument("--read-size-kib", type=int, default=IoConfig.read_size_kib, help="request size for both, in KiB")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each; the median is reported")
    parser.add_argument("--keep-file", action="store_true", help="leave the test file in place")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    if shutil.which("fio") is None:
        print("fio not found on PATH; install it (Debian: apt-get install fio)", file=sys.stderr)
        return 2
    region_bytes = args.region_mib * MIB
    size_bytes = int(args.size_gib * 1024) * MIB // region_bytes * region_bytes
    config = IoConfig(ring_depth=args.ring_depth, read_size_kib=args.read_size_kib, engine="io_uring", direct="direct")
    path = Path(args.dir) / "mer-bench-io.bin"
    make_file(path, size_bytes)
    try:
        engine_runs, fio_runs = [], []
        for _ in range(args.repeats):
            engine_rate, io_path = engine_mib_per_s(path, size_bytes, region_bytes, config)
            engine_runs.append(engine_rate)
            fio_runs.append(fio_mib_per_s(path, size_bytes, config))
            print(f"run engine_mib_per_s={engine_runs[-1]:.0f} fio_mib_per_s={fio_runs[-1]:.0f}", flush=True)
    finally:
        if not args.keep_file:
            path.unlink()
    engine_median = statistics.median(engine_runs)
    fio_median = statistics.median(fio_runs)
    print(
        f"io_path={io_path} file_gib={size_bytes / 1024 / MIB:.1f} request_kib={args.read_size_kib} "
        f"ring_depth={args.ring_depth} region_mib={args.region_mib} repeats={args.repeats}"
    )
    print(f"engine median MiB/s: {engine_median:.0f}")
    print(f"fio    median MiB/s: {fio_median:.0f}")
    print(f"ratio engine/fio: {engine_median / fio_median:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
