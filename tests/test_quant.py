"""The store layout against gguf's reference quantization, byte for byte."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import quants
from hypothesis import given, settings
from hypothesis import strategies as st

from mer_pipeline import quant

QUANTIZED = ("q4_0", "q8_0")
NEGATIVE_ZERO_F16 = bytes([0x00, 0x80])


def reference_pack(blocks: np.ndarray, rows: int, cols: int, dtype: str) -> np.ndarray:
    """Pack GGML blocks tile by tile, written from the layout drawing in quant.py."""
    block_bytes = quant.GGML_BLOCK_BYTES[dtype]
    qs_bytes = quant.QS_BYTES[dtype]
    n_blocks = cols // 32
    raw = blocks.reshape(rows, n_blocks, block_bytes)
    groups = -(-rows // 8)
    tile_bytes = quant.TILE_BYTES[dtype]
    packed = np.zeros(groups * n_blocks * tile_bytes, np.uint8)
    for g in range(groups):
        for b in range(n_blocks):
            tile = packed[(g * n_blocks + b) * tile_bytes:(g * n_blocks + b + 1) * tile_bytes]
            for r in range(8):
                row = 8 * g + r
                if row >= rows:
                    continue  # padding rows stay all zero
                block = raw[row, b]
                tile[2 * r:2 * r + 2] = block[:2]
                for j in range(qs_bytes):
                    tile[16 + 8 * j + r] = block[2 + j]
    return packed


def gguf_blocks(weights: np.ndarray, dtype: str) -> np.ndarray:
    return quants.quantize(weights.astype(np.float32), quant.GGML_TYPES[dtype])


def special_weights(rows: int, cols: int, seed: int) -> np.ndarray:
    """Random weights with some all-zero 32-weight blocks and some all-negative ones."""
    rng = np.random.default_rng(seed)
    weights = rng.standard_normal((rows, cols)).astype(np.float32)
    weights[0, :32] = 0.0
    if rows > 2:
        weights[2, -32:] = 0.0
        weights[1, :32] = -np.abs(weights[1, :32])
    return weights


def with_negative_zero_scales(blocks: np.ndarray, dtype: str) -> np.ndarray:
    """Return a copy of the blocks where a few scales are -0.0 but the quants are not zero."""
    block_bytes = quant.GGML_BLOCK_BYTES[dtype]
    flat = blocks.copy().reshape(-1, block_bytes)
    for index in range(0, flat.shape[0], 3):
        flat[index, :2] = np.frombuffer(NEGATIVE_ZERO_F16, np.uint8)
        flat[index, 2:] = np.arange(2, block_bytes, dtype=np.uint8) * 7
    return flat.reshape(blocks.shape)


@pytest.mark.parametrize("dtype", QUANTIZED)
@pytest.mark.parametrize("rows, cols", [(8, 32), (13, 64), (16, 2880), (3, 96)])
def test_pack_matches_reference_tiles(dtype, rows, cols):
    blocks = gguf_blocks(special_weights(rows, cols, seed=rows * cols), dtype)
    packed = quant.pack_ggml(blocks, rows, cols, dtype)
    expected = reference_pack(blocks, rows, cols, dtype)
    assert packed.dtype == np.uint8
    assert packed.size == quant.matrix_nbytes(rows, cols, dtype)
    assert packed.tobytes() == expected.tobytes()


@pytest.mark.parametrize("dtype", QUANTIZED)
def test_zero_blocks_keep_gguf_scale_bits(dtype):
    blocks = gguf_blocks(np.zeros((8, 64), np.float32), dtype)
    # gguf rounds an all-zero q4_0 block to scale 0 / -8 = -0.0 and a q8_0 block to +0.0.
    expected_scale = NEGATIVE_ZERO_F16 if dtype == "q4_0" else bytes(2)
    assert blocks[0, :2].tobytes() == expected_scale
    packed = quant.pack_ggml(blocks, 8, 64, dtype)
    assert packed[:16].tobytes() == expected_scale * 8
    assert quant.unpack_ggml(packed, 8, 64, dtype).tobytes() == blocks.tobytes()


@pytest.mark.parametrize("dtype", QUANTIZED)
def test_negative_zero_scales_round_trip(dtype):
    blocks = with_negative_zero_scales(gguf_blocks(special_weights(9, 96, seed=5), dtype), dtype)
    packed = quant.pack_ggml(blocks, 9, 96, dtype)
    assert packed.tobytes() == reference_pack(blocks, 9, 96, dtype).tobytes()
    assert quant.unpack_ggml(packed, 9, 96, dtype).tobytes() == blocks.tobytes()
    ours = quant.dequantize_packed(packed, 9, 96, dtype)
    theirs = quants.dequantize(blocks, quant.GGML_TYPES[dtype]).reshape(9, 96)
    assert ours.dtype == np.float32
    assert ours.view(np.uint32).tobytes() == theirs.astype(np.float32).view(np.uint32).tobytes()


@pytest.mark.parametrize("dtype", QUANTIZED)
@pytest.mark.parametrize("rows, cols", [(8, 32), (13, 64), (24, 2880)])
def test_unpack_inverts_pack(dtype, rows, cols):
    blocks = gguf_blocks(special_weights(rows, cols, seed=1), dtype)
    packed = quant.pack_ggml(blocks, rows, cols, dtype)
    unpacked = quant.unpack_ggml(packed, rows, cols, dtype)
    assert unpacked.shape == blocks.shape
    assert unpacked.tobytes() == blocks.tobytes()


@pytest.mark.parametrize("dtype", QUANTIZED)
@pytest.mark.parametrize("rows, cols", [(8, 32), (13, 64), (24, 2880)])
def test_dequantize_packed_matches_gguf(dtype, rows, cols):
    blocks = gguf_blocks(special_weights(rows, cols, seed=2), dtype)
    packed = quant.pack_ggml(blocks, rows, cols, dtype)
    ours = quant.dequantize_packed(packed, rows, cols, dtype)
    theirs = quants.dequantize(blocks, quant.GGML_TYPES[dtype]).reshape(rows, cols).astype(np.float32)
    assert ours.shape == (rows, cols)
    assert ours.view(np.uint32).tobytes() == theirs.view(np.uint32).tobytes()


@pytest.mark.parametrize("dtype", QUANTIZED)
def test_padding_rows_are_zero(dtype):
    blocks = gguf_blocks(special_weights(13, 64, seed=3), dtype)
    packed = quant.pack_ggml(blocks, 13, 64, dtype)
    tiles = packed.reshape(2, 2, quant.TILE_BYTES[dtype])
    for r in range(5, 8):
        assert tiles[1, :, 2 * r:2 * r + 2].tobytes() == bytes(4)
        assert not tiles[1, :, 16 + r::8].any()


@pytest.mark.parametrize("dtype", QUANTIZED)
def test_size_equals_gguf_tensor_plus_padding(dtype):
    for rows, cols in [(14336, 4096), (4096, 14336), (13, 2880)]:
        gguf_bytes = rows * (cols // 32) * quant.GGML_BLOCK_BYTES[dtype]
        padding_bytes = (quant.padded_rows(rows, dtype) - rows) * (cols // 32) * quant.GGML_BLOCK_BYTES[dtype]
        assert quant.matrix_nbytes(rows, cols, dtype) == gguf_bytes + padding_bytes


def test_f32_is_row_major():
    weights = np.arange(12, dtype=np.float32).reshape(3, 4)
    packed = quant.pack_ggml(weights, 3, 4, "f32")
    assert packed.tobytes() == weights.tobytes()
    assert np.array_equal(quant.unpack_ggml(packed, 3, 4, "f32"), weights)
    assert np.array_equal(quant.dequantize_packed(packed, 3, 4, "f32"), weights)


def test_mixtral_expert_layout():
    layout = quant.expert_layout(4096, 14336, "q4_0")
    assert layout.payload_bytes == 99_090_432
    assert layout.gate.offset == 0
    assert layout.up.offset == layout.gate.nbytes
    assert layout.down.offset == 2 * layout.gate.nbytes
    assert layout.region_bytes % 4096 == 0


def test_row_length_must_be_block_multiple():
    with pytest.raises(quant.LayoutError, match="2881 is not a multiple"):
        quant.matrix_nbytes(8, 2881, "q4_0")


def test_unknown_dtype_rejected():
    with pytest.raises(quant.LayoutError, match="unsupported dtype 'q5_k'"):
        quant.check_dtype("q5_k")


@settings(max_examples=25, deadline=None)
@given(
    dtype=st.sampled_from(QUANTIZED),
    rows=st.integers(1, 20),
    n_blocks=st.integers(1, 4),
    seed=st.integers(0, 2**31 - 1),
)
def test_round_trip_any_shape(dtype, rows, n_blocks, seed):
    cols = 32 * n_blocks
    blocks = with_negative_zero_scales(gguf_blocks(special_weights(rows, cols, seed), dtype), dtype)
    packed = quant.pack_ggml(blocks, rows, cols, dtype)
    assert packed.tobytes() == reference_pack(blocks, rows, cols, dtype).tobytes()
    assert quant.unpack_ggml(packed, rows, cols, dtype).tobytes() == blocks.tobytes()
