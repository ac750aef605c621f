"""The observability views against one real pipeline: a Prometheus scrape over loopback,
`mer stats` text, JSON and plot, the `--trace-out` timeline, and the live view.

One pipeline serves every test in this module. After the stream the pipeline is idle,
so every view reads the same histograms; the predictor restart runs last.
"""

import json
import re
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from mer_pipeline.cli import app
from mer_pipeline.main_job import launched_pipeline
from mer_pipeline.observe import plots
from mer_pipeline.observe.stages import merged_stages
from mer_pipeline.observe.timeline import collect_spans
from mer_pipeline.stream import collect_stats
from mer_pipeline.synth import SynthConfig, write_synth_store

N_TOKENS = 16
WORKERS = 2
PERCENTILES = (50, 95, 99)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("observe")
    store = root / "store"
    write_synth_store(store, SynthConfig(n_layers=32, n_experts=8, top_k=2, d_model=64, d_ff=128, dtype="q4_0", seed=7))
    socket_dir = root / "sock"
    log_path = root / "launcher.log"
    args = ["--slots", "48", "--workers", str(WORKERS), "--predictor", "transition", "--metrics-port", "0"]
    with launched_pipeline(store, socket_dir, args, log_path=log_path) as info:
        found = re.search(r"metrics at http://127\.0\.0\.1:(\d+)/metrics", log_path.read_text())
        assert found, log_path.read_text()
        trace_path = root / "run.json"
        result = CliRunner().invoke(
            app, ["stream", "--tokens", str(N_TOKENS), "--json", "--trace-out", str(trace_path), "--socket-dir", str(socket_dir)]
        )
        assert result.exit_code == 0, result.output
        summary = json.loads(result.stdout)
        yield {"info": info, "socket_dir": socket_dir, "port": int(found.group(1)), "trace": trace_path, "summary": summary, "root": root}


def _scrape(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
        return {family.name: family for family in text_string_to_metric_families(response.read().decode())}


def _stats_json(socket_dir):
    result = CliRunner().invoke(app, ["stats", "--json", "--socket-dir", str(socket_dir)])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _value(family, **labels):
    for sample in family.samples:
        if sample.labels == labels and not sample.name.endswith("_created"):
            return sample.value
    raise AssertionError(f"{family.name} has no sample with labels {labels}")


def test_scrape_counters_match_stats(run):
    families = _scrape(run["port"])
    io = _stats_json(run["socket_dir"])["counters"]["io"]
    summary = run["summary"]
    assert _value(families["mer_stats_up"]) == 1
    assert _value(families["mer_lookups"]) == io["lookups"] == summary["lookups"]
    assert _value(families["mer_hits"]) == io["hits"]
    assert _value(families["mer_misses"]) == io["misses"]
    assert _value(families["mer_read_bytes"]) == io["io_bytes"]
    for outcome in ("issued", "useful", "wasted", "late", "skipped"):
        assert _value(families["mer_prefetches"], outcome=outcome) == io[f"prefetch_{outcome}"]
    assert _value(families["mer_tokens"]) == N_TOKENS
    for daemon in ["io", "predictor", "compute"] + [f"worker:{i}" for i in range(WORKERS)]:
        assert _value(families["mer_daemon_restarts"], daemon=daemon) == 0
        assert _value(families["mer_daemon_state"], daemon=daemon, state="running") == 1


def test_scrape_histograms_match_stats(run):
    families = _scrape(run["port"])
    stages = _stats_json(run["socket_dir"])["stages"]
    assert set(stages) >= {"dispatch", "lease_wait", "io_device", "compute_expert", "token"}
    for stage, values in stages.items():
        family = families[f"mer_stage_{stage}_seconds"]
        assert family.type == "histogram"
        count = values["count"]
        samples = {(s.name, s.labels.get("le")): s.value for s in family.samples}
        assert samples[(f"{family.name}_count", None)] == count
        assert samples[(f"{family.name}_bucket", "+Inf")] == count
        bounds = sorted((float(le), value) for (name, le), value in samples.items() if name.endswith("_bucket") and le != "+Inf")
        for percentile in PERCENTILES:
            value_s = values[f"p{percentile}_us"] / 1e6
            target = max(int(percentile * count / 100 + 0.5), 1)
            for bound_s, cumulative in bounds:
                # A bucket reaches the percentile's rank exactly when its bound is at or above the value.
                assert (cumulative >= target) == (bound_s >= value_s - 1e-12), (stage, percentile, bound_s)
        assert _value(families["mer_stage_max_seconds"], stage=stage) == pytest.approx(values["max_us"] / 1e6)


def test_stats_text_matches_json(run):
    stages = _stats_json(run["socket_dir"])["stages"]
    result = CliRunner().invoke(app, ["stats", "--socket-dir", str(run["socket_dir"])], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    rows = {}
    for line in result.stdout.splitlines():
        cells = [c.strip() for c in line.strip("│┃ ").split("│")]
        if len(cells) == 6 and cells[0] in stages:
            rows[cells[0]] = [int(c) for c in cells[1:]]
    assert set(rows) == set(stages)
    for stage, values in stages.items():
        assert rows[stage] == [values["count"], values["p50_us"], values["p95_us"], values["p99_us"], values["max_us"]]


def test_stats_plot_matches_json(run):
    pytest.importorskip("matplotlib", reason="matplotlib (the plot extra) is not installed")
    out = run["root"] / "latency.png"
    result = CliRunner().invoke(app, ["stats", "--plot", str(out), "--socket-dir", str(run["socket_dir"])])
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    stages = _stats_json(run["socket_dir"])["stages"]
    info = run["info"]
    plotted = plots.plot_latency(merged_stages(collect_stats(info)), collect_spans(info), run["root"] / "again.png")
    assert set(plotted["curves"]) == set(stages)
    for stage, curve in plotted["curves"].items():
        assert curve["count"] == stages[stage]["count"]
        assert curve["p50_us"] == stages[stage]["p50_us"]
        assert curve["p99_us"] == stages[stage]["p99_us"]
        assert curve["values_us"][-1] == stages[stage]["max_us"]
    series = plotted["hit_rate"]
    assert series["lookups"].sum() == run["summary"]["lookups"]
    hits = (series["hit_rate"] * series["lookups"]).sum()
    assert hits == pytest.approx(run["summary"]["hits"])


def test_trace_file_tracks_spans_and_flows(run):
    trace = json.loads(run["trace"].read_text())
    events = trace["traceEvents"]
    titles = {e["pid"]: e["args"]["name"].split(" (")[0] for e in events if e["ph"] == "M" and e["name"] == "process_name"}
    assert sorted(titles.values()) == sorted(["I/O daemon", "predictor", "compute daemon"] + [f"worker:{i}" for i in range(WORKERS)])
    slices = [e for e in events if e["ph"] == "X"]
    by_name = {}
    for e in slices:
        by_name.setdefault(e["name"], []).append(e)
    summary = run["summary"]
    assert len(by_name["token"]) == N_TOKENS
    assert len(by_name["kernel"]) == summary["lookups"]
    assert len(by_name["lease_wait"]) == summary["lookups"]
    # Prefetch reads issued near the end may finish after the summary's stats snapshot.
    assert len(by_name["read"]) >= summary["io_reads"]
    assert len(by_name["predict"]) == summary["layer_steps"]

    tracks = {}
    for e in slices:
        tracks.setdefault((e["pid"], e["tid"]), []).append(e)
    for (pid, _), placed in tracks.items():
        placed.sort(key=lambda e: e["ts"])
        for first, second in zip(placed, placed[1:]):
            assert first["ts"] + first["dur"] <= second["ts"] + 1e-3, (titles[pid], first, second)
    worker_pids = {pid for pid, title in titles.items() if title.startswith("worker:")}
    # A worker's spans follow one another, except the kernel run during a read, which
    # overlaps its lease wait and so takes a second lane.
    worker_lanes = {tid for pid, tid in tracks if pid in worker_pids}
    assert 0 in worker_lanes
    assert worker_lanes <= {0, 1}
    assert {e["name"] for (pid, tid), placed in tracks.items() if pid in worker_pids and tid == 1 for e in placed} <= {
        "kernel_during_read"
    }

    starts = {e["id"]: e for e in events if e["ph"] == "s"}
    finishes = {e["id"]: e for e in events if e["ph"] == "f"}
    assert set(starts) == set(finishes)
    for end in list(starts.values()) + list(finishes.values()):
        inside = [s for s in tracks[(end["pid"], end["tid"])] if s["ts"] <= end["ts"] <= s["ts"] + s["dur"]]
        assert inside, end
    kinds = [e["name"] for e in starts.values()]
    assert kinds.count("demand") == summary["misses"]
    assert kinds.count("hint") == sum(1 for e in by_name["read"] if e["args"]["hint_ns"])
    assert kinds.count("hint") >= summary["prefetch_issued"]
    for flow_id, start in starts.items():
        target = finishes[flow_id]
        assert titles[target["pid"]] == "I/O daemon"
        if start["name"] == "hint":
            assert titles[start["pid"]] == "predictor"
        else:
            assert start["pid"] in worker_pids
    assert trace["otherData"]["dropped"] == {name: 0 for name in trace["otherData"]["dropped"]}


def test_watch_view_is_bounded(run):
    started = time.monotonic()
    result = CliRunner().invoke(app, ["stats", "--watch", "--duration-s", "2", "--socket-dir", str(run["socket_dir"])], env={"COLUMNS": "160"})
    elapsed_s = time.monotonic() - started
    assert result.exit_code == 0, result.output
    assert 2 <= elapsed_s < 30
    for text in ("lease_wait", "io_device", "hit rate", "prefetch wasted", "worker:1", "running", "pool by layer"):
        assert text in result.stdout, text
    total = re.search(r"lookups\s*│\s*\d+\s*│\s*(\d+)", result.stdout)
    assert total and int(total.group(1)) == run["summary"]["lookups"]


def test_scrape_counts_predictor_restart(run):
    result = CliRunner().invoke(app, ["ctl", "restart", "predictor", "--socket-dir", str(run["socket_dir"])])
    assert result.exit_code == 0, result.output
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        families = _scrape(run["port"])
        if _value(families["mer_daemon_restarts"], daemon="predictor") == 1 and _value(families["mer_daemon_state"], daemon="predictor", state="running") == 1:
            break
        time.sleep(0.5)
    assert _value(families["mer_daemon_restarts"], daemon="predictor") == 1
    assert _value(families["mer_daemon_restarts"], daemon="io") == 0
