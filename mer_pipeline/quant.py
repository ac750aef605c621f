"""Weight layouts of the expert store and their conversion to and from GGML blocks.

GGML's q4_0 and q8_0 formats store each row as a run of 32-weight blocks:

    q4_0 block (18 bytes): d: float16 scale | qs[16]: byte j holds weight j in its
                           low nibble and weight j + 16 in its high nibble;
                           weight = d * (nibble - 8)
    q8_0 block (34 bytes): d: float16 scale | qs[32]: int8; weight = d * qs[j]

The store keeps the same bytes, reordered so that the kernel's vector lanes run
over 8 output rows at once ("row-interleaved by 8"). For row group g (rows
8g .. 8g+7) and block column b, one tile holds:

    q4_0x8 tile (144 bytes = 8 x 18):
        [0:16)    d[r] for r in 0..7, float16
        [16:144)  qs byte j of row r at 16 + 8*j + r, for j in 0..15

    q8_0x8 tile (272 bytes = 8 x 34):
        [0:16)    d[r] for r in 0..7, float16
        [16:272)  qs[j] of row r at 16 + 8*j + r, for j in 0..31

Tiles are ordered g-major: tile (g, b) starts at (g * n_blocks + b) * tile_bytes.
A matrix whose row count is not a multiple of 8 is padded with all-zero rows
(scale 0), so the padding adds no value to any output. The tiles hold exactly
the bytes of the GGML blocks, so packing and unpacking are bit-exact and a
packed q4_0 matrix is the same size as its GGUF tensor (plus any row padding).

f32 matrices are stored row-major, unpadded.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np
from gguf import GGMLQuantizationType, quants

Dtype = Literal["q4_0", "q8_0", "f32"]
DTYPES: tuple[Dtype, ...] = ("q4_0", "q8_0", "f32")

BLOCK_WEIGHTS = 32
INTERLEAVE_ROWS = 8
SCALES_BYTES = 2 * INTERLEAVE_ROWS
# Bytes of quantized values per GGML block.
QS_BYTES = {"q4_0": 16, "q8_0": 32}
# Bytes of one GGML block: float16 scale plus the quantized values.
GGML_BLOCK_BYTES = {"q4_0": 18, "q8_0": 34}
TILE_BYTES = {name: INTERLEAVE_ROWS * size for name, size in GGML_BLOCK_BYTES.items()}
GGML_TYPES = {
    "q4_0": GGMLQuantizationType.Q4_0,
    "q8_0": GGMLQuantizationType.Q8_0,
    "f32": GGMLQuantizationType.F32,
}


class LayoutError(ValueError):
    """A matrix shape or buffer that a store layout cannot hold."""


def check_dtype(dtype: str) -> Dtype:
    if dtype not in DTYPES:
        raise LayoutError(f"unsupported dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
    return dtype  # type: ignore[return-value]


def padded_rows(rows: int, dtype: str) -> int:
    if check_dtype(dtype) == "f32":
        return rows
    return -(-rows // INTERLEAVE_ROWS) * INTERLEAVE_ROWS


def matrix_nbytes(rows: int, cols: int, dtype: str) -> int:
    """Return the bytes that a rows x cols matrix takes in the store layout."""
    dtype = check_dtype(dtype)
    if rows <= 0 or cols <= 0:
        raise LayoutError(f"matrix shape ({rows}, {cols}) must be positive")
    if dtype == "f32":
        return rows * cols * 4
    if cols % BLOCK_WEIGHTS:
        raise LayoutError(
            f"row length {cols} is not a multiple of the {dtype} block size ({BLOCK_WEIGHTS})"
        )
    groups = padded_rows(rows, dtype) // INTERLEAVE_ROWS
    return groups * (cols // BLOCK_WEIGHTS) * TILE_BYTES[dtype]


def quantize_ggml(weights: np.ndarray, dtype: str) -> np.ndarray:
    """Quantize float weights [rows, cols] to GGML blocks with gguf's reference rounding.

    Returns uint8 [rows, n_blocks * block_bytes] for q4_0/q8_0 and float32 for f32.
    """
    dtype = check_dtype(dtype)
    weights = np.ascontiguousarray(weights, dtype=np.float32)
    if dtype == "f32":
        return weights
    if weights.shape[-1] % BLOCK_WEIGHTS:
        raise LayoutError(
            f"row length {weights.shape[-1]} is not a multiple of the {dtype} "
            f"block size ({BLOCK_WEIGHTS})"
        )
    return quants.quantize(weights, GGML_TYPES[dtype])


def pack_ggml(blocks: np.ndarray, rows: int, cols: int, dtype: str) -> np.ndarray:
    """Reorder GGML blocks of a rows x cols matrix into the store layout (1-D uint8).

    `blocks` is the raw tensor data as GGUF stores it: uint8 [rows, n_blocks * block_bytes]
    (any shape with that many bytes) for q4_0/q8_0, or float32 [rows, cols] for f32.
    """
    dtype = check_dtype(dtype)
    if dtype == "f32":
        values = np.ascontiguousarray(blocks, dtype=np.float32)
        if values.size != rows * cols:
            raise LayoutError(f"f32 matrix has {values.size} values, expected {rows} x {cols}")
        return values.reshape(-1).view(np.uint8)

    matrix_nbytes(rows, cols, dtype)  # validates the shape
    n_blocks = cols // BLOCK_WEIGHTS
    block_bytes = GGML_BLOCK_BYTES[dtype]
    raw = np.ascontiguousarray(blocks).view(np.uint8).reshape(-1)
    if raw.size != rows * n_blocks * block_bytes:
        raise LayoutError(
            f"{dtype} matrix ({rows}, {cols}) needs {rows * n_blocks * block_bytes} bytes "
            f"of GGML blocks, got {raw.size}"
        )
    rows_padded = padded_rows(rows, dtype)
    grid = np.zeros((rows_padded, n_blocks, block_bytes), dtype=np.uint8)
    grid[:rows] = raw.reshape(rows, n_blocks, block_bytes)

    # grid axes: (group, row-in-group, block, byte) -> (group, block, byte, row-in-group)
    grid = grid.reshape(rows_padded // INTERLEAVE_ROWS, INTERLEAVE_ROWS, n_blocks, block_bytes)
    scales = grid[..., :2].transpose(0, 2, 1, 3)  # (g, b, r, 2): 8 consecutive float16
    values = grid[..., 2:].transpose(0, 2, 3, 1)  # (g, b, j, r): byte j of each row
    tiles = np.concatenate(
        [
            scales.reshape(scales.shape[0], n_blocks, SCALES_BYTES),
            values.reshape(values.shape[0], n_blocks, QS_BYTES[dtype] * INTERLEAVE_ROWS),
        ],
        axis=-1,
    )
    return np.ascontiguousarray(tiles).reshape(-1)


def unpack_ggml(packed: np.ndarray, rows: int, cols: int, dtype: str) -> np.ndarray:
    """Invert pack_ggml: return the GGML blocks (uint8 [rows, n_blocks * block_bytes]).

    For f32 this returns float32 [rows, cols].
    """
    dtype = check_dtype(dtype)
    packed = np.ascontiguousarray(packed).view(np.uint8).reshape(-1)
    expected = matrix_nbytes(rows, cols, dtype)
    if packed.size != expected:
        raise LayoutError(
            f"{dtype} matrix ({rows}, {cols}) takes {expected} bytes in the store, got {packed.size}"
        )
    if dtype == "f32":
        return packed.view(np.float32).reshape(rows, cols)

    n_blocks = cols // BLOCK_WEIGHTS
    qs_bytes = QS_BYTES[dtype]
    groups = padded_rows(rows, dtype) // INTERLEAVE_ROWS
    tiles = packed.reshape(groups, n_blocks, TILE_BYTES[dtype])
    scales = tiles[..., :SCALES_BYTES].reshape(groups, n_blocks, INTERLEAVE_ROWS, 2)
    values = tiles[..., SCALES_BYTES:].reshape(groups, n_blocks, qs_bytes, INTERLEAVE_ROWS)
    blocks = np.concatenate(
        [scales.transpose(0, 2, 1, 3), values.transpose(0, 3, 1, 2)], axis=-1
    )  # (g, r, b, block_bytes)
    blocks = blocks.reshape(groups * INTERLEAVE_ROWS, n_blocks * GGML_BLOCK_BYTES[dtype])
    return np.ascontiguousarray(blocks[:rows])


def dequantize_packed(packed: np.ndarray, rows: int, cols: int, dtype: str) -> np.ndarray:
    """Return the float32 weights [rows, cols] that a packed matrix represents."""
    blocks = unpack_ggml(packed, rows, cols, dtype)
    if dtype == "f32":
        return blocks.copy()
    return quants.dequantize(blocks, GGML_TYPES[dtype]).reshape(rows, cols)


@dataclasses.dataclass(frozen=True)
class Section:
    """One weight matrix inside an expert region."""

    name: str
    offset: int
    nbytes: int
    rows: int
    cols: int


@dataclasses.dataclass(frozen=True)
class ExpertLayout:
    """Byte layout of one expert region: gate [d_ff, d_model], up [d_ff, d_model],
    down [d_model, d_ff], back to back, the region padded to `align_bytes`."""

    d_model: int
    d_ff: int
    dtype: Dtype
    gate: Section
    up: Section
    down: Section
    payload_bytes: int
    region_bytes: int

    @property
    def sections(self) -> tuple[Section, Section, Section]:
        return (self.gate, self.up, self.down)


def expert_layout(d_model: int, d_ff: int, dtype: str, align_bytes: int = 4096) -> ExpertLayout:
    dtype = check_dtype(dtype)
    shapes = (("gate", d_ff, d_model), ("up", d_ff, d_model), ("down", d_model, d_ff))
    sections = []
    offset = 0
    for name, rows, cols in shapes:
        nbytes = matrix_nbytes(rows, cols, dtype)
        sections.append(Section(name, offset, nbytes, rows, cols))
        offset += nbytes
    region_bytes = -(-offset // align_bytes) * align_bytes
    return ExpertLayout(d_model, d_ff, dtype, *sections, payload_bytes=offset, region_bytes=region_bytes)
