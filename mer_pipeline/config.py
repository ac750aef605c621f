"""The pipeline's typed configuration: one dataclass tree, one parser, each default once.

A topology file (configs/NAME.toml) sets any subset of the fields below; command-line
overrides are applied on top with `apply_overrides`. Every process of a pipeline gets
the same resolved config as JSON (`to_json` / `from_json`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
from pathlib import Path
from typing import Any, get_type_hints

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
PREDICTORS = ("none", "frequency", "previous", "transition")
EVICTIONS = ("lru", "layer")


class ConfigError(ValueError):
    """An invalid or unknown configuration value."""


@dataclasses.dataclass
class PoolConfig:
    # Number of slots; 0 derives it from memory_gib.
    slots: int = 0
    # Memory for slot data when slots is 0, in GiB.
    memory_gib: float = 2.0
    # Experts (ids) that are loaded at start and never evicted.
    pinned: list[int] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class IoConfig:
    # CPUs of the I/O daemon; empty means every CPU of the NUMA node.
    cpus: list[int] = dataclasses.field(default_factory=list)
    ring_depth: int = 32
    read_size_kib: int = 1024
    eviction: str = "layer"
    # "auto" tries io_uring, then a preadv thread pool; "preadv" forces the fallback.
    engine: str = "auto"
    # "auto" tries O_DIRECT, then buffered reads with fadvise(DONTNEED); "buffered" forces it.
    direct: str = "auto"
    # Prefetch reads in flight at most; a hint beyond that is dropped, so demand reads
    # do not queue behind guesses.
    prefetch_max_inflight: int = 2
    # A hint is started only if the reads ahead of it and its own read, at the measured
    # read time, fit in steps_ahead x the measured layer-step time x this factor; 0 turns
    # the check off.
    prefetch_deadline_slack: float = 1.0


@dataclasses.dataclass
class PredictorConfig:
    # "none": the predictor observes the routing but sends no hints. On Mixtral routing the
    # best predictor's hints are right about 4 times in 10, and in the overlap benchmark
    # pipelines without hints ran faster.
    kind: str = "none"
    cpus: list[int] = dataclasses.field(default_factory=list)
    # How many layer steps ahead hints reach.
    lookahead_layers: int = 4
    # Hints sent per observed layer step, at most.
    max_hints_per_step: int = 4
    min_confidence: float = 0.1


@dataclasses.dataclass
class ComputeConfig:
    cpus: list[int] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class WorkersConfig:
    # Number of workers; 0 means one per CPU in `cpus`.
    count: int = 0
    # CPUs the workers are pinned to, one per worker in turn; empty means the NUMA node's.
    cpus: list[int] = dataclasses.field(default_factory=list)
    # A worker whose expert is being read computes on the bytes that have arrived, so
    # the kernel runs during the read instead of after it.
    compute_during_read: bool = True


@dataclasses.dataclass
class RuntimeConfig:
    # Directory for sockets and the pipeline's state; empty means
    # $XDG_RUNTIME_DIR/mer/NAME, else /tmp/mer-UID/NAME.
    socket_dir: str = ""
    ready_timeout_s: float = 60.0
    request_timeout_s: float = 120.0
    # A worker sends an unanswered lease request again after this long (the io daemon may have restarted).
    lease_retry_s: float = 5.0
    # Interval of an idle worker's heartbeat to the compute daemon, so a restarted compute daemon finds it.
    heartbeat_s: float = 1.0
    stop_timeout_s: float = 10.0
    # numba compiles the kernels once per machine and caches them; the first compile is slow.
    compile_timeout_s: float = 600.0
    # A daemon that exits unexpectedly more often than this within the window is given up on.
    max_restarts: int = 5
    restart_window_s: float = 60.0
    log_level: str = "INFO"


@dataclasses.dataclass
class PipelineConfig:
    name: str = "numa0"
    numa_node: int = 0
    store: str = ""
    pool: PoolConfig = dataclasses.field(default_factory=PoolConfig)
    io: IoConfig = dataclasses.field(default_factory=IoConfig)
    predictor: PredictorConfig = dataclasses.field(default_factory=PredictorConfig)
    compute: ComputeConfig = dataclasses.field(default_factory=ComputeConfig)
    workers: WorkersConfig = dataclasses.field(default_factory=WorkersConfig)
    runtime: RuntimeConfig = dataclasses.field(default_factory=RuntimeConfig)

    def resolved_socket_dir(self) -> Path:
        if self.runtime.socket_dir:
            return Path(self.runtime.socket_dir)
        base = os.environ.get("XDG_RUNTIME_DIR")
        root = Path(base) / "mer" if base else Path(f"/tmp/mer-{os.getuid()}")
        return root / self.name

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "PipelineConfig":
        return _build(cls, json.loads(text), "config")


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a table, got {type(values).__name__}")
    hints = get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown setting {unknown[0]!r}; known settings: {', '.join(sorted(known))}")
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, f"{where}.{name}")
        else:
            kwargs[name] = _coerce(value, hint, f"{where}.{name}")
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is str and isinstance(value, str):
        return value
    if hint is bool and isinstance(value, bool):
        return value
    if getattr(hint, "__origin__", None) is list:
        if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return list(value)
        raise ConfigError(f"{where}: expected a list of integers, got {value!r}")
    raise ConfigError(f"{where}: expected {getattr(hint, '__name__', hint)}, got {value!r}")


def validate(config: PipelineConfig) -> PipelineConfig:
    """Check values that do not depend on the machine; raise ConfigError naming the setting."""
    if config.predictor.kind not in PREDICTORS:
        raise ConfigError(f"predictor.kind {config.predictor.kind!r} is unknown; choose one of {', '.join(PREDICTORS)}")
    if config.io.eviction not in EVICTIONS:
        raise ConfigError(f"io.eviction {config.io.eviction!r} is unknown; choose one of {', '.join(EVICTIONS)}")
    if config.io.engine not in ("auto", "io_uring", "preadv"):
        raise ConfigError(f"io.engine {config.io.engine!r} is unknown; choose auto, io_uring or preadv")
    if config.io.direct not in ("auto", "direct", "buffered"):
        raise ConfigError(f"io.direct {config.io.direct!r} is unknown; choose auto, direct or buffered")
    if not 1 <= config.io.ring_depth <= 4096:
        raise ConfigError(f"io.ring_depth {config.io.ring_depth} must be between 1 and 4096")
    if config.io.read_size_kib < 4 or config.io.read_size_kib % 4 or config.io.read_size_kib > 1024:
        raise ConfigError(
            f"io.read_size_kib {config.io.read_size_kib} must be a multiple of 4 between 4 and 1024 "
            "(larger O_DIRECT requests can complete short with -EAGAIN)"
        )
    if config.io.prefetch_max_inflight < 0 or config.io.prefetch_deadline_slack < 0:
        raise ConfigError(
            f"io.prefetch_max_inflight ({config.io.prefetch_max_inflight}) and io.prefetch_deadline_slack "
            f"({config.io.prefetch_deadline_slack}) must be >= 0"
        )
    if config.pool.slots < 0 or config.pool.memory_gib <= 0:
        raise ConfigError(f"pool.slots ({config.pool.slots}) must be >= 0 and pool.memory_gib ({config.pool.memory_gib}) > 0")
    if config.workers.count < 0 or config.workers.count > 64:
        raise ConfigError(f"workers.count {config.workers.count} must be between 0 and 64")
    if config.predictor.lookahead_layers < 1:
        raise ConfigError(f"predictor.lookahead_layers {config.predictor.lookahead_layers} must be >= 1")
    if config.runtime.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(f"runtime.log_level {config.runtime.log_level!r} is unknown; choose DEBUG, INFO, WARNING or ERROR")
    if not config.name.replace("-", "").replace("_", "").isalnum():
        raise ConfigError(f"name {config.name!r} may contain only letters, digits, '-' and '_'")
    return config


def topology_path(topology: str) -> Path:
    candidate = Path(topology)
    if candidate.suffix == ".toml" and candidate.is_file():
        return candidate
    path = CONFIG_DIR / f"{topology}.toml"
    if not path.is_file():
        available = sorted(p.stem for p in CONFIG_DIR.glob("*.toml"))
        raise ConfigError(f"topology {topology!r} not found in {CONFIG_DIR}; available: {', '.join(available)}")
    return path


def load_config(topology: str = "numa0", overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """Read configs/TOPOLOGY.toml (or a .toml path) and apply dotted overrides such as
    {"pool.slots": 64}."""
    path = topology_path(topology)
    try:
        values = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML ({exc})") from exc
    values.setdefault("name", path.stem)
    config = _build(PipelineConfig, values, str(path))
    return validate(apply_overrides(config, overrides or {}))


def apply_overrides(config: PipelineConfig, overrides: dict[str, Any]) -> PipelineConfig:
    values = dataclasses.asdict(config)
    for dotted, value in overrides.items():
        if value is None:
            continue
        target = values
        parts = dotted.split(".")
        for part in parts[:-1]:
            if part not in target or not isinstance(target[part], dict):
                raise ConfigError(f"unknown setting {dotted!r}")
            target = target[part]
        if parts[-1] not in target:
            raise ConfigError(f"unknown setting {dotted!r}")
        target[parts[-1]] = value
    return validate(_build(PipelineConfig, values, "overrides"))
