"""Matrix-vector and SwiGLU kernels that compute straight from the store layout.

The weights stay in the layout that quant.py describes: q4_0 and q8_0 tiles
interleave 8 output rows, so lane r of an 8-lane float32 vector is row r of a
row group. The hot loop is LLVM IR that `_make_tile_kernel` writes with llvmlite
and numba inlines into the parallel drivers. A q4_0 step loads byte j of the 8
rows, splits it into two nibble vectors, converts them to float32 and adds their
products with x into one accumulator per (row, token) with explicit fused
multiply-adds. A kernel converts one tile's weights at a time and never dequantizes
a whole matrix.

Per (row, token) and 32-weight block, the q4_0 kernel computes, in this order,

    dot = 0
    for j in 0..15:
        dot = fma(nibble_lo[j], x[j], dot)
        dot = fma(nibble_hi[j], x[j + 16], dot)
    acc = fma(d, dot - 8 * sum(x[0..31]), acc)

which is d * sum((nibble - 8) * x) up to rounding and saves subtracting 8 from
every weight. The q8_0 kernel runs dot = fma(q[j], x[j], dot) for j in 0..31 and
then acc = fma(d, dot, acc). f32 matrices are row-major, so each row's dot product
runs over 8 partial sums that a fixed tree adds at the end.

A token's result has the same bits whatever the batch size, its position in the
batch and the thread count, because:

- Threads split the output rows between them, never the reduction of one row.
- Every kernel variant (1, 2 or 4 tokens, 1, 2 or 4 row groups per pass) runs the
  sequence above for each (row, token). It calls `llvm.fma` and sets no fast-math
  flags, so LLVM can neither reorder the sums nor fuse multiplies and adds
  differently from one variant to another.
- One scalar loop per token computes the block sums of x and the SiLU.

NOTE: because q4_0 subtracts 8 * sum(x) after the fact, its rounding error scales
with sum(|nibble * x|) rather than sum(|(nibble - 8) * x|). Blocks whose nibbles are
nearly all 8 (weights near zero) lose the most. An identity-like expert with dense x
comes to about 1e-5 relative error and random weights to about 1e-6 (see the tests).
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from mer_pipeline import quant

LANES = quant.INTERLEAVE_ROWS
BLOCK = quant.BLOCK_WEIGHTS
MAX_TOKENS = 64

_F32 = ir.FloatType()
_I32 = ir.IntType(32)
_I64 = ir.IntType(64)
_VEC_F32 = ir.VectorType(_F32, LANES)
_VEC_I32 = ir.VectorType(_I32, LANES)
_VEC_I8 = ir.VectorType(ir.IntType(8), LANES)
_VEC_F16 = ir.VectorType(ir.HalfType(), LANES)

# Dtype codes that the compiled drivers branch on.
_Q4_0 = 0
_Q8_0 = 1
_F32_CODE = 2
_DTYPE_CODES = {"q4_0": _Q4_0, "q8_0": _Q8_0, "f32": _F32_CODE}
_TILE_BYTES_Q4_0 = quant.TILE_BYTES["q4_0"]
_TILE_BYTES_Q8_0 = quant.TILE_BYTES["q8_0"]


# --- LLVM IR helpers -------------------------------------------------------------


def _const_i64(value: int) -> ir.Constant:
    return ir.Constant(_I64, value)


def _splat(builder: ir.IRBuilder, scalar: ir.Value) -> ir.Value:
    vec = builder.insert_element(ir.Constant(_VEC_F32, ir.Undefined), scalar, ir.Constant(_I32, 0))
    return builder.shuffle_vector(vec, vec, ir.Constant(_VEC_I32, [0] * LANES))


def _fma(builder: ir.IRBuilder, a: ir.Value, b: ir.Value, c: ir.Value) -> ir.Value:
    fnty = ir.FunctionType(_VEC_F32, [_VEC_F32, _VEC_F32, _VEC_F32])
    fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.fma.v8f32")
    return builder.call(fn, [a, b, c])


def _data_ptr(context, builder, arrty, arr) -> ir.Value:
    return context.make_array(arrty)(context, builder, value=arr).data


def _load_vector(builder: ir.IRBuilder, byte_ptr: ir.Value, offset: int, vecty: ir.VectorType):
    ptr = builder.gep(byte_ptr, [_const_i64(offset)])
    return builder.load(builder.bitcast(ptr, vecty.as_pointer()), align=1)


def _tile_values_q4(builder, tile_ptr, j):
    """Return (low nibbles, high nibbles) of qs byte j of the 8 rows as float32 vectors."""
    raw = _load_vector(builder, tile_ptr, quant.SCALES_BYTES + LANES * j, _VEC_I8)
    raw = builder.zext(raw, _VEC_I32)
    low = builder.and_(raw, ir.Constant(_VEC_I32, [15] * LANES))
    high = builder.lshr(raw, ir.Constant(_VEC_I32, [4] * LANES))
    return builder.sitofp(low, _VEC_F32), builder.sitofp(high, _VEC_F32)


def _tile_values_q8(builder, tile_ptr, j):
    """Return qs[j] of the 8 rows as a float32 vector."""
    raw = _load_vector(builder, tile_ptr, quant.SCALES_BYTES + LANES * j, _VEC_I8)
    return builder.sitofp(builder.sext(raw, _VEC_I32), _VEC_F32)


def _tile_scales(builder, tile_ptr):
    return builder.fpext(_load_vector(builder, tile_ptr, 0, _VEC_F16), _VEC_F32)


def _make_tile_kernel(dtype: str, n_groups: int, n_tokens: int):
    """Build an intrinsic that computes `n_groups` row groups for `n_tokens` tokens.

    Arguments of the intrinsic, with offsets counted in elements of their array
    (all arrays C-contiguous):

    - w, w_off: the packed matrix bytes and the first tile of the first row group.
    - n_blocks: 32-weight blocks per row, which is also the tile count of a row group.
    - x, x_off: float32 activations. Token t starts at x_off + t * x_stride.
    - xsum, xsum_off: block sums of x, read by q4_0 only. Token t starts at
      xsum_off + t * n_blocks.
    - out, out_off: float32 results. Row 8 * g + r of token t goes to
      out_off + t * out_stride + 8 * g + r.
    - x_stride, out_stride: elements between consecutive tokens.

    Each (row, token) pair gets its own accumulator chain, so every variant runs
    the same operations in the same order for it.
    """
    tile_bytes = quant.TILE_BYTES[dtype]
    qs_bytes = quant.QS_BYTES[dtype]
    zero = ir.Constant(_VEC_F32, [0.0] * LANES)

    def codegen(context, builder, signature, args):
        w, w_off, n_blocks, x, x_off, xsum, xsum_off, out, out_off, x_stride, out_stride = args
        w_ty, x_ty, xsum_ty, out_ty = (signature.args[i] for i in (0, 3, 5, 7))

        w_base = builder.gep(_data_ptr(context, builder, w_ty, w), [w_off])
        group_bytes = builder.mul(n_blocks, _const_i64(tile_bytes))
        x_data = _data_ptr(context, builder, x_ty, x)
        xsum_data = _data_ptr(context, builder, xsum_ty, xsum)
        x_rows = []
        xsum_rows = []
        for t in range(n_tokens):
            x_rows.append(builder.gep(x_data, [builder.add(x_off, builder.mul(x_stride, _const_i64(t)))]))
            xsum_index = builder.add(xsum_off, builder.mul(n_blocks, _const_i64(t)))
            xsum_rows.append(builder.gep(xsum_data, [xsum_index]))
        # Allocas in the entry block, which LLVM promotes to registers.
        totals = [[cgutils.alloca_once_value(builder, zero) for _ in range(n_tokens)]
                  for _ in range(n_groups)]

        with cgutils.for_range(builder, n_blocks) as loop:
            b = loop.index
            tile_off = builder.mul(b, _const_i64(tile_bytes))
            tiles = [
                builder.gep(w_base, [builder.add(builder.mul(group_bytes, _const_i64(g)), tile_off)])
                for g in range(n_groups)
            ]
            x_block = [builder.gep(x_rows[t], [builder.mul(b, _const_i64(BLOCK))]) for t in range(n_tokens)]
            dots = [[zero] * n_tokens for _ in range(n_groups)]

            def x_splat(t, col):
                return _splat(builder, builder.load(builder.gep(x_block[t], [_const_i64(col)])))

            for j in range(qs_bytes):
                if dtype == "q4_0":
                    nibbles = [_tile_values_q4(builder, tiles[g], j) for g in range(n_groups)]
                    for t in range(n_tokens):
                        x_low, x_high = x_splat(t, j), x_splat(t, j + 16)
                        for g in range(n_groups):
                            dots[g][t] = _fma(builder, nibbles[g][0], x_low, dots[g][t])
                            dots[g][t] = _fma(builder, nibbles[g][1], x_high, dots[g][t])
                else:
                    values = [_tile_values_q8(builder, tiles[g], j) for g in range(n_groups)]
                    for t in range(n_tokens):
                        x_j = x_splat(t, j)
                        for g in range(n_groups):
                            dots[g][t] = _fma(builder, values[g], x_j, dots[g][t])

            for g in range(n_groups):
                scales = _tile_scales(builder, tiles[g])
                for t in range(n_tokens):
                    dot = dots[g][t]
                    if dtype == "q4_0":
                        # The nibbles went in without their offset of -8, so subtract 8 * sum(x) here.
                        x_total = builder.load(builder.gep(xsum_rows[t], [b]))
                        offset = builder.fmul(x_total, ir.Constant(_F32, 8.0))
                        dot = builder.fsub(dot, _splat(builder, offset))
                    total = _fma(builder, scales, dot, builder.load(totals[g][t]))
                    builder.store(total, totals[g][t])

        out_data = _data_ptr(context, builder, out_ty, out)
        for g in range(n_groups):
            for t in range(n_tokens):
                index = builder.add(out_off, builder.mul(out_stride, _const_i64(t)))
                index = builder.add(index, _const_i64(LANES * g))
                ptr = builder.bitcast(builder.gep(out_data, [index]), _VEC_F32.as_pointer())
                builder.store(builder.load(totals[g][t]), ptr, align=4)
        return context.get_dummy_value()

    @intrinsic
    def tile_kernel(typingctx, w, w_off, n_blocks, x, x_off, xsum, xsum_off, out, out_off,
                    x_stride, out_stride):
        sig = types.void(w, types.int64, types.int64, x, types.int64, xsum, types.int64, out,
                         types.int64, types.int64, types.int64)
        return sig, codegen

    return tile_kernel


# Variants as (row groups, tokens) per pass. On a 2-core AMD EPYC (Zen 1) VM, one
# thread ran one token fastest with 4 row groups, which share each broadcast of x,
# and 2 or 4 tokens with 2 row groups, which share each converted weight.
_Q4_G4_T1 = _make_tile_kernel("q4_0", 4, 1)
_Q4_G2_T2 = _make_tile_kernel("q4_0", 2, 2)
_Q4_G2_T4 = _make_tile_kernel("q4_0", 2, 4)
_Q4_G1_T1 = _make_tile_kernel("q4_0", 1, 1)
_Q4_G1_T2 = _make_tile_kernel("q4_0", 1, 2)
_Q4_G1_T4 = _make_tile_kernel("q4_0", 1, 4)
_Q8_G4_T1 = _make_tile_kernel("q8_0", 4, 1)
_Q8_G2_T2 = _make_tile_kernel("q8_0", 2, 2)
_Q8_G2_T4 = _make_tile_kernel("q8_0", 2, 4)
_Q8_G1_T1 = _make_tile_kernel("q8_0", 1, 1)
_Q8_G1_T2 = _make_tile_kernel("q8_0", 1, 2)
_Q8_G1_T4 = _make_tile_kernel("q8_0", 1, 4)

# Row groups that one parallel work item covers: the most that any variant takes.
_GROUPS_PER_ITEM = 4



# --- compiled drivers ----------------------------------------------------------------


@njit(cache=True)
def _block_sums(x, n_blocks):
    """Return float32 [n_tokens, n_blocks]: each 32-value block of x summed in order."""
    n_tokens = x.shape[0]
    sums = np.empty((n_tokens, n_blocks), np.float32)
    for t in range(n_tokens):
        for b in range(n_blocks):
            total = np.float32(0.0)
            for j in range(BLOCK):
                total += x[t, BLOCK * b + j]
            sums[t, b] = total
    return sums


@njit(cache=True)
def _run_tiles(code, n_groups, n_tokens, w, w_off, n_blocks, x, x_off, xsum, xsum_off, out,
               out_off):
    """Call the tile kernel variant for (dtype code, row groups, tokens), as _make_tile_kernel describes."""
    x_stride = x.shape[1]
    out_stride = out.shape[1]
    if code == _Q4_0:
        if n_groups == 4:
            _Q4_G4_T1(w, w_off, n_blocks, x, x_off, xsum, xsum_off, out, out_off, x_stride, out_stride)
        elif n_groups == 2 and n_tokens == 4:
            _Q4_G2_T4(w, w_off, n_blocks, x, x_off, xsum, xsum_off, out, out_off, x_stride, out_stride)
        elif n_groups == 2:
            _Q4_G2_T2(w, w_off, n_blocks, x, x_off, xsum, xsum_off, out, out_off, x_stride, out_stride)
        elif n_tokens == 4:
            _Q4_G1_T4(w, w_off, n_blocks, x, x_off, xsum, xsum_off, out, out_off, x_stride, out_stride)
        elif n_tokens == 2:
            _Q4_G1_T2(w, w_off, n_blocks, x, x_off, xsum, xsum_off, out, out_off, x_stride, out_stride)
        else:
            _Q4_G1_T1(w, w_off, n_blocks, x, x_off, xsum, xsum_off, out, out_off, x_stride, out_stride)
    else:
        if n_groups == 4:
            _Q8_G4_T1(w, w_off, n_blocks, x, x_off, xsum, xsum_off, out, out_off, x_stride, out_stride)
        elif n_groups == 2 and n_tokens == 4:
            _Q8_G2_T4(w, w_off, n_blocks, x, x_off, xsum, xsum_off, out, out_off, x_stride, out_stride)
        elif n_groups == 2:
            _Q8_G2_T2(w, w_off, n_blocks, x, x_off, xsum, xsum_off, out, out_off, x_stride, out_stride)
        elif n_tokens == 4:
            _Q8_G1_T4(w, w_off, n_blocks, x, x_off, xsum, xsum_off, out, out_off, x_stride, out_stride)
        elif n_tokens == 2:
            _Q8_G1_T2(w, w_off, n_blocks, x, x_off, xsum, xsum_off, out, out_off, x_stride, out_stride)
        else:
            _Q8_G1_T1(w, w_off, n_blocks, x, x_off, xsum, xsum_off, out, out_off, x_stride, out_stride)


@njit(cache=True)
def _rows_quantized(code, w, w_off, n_blocks, n_groups, item, x, xsum, out):
    """Compute row groups 4 * item .. 4 * item + 3 (those that exist) for all tokens."""
    tile_bytes = _TILE_BYTES_Q4_0 if code == _Q4_0 else _TILE_BYTES_Q8_0
    group_bytes = n_blocks * tile_bytes
    first = _GROUPS_PER_ITEM * item
    count = min(_GROUPS_PER_ITEM, n_groups - first)
    n_tokens = x.shape[0]
    t = 0
    while t < n_tokens:
        left = n_tokens - t
        if left >= 4:
            tokens = 4
        elif left >= 2:
            tokens = 2
        else:
            tokens = 1
        groups = 4 if tokens == 1 else 2
        g = 0
        while g < count:
            step = groups if count - g >= groups else 1
            group = first + g
            _run_tiles(code, step, tokens, w, w_off + group * group_bytes, n_blocks, x,
                       t * x.shape[1], xsum, t * n_blocks, out, t * out.shape[1] + LANES * group)
            g += step
        t += tokens


@njit(cache=True)
def _row_f32(w, w_off, cols, x, t):
    """Return the dot product of one f32 row with token t, using 8 fixed partial sums."""
    s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = np.float32(0.0)
    k = 0
    while k + LANES <= cols:
        base = w_off + k
        s0 += w[base] * x[t, k]
        s1 += w[base + 1] * x[t, k + 1]
        s2 += w[base + 2] * x[t, k + 2]
        s3 += w[base + 3] * x[t, k + 3]
        s4 += w[base + 4] * x[t, k + 4]
        s5 += w[base + 5] * x[t, k + 5]
        s6 += w[base + 6] * x[t, k + 6]
        s7 += w[base + 7] * x[t, k + 7]
        k += LANES
    while k < cols:
        s0 += w[w_off + k] * x[t, k]
        k += 1
    return ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))


@njit(cache=True)
def _rows(code, region, w_off, rows, cols, item, x, xsum, out):
    """Compute the rows of work item `item` (32 rows) of one matrix for all tokens.

    `rows` is the padded row count for q4_0/q8_0 and the row count for f32.
    """
    if code == _F32_CODE:
        weights = region[w_off:w_off + 4 * rows * cols].view(np.float32)
        first = _GROUPS_PER_ITEM * LANES * item
        for row in range(first, min(first + _GROUPS_PER_ITEM * LANES, rows)):
            for t in range(x.shape[0]):
                out[t, row] = _row_f32(weights, row * cols, cols, x, t)
    else:
        _rows_quantized(code, region, w_off, cols // BLOCK, rows // LANES, item, x, xsum, out)


@njit(cache=True)
def _items(rows):
    return -(-rows // (_GROUPS_PER_ITEM * LANES))


# NOTE: prange gives each thread an equal share of the work items up front (numba's
# OpenMP and workqueue layers), so a thread whose core is busy with another
# process holds up the call.


@njit(parallel=True, cache=True)
def _matvec(code, w, cols, x, out):
    rows = out.shape[1]
    xsum = _block_sums(x, cols // BLOCK if code != _F32_CODE else 0)
    for item in prange(_items(rows)):
        _rows(code, w, 0, rows, cols, item, x, xsum, out)


@njit(cache=True)
def _silu_mul(gate, up, first_row, end_row):
    """gate[:, first_row:end_row] = silu(gate) * up, one scalar loop per token."""
    for t in range(gate.shape[0]):
        for i in range(first_row, end_row):
            g = gate[t, i]
            gate[t, i] = g / (np.float32(1.0) + np.exp(-g)) * up[t, i]


@njit(cache=True)
def _rows_span(code, region, w_off, rows, cols, first_item, end_item, x, xsum, out):
    """Compute work items first_item .. end_item - 1 of one matrix on this thread."""
    for item in range(first_item, end_item):
        _rows(code, region, w_off, rows, cols, item, x, xsum, out)


@njit(parallel=True, cache=True)
def _swiglu(code, region, gate_off, up_off, down_off, d_model, d_ff, x, out):
    n_tokens = x.shape[0]
    quantized = code != _F32_CODE
    xsum = _block_sums(x, d_model // BLOCK if quantized else 0)
    gate = np.empty((n_tokens, d_ff), np.float32)
    up = np.empty((n_tokens, d_ff), np.float32)
    rows_per_item = _GROUPS_PER_ITEM * LANES
    for item in prange(_items(d_ff)):
        _rows(code, region, gate_off, d_ff, d_model, item, x, xsum, gate)
        _rows(code, region, up_off, d_ff, d_model, item, x, xsum, up)
        _silu_mul(gate, up, rows_per_item * item, min(rows_per_item * (item + 1), d_ff))

    hsum = _block_sums(gate, d_ff // BLOCK if quantized else 0)
    for item in prange(_items(d_model)):
        _rows(code, region, down_off, d_model, d_ff, item, gate, hsum, out)


# --- Python API ----------------------------------------------------------------------


def _as_bytes(buffer) -> np.ndarray:
    array = np.frombuffer(buffer, dtype=np.uint8) if not isinstance(buffer, np.ndarray) else buffer
    return array.reshape(-1).view(np.uint8)


def _as_tokens(x, width: int, name: str) -> tuple[np.ndarray, bool]:
    """Return x as a writable C-contiguous float32 [n_tokens, width] and whether it was 1-D."""
    array = np.asarray(x)
    single = array.ndim == 1
    if single:
        array = array[np.newaxis, :]
    if array.ndim != 2 or array.shape[1] != width:
        raise ValueError(f"{name} has shape {np.shape(x)}; expected ({width},) or (n_tokens, {width})")
    if not 1 <= array.shape[0] <= MAX_TOKENS:
        raise ValueError(f"{name} has {array.shape[0]} tokens; expected 1 to {MAX_TOKENS}")
    if array.dtype != np.float32:
        raise ValueError(f"{name} has dtype {array.dtype}; expected float32")
    if not array.flags.c_contiguous or not array.flags.writeable:
        array = array.copy()
    return array, single


def matvec(packed, rows: int, cols: int, dtype: str, x) -> np.ndarray:
    """Multiply one packed matrix (as quant.pack_ggml returns it) by each token of x.

    x is float32 [n_tokens, cols] or [cols]; returns float32 [n_tokens, rows] or [rows].
    """
    dtype = quant.check_dtype(dtype)
    weights = _as_bytes(packed)
    expected_bytes = quant.matrix_nbytes(rows, cols, dtype)
    if weights.size != expected_bytes:
        raise quant.LayoutError(
            f"{dtype} matrix ({rows}, {cols}) takes {expected_bytes} bytes, got {weights.size}"
        )
    tokens, single = _as_tokens(x, cols, "x")
    out = np.empty((tokens.shape[0], quant.padded_rows(rows, dtype)), np.float32)
    _matvec(_DTYPE_CODES[dtype], weights, cols, tokens, out)
    result = out[:, :rows] if out.shape[1] != rows else out
    return result[0].copy() if single else np.ascontiguousarray(result)


def swiglu(region, layout: quant.ExpertLayout, x) -> np.ndarray:
    """Compute W_down @ (silu(W_gate @ x) * (W_up @ x)) for each token of x.

    region is one expert region (uint8 array or buffer of at least
    layout.payload_bytes bytes); x is float32 [n_tokens, d_model] or [d_model].
    """
    weights = _as_bytes(region)
    if weights.size < layout.payload_bytes:
        raise quant.LayoutError(
            f"expert region has {weights.size} bytes; the layout needs {layout.payload_bytes}"
        )
    tokens, single = _as_tokens(x, layout.d_model, "x")
    out = np.empty((tokens.shape[0], layout.d_model), np.float32)
    _swiglu(_DTYPE_CODES[layout.dtype], weights, layout.gate.offset, layout.up.offset,
            layout.down.offset, layout.d_model, layout.d_ff, tokens, out)
    return out[0].copy() if single else out


class SwigluProgress:
    """The SwiGLU of one expert computed while its region is still being read.

    The region arrives front to back: gate, then up, then down. Each `advance` computes
    the 32-row work items whose bytes lie below `ready_bytes`: gate rows, then up rows,
    then the SiLU product, then down rows. Every row runs the same code as in `swiglu`
    (one thread), so the result has the same bits.
    """

    def __init__(self, layout: quant.ExpertLayout, x) -> None:
        self.layout = layout
        self._code = _DTYPE_CODES[layout.dtype]
        self._tokens, self._single = _as_tokens(x, layout.d_model, "x")
        n_tokens = self._tokens.shape[0]
        self._quantized = layout.dtype != "f32"
        self._xsum = _block_sums(self._tokens, layout.d_model // BLOCK if self._quantized else 0)
        self._gate = np.empty((n_tokens, layout.d_ff), np.float32)
        self._up = np.empty((n_tokens, layout.d_ff), np.float32)
        self._hsum: np.ndarray | None = None
        self._out = np.empty((n_tokens, layout.d_model), np.float32)
        rows_per_item = _GROUPS_PER_ITEM * LANES
        # Per section in read order: (section, rows as the kernel counts them, work items,
        # bytes per work item, output array).
        self._stages = tuple(
            (
                section,
                rows,
                -(-rows // rows_per_item),
                rows_per_item * section.nbytes // quant.padded_rows(section.rows, layout.dtype),
                out,
            )
            for section, rows, out in (
                (layout.gate, layout.d_ff, self._gate),
                (layout.up, layout.d_ff, self._up),
                (layout.down, layout.d_model, self._out),
            )
        )
        self._stage = 0
        self._next_item = 0

    @property
    def done(self) -> bool:
        return self._stage == len(self._stages)

    def advance(self, region, ready_bytes: int) -> int:
        """Compute every work item now readable; return how many were computed."""
        weights = _as_bytes(region)
        ready_bytes = min(ready_bytes, weights.size)
        computed = 0
        while not self.done:
            section, rows, n_items, item_bytes, out = self._stages[self._stage]
            # Work items that lie wholly below ready_bytes (the last one may be shorter).
            if ready_bytes >= section.offset + section.nbytes:
                end_item = n_items
            else:
                end_item = max(0, (ready_bytes - section.offset) // item_bytes)
            if end_item > self._next_item:
                x, xsum = (self._tokens, self._xsum) if self._stage < 2 else (self._gate, self._hsum)
                _rows_span(self._code, weights, section.offset, rows, section.cols, self._next_item, end_item, x, xsum, out)
                computed += end_item - self._next_item
                self._next_item = end_item
            if self._next_item < n_items:
                break
            self._stage += 1
            self._next_item = 0
            if self._stage == 2:
                _silu_mul(self._gate, self._up, 0, self.layout.d_ff)
                self._hsum = _block_sums(self._gate, self.layout.d_ff // BLOCK if self._quantized else 0)
        return computed

    def result(self) -> np.ndarray:
        """Return the output, shaped like `swiglu`'s; only once `done`."""
        if not self.done:
            raise RuntimeError("the SwiGLU is not complete: part of the expert region has not been computed")
        return self._out[0].copy() if self._single else self._out


def set_num_threads(n: int) -> None:
    """Set the threads that the kernels of this process use (1 to numba.config.NUMBA_NUM_THREADS)."""
    limit = numba.config.NUMBA_NUM_THREADS
    if not 1 <= n <= limit:
        raise ValueError(f"thread count {n} is out of range; expected 1 to {limit} (NUMBA_NUM_THREADS)")
    numba.set_num_threads(n)


def warmup() -> None:
    """Load the kernels for writable weight buffers from numba's disk cache (compiling
    them on a cache miss, which takes a minute or more).

    One call loads the code of every dtype. Read-only buffers (bytes, read-only
    mappings) use a second specialization that loads on its first use.
    """
    layout = quant.expert_layout(BLOCK, 2 * BLOCK, "q4_0")
    x = np.zeros((1, BLOCK), np.float32)
    swiglu(np.zeros(layout.region_bytes, np.uint8), layout, x)
    progress = SwigluProgress(layout, x)
    progress.advance(np.zeros(layout.region_bytes, np.uint8), layout.region_bytes)
    packed = np.zeros(quant.matrix_nbytes(LANES, BLOCK, "q4_0"), np.uint8)
    matvec(packed, LANES, BLOCK, "q4_0", x)
