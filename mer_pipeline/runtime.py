"""Code shared by every MER daemon: the pipeline description, socket endpoints, logging,
CPU pinning and exit on the launcher's death.

The launcher writes SOCKET_DIR/pipeline.json before it starts any daemon; each daemon
is started as `python -m PACKAGE --pipeline SOCKET_DIR/pipeline.json [role args]`.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable

from mer_pipeline.config import PipelineConfig

log = logging.getLogger(__name__)

PIPELINE_FILE = "pipeline.json"
PR_SET_PDEATHSIG = 1


@dataclasses.dataclass
class PipelineInfo:
    """The resolved config plus what the launcher created for this run."""

    config: PipelineConfig
    socket_dir: str
    store: str
    pool_data_name: str
    pool_table_name: str
    pool_slots: int
    slot_bytes: int
    worker_cpus: list[list[int]]
    launcher_pid: int

    def endpoint(self, name: str) -> str:
        return f"ipc://{os.path.join(self.socket_dir, name + '.sock')}"

    def save(self, path: Path) -> None:
        values = dataclasses.asdict(self)
        values["config"] = json.loads(self.config.to_json())
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(values, f, indent=1)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "PipelineInfo":
        values = json.loads(Path(path).read_text())
        values["config"] = PipelineConfig.from_json(json.dumps(values["config"]))
        return cls(**values)


# Socket names, one per daemon role.
IO_SOCKET = "io"
COMPUTE_SOCKET = "compute"
TASKS_SOCKET = "tasks"
PREDICTOR_SOCKET = "predictor"
LAUNCHER_SOCKET = "launcher"


def setup_logging(role: str, level: str = "INFO") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        stream=sys.stderr,
        format=f"%(asctime)s %(levelname)s {role}[%(process)d] %(name)s: %(message)s",
    )


def exit_with_parent() -> None:
    """Ask the kernel to send SIGTERM to this process when its parent (the launcher) dies."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            log.warning("prctl(PR_SET_PDEATHSIG) failed errno=%d", ctypes.get_errno())
    except (OSError, AttributeError) as exc:
        log.warning("prctl unavailable, exit on parent death relies on polling error=%s", exc)


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(0)


def run_daemon(
    prog: str,
    role: str,
    argv: list[str] | None,
    cpus_of: Callable[[PipelineConfig], list[int]],
    factory: Callable[["PipelineInfo"], Any],
) -> None:
    """Run one daemon process: parse --pipeline, set up logging, exit with the launcher,
    exit on SIGTERM, pin to the role's CPUs, then serve until done and close."""
    parser = argparse.ArgumentParser(prog=prog, description=f"MER {role} daemon")
    parser.add_argument("--pipeline", required=True, help="path of the pipeline.json the launcher wrote")
    args = parser.parse_args(argv)
    info = PipelineInfo.load(args.pipeline)
    setup_logging(role, info.config.runtime.log_level)
    exit_with_parent()
    signal.signal(signal.SIGTERM, _exit_on_signal)
    pin_cpus(cpus_of(info.config), role)
    daemon = factory(info)
    try:
        daemon.serve()
    finally:
        daemon.close()


def parent_alive(launcher_pid: int) -> bool:
    return os.getppid() == launcher_pid


def pin_cpus(cpus: list[int], role: str) -> None:
    if not cpus:
        return
    os.sched_setaffinity(0, set(cpus))
    log.info("%s pinned cpus=%s", role, ",".join(map(str, sorted(cpus))))


class RateLimitedWarning:
    """Log a warning at most once per `interval_s` per key, with the count of repeats
    that were suppressed in between, so hostile or broken peers cannot flood a log."""

    def __init__(self, logger: logging.Logger, interval_s: float = 5.0) -> None:
        self.logger = logger
        self.interval_s = interval_s
        self.last_s: dict[str, float] = {}
        self.suppressed: dict[str, int] = {}

    def warning(self, key: str, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self.last_s.get(key, -self.interval_s) < self.interval_s:
            self.suppressed[key] = self.suppressed.get(key, 0) + 1
            return
        self.last_s[key] = now
        repeats = self.suppressed.pop(key, 0)
        self.logger.warning(message + " suppressed_since_last=%d", *args, repeats)
