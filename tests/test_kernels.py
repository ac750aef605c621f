"""Kernels against a float64 reference, hand-computed results, and their own bits.

The reference dequantizes with gguf.quants (not with the store layout) and
computes in float64 numpy. The first run compiles the kernels, which takes a
minute or more, and numba caches them on disk for later runs.
"""

from __future__ import annotations

import functools

import numba
import numpy as np
import pytest
from gguf import quants

from mer_pipeline import kernels, quant

MAX_RELATIVE_ERROR = 1e-5
BATCH_SIZES = (1, 3, 8, 64)
SHAPES = ((32, 64), (64, 128), (2880, 256), (256, 2880))  # (d_model, d_ff)


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.linalg.norm(actual.astype(np.float64) - expected) / np.linalg.norm(expected))


def bits(values: np.ndarray) -> bytes:
    return np.ascontiguousarray(values, dtype=np.float32).view(np.uint32).tobytes()


@functools.cache
def packed_matrix(rows: int, cols: int, dtype: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Return (store bytes, float64 weights dequantized by gguf) of a random matrix."""
    rng = np.random.default_rng(seed)
    weights = rng.standard_normal((rows, cols)).astype(np.float32) / np.sqrt(cols)
    if dtype == "f32":
        return quant.pack_ggml(weights, rows, cols, dtype), weights.astype(np.float64)
    blocks = quants.quantize(weights, quant.GGML_TYPES[dtype])
    reference = quants.dequantize(blocks, quant.GGML_TYPES[dtype]).reshape(rows, cols)
    return quant.pack_ggml(blocks, rows, cols, dtype), reference.astype(np.float64)


@functools.cache
def expert(d_model: int, d_ff: int, dtype: str) -> tuple[quant.ExpertLayout, np.ndarray, dict]:
    """Return (layout, region, float64 reference weights by section name)."""
    layout = quant.expert_layout(d_model, d_ff, dtype)
    region = np.zeros(layout.region_bytes, np.uint8)
    reference = {}
    for seed, section in enumerate(layout.sections):
        packed, weights = packed_matrix(section.rows, section.cols, dtype, seed)
        region[section.offset:section.offset + section.nbytes] = packed
        reference[section.name] = weights
    region.flags.writeable = False  # cached and shared between tests, so read-only
    return layout, region, reference


def reference_swiglu(weights: dict, x: np.ndarray) -> np.ndarray:
    x64 = x.astype(np.float64)
    gate = x64 @ weights["gate"].T
    up = x64 @ weights["up"].T
    hidden = gate / (1.0 + np.exp(-gate)) * up
    return hidden @ weights["down"].T


def tokens(n_tokens: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n_tokens, width)).astype(np.float32)


def raw_block(dtype: str, scale: float, quants_: list[int]) -> bytes:
    """Build one GGML block by hand: float16 scale, then q4_0 nibbles or q8_0 int8 values.

    For q4_0, quants_ are the 32 stored nibbles (weight = scale * (nibble - 8)).
    """
    head = np.float16(scale).tobytes()
    if dtype == "q8_0":
        return head + np.array(quants_, np.int8).tobytes()
    nibbles = np.array(quants_, np.uint8)
    return head + (nibbles[:16] | (nibbles[16:] << 4)).astype(np.uint8).tobytes()


def block_matrix(dtype: str, rows: list[list[tuple[float, list[int]]]]) -> np.ndarray:
    """Return uint8 GGML blocks [n_rows, n_blocks * block_bytes] from (scale, quants) per block."""
    return np.frombuffer(b"".join(raw_block(dtype, s, q) for row in rows for s, q in row), np.uint8).reshape(
        len(rows), -1
    )


def int_weights_blocks(dtype: str, weights: np.ndarray) -> np.ndarray:
    """Encode small integer weights exactly as blocks with scale 1."""
    offset = 8 if dtype == "q4_0" else 0
    rows = []
    for row in weights.astype(int):
        rows.append([(1.0, list(row[b:b + 32] + offset)) for b in range(0, row.size, 32)])
    return block_matrix(dtype, rows)


@pytest.fixture
def all_threads():
    yield
    kernels.set_num_threads(numba.config.NUMBA_NUM_THREADS)


# --- accuracy against the float64 reference ---------------------------------------


@pytest.mark.parametrize("dtype", quant.DTYPES)
@pytest.mark.parametrize("d_model, d_ff", SHAPES)
def test_swiglu_matches_reference(dtype, d_model, d_ff):
    layout, region, weights = expert(d_model, d_ff, dtype)
    for n_tokens in BATCH_SIZES:
        x = tokens(n_tokens, d_model, seed=n_tokens)
        result = kernels.swiglu(region, layout, x)
        assert result.shape == (n_tokens, d_model)
        assert result.dtype == np.float32
        assert relative_error(result, reference_swiglu(weights, x)) < MAX_RELATIVE_ERROR


@pytest.mark.parametrize("dtype", quant.DTYPES)
def test_swiglu_one_token_vector(dtype):
    layout, region, weights = expert(64, 128, dtype)
    x = tokens(1, 64, seed=9)[0]
    result = kernels.swiglu(memoryview(region), layout, x)
    assert result.shape == (64,)
    assert relative_error(result, reference_swiglu(weights, x[np.newaxis])[0]) < MAX_RELATIVE_ERROR


@pytest.mark.parametrize("dtype", quant.DTYPES)
@pytest.mark.parametrize("rows, cols", [(8, 32), (13, 64), (40, 2880), (3, 96)])
def test_matvec_matches_reference(dtype, rows, cols):
    packed, weights = packed_matrix(rows, cols, dtype, seed=rows)
    for n_tokens in BATCH_SIZES:
        x = tokens(n_tokens, cols, seed=n_tokens)
        result = kernels.matvec(packed, rows, cols, dtype, x)
        assert result.shape == (n_tokens, rows)
        assert relative_error(result, x.astype(np.float64) @ weights.T) < MAX_RELATIVE_ERROR


# --- known results ------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["q4_0", "q8_0"])
def test_matvec_known_answer(dtype):
    # Row r has weight (r - 3) in column r and 1 in column 32 + r, with scale 1.
    weights = np.zeros((5, 64))
    for r in range(5):
        weights[r, r] = r - 3
        weights[r, 32 + r] = 1
    packed = quant.pack_ggml(int_weights_blocks(dtype, weights), 5, 64, dtype)
    x = np.zeros(64, np.float32)
    x[:5] = [1, 2, 3, 4, 5]
    x[32:37] = 0.5
    # Row r: (r - 3) * (r + 1) + 0.5 = -3 + 0.5, -4 + 0.5, -3 + 0.5, 0 + 0.5, 5 + 0.5.
    expected = np.array([-2.5, -3.5, -2.5, 0.5, 5.5], np.float32)
    assert np.array_equal(kernels.matvec(packed, 5, 64, dtype, x), expected)


def test_matvec_q4_scale_and_offset():
    # Every nibble is 0, so every weight is scale * (0 - 8) = -4 for scale 0.5.
    packed = quant.pack_ggml(block_matrix("q4_0", [[(0.5, [0] * 32)]] * 8), 8, 32, "q4_0")
    x = np.full(32, 0.25, np.float32)
    expected = np.full(8, 32 * -4 * 0.25, np.float32)
    assert np.array_equal(kernels.matvec(packed, 8, 32, "q4_0", x), expected)


def known_answer_expert(dtype: str) -> tuple[quant.ExpertLayout, np.ndarray]:
    """Build an expert with gate = [I; 0], up = 2 [I; 0] and down[:, :32] = I, so out[i] = silu(x[i]) * 2 x[i]."""
    d_model, d_ff = 32, 64
    identity = np.zeros((d_ff, d_model))
    identity[:d_model] = np.eye(d_model)
    down = np.zeros((d_model, d_ff))
    down[:, :d_model] = np.eye(d_model)
    layout = quant.expert_layout(d_model, d_ff, dtype)
    region = np.zeros(layout.region_bytes, np.uint8)
    for section, matrix in zip(layout.sections, (identity, 2 * identity, down)):
        blocks = matrix.astype(np.float32) if dtype == "f32" else int_weights_blocks(dtype, matrix)
        region[section.offset:section.offset + section.nbytes] = quant.pack_ggml(
            blocks, section.rows, section.cols, dtype
        )
    return layout, region


@pytest.mark.parametrize("dtype", quant.DTYPES)
def test_swiglu_known_answer(dtype):
    layout, region = known_answer_expert(dtype)
    x = np.zeros(32, np.float32)
    x[:3] = [2.0, -1.0, 0.5]
    result = kernels.swiglu(region, layout, x)
    # silu(v) * 2v = 2 v^2 / (1 + e^-v): 8 / (1 + e^-2), 2 / (1 + e), 0.5 / (1 + e^-0.5).
    expected = np.array([7.046376623823058, 0.5378828427399902, 0.31122966560092724])
    assert result[0] == pytest.approx(expected[0], rel=1e-6)
    # q4_0 rounds each output to within about 8 * eps * sum(|h|) of the block, so the
    # small outputs are checked against the vector's norm.
    assert relative_error(result[:3], expected) < 1e-6
    assert not result[3:].any()


@pytest.mark.parametrize("dtype", quant.DTYPES)
def test_swiglu_identity_dense_input(dtype):
    # The hardest case for q4_0's "- 8 * sum(x)" step: nearly all nibbles are 8, so
    # sum(nibble * x) and 8 * sum(x) cancel almost completely.
    layout, region = known_answer_expert(dtype)
    x = np.linspace(-3, 3, 32).astype(np.float32)
    expected = 2 * x.astype(np.float64) ** 2 / (1 + np.exp(-x.astype(np.float64)))
    assert relative_error(kernels.swiglu(region, layout, x), expected) < MAX_RELATIVE_ERROR


# --- determinism -----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", quant.DTYPES)
def test_swiglu_same_bits_any_thread_count(dtype, all_threads):
    layout, region, _ = expert(2880, 256, dtype)
    x = tokens(8, 2880, seed=3)
    results = []
    for n_threads in sorted({1, 2, numba.config.NUMBA_NUM_THREADS}):
        if n_threads > numba.config.NUMBA_NUM_THREADS:
            continue
        kernels.set_num_threads(n_threads)
        results.append(kernels.swiglu(region, layout, x))
    for result in results[1:]:
        assert bits(result) == bits(results[0])


@pytest.mark.parametrize("dtype", quant.DTYPES)
@pytest.mark.parametrize("d_model, d_ff", [(64, 128), (256, 2880)])
def test_swiglu_same_bits_any_batch(dtype, d_model, d_ff):
    layout, region, _ = expert(d_model, d_ff, dtype)
    x = tokens(64, d_model, seed=4)
    full = kernels.swiglu(region, layout, x)
    for index in (0, 5, 63):
        alone = kernels.swiglu(region, layout, x[index])
        assert bits(alone) == bits(full[index])
    # Every batch size up to 9 runs each kernel variant and remainder path; the
    # token sits at each position in turn.
    for n_tokens in range(2, 10):
        for position in range(n_tokens):
            batch = np.roll(x[:n_tokens], position - 7 % n_tokens, axis=0)
            batch[position] = x[7]
            result = kernels.swiglu(region, layout, batch)
            assert bits(result[position]) == bits(full[7])


@pytest.mark.parametrize("dtype", quant.DTYPES)
def test_matvec_same_bits_any_batch(dtype, all_threads):
    packed, _ = packed_matrix(40, 2880, dtype, seed=6)
    x = tokens(64, 2880, seed=5)
    full = kernels.matvec(packed, 40, 2880, dtype, x)
    kernels.set_num_threads(1)
    for n_tokens in (1, 2, 3, 5, 64):
        result = kernels.matvec(packed, 40, 2880, dtype, x[-n_tokens:])
        assert bits(result) == bits(full[-n_tokens:])


# --- input checks ---------------------------------------------------------------------


def test_swiglu_rejects_wrong_width():
    layout, region, _ = expert(64, 128, "q4_0")
    with pytest.raises(ValueError, match=r"x has shape \(2, 32\); expected \(64,\) or \(n_tokens, 64\)"):
        kernels.swiglu(region, layout, np.zeros((2, 32), np.float32))


def test_swiglu_rejects_too_many_tokens():
    layout, region, _ = expert(64, 128, "q4_0")
    with pytest.raises(ValueError, match="x has 65 tokens; expected 1 to 64"):
        kernels.swiglu(region, layout, np.zeros((65, 64), np.float32))


def test_swiglu_rejects_float64():
    layout, region, _ = expert(64, 128, "q4_0")
    with pytest.raises(ValueError, match="x has dtype float64; expected float32"):
        kernels.swiglu(region, layout, np.zeros(64))


def test_swiglu_rejects_short_region():
    layout, region, _ = expert(64, 128, "q4_0")
    with pytest.raises(quant.LayoutError, match="expert region has 100 bytes"):
        kernels.swiglu(region[:100], layout, np.zeros(64, np.float32))


def test_matvec_rejects_wrong_size():
    with pytest.raises(quant.LayoutError, match=r"q8_0 matrix \(8, 32\) takes 272 bytes, got 271"):
        kernels.matvec(np.zeros(271, np.uint8), 8, 32, "q8_0", np.zeros(32, np.float32))


def test_set_num_threads_rejects_zero():
    with pytest.raises(ValueError, match="thread count 0 is out of range"):
        kernels.set_num_threads(0)


# --- computing while the region arrives ---------------------------------------------


@pytest.mark.parametrize("dtype", quant.DTYPES)
@pytest.mark.parametrize("d_model, d_ff", [(64, 128), (256, 2880)])
def test_swiglu_progress_same_bits_as_swiglu(dtype, d_model, d_ff):
    layout, region, reference = expert(d_model, d_ff, dtype)
    x = tokens(3, d_model, seed=5)
    full = kernels.swiglu(region, layout, x)
    rng = np.random.default_rng(6)
    # Bytes that have not arrived yet are 0xFF: a q4_0/q8_0 scale of NaN and a NaN f32
    # weight, so computing on them would show in the result.
    arriving = np.full(layout.region_bytes, 0xFF, np.uint8)
    progress = kernels.SwigluProgress(layout, x)
    assert progress.advance(arriving, 0) == 0
    ready_bytes = 0
    steps = 0
    while not progress.done:
        ready_bytes = min(layout.region_bytes, ready_bytes + int(rng.integers(1, layout.region_bytes // 6)))
        arriving[:ready_bytes] = region[:ready_bytes]
        progress.advance(arriving, ready_bytes)
        steps += 1
    assert steps > 3
    assert bits(progress.result()) == bits(full)
    assert relative_error(progress.result(), reference_swiglu(reference, x)) < MAX_RELATIVE_ERROR


def test_swiglu_progress_one_token_and_incomplete():
    layout, region, _ = expert(64, 128, "q4_0")
    x = tokens(1, 64, seed=7)[0]
    progress = kernels.SwigluProgress(layout, x)
    progress.advance(region, layout.up.offset)
    assert not progress.done
    with pytest.raises(RuntimeError, match="not complete"):
        progress.result()
    progress.advance(region, layout.region_bytes)
    assert progress.result().shape == (64,)
    assert bits(progress.result()) == bits(kernels.swiglu(region, layout, x))
