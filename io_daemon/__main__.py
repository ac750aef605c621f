"""Entry point: `python -m io_daemon --pipeline SOCKET_DIR/pipeline.json`."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

import zmq

from mer_pipeline import runtime
from io_daemon.daemon import DaemonError, IoDaemon
from mer_pipeline.expert_reader import ReaderSetupError
from mer_pipeline.slot_pool import SlotPoolError
from mer_pipeline.store import StoreError

log = logging.getLogger("io_daemon")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m io_daemon", description=__doc__)
    parser.add_argument("--pipeline", required=True, help="path of the pipeline.json the launcher wrote")
    args = parser.parse_args(argv)

    info = runtime.PipelineInfo.load(args.pipeline)
    runtime.setup_logging("io_daemon", info.config.runtime.log_level)
    runtime.exit_with_parent()
    runtime.pin_cpus(info.config.io.cpus, "io_daemon")

    # SIGTERM only sets a flag; the wakeup pipe makes the poll return at once.
    wakeup_read, wakeup_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wakeup_write)
    daemon: IoDaemon | None = None

    def request_stop(signum: int, frame: object) -> None:
        if daemon is not None:
            daemon.stopping = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)

    context = zmq.Context()
    try:
        daemon = IoDaemon(info)
        daemon.adopt_table()
        daemon.load_pinned()
        daemon.bind(context)
        log.info(
            "io_daemon ready io_path=%s slots=%d slot_bytes=%d ring_depth=%d read_size_kib=%d eviction=%s endpoint=%s",
            daemon.reader.io_path,
            daemon.table.n_slots,
            daemon.pool.slot_bytes,
            info.config.io.ring_depth,
            info.config.io.read_size_kib,
            info.config.io.eviction,
            info.endpoint(runtime.IO_SOCKET),
        )
        if not daemon.stopping:
            daemon.run(wakeup_read)
    except (DaemonError, ReaderSetupError, SlotPoolError, StoreError) as exc:
        log.error("io_daemon failed to start error=%s", exc)
        return 2
    finally:
        if daemon is not None:
            daemon.stop()
        context.term()
    log.info("io_daemon stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
