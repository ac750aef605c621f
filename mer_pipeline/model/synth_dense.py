"""Random dense tensors for a synthetic store, so the whole model runs on synthetic weights.

The tensors follow llama.cpp's names and types for a Mixtral Q4_0 file: the embedding,
attention and output matrices in the store's dtype (q4_0, q8_0 or f32), the norms and
routers in F32. Matrices are normal with std 1/sqrt(row length), the scale of a freshly
initialised linear layer. Norm weights are 1 + N(0, 0.02), so RMSNorm keeps unit scale.
Every tensor is drawn from numpy's PCG64 seeded with (seed, tensor index), so a seed
gives the same file.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter

from mer_pipeline import quant
from mer_pipeline.store import DENSE_FILE_NAME

log = logging.getLogger(__name__)

ARCHITECTURE = "mixtral"
ROPE_THETA = 1e6
RMS_NORM_EPS = 1e-5
CONTEXT_LENGTH = 32768
BOS_TOKEN_ID = 1
EOS_TOKEN_ID = 2
NORM_STD = 0.02

__all__ = ["DENSE_FILE_NAME", "dense_model_fields", "write_dense_gguf"]


def dense_model_fields(config) -> dict[str, Any]:
    """Return the manifest's model fields beyond the expert shape, for a SynthConfig with full_model."""
    return {
        "architecture": ARCHITECTURE,
        "vocab_size": config.vocab_size,
        "n_heads": config.n_heads,
        "n_kv_heads": config.n_kv_heads,
        "head_dim": config.d_model // config.n_heads,
        "rope_theta": ROPE_THETA,
        "rms_norm_eps": RMS_NORM_EPS,
        "context_length": CONTEXT_LENGTH,
        "tie_word_embeddings": False,
        "bos_token_id": BOS_TOKEN_ID,
        "eos_token_id": EOS_TOKEN_ID,
    }


def _tensor_specs(config) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, numpy shape, kind) of every dense tensor; kind is "matrix", "router" or "norm"."""
    head_dim = config.d_model // config.n_heads
    q_rows, kv_rows = config.n_heads * head_dim, config.n_kv_heads * head_dim
    specs = [("token_embd.weight", (config.vocab_size, config.d_model), "matrix")]
    for layer in range(config.n_layers):
        prefix = f"blk.{layer}."
        specs += [
            (prefix + "attn_norm.weight", (config.d_model,), "norm"),
            (prefix + "attn_q.weight", (q_rows, config.d_model), "matrix"),
            (prefix + "attn_k.weight", (kv_rows, config.d_model), "matrix"),
            (prefix + "attn_v.weight", (kv_rows, config.d_model), "matrix"),
            (prefix + "attn_output.weight", (config.d_model, q_rows), "matrix"),
            (prefix + "ffn_norm.weight", (config.d_model,), "norm"),
            (prefix + "ffn_gate_inp.weight", (config.n_experts, config.d_model), "router"),
        ]
    specs += [("output_norm.weight", (config.d_model,), "norm"),
              ("output.weight", (config.vocab_size, config.d_model), "matrix")]
    return specs


def write_dense_gguf(path: Path, config) -> list[dict[str, Any]]:
    """Write dense.gguf for a SynthConfig; return the manifest's list of dense tensors."""
    writer = GGUFWriter(path, ARCHITECTURE)
    writer.add_string("mer.tensor_naming", "gguf")
    listed = []
    for index, (name, shape, kind) in enumerate(_tensor_specs(config)):
        rng = np.random.default_rng([config.seed, index])
        if kind == "norm":
            values = 1.0 + NORM_STD * rng.standard_normal(shape, dtype=np.float32)
        else:
            values = rng.standard_normal(shape, dtype=np.float32) / np.float32(np.sqrt(shape[-1]))
        if kind == "matrix" and config.dtype != "f32":
            ggml_type = quant.GGML_TYPES[config.dtype]
            writer.add_tensor(name, quant.quantize_ggml(values, config.dtype), raw_dtype=ggml_type)
        else:
            ggml_type = GGMLQuantizationType.F32
            writer.add_tensor(name, values.astype(np.float32))
        listed.append({"name": name, "type": ggml_type.name, "shape": list(shape)})
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    log.info("synthetic dense tensors written path=%s tensors=%d bytes=%d", path, len(listed), path.stat().st_size)
    return listed
