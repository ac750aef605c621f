"""The dense (non-expert) weights of a Mixtral model, loaded from a store's dense.gguf.

GGUFReader memory-maps the file. q4_0 and q8_0 matrices are packed once into the kernel
layout (quant.pack_ggml) and multiplied by kernels.matvec. Float matrices (F32, F16,
BF16, F64) and other GGML block types, such as the Q6_K output head of a llama.cpp Q4_0
file, become float32 arrays at load time and are multiplied with numpy.

llama.cpp's converter permutes the rows of attn_q and attn_k within each head so that
GGML's rotary embedding, which rotates adjacent pairs (x[2i], x[2i+1]), matches the
Hugging Face "rotate half" embedding, which rotates (x[i], x[i + head_dim/2]). The
loader undoes that permutation for stores with GGUF naming, so both namings run the
same rotate-half code on the same rows and give the same logits.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
from gguf import GGMLQuantizationType, quants

from mer_pipeline import kernels, quant
from mer_pipeline.model.config import ModelConfig, ModelError
from mer_pipeline.store import Store

log = logging.getLogger(__name__)

# Tensor names by role, per naming convention; "{layer}" is the layer index.
TENSOR_NAMES = {
    "gguf": {
        "embed": ("token_embd.weight",),
        "final_norm": ("output_norm.weight",),
        "output": ("output.weight",),
        "attn_norm": ("blk.{layer}.attn_norm.weight",),
        "ffn_norm": ("blk.{layer}.ffn_norm.weight",),
        "q": ("blk.{layer}.attn_q.weight",),
        "k": ("blk.{layer}.attn_k.weight",),
        "v": ("blk.{layer}.attn_v.weight",),
        "o": ("blk.{layer}.attn_output.weight",),
        "router": ("blk.{layer}.ffn_gate_inp.weight",),
    },
    "hf": {
        "embed": ("model.embed_tokens.weight",),
        "final_norm": ("model.norm.weight",),
        "output": ("lm_head.weight",),
        "attn_norm": ("model.layers.{layer}.input_layernorm.weight",),
        "ffn_norm": ("model.layers.{layer}.post_attention_layernorm.weight",),
        "q": ("model.layers.{layer}.self_attn.q_proj.weight",),
        "k": ("model.layers.{layer}.self_attn.k_proj.weight",),
        "v": ("model.layers.{layer}.self_attn.v_proj.weight",),
        "o": ("model.layers.{layer}.self_attn.o_proj.weight",),
        "router": ("model.layers.{layer}.mlp.gate.weight", "model.layers.{layer}.block_sparse_moe.gate.weight"),
    },
}
LAYER_ROLES = ("attn_norm", "ffn_norm", "q", "k", "v", "o", "router")
PACKED_TYPES = {GGMLQuantizationType.Q4_0: "q4_0", GGMLQuantizationType.Q8_0: "q8_0"}
FLOAT_TYPES = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16,
               GGMLQuantizationType.F64)


def unpermute_llama_rows(rows: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's permute(w, n_heads) on the rows of a q or k projection.

    The converter reshapes rows as (head, 2, head_dim/2) and swaps the last two axes;
    this reshapes as (head, head_dim/2, 2) and swaps them back. Rows are whole (GGML
    blocks or floats), so the same code works on packed and float data.
    """
    n_rows = rows.shape[0]
    half = n_rows // n_heads // 2
    return np.ascontiguousarray(
        rows.reshape(n_heads, half, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)
    )


class Linear:
    """y = W x for a [rows, cols] weight matrix, either packed for the q4_0/q8_0 kernel or float32."""

    def __init__(self, name: str, rows: int, cols: int, dtype: str, data: np.ndarray) -> None:
        self.name = name
        self.rows = rows
        self.cols = cols
        self.dtype = dtype  # "q4_0", "q8_0" (data packed by quant.pack_ggml) or "f32" (data [rows, cols])
        self.data = data

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Return float32 [n, rows] for float32 x [n, cols]."""
        if self.dtype == "f32":
            return np.ascontiguousarray(x @ self.data.T, dtype=np.float32)
        out = np.empty((x.shape[0], self.rows), np.float32)
        for start in range(0, x.shape[0], kernels.MAX_TOKENS):
            part = np.ascontiguousarray(x[start : start + kernels.MAX_TOKENS], dtype=np.float32)
            out[start : start + part.shape[0]] = kernels.matvec(self.data, self.rows, self.cols, self.dtype, part)
        return out


@dataclasses.dataclass
class LayerWeights:
    attn_norm: np.ndarray
    ffn_norm: np.ndarray
    q: Linear
    k: Linear
    v: Linear
    o: Linear
    router: Linear


@dataclasses.dataclass
class DenseWeights:
    embed_type: GGMLQuantizationType
    embed_data: np.ndarray  # raw rows as stored: float32 [vocab, d_model] or GGML blocks [vocab, row_bytes]
    final_norm: np.ndarray
    output: Linear
    layers: list[LayerWeights]

    def embed(self, token_ids: np.ndarray) -> np.ndarray:
        """Return float32 [n, d_model] embedding rows of the given token ids."""
        rows = np.asarray(self.embed_data[token_ids])
        if self.embed_type == GGMLQuantizationType.F32:
            return np.array(rows, dtype=np.float32)
        return np.ascontiguousarray(quants.dequantize(rows, self.embed_type), dtype=np.float32)

    @property
    def nbytes(self) -> int:
        linears = [self.output] + [getattr(layer, role) for layer in self.layers for role in ("q", "k", "v", "o", "router")]
        return int(self.embed_data.nbytes) + sum(linear.nbytes for linear in linears)


def _to_float32(tensor) -> np.ndarray:
    """Return a tensor's values as float32, in numpy order (row length last)."""
    kind = tensor.tensor_type
    shape = tuple(int(d) for d in reversed(tensor.shape))
    if kind == GGMLQuantizationType.F64:
        return np.asarray(tensor.data, dtype=np.float32).reshape(shape)
    try:
        values = quants.dequantize(np.asarray(tensor.data), kind)
    except NotImplementedError:
        raise ModelError(f"dense tensor {tensor.name} has GGML type {kind.name}, which gguf cannot dequantize") from None
    return np.ascontiguousarray(values, dtype=np.float32).reshape(shape)


class _Loader:
    def __init__(self, store: Store, config: ModelConfig) -> None:
        self.config = config
        self.reader = store.open_dense()
        self.tensors = {t.name: t for t in self.reader.tensors}
        self.names = TENSOR_NAMES[config.naming]
        self.used: set[str] = set()
        self.where = str(store.dense_path)

    def find(self, role: str, layer: int | None = None, required: bool = True):
        for pattern in self.names[role]:
            name = pattern.format(layer=layer)
            if name in self.tensors:
                self.used.add(name)
                return self.tensors[name]
        if required:
            name = self.names[role][0].format(layer=layer)
            raise ModelError(f"{self.where}: missing dense tensor {name}")
        return None

    def vector(self, role: str, layer: int | None, length: int) -> np.ndarray:
        tensor = self.find(role, layer)
        values = _to_float32(tensor).reshape(-1)
        if values.size != length:
            raise ModelError(f"{self.where}: tensor {tensor.name} has {values.size} values, expected {length}")
        return values

    def linear(self, role: str, layer: int | None, rows: int, cols: int, heads: int | None = None) -> Linear:
        tensor = self.find(role, layer)
        shape = tuple(int(d) for d in reversed(tensor.shape))
        if shape != (rows, cols):
            raise ModelError(f"{self.where}: tensor {tensor.name} has shape {list(shape)}, expected [{rows}, {cols}]")
        permuted = heads is not None and self.config.naming == "gguf"
        if tensor.tensor_type in PACKED_TYPES:
            dtype = PACKED_TYPES[tensor.tensor_type]
            blocks = np.asarray(tensor.data).reshape(rows, -1)
            if permuted:
                blocks = unpermute_llama_rows(blocks, heads)
            return Linear(tensor.name, rows, cols, dtype, quant.pack_ggml(blocks, rows, cols, dtype))
        if tensor.tensor_type not in FLOAT_TYPES:
            log.info("dense tensor dequantized at load name=%s type=%s", tensor.name, tensor.tensor_type.name)
        values = _to_float32(tensor)
        if permuted:
            values = unpermute_llama_rows(values, heads)
        return Linear(tensor.name, rows, cols, "f32", values)

    def load(self) -> DenseWeights:
        c = self.config
        q_rows, kv_rows = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
        layers = []
        for layer in range(c.n_layers):
            layers.append(LayerWeights(
                attn_norm=self.vector("attn_norm", layer, c.d_model),
                ffn_norm=self.vector("ffn_norm", layer, c.d_model),
                q=self.linear("q", layer, q_rows, c.d_model, heads=c.n_heads),
                k=self.linear("k", layer, kv_rows, c.d_model, heads=c.n_kv_heads),
                v=self.linear("v", layer, kv_rows, c.d_model),
                o=self.linear("o", layer, c.d_model, q_rows),
                router=self.linear("router", layer, c.n_experts, c.d_model),
            ))

        embed = self.find("embed")
        embed_shape = tuple(int(d) for d in reversed(embed.shape))
        if embed_shape != (c.vocab_size, c.d_model):
            raise ModelError(f"{self.where}: tensor {embed.name} has shape {list(embed_shape)}, "
                             f"expected [{c.vocab_size}, {c.d_model}]")
        embed_type = embed.tensor_type
        embed_data = np.asarray(embed.data).reshape(c.vocab_size, -1)
        if embed_type not in (GGMLQuantizationType.F32, *PACKED_TYPES) and embed_type in FLOAT_TYPES:
            embed_data, embed_type = _to_float32(embed), GGMLQuantizationType.F32

        if self.find("output", required=False) is not None:
            output = self.linear("output", None, c.vocab_size, c.d_model)
        else:
            log.info("no output head tensor; using the token embedding (tied weights)")
            output = self.linear("embed", None, c.vocab_size, c.d_model)
        final_norm = self.vector("final_norm", None, c.d_model)

        unused = sorted(set(self.tensors) - self.used)
        if unused:
            raise ModelError(
                f"{self.where}: dense tensor {unused[0]} ({len(unused)} unused in all) has no place in a Mixtral "
                f"block; the store's model is not an architecture this runtime can run"
            )
        return DenseWeights(embed_type, embed_data, final_norm, output, layers)


def load_dense(store: Store, config: ModelConfig) -> DenseWeights:
    """Load and check every dense tensor of the store; raise ModelError naming the first bad one."""
    return _Loader(store, config).load()
