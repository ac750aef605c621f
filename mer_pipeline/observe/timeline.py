"""Timelines: the daemons' spans as a Chrome trace-event file for Perfetto and chrome://tracing.

Layout of the file:

    one process track per daemon   I/O daemon, predictor, compute daemon, worker:0 ...
    threads inside a track         lanes: spans that overlap in time (the I/O daemon keeps
                                   many reads in flight) go to separate lanes, so every
                                   lane contains non-overlapping complete ("X") events
    flow arrows ("s" -> "f")       from a worker's lease wait (a demand) or from the
                                   predictor's step that sent a hint, to the read it caused

Timestamps are microseconds since the first span, from CLOCK_MONOTONIC in every process.
Each daemon keeps only its last SPAN_CAPACITY spans (see observe/spans.py), so a long
run's timeline shows its end; `otherData.dropped` counts the spans that fell out.
"""

from __future__ import annotations

import bisect
import json
from pathlib import Path
from typing import Any

from mer_pipeline import wire
from mer_pipeline.client import DaemonClient, DaemonTimeout
from mer_pipeline.observe.spans import SPAN_CAPACITY, check_processes
from mer_pipeline.runtime import COMPUTE_SOCKET, IO_SOCKET, PREDICTOR_SOCKET, PipelineInfo

SPANS_TIMEOUT_S = 10.0
# A dead predictor costs only its track, so its wait is short.
PREDICTOR_TIMEOUT_S = 2.0
# Track order and ids: the I/O daemon first, the workers last.
TRACK_IDS = {"io": 1, "predictor": 2, "compute": 3}
FIRST_WORKER_TRACK = 10
TRACK_TITLES = {"io": "I/O daemon", "predictor": "predictor", "compute": "compute daemon"}


def collect_spans(info: PipelineInfo, since_ns: int = 0) -> dict[str, dict[str, Any]]:
    """Ask every daemon for its spans that end at or after since_ns; return {process: entry}.

    A predictor that does not reply is left out. The compute daemon's reply includes
    its workers.
    """
    processes: dict[str, dict[str, Any]] = {}
    for name, socket, timeout_s in (
        ("io", IO_SOCKET, SPANS_TIMEOUT_S),
        ("predictor", PREDICTOR_SOCKET, PREDICTOR_TIMEOUT_S),
        ("compute", COMPUTE_SOCKET, SPANS_TIMEOUT_S),
    ):
        client = DaemonClient(info.endpoint(socket), name)
        try:
            reply = client.request(wire.SpansRequest(client.next_id(), since_ns), timeout_s)
        except DaemonTimeout:
            if name == "predictor":
                continue
            raise
        finally:
            client.close()
        if not isinstance(reply, wire.SpansReply):
            raise wire.WireError(f"the {name} daemon replied {reply.TYPE} to a spans request")
        processes.update(check_processes(reply.processes, f"{name} spans_reply"))
    return processes


def track_id(process: str) -> int:
    if process in TRACK_IDS:
        return TRACK_IDS[process]
    if process.startswith("worker:"):
        return FIRST_WORKER_TRACK + int(process.split(":", 1)[1])
    return FIRST_WORKER_TRACK + 1000 + sum(process.encode())


def assign_lanes(spans: list[list[Any]]) -> list[tuple[int, list[Any]]]:
    """Return (lane, span) pairs, sorted by start, with no two spans of a lane overlapping."""
    lane_ends: list[int] = []
    placed = []
    for span in sorted(spans, key=lambda s: (s[1], s[2])):
        for lane, end_ns in enumerate(lane_ends):
            if end_ns <= span[1]:
                break
        else:
            lane = len(lane_ends)
            lane_ends.append(0)
        lane_ends[lane] = span[2]
        placed.append((lane, span))
    return placed


class _Flows:
    """Finds the source span of each read: the lease wait of a demand, the predictor step of a hint."""

    def __init__(self, processes: dict[str, dict[str, Any]]) -> None:
        self.lease_waits: dict[tuple[int, int], list[list[Any]]] = {}
        for process, entry in processes.items():
            if not process.startswith("worker:"):
                continue
            worker = int(process.split(":", 1)[1])
            for span in entry["spans"]:
                if span[0] == "lease_wait":
                    self.lease_waits.setdefault((worker, span[3].get("request_id", -1)), []).append(span)
        # expert -> ([start_ns ascending], [span]) of the predictor steps that hinted it. A
        # step sends its hints before its span ends, so the I/O daemon can receive a hint
        # before that end, but never before the step started.
        self.hint_starts: dict[int, tuple[list[int], list[list[Any]]]] = {}
        for span in sorted(processes.get("predictor", {}).get("spans", []), key=lambda s: s[1]):
            for expert in span[3].get("hints", []):
                starts, spans = self.hint_starts.setdefault(expert, ([], []))
                starts.append(span[1])
                spans.append(span)

    def demand_sources(self, read: list[Any]) -> list[tuple[str, list[Any]]]:
        sources = []
        for worker, request_id in read[3].get("demands", []):
            for span in self.lease_waits.get((worker, request_id), []):
                # Request ids restart with a restarted worker; the matching wait overlaps the read.
                if span[1] <= read[2] and span[2] >= read[1]:
                    sources.append((f"worker:{worker}", span))
                    break
        return sources

    def hint_source(self, read: list[Any]) -> tuple[str, list[Any]] | None:
        hint_ns = read[3].get("hint_ns", 0)
        found = self.hint_starts.get(read[3].get("expert", -1))
        if not hint_ns or found is None:
            return None
        starts, spans = found
        index = bisect.bisect_right(starts, hint_ns) - 1
        return ("predictor", spans[index]) if index >= 0 else None


def build_trace(processes: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Turn {process: spans entry} into a Chrome trace-event object."""
    all_spans = [span for entry in processes.values() for span in entry["spans"]]
    t0_ns = min((span[1] for span in all_spans), default=0)

    def micros(ns: int) -> float:
        return (ns - t0_ns) / 1000

    events: list[dict[str, Any]] = []
    # id(span) -> (pid, tid) of the lane it was placed in, for binding flow ends
    placement: dict[int, tuple[int, int]] = {}
    for process, entry in sorted(processes.items(), key=lambda item: track_id(item[0])):
        pid = track_id(process)
        title = TRACK_TITLES.get(process, process)
        events.append({"ph": "M", "name": "process_name", "pid": pid, "tid": 0, "args": {"name": f"{title} (pid {entry['pid']})"}})
        events.append({"ph": "M", "name": "process_sort_index", "pid": pid, "tid": 0, "args": {"sort_index": pid}})
        lanes = set()
        for lane, span in assign_lanes(entry["spans"]):
            name, start_ns, end_ns, args = span
            placement[id(span)] = (pid, lane)
            lanes.add(lane)
            events.append(
                {"ph": "X", "name": name, "cat": process, "pid": pid, "tid": lane, "ts": micros(start_ns), "dur": (end_ns - start_ns) / 1000, "args": args}
            )
        for lane in sorted(lanes):
            events.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": lane, "args": {"name": f"lane {lane}"}})

    flows = _Flows(processes)
    flow_id = 0
    for read in processes.get("io", {}).get("spans", []):
        if read[0] != "read":
            continue
        sources = [("demand", source) for source in flows.demand_sources(read)]
        hint = flows.hint_source(read)
        if hint is not None:
            sources.append(("hint", hint))
        for kind, (_, source) in sources:
            flow_id += 1
            source_pid, source_tid = placement[id(source)]
            target_pid, target_tid = placement[id(read)]
            # Each end sits at its slice's midpoint, so it binds to that slice and no neighbour.
            events.append(
                {"ph": "s", "name": kind, "cat": "flow", "id": flow_id, "pid": source_pid, "tid": source_tid, "ts": micros((source[1] + source[2]) // 2)}
            )
            events.append(
                {"ph": "f", "bp": "e", "name": kind, "cat": "flow", "id": flow_id, "pid": target_pid, "tid": target_tid, "ts": micros((read[1] + read[2]) // 2)}
            )
    return {
        "traceEvents": events,
        "displayTimeUnit": "ms",
        "otherData": {
            "clock": "CLOCK_MONOTONIC",
            "t0_ns": t0_ns,
            "span_capacity_per_process": {process: entry["capacity"] for process, entry in processes.items()},
            "dropped": {process: entry["dropped"] for process, entry in processes.items()},
        },
    }


def write_trace(info: PipelineInfo, path: str | Path, since_ns: int = 0) -> dict[str, int]:
    """Collect the spans of a running pipeline and write them to `path` as a Chrome trace.

    Return counts: spans, flows and processes written. Used by `mer stream --trace-out`;
    any command that drives the pipeline can call it with the monotonic_ns it started at.
    """
    trace = build_trace(collect_spans(info, since_ns))
    Path(path).write_text(json.dumps(trace, separators=(",", ":")))
    events = trace["traceEvents"]
    return {
        "spans": sum(1 for e in events if e["ph"] == "X"),
        "flows": sum(1 for e in events if e["ph"] == "s"),
        "processes": sum(1 for e in events if e["ph"] == "M" and e["name"] == "process_name"),
        "span_capacity": SPAN_CAPACITY,
    }
