"""Whole-model generation on a synthetic Mixtral-shaped store, with the pool holding a share
of the experts, against two bounds measured in the same run.

For each pool share (default 25% and 50% of the experts) it starts the numa0 pipeline
with that many slots and runs one short warm-up generation (kernel loading, first reads).
It then generates --decode-tokens tokens after a --prompt-tokens prompt and records time
to first token, decode tokens/s, hit rate, I/O share and bytes read per token. Then:

- compute bound: a pool that holds every expert, measured on a second generation after
  a first one has loaded every expert the prompt routes to (hit rate reported);
- I/O bound: every expert use a miss, paid at the read bandwidth the I/O daemon measured
  in the smallest-pool run (bytes read / time with reads in flight): decode reads
  layers * top_k regions per token; prefill reads every expert of every layer once.

    .venv/bin/python benchmarks/bench_generate.py --store /var/tmp/mer-bench-generate --layers 8

The store is made if absent (8 layers: about 6.3 GiB of experts plus 0.3 GiB of dense
tensors) and deleted at the end unless --keep-store.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mer_pipeline.generate import generate, make_backend  # noqa: E402
from mer_pipeline.main_job import launched_pipeline  # noqa: E402
from mer_pipeline.model import load_model  # noqa: E402
from mer_pipeline.store import StoreError, open_store  # noqa: E402
from mer_pipeline.synth import SynthConfig, write_synth_store  # noqa: E402

log = logging.getLogger("bench_generate")


def ensure_store(path: Path, layers: int) -> tuple[object, bool]:
    try:
        return open_store(path), False
    except StoreError:
        pass
    config = SynthConfig(n_layers=layers, n_experts=8, top_k=2, d_model=4096, d_ff=14336, dtype="q4_0", seed=0,
                         full_model=True, vocab_size=32000, n_heads=32, n_kv_heads=8)
    started_s = time.monotonic()
    store = write_synth_store(path, config, force=True)
    log.info("store written path=%s elapsed_s=%.0f", path, time.monotonic() - started_s)
    return store, True


def run_pipeline(store, slots: int, prompt: list[int], decode_tokens: int, repeats_before: int,
                 lookahead: str | int) -> dict:
    with tempfile.TemporaryDirectory(prefix="mer-bench-gen-") as tmp:
        with launched_pipeline(store.path, Path(tmp) / "pipeline", ["--slots", str(slots)]) as info:
            backend = make_backend(store, info)
            try:
                model = load_model(store, backend, lookahead=lookahead)
                for _ in range(repeats_before):
                    generate(model, prompt, 2, stop_at_eos=False, pipeline=info)
                model = load_model(store, backend, lookahead=lookahead)  # fresh lookahead statistics
                result = generate(model, prompt, decode_tokens + 1, stop_at_eos=False, pipeline=info)
            finally:
                backend.close()
    s = result.summary
    return {
        "slots": slots,
        "time_to_first_token_s": s["time_to_first_token_s"],
        "prefill_tokens_per_s": s["prefill_tokens_per_s"],
        "decode_tokens_per_s": s["decode_tokens_per_s"],
        "decode_step_ms": s["decode_step_ms"],
        "prefill": s["prefill"],
        "decode": s["decode"],
        "lookahead": s["lookahead"],
        "generated_ids": result.generated_ids,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", type=Path, default=Path("/var/tmp/mer-bench-generate"))
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--decode-tokens", type=int, default=8)
    parser.add_argument("--shares", default="0.25,0.5", help="pool shares of the experts, comma-separated")
    parser.add_argument("--lookahead", default="auto", help="farthest lookahead distance in layers for prefetch hints, or auto")
    parser.add_argument("--keep-store", action="store_true")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    lookahead = args.lookahead if args.lookahead == "auto" else int(args.lookahead)

    store, created = ensure_store(args.store, args.layers)
    try:
        total = store.n_experts_total
        rng = np.random.default_rng(0)
        prompt = [1] + rng.integers(3, 32000, args.prompt_tokens - 1).tolist()
        results = {"machine": f"{platform.node()} {platform.processor() or platform.machine()}",
                   "layers": store.shape.n_layers, "experts_total": total, "region_bytes": store.region_bytes,
                   "prompt_tokens": len(prompt), "decode_tokens": args.decode_tokens, "runs": {}}
        for share in [float(s) for s in args.shares.split(",")]:
            slots = max(4, int(round(total * share)))
            log.info("run share=%.2f slots=%d", share, slots)
            results["runs"][f"pool {share:.0%}"] = run_pipeline(store, slots, prompt, args.decode_tokens, 1, lookahead)
        log.info("run all experts resident slots=%d", total)
        results["runs"]["all resident"] = run_pipeline(store, total, prompt, args.decode_tokens, 1, lookahead)

        smallest = results["runs"][next(iter(results["runs"]))]
        bandwidth = max(smallest["prefill"]["io_mib_per_s"], smallest["decode"]["io_mib_per_s"]) * 2**20
        shape = store.shape
        decode_bytes = shape.n_layers * shape.top_k * store.region_bytes
        prefill_bytes = total * store.region_bytes
        results["io_bound"] = {
            "read_bytes_per_s": bandwidth,
            "decode_tokens_per_s": bandwidth / decode_bytes,
            "decode_read_bytes_per_token": decode_bytes,
            "time_to_first_token_s": prefill_bytes / bandwidth,
        }
        print(json.dumps(results, indent=1))
        if args.out:
            args.out.write_text(json.dumps(results, indent=1))
    finally:
        if created and not args.keep_store:
            shutil.rmtree(args.store, ignore_errors=True)


if __name__ == "__main__":
    main()
