"""mer-launch: check the machine, create the slot pool, start the daemons, supervise them.

Start order: I/O daemon, predictor, compute daemon, workers; each must report ready
within runtime.ready_timeout_s. The launcher stays in the foreground, restarts a daemon
that exits unexpectedly (see mer_pipeline/supervisor.py), serves `mer ctl` on
launcher.sock, and on SIGINT/SIGTERM stops every daemon and removes the shared-memory
segments and sockets it made. Daemon logs go to SOCKET_DIR/logs/NAME.log.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import typer
import zmq

from mer_pipeline import wire
from mer_pipeline.client import DaemonClient, DaemonTimeout
from mer_pipeline.config import ConfigError, PipelineConfig, load_config
from mer_pipeline.runtime import (
    COMPUTE_SOCKET,
    IO_SOCKET,
    LAUNCHER_SOCKET,
    PIPELINE_FILE,
    PREDICTOR_SOCKET,
    PipelineInfo,
    RateLimitedWarning,
    setup_logging,
)
from mer_pipeline.slot_pool import SlotPool, pool_names, unlink_segment
from mer_pipeline.store import StoreError, open_store
from mer_pipeline.supervisor import Event, RestartPolicy, State, Supervised
from mer_pipeline import topology

log = logging.getLogger("mer.launch")

LOCK_FILE = "launcher.pid"
SUPERVISE_INTERVAL_S = 0.2
LOG_TAIL_LINES = 20


class LaunchError(RuntimeError):
    """The pipeline could not be started; the message names the value and the fix."""


@dataclasses.dataclass
class Daemon:
    name: str
    command: list[str]
    supervised: Supervised
    process: subprocess.Popen | None = None
    restart_requested: bool = False


def tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        return "".join(collections.deque(path.open(errors="replace"), maxlen=lines))
    except OSError:
        return ""


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Launcher:
    def __init__(self, config: PipelineConfig) -> None:
        self.config = config
        self.socket_dir = config.resolved_socket_dir()
        self.log_dir = self.socket_dir / "logs"
        self.pool: SlotPool | None = None
        self.info: PipelineInfo | None = None
        self.daemons: dict[str, Daemon] = {}
        self.context = zmq.Context()
        self.control: zmq.Socket | None = None
        self.stop_requested = False
        self.failure: str | None = None
        self.claimed_socket_dir = False
        self.warn = RateLimitedWarning(log)

    # --- preparation ------------------------------------------------------------------

    def prepare(self) -> PipelineInfo:
        config = self.config
        if not config.store:
            raise LaunchError("no store given: pass --store PATH or set `store` in the topology file")
        try:
            store = open_store(config.store)
        except StoreError as exc:
            raise LaunchError(str(exc)) from exc

        node_cpus = topology.node_cpus(config.numa_node)
        for setting, cpus in (("io.cpus", config.io.cpus), ("predictor.cpus", config.predictor.cpus), ("compute.cpus", config.compute.cpus), ("workers.cpus", config.workers.cpus)):
            topology.check_cpus(cpus, setting)
        worker_pool = config.workers.cpus or node_cpus
        n_workers = config.workers.count or len(worker_pool)
        worker_cpus = [[worker_pool[i % len(worker_pool)]] for i in range(n_workers)]
        if n_workers > len(worker_pool):
            log.warning(
                "more workers than CPUs workers=%d cpus=%d: workers share cores and each kernel call slows down",
                n_workers, len(worker_pool),
            )

        slot_bytes = -(-store.region_bytes // 4096) * 4096
        n_slots = config.pool.slots or int(config.pool.memory_gib * 2**30 // slot_bytes)
        n_slots = min(n_slots, store.n_experts_total)
        for expert in config.pool.pinned:
            if not 0 <= expert < store.n_experts_total:
                raise LaunchError(f"pool.pinned names expert {expert}, outside 0..{store.n_experts_total - 1}")
        needed = n_workers + len(config.pool.pinned) + 1
        if n_slots < needed:
            raise LaunchError(
                f"the pool has {n_slots} slots of {slot_bytes / 2**20:.1f} MiB but needs at least {needed} "
                f"({n_workers} workers + {len(config.pool.pinned)} pinned + 1); raise pool.slots or pool.memory_gib"
            )
        pool_bytes = n_slots * slot_bytes
        available = topology.mem_available_bytes()
        if pool_bytes > available:
            raise LaunchError(
                f"the pool needs {pool_bytes / 2**30:.2f} GiB but only {available / 2**30:.2f} GiB of memory is "
                "available; lower pool.slots or pool.memory_gib"
            )
        shm_free = topology.shm_free_bytes()
        if pool_bytes > shm_free:
            raise LaunchError(
                f"the pool needs {pool_bytes / 2**30:.2f} GiB but {topology.SHM_ROOT} has {shm_free / 2**30:.2f} GiB free; "
                f"lower pool.slots or pool.memory_gib, or enlarge {topology.SHM_ROOT}"
            )

        self.claim_socket_dir()
        data_name, table_name = pool_names(config.name)
        self.pool = SlotPool.create(data_name, table_name, n_slots, slot_bytes)
        self.info = PipelineInfo(
            config=config,
            socket_dir=str(self.socket_dir),
            store=str(Path(config.store).resolve()),
            pool_data_name=data_name,
            pool_table_name=table_name,
            pool_slots=n_slots,
            slot_bytes=slot_bytes,
            worker_cpus=worker_cpus,
            launcher_pid=os.getpid(),
        )
        self.info.save(self.socket_dir / PIPELINE_FILE)
        log.info(
            "launcher prepared name=%s socket_dir=%s slots=%d slot_mib=%.1f workers=%d worker_cpus=%s",
            config.name, self.socket_dir, n_slots, slot_bytes / 2**20, n_workers, worker_cpus,
        )
        return self.info

    def claim_socket_dir(self) -> None:
        """Create the socket directory (mode 0700), refusing a live pipeline of the same
        name and removing what a dead one left behind."""
        try:
            self.socket_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.chmod(self.socket_dir, 0o700)
        except OSError as exc:
            raise LaunchError(
                f"cannot create the socket directory {self.socket_dir} ({exc.strerror}); "
                "choose a writable --socket-dir or set runtime.socket_dir"
            ) from exc
        lock = self.socket_dir / LOCK_FILE
        if lock.exists():
            try:
                old_pid = int(lock.read_text().strip() or 0)
            except ValueError:
                old_pid = 0
            if old_pid and old_pid != os.getpid() and pid_alive(old_pid):
                raise LaunchError(
                    f"a pipeline named {self.config.name!r} is already running (launcher pid {old_pid}, "
                    f"socket dir {self.socket_dir}); stop it first or choose another --topology/--socket-dir"
                )
            self.remove_leftovers()
        lock.write_text(f"{os.getpid()}\n")
        self.claimed_socket_dir = True

    def remove_leftovers(self) -> None:
        stale = self.socket_dir / PIPELINE_FILE
        if stale.exists():
            try:
                old = PipelineInfo.load(stale)
                removed = sum(unlink_segment(n) for n in (old.pool_data_name, old.pool_table_name))
                log.warning("removed leftovers of a dead pipeline segments=%d socket_dir=%s", removed, self.socket_dir)
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.warning("could not read the dead pipeline's description path=%s error=%s", stale, exc)
            stale.unlink(missing_ok=True)
        for socket_file in self.socket_dir.glob("*.sock"):
            socket_file.unlink(missing_ok=True)

    # --- daemons ------------------------------------------------------------------------

    def daemon_command(self, name: str) -> list[str]:
        pipeline = str(self.socket_dir / PIPELINE_FILE)
        if name == "io":
            return [sys.executable, "-m", "io_daemon", "--pipeline", pipeline]
        if name == "predictor":
            return [sys.executable, "-m", "mer_pipeline.predictor_daemon", "--pipeline", pipeline]
        if name == "compute":
            return [sys.executable, "-m", "compute_daemon", "--pipeline", pipeline]
        index = int(name.split(":", 1)[1])
        return [sys.executable, "-m", "workers", "--pipeline", pipeline, "--index", str(index)]

    def daemon_names(self) -> list[str]:
        assert self.info is not None
        return ["io", "predictor", "compute"] + [f"worker:{i}" for i in range(len(self.info.worker_cpus))]

    def log_path(self, name: str) -> Path:
        return self.log_dir / f"{name.replace(':', '-')}.log"

    def spawn(self, daemon: Daemon) -> None:
        self.log_dir.mkdir(exist_ok=True, mode=0o700)
        with self.log_path(daemon.name).open("ab") as log_file:
            daemon.process = subprocess.Popen(
                daemon.command, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                # Own session: a terminal's Ctrl-C reaches only the launcher, which then
                # stops the daemons in order instead of watching them die unexpectedly.
                start_new_session=True,
            )
        log.info("daemon started name=%s pid=%d", daemon.name, daemon.process.pid)

    def is_ready(self, name: str) -> bool:
        assert self.info is not None
        endpoints = {"io": IO_SOCKET, "predictor": PREDICTOR_SOCKET, "compute": COMPUTE_SOCKET}
        endpoint = self.info.endpoint(endpoints.get(name, COMPUTE_SOCKET))
        client = DaemonClient(endpoint, name, self.context)
        try:
            reply = client.stats(timeout_s=1.0)
        except DaemonTimeout:
            return False
        finally:
            client.close()
        if name in endpoints:
            return True
        return name in reply.counters.get("workers", {})

    def wait_ready(self, names: list[str]) -> None:
        timeout_s = self.config.runtime.ready_timeout_s
        deadline = time.monotonic() + timeout_s
        pending = list(names)
        while pending:
            name = pending[0]
            daemon = self.daemons[name]
            if daemon.process is not None and daemon.process.poll() is not None:
                raise LaunchError(
                    f"the {name} daemon exited with status {daemon.process.returncode} while starting; "
                    f"its log {self.log_path(name)} ends with:\n{tail(self.log_path(name))}"
                )
            if self.is_ready(name):
                daemon.supervised.handle(Event.READY)
                log.info("daemon ready name=%s pid=%d", name, daemon.process.pid if daemon.process else -1)
                pending.pop(0)
                continue
            if time.monotonic() > deadline:
                raise LaunchError(
                    f"the {name} daemon did not become ready within runtime.ready_timeout_s={timeout_s:.0f} s; "
                    f"a slow first start (numba compiling kernels) may need a larger value. "
                    f"Its log {self.log_path(name)} ends with:\n{tail(self.log_path(name))}"
                )
            if self.stop_requested:
                raise LaunchError("stop requested while starting")

    def start(self) -> None:
        self.prepare()
        self.control = self.context.socket(zmq.ROUTER)
        self.control.setsockopt(zmq.LINGER, 0)
        self.control.bind(self.info.endpoint(LAUNCHER_SOCKET))
        policy = RestartPolicy(
            max_restarts=self.config.runtime.max_restarts, restart_window_s=self.config.runtime.restart_window_s
        )
        for name in self.daemon_names():
            self.daemons[name] = Daemon(name, self.daemon_command(name), Supervised(name, policy))
        for name in ["io", "predictor", "compute"]:
            self.spawn(self.daemons[name])
            self.wait_ready([name])
        self.compile_kernels()
        workers = [n for n in self.daemon_names() if n.startswith("worker:")]
        for name in workers:
            self.spawn(self.daemons[name])
        self.wait_ready(workers)
        log.info("pipeline ready name=%s daemons=%d socket_dir=%s", self.config.name, len(self.daemons), self.socket_dir)

    def compile_kernels(self) -> None:
        """Fill numba's on-disk cache in one process, so that the workers load the kernels
        instead of each compiling them at once."""
        timeout_s = self.config.runtime.compile_timeout_s
        start_s = time.monotonic()
        command = [sys.executable, "-c", "from mer_pipeline.kernels import warmup; warmup()"]
        try:
            result = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired as exc:
            raise LaunchError(
                f"compiling the kernels took longer than runtime.compile_timeout_s={timeout_s:.0f} s; raise it on a slow machine"
            ) from exc
        if result.returncode != 0:
            raise LaunchError(f"compiling the kernels failed with status {result.returncode}:\n{result.stderr[-3000:]}")
        log.info("kernels ready elapsed_s=%.1f", time.monotonic() - start_s)

    # --- supervision ------------------------------------------------------------------

    def supervise(self) -> int:
        while not self.stop_requested and self.failure is None:
            self.serve_control(SUPERVISE_INTERVAL_S)
            now = time.monotonic()
            for daemon in self.daemons.values():
                self.check_daemon(daemon, now)
        if self.failure:
            log.error("pipeline failed: %s", self.failure)
            return 1
        return 0

    def check_daemon(self, daemon: Daemon, now: float) -> None:
        supervised = daemon.supervised
        if supervised.state is State.BACKOFF and now >= supervised.backoff_until_s:
            supervised.handle(Event.BACKOFF_OVER, now)
            self.spawn(daemon)
            return
        if daemon.process is None or daemon.process.poll() is None:
            if supervised.state is State.STARTING and self.is_ready(daemon.name):
                supervised.handle(Event.READY)
                log.info("daemon ready name=%s pid=%d restarts=%d", daemon.name, daemon.process.pid, supervised.restarts)
            return
        status = daemon.process.returncode
        how = f"signal {-status}" if status < 0 else f"exit status {status}"
        daemon.process = None
        if daemon.restart_requested:
            daemon.restart_requested = False
            supervised.handle(Event.EXIT_WANTED)
            daemon.supervised = Supervised(daemon.name, supervised.policy, restarts=supervised.restarts + 1)
            self.after_exit(daemon.name)
            self.spawn(daemon)
            return
        if supervised.state not in (State.STARTING, State.RUNNING) or self.stop_requested:
            return
        supervised.handle(Event.EXIT_UNWANTED, now)
        log.warning("daemon exited unexpectedly name=%s how=%s log=%s", daemon.name, how, self.log_path(daemon.name))
        self.after_exit(daemon.name)
        if supervised.should_give_up():
            supervised.handle(Event.GIVE_UP, now)
            self.failure = (
                f"the {daemon.name} daemon exited {len(supervised.exit_times_s)} times within "
                f"runtime.restart_window_s={supervised.policy.restart_window_s:.0f} s (last: {how}); its log "
                f"{self.log_path(daemon.name)} ends with:\n{tail(self.log_path(daemon.name))}"
            )

    def after_exit(self, name: str) -> None:
        """Reclaim what a dead daemon held."""
        if name.startswith("worker:"):
            client = DaemonClient(self.info.endpoint(IO_SOCKET), "io", self.context)
            client.send(wire.ReclaimLeases(int(name.split(":", 1)[1])))
            client.close()

    def serve_control(self, timeout_s: float) -> None:
        if not self.control.poll(int(timeout_s * 1000)):
            return
        while self.control.poll(0):
            parts = self.control.recv_multipart()
            sender, frame = parts[0], parts[-1]
            try:
                request = wire.decode(frame, (wire.ControlRequest,))
            except wire.WireError as exc:
                self.warn.warning("control", "control message rejected error=%s", exc)
                continue
            reply = self.handle_control(request)
            self.control.send_multipart([sender, reply.encode()])

    def handle_control(self, request: wire.ControlRequest) -> wire.ControlReply:
        if request.command == "status":
            return wire.ControlReply(request.request_id, True, "", self.status())
        if request.command == "stop":
            self.stop_requested = True
            return wire.ControlReply(request.request_id, True, "", {})
        if request.command == "restart":
            daemon = self.daemons.get(request.target)
            if daemon is None:
                names = ", ".join(self.daemons)
                return wire.ControlReply(request.request_id, False, f"no daemon named {request.target!r}; daemons: {names}", {})
            if daemon.process is None:
                return wire.ControlReply(request.request_id, False, f"{request.target} is not running (state {daemon.supervised.state.value})", {})
            daemon.restart_requested = True
            if daemon.supervised.state in (State.STARTING, State.RUNNING):
                daemon.supervised.handle(Event.STOP)
            daemon.process.terminate()
            log.info("daemon restart requested name=%s pid=%d", daemon.name, daemon.process.pid)
            return wire.ControlReply(request.request_id, True, "", {"name": daemon.name})
        return wire.ControlReply(request.request_id, False, f"unknown command {request.command!r}; use status, restart or stop", {})

    def status(self) -> dict:
        now = time.monotonic()
        daemons = {}
        for name, daemon in self.daemons.items():
            daemons[name] = {
                "pid": daemon.process.pid if daemon.process else None,
                "state": daemon.supervised.state.value,
                "uptime_s": round(now - daemon.supervised.started_s, 1),
                "restarts": daemon.supervised.restarts,
            }
        return {"name": self.config.name, "launcher_pid": os.getpid(), "socket_dir": str(self.socket_dir), "daemons": daemons}

    # --- stop -------------------------------------------------------------------------

    def stop(self) -> None:
        for daemon in self.daemons.values():
            if daemon.supervised.state in (State.STARTING, State.RUNNING, State.BACKOFF):
                daemon.supervised.handle(Event.STOP)
            if daemon.process is not None and daemon.process.poll() is None:
                daemon.process.terminate()
        deadline = time.monotonic() + self.config.runtime.stop_timeout_s
        for daemon in self.daemons.values():
            if daemon.process is None:
                continue
            try:
                daemon.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("daemon did not stop in time, killing name=%s pid=%d", daemon.name, daemon.process.pid)
                daemon.process.kill()
                daemon.process.wait()
        if self.control is not None:
            self.control.close(0)
        self.context.term()
        if self.pool is not None:
            self.pool.close()
            self.pool.unlink()
        if not self.claimed_socket_dir:
            return
        for socket_file in self.socket_dir.glob("*.sock"):
            socket_file.unlink(missing_ok=True)
        (self.socket_dir / PIPELINE_FILE).unlink(missing_ok=True)
        (self.socket_dir / LOCK_FILE).unlink(missing_ok=True)
        log.info("pipeline stopped name=%s", self.config.name)


def _request_stop(launcher: Launcher) -> None:
    def handler(signum: int, frame: object) -> None:
        log.info("launcher stop requested signal=%s", signal.Signals(signum).name)
        launcher.stop_requested = True

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def start_metrics(launcher: Launcher, port: int):
    """Serve Prometheus metrics for the started pipeline; return the HTTP server."""
    from mer_pipeline.observe.metrics import serve_metrics

    def daemon_states() -> dict[str, tuple[str, int]]:
        return {name: (d.supervised.state.value, d.supervised.restarts) for name, d in list(launcher.daemons.items())}

    try:
        server, _ = serve_metrics(port, launcher.info, daemon_states)
    except OSError as exc:
        raise LaunchError(f"cannot serve metrics on 127.0.0.1:{port} ({exc}); choose another --metrics-port") from exc
    print(f"mer-launch: metrics at http://127.0.0.1:{server.server_port}/metrics", flush=True)
    return server


app = typer.Typer(add_completion=False, help="Start a MER pipeline and supervise it until SIGINT/SIGTERM.")


@app.command()
def launch(
    topology_name: str = typer.Option("numa0", "--topology", help="configs/NAME.toml, or a path to a .toml file"),
    store: Optional[str] = typer.Option(None, help="expert store directory (sets store)"),
    slots: Optional[int] = typer.Option(None, help="number of slots in the pool (sets pool.slots; 0 sizes the pool from pool.memory_gib)"),
    memory_gib: Optional[float] = typer.Option(None, help="memory for the slot pool in GiB (sets pool.memory_gib)"),
    predictor: Optional[str] = typer.Option(None, help="prefetch predictor: none, frequency or transition (sets predictor.kind)"),
    eviction: Optional[str] = typer.Option(None, help="eviction policy: lru or layer (sets io.eviction)"),
    workers: Optional[int] = typer.Option(None, help="number of compute workers, 0 for one per CPU of the NUMA node (sets workers.count)"),
    io_engine: Optional[str] = typer.Option(None, help="read engine: auto, io_uring or preadv (sets io.engine)"),
    direct: Optional[str] = typer.Option(None, help="O_DIRECT use: auto, direct or buffered (sets io.direct)"),
    socket_dir: Optional[str] = typer.Option(None, help="directory for sockets, state and logs (sets runtime.socket_dir)"),
    name: Optional[str] = typer.Option(None, help="pipeline name (default: the topology's)"),
    log_level: Optional[str] = typer.Option(None, help="daemon log level: DEBUG, INFO, WARNING or ERROR (sets runtime.log_level)"),
    metrics_port: Optional[int] = typer.Option(None, help="serve Prometheus metrics on 127.0.0.1:PORT (0: a free port); off when absent"),
    compute_during_read: Optional[bool] = typer.Option(
        None,
        "--compute-during-read/--compute-after-read",
        help="whether a worker computes on an expert's bytes while they are read (sets workers.compute_during_read)",
    ),
) -> None:
    overrides = {
        "store": store, "pool.slots": slots, "pool.memory_gib": memory_gib, "predictor.kind": predictor,
        "io.eviction": eviction, "workers.count": workers, "io.engine": io_engine, "io.direct": direct,
        "runtime.socket_dir": socket_dir, "name": name, "runtime.log_level": log_level,
        "workers.compute_during_read": compute_during_read,
    }
    try:
        config = load_config(topology_name, overrides)
    except ConfigError as exc:
        typer.echo(f"mer-launch: {exc}", err=True)
        raise typer.Exit(2)
    if metrics_port is not None and not 0 <= metrics_port <= 65535:
        typer.echo(f"mer-launch: --metrics-port {metrics_port} is not a TCP port; use 0 to 65535 (0 picks a free port)", err=True)
        raise typer.Exit(2)
    setup_logging("launcher", config.runtime.log_level)
    launcher = Launcher(config)
    _request_stop(launcher)
    code = 0
    metrics_server = None
    try:
        launcher.start()
        if metrics_port is not None:
            metrics_server = start_metrics(launcher, metrics_port)
        print(f"mer-launch: pipeline {config.name!r} ready, socket dir {launcher.socket_dir}", flush=True)
        code = launcher.supervise()
    except (LaunchError, topology.TopologyError, ConfigError) as exc:
        typer.echo(f"mer-launch: {exc}", err=True)
        code = 2
    finally:
        if metrics_server is not None:
            metrics_server.shutdown()
            metrics_server.server_close()
        launcher.stop()
    raise typer.Exit(code)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
