"""Write a new expert store: pack expert regions and commit the directory atomically.

A store is built in a temporary directory next to OUT (`.OUT.tmp-<pid>-<random>`). Every
file is fsynced, then the directory is renamed to OUT and the parent directory fsynced, so
OUT either does not exist or contains a complete store whose manifest was written last. A
process killed half way leaves only the temporary directory, which open_store never
mistakes for a store because it is not at OUT.

Quantization here is a numba version of gguf.quants' q4_0 and q8_0 rounding that writes
straight into the 8-row-interleaved tiles of mer_pipeline.quant. It must stay bit for bit
equal to `quant.pack_ggml(quant.quantize_ggml(w))`. tests/test_store.py checks that,
including zero blocks, -0.0 scales and row counts that are not a multiple of 8.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import secrets
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numba
import numpy as np

from mer_pipeline import quant
from mer_pipeline.quant import BLOCK_WEIGHTS, INTERLEAVE_ROWS, SCALES_BYTES, TILE_BYTES, ExpertLayout
from mer_pipeline.store import (
    ALIGN_BYTES,
    CHECKSUM_ALGORITHM,
    DATA_FILE_NAME,
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    Store,
    checksum_bytes,
    checksum_file,
    open_store,
)

logger = logging.getLogger(__name__)

# Regions waiting for the writer thread; two keep the disk busy while the next expert is
# packed, without holding more than three regions in memory.
WRITE_QUEUE_DEPTH = 2
# numba reads module globals as compile-time constants, but not dict entries.
Q4_0_TILE_BYTES = TILE_BYTES["q4_0"]
Q8_0_TILE_BYTES = TILE_BYTES["q8_0"]


class StoreWriteError(RuntimeError):
    """A store that could not be written (the output path exists, a write failed)."""


# ---------------------------------------------------------------------------------------
# Quantize and pack


# NOTE: when a block's scale is subnormal in float32 (max |w| below about 1e-37), 1/d
# overflows and gguf's numpy code casts inf or NaN to an integer, which numpy leaves to the
# platform. _nibble and _int8 return 0 there, which is what numpy does on x86-64; real
# weights never come near that range.
@numba.njit(nogil=True, cache=True)
def _nibble(v):
    # trunc(v), clipped to 0..15, for v = w / d + 8.5.
    if v < 1.0:
        return 0
    if v < 16.0:
        return np.int32(v)
    return 15 if v < np.inf else 0


@numba.njit(nogil=True, cache=True)
def _int8(v):
    if abs(v) <= 127.0:
        return np.int32(v)
    return 0


@numba.njit(nogil=True, cache=True)
def _block_absmax(flat, base):
    # Four partial maxima break the dependency chain; max is exact, so the order does not matter.
    a0 = np.float32(0.0)
    a1 = np.float32(0.0)
    a2 = np.float32(0.0)
    a3 = np.float32(0.0)
    for j in range(0, BLOCK_WEIGHTS, 4):
        a0 = max(a0, abs(flat[base + j]))
        a1 = max(a1, abs(flat[base + j + 1]))
        a2 = max(a2, abs(flat[base + j + 2]))
        a3 = max(a3, abs(flat[base + j + 3]))
    return max(max(a0, a1), max(a2, a3))


@numba.njit(nogil=True, cache=True)
def _round_half_away(x):
    # gguf.quants.np_roundf, in float32.
    a = abs(x)
    floored = np.floor(a)
    rounded = floored + np.floor(np.float32(2.0) * (a - floored))
    return -rounded if x < 0.0 else rounded


# Kernel arguments: flat is the float32 matrix, row-major and flattened (flat indexing
# compiled to faster code than 2-D views). out is the packed matrix, whose qs bytes the
# kernel writes. scales[g, b * 8 + r] receives the float32 scale of row 8g + r, block b.


@numba.njit(nogil=True, parallel=True, cache=True)
def _quantize_tiles_q4_0(flat, rows, cols, out, scales):
    n_blocks = cols // BLOCK_WEIGHTS
    tile_bytes = Q4_0_TILE_BYTES
    for g in numba.prange(scales.shape[0]):
        for b in range(n_blocks):
            tile = (g * n_blocks + b) * tile_bytes + SCALES_BYTES
            for r in range(INTERLEAVE_ROWS):
                row = g * INTERLEAVE_ROWS + r
                if row >= rows:
                    break
                base = row * cols + b * BLOCK_WEIGHTS
                # gguf.quants.Q4_0: d = (the signed weight of largest magnitude, first one on
                # ties) / -8. In a zero block that is the first weight: 0.0 / -8 = -0.0.
                amax = _block_absmax(flat, base)
                vmax = flat[base]
                for j in range(BLOCK_WEIGHTS):
                    if abs(flat[base + j]) == amax:
                        vmax = flat[base + j]
                        break
                d = vmax / np.float32(-8.0)
                inv_d = np.float32(0.0) if d == 0.0 else np.float32(1.0) / d
                scales[g, b * INTERLEAVE_ROWS + r] = d
                if abs(inv_d) < np.inf:
                    # |w * inv_d| <= 8, so v >= 0 and trunc(min(v, 15)) = min(trunc(v), 15).
                    for j in range(16):
                        lo = min(np.float32(flat[base + j] * inv_d) + np.float32(8.5), np.float32(15.0))
                        hi = min(np.float32(flat[base + j + 16] * inv_d) + np.float32(8.5), np.float32(15.0))
                        out[tile + INTERLEAVE_ROWS * j + r] = np.uint8(np.int32(lo) | (np.int32(hi) << 4))
                    continue
                for j in range(16):
                    q_lo = _nibble(np.float32(flat[base + j] * inv_d) + np.float32(8.5))
                    q_hi = _nibble(np.float32(flat[base + j + 16] * inv_d) + np.float32(8.5))
                    out[tile + INTERLEAVE_ROWS * j + r] = np.uint8(q_lo | (q_hi << 4))


@numba.njit(nogil=True, parallel=True, cache=True)
def _quantize_tiles_q8_0(flat, rows, cols, out, scales):
    n_blocks = cols // BLOCK_WEIGHTS
    tile_bytes = Q8_0_TILE_BYTES
    for g in numba.prange(scales.shape[0]):
        for b in range(n_blocks):
            tile = (g * n_blocks + b) * tile_bytes + SCALES_BYTES
            for r in range(INTERLEAVE_ROWS):
                row = g * INTERLEAVE_ROWS + r
                if row >= rows:
                    break
                base = row * cols + b * BLOCK_WEIGHTS
                # gguf.quants.Q8_0: d = max |w| / 127, q = round half away from zero (w / d).
                d = _block_absmax(flat, base) / np.float32(127.0)
                inv_d = np.float32(0.0) if d == 0.0 else np.float32(1.0) / d
                scales[g, b * INTERLEAVE_ROWS + r] = d
                if abs(inv_d) < np.inf:
                    for j in range(BLOCK_WEIGHTS):
                        q = np.int32(_round_half_away(np.float32(flat[base + j] * inv_d)))
                        out[tile + INTERLEAVE_ROWS * j + r] = np.uint8(q & 0xFF)
                    continue
                for j in range(BLOCK_WEIGHTS):
                    q = _int8(_round_half_away(np.float32(flat[base + j] * inv_d)))
                    out[tile + INTERLEAVE_ROWS * j + r] = np.uint8(q & 0xFF)


def quantize_pack(weights: np.ndarray, dtype: str, out: np.ndarray | None = None) -> np.ndarray:
    """Quantize float weights [rows, cols] with gguf's rounding and pack them in the store layout.

    Returns the packed matrix as 1-D uint8, written into `out` when given (its size must be
    quant.matrix_nbytes(rows, cols, dtype)). Equal byte for byte to
    `quant.pack_ggml(quant.quantize_ggml(weights, dtype), rows, cols, dtype)`.
    """
    dtype = quant.check_dtype(dtype)
    weights = np.ascontiguousarray(weights, dtype=np.float32)
    if weights.ndim != 2:
        raise quant.LayoutError(f"expected a 2-D matrix, got shape {weights.shape}")
    rows, cols = weights.shape
    nbytes = quant.matrix_nbytes(rows, cols, dtype)
    if out is None:
        out = np.empty(nbytes, dtype=np.uint8)
    elif out.dtype != np.uint8 or out.size != nbytes:
        raise quant.LayoutError(f"output buffer has {out.size} bytes, the {dtype} matrix needs {nbytes}")
    if dtype == "f32":
        out.view(np.float32)[:] = weights.reshape(-1)
        return out

    groups = quant.padded_rows(rows, dtype) // INTERLEAVE_ROWS
    n_blocks = cols // BLOCK_WEIGHTS
    tiles = out.reshape(groups, n_blocks, TILE_BYTES[dtype])
    if rows % INTERLEAVE_ROWS:
        tiles[-1] = 0  # the kernel skips padding rows, which pack_ggml fills with zero bytes
    scales = np.zeros((groups, n_blocks * INTERLEAVE_ROWS), dtype=np.float32)
    kernel = _quantize_tiles_q4_0 if dtype == "q4_0" else _quantize_tiles_q8_0
    kernel(weights.reshape(-1), rows, cols, out, scales)
    # numba has no float16 on the CPU, so the scales are rounded to float16 by numpy,
    # which is also what gguf.quants does.
    tiles[..., :SCALES_BYTES] = scales.astype(np.float16).view(np.uint8).reshape(groups, n_blocks, SCALES_BYTES)
    return out


# ---------------------------------------------------------------------------------------
# Expert regions


def new_region(layout: ExpertLayout) -> np.ndarray:
    """Return a zeroed buffer of one expert region (uint8 [region_bytes])."""
    return np.zeros(layout.region_bytes, dtype=np.uint8)


def section_view(region: np.ndarray, layout: ExpertLayout, name: str) -> np.ndarray:
    """Return the bytes of section `name` ("gate", "up" or "down") inside a region buffer."""
    section = getattr(layout, name)
    return region[section.offset : section.offset + section.nbytes]


def put_packed(region: np.ndarray, layout: ExpertLayout, name: str, packed: np.ndarray) -> None:
    """Copy an already packed matrix (e.g. from quant.pack_ggml) into its section of a region."""
    view = section_view(region, layout, name)
    packed = np.ascontiguousarray(packed).view(np.uint8).reshape(-1)
    if packed.size != view.size:
        raise quant.LayoutError(f"packed {name} matrix has {packed.size} bytes, its section has {view.size}")
    view[:] = packed


# ---------------------------------------------------------------------------------------
# Atomic store directory


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class StoreWriter:
    """Build a store in a temporary directory next to `out` and move it into place on commit().

    Use as a context manager: leaving the block without commit() (an exception, Ctrl-C)
    deletes the temporary directory. Expert regions are written in expert id order by a
    background thread, so packing the next expert overlaps the disk write of the last one.
    """

    def __init__(self, out: str | os.PathLike[str], layout: ExpertLayout, n_experts_total: int, *, force: bool = False):
        self.out = Path(out)
        self.layout = layout
        self.n_experts_total = n_experts_total
        self.force = force
        if self.out.exists() and not force:
            raise StoreWriteError(f"{self.out} already exists; remove it or pass --force to replace it")
        if not self.out.parent.is_dir():
            raise StoreWriteError(f"{self.out.parent} is not a directory; create it first")
        self.tmp = self.out.parent / f".{self.out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        self.entries: list[dict[str, Any]] = []
        self.files: dict[str, dict[str, Any]] = {}
        self._next_id = 0
        self._queue: queue.Queue[tuple[int, np.ndarray] | None] = queue.Queue(maxsize=WRITE_QUEUE_DEPTH)
        self._thread: threading.Thread | None = None
        self._data_file: Any = None
        self._write_error: BaseException | None = None
        self._committed = False
        self._written_bytes = 0
        self._started_s = 0.0

    @property
    def path(self) -> Path:
        """The temporary directory that becomes the store; write extra files (dense.gguf) here."""
        return self.tmp

    def __enter__(self) -> StoreWriter:
        self.tmp.mkdir()
        self._started_s = time.monotonic()
        self._data_file = open(self.tmp / DATA_FILE_NAME, "wb", buffering=0)
        self._thread = threading.Thread(target=self._write_loop, name="store-writer", daemon=True)
        self._thread.start()
        logger.info("store write start out=%s tmp=%s experts=%d region_bytes=%d",
                    self.out, self.tmp, self.n_experts_total, self.layout.region_bytes)
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if not self._committed:
            self._stop_thread()
            if self._data_file is not None:
                self._data_file.close()
            shutil.rmtree(self.tmp, ignore_errors=True)
            if exc is not None:
                logger.info("store write aborted out=%s error=%r; removed %s", self.out, exc, self.tmp)

    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._write_error is not None:
                continue  # keep consuming, so that add_expert() does not block after a failed write
            expert_id, region = item
            try:
                view = memoryview(region)
                while view:
                    written = self._data_file.write(view)
                    view = view[written:]
                self._written_bytes += region.size
            except OSError as exc:
                self._write_error = exc

    def _stop_thread(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self._thread = None

    def _check_write_error(self) -> None:
        if self._write_error is not None:
            raise StoreWriteError(
                f"{self.tmp / DATA_FILE_NAME}: write failed ({self._write_error}); check free space on "
                f"{self.out.parent}"
            ) from self._write_error

    def add_expert(self, layer: int, expert: int, region: np.ndarray) -> None:
        """Queue one expert region (uint8 [region_bytes]); experts must come in expert id order."""
        self._check_write_error()
        if region.dtype != np.uint8 or region.size != self.layout.region_bytes:
            raise quant.LayoutError(
                f"expert region has {region.size} bytes of {region.dtype}, expected {self.layout.region_bytes} uint8"
            )
        expert_id = self._next_id
        offset = expert_id * self.layout.region_bytes
        self.entries.append({
            "layer": layer,
            "expert": expert,
            "file": DATA_FILE_NAME,
            "offset": offset,
            "length": self.layout.region_bytes,
            "checksum": checksum_bytes(region),
        })
        self._next_id += 1
        self._queue.put((expert_id, region))

    def add_file(self, name: str) -> None:
        """Record a file written into `path` by the caller, with its size and checksum."""
        file_path = self.tmp / name
        self.files[name] = {"name": name, "bytes": file_path.stat().st_size, "checksum": checksum_file(file_path)}

    def commit(self, manifest_fields: dict[str, Any]) -> Store:
        """Write the manifest, fsync everything, move the store to `out` and return it opened."""
        if self._next_id != self.n_experts_total:
            raise StoreWriteError(f"{self._next_id} experts written, the store needs {self.n_experts_total}")
        self._stop_thread()
        self._check_write_error()
        os.fsync(self._data_file.fileno())
        self._data_file.close()
        self._data_file = None
        self.files[DATA_FILE_NAME] = {
            "name": DATA_FILE_NAME,
            "bytes": (self.tmp / DATA_FILE_NAME).stat().st_size,
            "checksum": None,  # each expert region has its own checksum
        }
        for name in self.files:
            if name != DATA_FILE_NAME:
                _fsync_path(self.tmp / name)

        manifest = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            **manifest_fields,
            "align_bytes": ALIGN_BYTES,
            "checksum_algorithm": CHECKSUM_ALGORITHM,
            "files": list(self.files.values()),
            "experts": self.entries,
        }
        manifest_path = self.tmp / MANIFEST_NAME
        with open(manifest_path, "w") as f:
            json.dump(manifest, f, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        _fsync_path(self.tmp)
        open_store(self.tmp)  # a store that does not open must never reach `out`

        replaced = None
        if self.out.exists():
            replaced = self.out.parent / f".{self.out.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
            os.rename(self.out, replaced)
        os.rename(self.tmp, self.out)
        _fsync_path(self.out.parent)
        self._committed = True
        if replaced is not None:
            shutil.rmtree(replaced)
        elapsed_s = time.monotonic() - self._started_s
        logger.info("store write done out=%s experts=%d bytes=%d elapsed_s=%.1f",
                    self.out, self.n_experts_total, self._written_bytes, elapsed_s)
        return open_store(self.out)
