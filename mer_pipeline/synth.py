"""Synthetic expert stores: random weights of a real model's shape, for I/O and kernel tests.

Weights are drawn from a normal distribution with std 1/sqrt(fan_in) (fan_in = the row
length), the scale of a freshly initialised linear layer. Each weight depends only on
(seed, expert id, matrix, element index), through a counter-based generator:

    h = splitmix64(key(seed, expert_id, matrix) + (i // 4) * GOLDEN_GAMMA)
    u = bits 16 * (i % 4) .. 16 * (i % 4) + 15 of h, a level in 0 .. 65535
    w = std * Q(u)

where Q(u) = Phi^-1((u + 0.5) / 65536) at every 16th level (and at u = 65535), linear in
between, so w takes 65536 equally likely values reaching +-4.3 std. A store is the same
for a seed whatever the thread count, and any expert can be regenerated on its own
(tests compare a store against `expert_weights`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import statistics
import time
from collections.abc import Callable
from functools import cache

import numba
import numpy as np

from mer_pipeline import quant
from mer_pipeline.quant import expert_layout
from mer_pipeline.store import Store
from mer_pipeline.store_writer import StoreWriter, new_region, quantize_pack, section_view

logger = logging.getLogger(__name__)

GOLDEN_GAMMA = np.uint64(0x9E3779B97F4A7C15)
QUANTILE_LEVELS = 1 << 16
# The inverse CDF is tabulated at every 16th level and interpolated linearly in between:
# a 16 KiB float32 table stays in L1, where a 65536-entry one made generation 10x slower.
KNOTS = 1 << 12
SECTION_NAMES = ("gate", "up", "down")


@dataclasses.dataclass(frozen=True)
class SynthConfig:
    """Shape and dtype of a synthetic store; the CLI's defaults live here only."""

    n_layers: int = 32
    n_experts: int = 8
    top_k: int = 2
    d_model: int = 4096
    d_ff: int = 14336
    dtype: str = "q4_0"
    seed: int = 0
    # With full_model, the store also gets random dense tensors (see mer_pipeline.model.synth_dense) so the
    # whole model runs; the attention shape below matters only then.
    full_model: bool = False
    vocab_size: int = 32000
    n_heads: int = 32
    n_kv_heads: int = 8

    def validate(self) -> None:
        for name in ("n_layers", "n_experts", "top_k", "d_model", "d_ff"):
            if getattr(self, name) <= 0:
                raise quant.LayoutError(f"{name} ({getattr(self, name)}) must be positive")
        if self.top_k > self.n_experts:
            raise quant.LayoutError(f"top_k ({self.top_k}) must not exceed n_experts ({self.n_experts})")
        if not 0 <= self.seed < 2**64:
            raise quant.LayoutError(f"seed ({self.seed}) must be in 0 .. 2**64 - 1")
        expert_layout(self.d_model, self.d_ff, self.dtype)  # checks dtype and the block size rule
        if self.full_model:
            for name in ("vocab_size", "n_heads", "n_kv_heads"):
                if getattr(self, name) <= 0:
                    raise quant.LayoutError(f"{name} ({getattr(self, name)}) must be positive")
            if self.n_heads % self.n_kv_heads or self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
                raise quant.LayoutError(
                    f"n_heads ({self.n_heads}) must divide d_model ({self.d_model}) into even head sizes and be "
                    f"a multiple of n_kv_heads ({self.n_kv_heads})"
                )


def _splitmix64(x: int) -> int:
    mask = (1 << 64) - 1
    x = (x + int(GOLDEN_GAMMA)) & mask
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
    return x ^ (x >> 31)


def matrix_key(seed: int, expert_id: int, section_index: int) -> int:
    """Return the 64-bit stream key of one matrix (section_index: 0 gate, 1 up, 2 down)."""
    return _splitmix64(_splitmix64(seed) ^ (expert_id * len(SECTION_NAMES) + section_index))


@cache
def _quantile_knots() -> tuple[np.ndarray, np.ndarray]:
    """Return (base, slope) of the piecewise-linear inverse normal CDF, float64 [KNOTS] each."""
    inv_cdf = statistics.NormalDist().inv_cdf
    levels_per_knot = QUANTILE_LEVELS // KNOTS
    points = [inv_cdf((level + 0.5) / QUANTILE_LEVELS) for level in range(0, QUANTILE_LEVELS, levels_per_knot)]
    base = np.array(points, dtype=np.float64)
    slope = np.empty(KNOTS, dtype=np.float64)
    slope[:-1] = np.diff(base) / levels_per_knot
    last_level = QUANTILE_LEVELS - 1
    slope[-1] = (inv_cdf((last_level + 0.5) / QUANTILE_LEVELS) - base[-1]) / (levels_per_knot - 1)
    return base, slope


@numba.njit(nogil=True, cache=True)
def _mix(key, word):
    x = key + word * GOLDEN_GAMMA + GOLDEN_GAMMA
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


@numba.njit(nogil=True, cache=True)
def _normal_at(x, lane, base, slope):
    level = (x >> np.uint64(16 * lane)) & np.uint64(0xFFFF)
    knot = level >> np.uint64(4)
    return base[knot] + slope[knot] * np.float32(level & np.uint64(15))


@numba.njit(nogil=True, parallel=True, cache=True)
def _fill_normal(flat, key, base, slope):
    n_full_words = flat.size // 4
    for word in numba.prange(n_full_words):
        x = _mix(key, np.uint64(word))
        for lane in range(4):
            flat[4 * word + lane] = _normal_at(x, lane, base, slope)
    tail = flat.size - 4 * n_full_words
    if tail:
        x = _mix(key, np.uint64(n_full_words))
        for lane in range(tail):
            flat[4 * n_full_words + lane] = _normal_at(x, lane, base, slope)


def synth_matrix(seed: int, expert_id: int, section_index: int, rows: int, cols: int,
                 out: np.ndarray | None = None) -> np.ndarray:
    """Return the float32 weights [rows, cols] of one matrix of a synthetic expert."""
    if out is None:
        out = np.empty((rows, cols), dtype=np.float32)
    if out.shape != (rows, cols) or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"output buffer must be C-contiguous float32 ({rows}, {cols}), got {out.dtype} {out.shape}")
    base, slope = _quantile_knots()
    std = np.float32(1.0 / np.sqrt(cols))
    _fill_normal(out.reshape(-1), np.uint64(matrix_key(seed, expert_id, section_index)),
                 (base * std).astype(np.float32), (slope * std).astype(np.float32))
    return out


def expert_weights(config: SynthConfig, expert_id: int) -> dict[str, np.ndarray]:
    """Return the float32 gate, up and down matrices of one synthetic expert (before quantization)."""
    layout = expert_layout(config.d_model, config.d_ff, config.dtype)
    return {
        section.name: synth_matrix(config.seed, expert_id, index, section.rows, section.cols)
        for index, section in enumerate(layout.sections)
    }


def write_synth_store(out: str | os.PathLike[str], config: SynthConfig, *, force: bool = False,
                      on_expert: Callable[[int], None] | None = None) -> Store:
    """Write a synthetic store to `out`, one expert at a time; on_expert(expert_id) reports progress."""
    config.validate()
    layout = expert_layout(config.d_model, config.d_ff, config.dtype)
    n_total = config.n_layers * config.n_experts
    writer = StoreWriter(out, layout, n_total, force=force)  # rejects an existing `out` before any work
    logger.info("synth start out=%s layers=%d experts=%d d_model=%d d_ff=%d dtype=%s seed=%d store_bytes=%d",
                out, config.n_layers, config.n_experts, config.d_model, config.d_ff, config.dtype,
                config.seed, n_total * layout.region_bytes)
    started_s = time.monotonic()
    # One float buffer per matrix shape, reused for every expert.
    scratch = {
        (rows, cols): np.empty((rows, cols), dtype=np.float32)
        for rows, cols in {(s.rows, s.cols) for s in layout.sections}
    }
    with writer:
        for expert_id in range(n_total):
            region = new_region(layout)
            for index, section in enumerate(layout.sections):
                weights = synth_matrix(config.seed, expert_id, index, section.rows, section.cols,
                                       out=scratch[(section.rows, section.cols)])
                quantize_pack(weights, config.dtype, out=section_view(region, layout, section.name))
            writer.add_expert(expert_id // config.n_experts, expert_id % config.n_experts, region)
            if on_expert is not None:
                on_expert(expert_id)
        model = {
            "n_layers": config.n_layers,
            "n_experts": config.n_experts,
            "top_k": config.top_k,
            "d_model": config.d_model,
            "d_ff": config.d_ff,
        }
        dense = None
        if config.full_model:
            from mer_pipeline.model.synth_dense import DENSE_FILE_NAME, dense_model_fields, write_dense_gguf

            dense = {"file": DENSE_FILE_NAME, "naming": "gguf",
                     "tensors": write_dense_gguf(writer.path / DENSE_FILE_NAME, config)}
            writer.add_file(DENSE_FILE_NAME)
            model.update(dense_model_fields(config))
        store = writer.commit({
            "model": model,
            "dtype": config.dtype,
            "source": {"kind": "synthetic", "seed": config.seed, "path": None, "sha256": None, "size": None,
                       "distribution": "normal(0, 1/sqrt(fan_in))"},
            "dense": dense,
        })
    elapsed_s = time.monotonic() - started_s
    logger.info("synth done out=%s experts=%d elapsed_s=%.1f bytes_per_s=%.0f",
                out, n_total, elapsed_s, n_total * layout.region_bytes / max(elapsed_s, 1e-9))
    return store
