"""Machine resources: CPUs, NUMA nodes, free memory and /dev/shm space.

The launcher checks a config against these before it starts anything.
"""

from __future__ import annotations

import os
from pathlib import Path

NODE_ROOT = Path("/sys/devices/system/node")
SHM_ROOT = "/dev/shm"


class TopologyError(ValueError):
    """A config that names CPUs, nodes or memory this machine does not have."""


def parse_cpu_list(text: str) -> list[int]:
    """Parse a sysfs CPU list such as "0-3,8,10-11"."""
    cpus: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        low, _, high = part.partition("-")
        cpus.extend(range(int(low), int(high or low) + 1))
    return cpus


def usable_cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def numa_nodes() -> list[int]:
    if not NODE_ROOT.is_dir():
        return [0]
    return sorted(int(p.name[4:]) for p in NODE_ROOT.glob("node[0-9]*"))


def node_cpus(node: int) -> list[int]:
    """CPUs of a NUMA node that this process may use."""
    nodes = numa_nodes()
    if node not in nodes:
        raise TopologyError(
            f"NUMA node {node} does not exist on this machine (nodes: {', '.join(map(str, nodes))}); "
            "set numa_node in the topology file"
        )
    path = NODE_ROOT / f"node{node}" / "cpulist"
    cpus = parse_cpu_list(path.read_text()) if path.is_file() else usable_cpus()
    allowed = set(usable_cpus())
    usable = [c for c in cpus if c in allowed]
    if not usable:
        raise TopologyError(f"NUMA node {node} has no CPU this process may run on (node CPUs {cpus}, allowed {sorted(allowed)})")
    return usable


def check_cpus(cpus: list[int], setting: str) -> list[int]:
    allowed = set(usable_cpus())
    missing = [c for c in cpus if c not in allowed]
    if missing:
        raise TopologyError(
            f"{setting} names CPU {missing[0]}, which does not exist or is not available to this process "
            f"(available: {','.join(map(str, sorted(allowed)))})"
        )
    return cpus


def mem_available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise TopologyError("MemAvailable not found in /proc/meminfo")


def shm_free_bytes() -> int:
    stats = os.statvfs(SHM_ROOT)
    return stats.f_bavail * stats.f_frsize
