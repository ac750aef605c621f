"""Shared fixtures: the tiny Mixtral checkpoints and GGUF files written from them.

The GGUF writer here mimics llama.cpp's convert_hf_to_gguf.py for Mixtral: llama
architecture metadata, llama.cpp tensor names, and the rotary row permutation of
attn_q/attn_k, so that importer tests read files shaped like real llama.cpp output.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFWriter, quants
from safetensors.numpy import load_file

DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"
HF_TINY = DATA_DIR / "hf-mixtral-tiny"

# mixtral_layer0.safetensors has no config file; these values come from mixtral_layer0.json.
LAYER0_CONFIG = {
    "model_type": "mixtral",
    "num_hidden_layers": 1,
    "num_local_experts": 4,
    "num_experts_per_tok": 2,
    "hidden_size": 64,
    "intermediate_size": 128,
}


@pytest.fixture(scope="session")
def hf_tiny() -> Path:
    if not HF_TINY.is_dir():
        pytest.skip(f"reference data not found at {HF_TINY}; the tiny Mixtral checkpoints live in ../shared/data")
    return HF_TINY


@pytest.fixture(scope="session")
def fixtures(hf_tiny: Path) -> dict[str, dict[str, Any]]:
    """Each tiny checkpoint: its path, the config to import it with, and its tensors."""
    return {
        "full": {
            "path": hf_tiny / "full_mixtral.safetensors",
            "config_path": hf_tiny / "mixtral_tiny_config.json",
            "config": json.loads((hf_tiny / "mixtral_tiny_config.json").read_text()),
            "tensors": load_file(hf_tiny / "full_mixtral.safetensors"),
        },
        "classic": {
            "path": hf_tiny / "mixtral_classic.safetensors",
            "config_path": hf_tiny / "mixtral_classic_config.json",
            "config": json.loads((hf_tiny / "mixtral_classic_config.json").read_text()),
            "tensors": load_file(hf_tiny / "mixtral_classic.safetensors"),
        },
        "layer0": {
            "path": hf_tiny / "mixtral_layer0.safetensors",
            "config_path": None,
            "config": LAYER0_CONFIG,
            "tensors": load_file(hf_tiny / "mixtral_layer0.safetensors"),
        },
    }


def hf_experts(tensors: dict[str, np.ndarray], config: dict[str, Any]) -> dict[tuple[int, int], dict[str, np.ndarray]]:
    """Return {(layer, expert): {"gate", "up", "down"}} float32 matrices from HF tensors, either naming."""
    d_ff = config["intermediate_size"]
    experts = {}
    for layer in range(config["num_hidden_layers"]):
        packed = f"model.layers.{layer}.mlp.experts.gate_up_proj"
        for expert in range(config["num_local_experts"]):
            if packed in tensors:
                gate_up = tensors[packed][expert]
                down = tensors[f"model.layers.{layer}.mlp.experts.down_proj"][expert]
                experts[layer, expert] = {"gate": gate_up[:d_ff], "up": gate_up[d_ff:], "down": down}
            else:
                prefix = f"model.layers.{layer}.block_sparse_moe.experts.{expert}."
                experts[layer, expert] = {
                    "gate": tensors[prefix + "w1.weight"],
                    "up": tensors[prefix + "w3.weight"],
                    "down": tensors[prefix + "w2.weight"],
                }
    return experts


def llama_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py LlamaModel.permute: HF rotate-half rows -> GGML rope rows."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2)
            .reshape(weights.shape))


def _encode(array: np.ndarray, ggml_type: GGMLQuantizationType) -> np.ndarray:
    if ggml_type == GGMLQuantizationType.F32:
        return np.ascontiguousarray(array, dtype=np.float32)
    if ggml_type == GGMLQuantizationType.F16:
        return np.ascontiguousarray(array, dtype=np.float16)
    return quants.quantize(np.ascontiguousarray(array, dtype=np.float32), ggml_type)


def _add(writer: GGUFWriter, name: str, array: np.ndarray, ggml_type: GGMLQuantizationType) -> None:
    encoded = _encode(array, ggml_type)
    writer.add_tensor(name, encoded, raw_dtype=ggml_type if encoded.dtype == np.uint8 else None)


def _dense_gguf_name(name: str) -> str | None:
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    if name in fixed:
        return fixed[name]
    parts = name.split(".")
    if parts[:2] != ["model", "layers"]:
        return None
    layer, rest = parts[2], ".".join(parts[3:])
    mapped = {
        "input_layernorm.weight": "attn_norm.weight",
        "post_attention_layernorm.weight": "ffn_norm.weight",
        "self_attn.q_proj.weight": "attn_q.weight",
        "self_attn.k_proj.weight": "attn_k.weight",
        "self_attn.v_proj.weight": "attn_v.weight",
        "self_attn.o_proj.weight": "attn_output.weight",
        "mlp.gate.weight": "ffn_gate_inp.weight",
        "block_sparse_moe.gate.weight": "ffn_gate_inp.weight",
    }.get(rest)
    return None if mapped is None else f"blk.{layer}.{mapped}"


def write_llama_gguf(path: Path, tensors: dict[str, np.ndarray], config: dict[str, Any], *,
                     layout: str = "stacked", expert_type: GGMLQuantizationType = GGMLQuantizationType.F32,
                     skip: tuple[str, ...] = (), overrides: dict[str, int] | None = None,
                     extra: dict[str, np.ndarray] | None = None) -> Path:
    """Write a llama.cpp-style Mixtral GGUF from HF tensors.

    layout: "stacked" (ffn_*_exps), "per_expert" (ffn_gate.E) or "fused" (ffn_gate_up_exps).
    Attention and embedding matrices use expert_type too when it is a block type, as
    llama.cpp's quantizer does; norms and the router stay F32. `skip` drops tensors by
    GGUF name; `overrides` replaces integer metadata (key without the "llama." prefix);
    `extra` adds tensors as they are (their numpy dtype sets the GGML type).
    """
    n_layers = config["num_hidden_layers"]
    n_experts = config["num_local_experts"]
    n_heads = config.get("num_attention_heads")
    n_kv_heads = config.get("num_key_value_heads", n_heads)
    metadata = {
        "block_count": n_layers,
        "context_length": config.get("max_position_embeddings", 4096),
        "embedding_length": config["hidden_size"],
        "feed_forward_length": config["intermediate_size"],
        "expert_count": n_experts,
        "expert_used_count": config["num_experts_per_tok"],
        **(overrides or {}),
    }
    writer = GGUFWriter(path, "llama")
    for key, value in metadata.items():
        writer.add_uint32(f"llama.{key}", value)
    if n_heads:
        writer.add_head_count(n_heads)
        writer.add_head_count_kv(n_kv_heads)
        writer.add_rope_dimension_count(config.get("head_dim", config["hidden_size"] // n_heads))
    writer.add_rope_freq_base(config.get("rope_theta", 10000.0))
    writer.add_layer_norm_rms_eps(config.get("rms_norm_eps", 1e-5))
    if "vocab_size" in config:
        writer.add_vocab_size(config["vocab_size"])
        writer.add_tokenizer_model("llama")
        writer.add_token_list([f"<tok{i}>" for i in range(config["vocab_size"])])
        writer.add_bos_token_id(config.get("bos_token_id", 1))
        writer.add_eos_token_id(config.get("eos_token_id", 2))

    quantized_dense = expert_type not in (GGMLQuantizationType.F32, GGMLQuantizationType.F16)
    for name, array in tensors.items():
        gguf_name = _dense_gguf_name(name)
        if gguf_name is None or gguf_name in skip:
            continue
        if gguf_name.endswith("attn_q.weight"):
            array = llama_permute(array, n_heads)
        elif gguf_name.endswith("attn_k.weight"):
            array = llama_permute(array, n_kv_heads)
        two_d = array.ndim == 2 and "ffn_gate_inp" not in gguf_name
        _add(writer, gguf_name, array, expert_type if two_d and quantized_dense else GGMLQuantizationType.F32)

    experts = hf_experts(tensors, config)
    for layer in range(n_layers):
        stacks = {part: np.stack([experts[layer, e][part] for e in range(n_experts)]) for part in ("gate", "up", "down")}
        names: list[tuple[str, np.ndarray]]
        if layout == "stacked":
            names = [(f"blk.{layer}.ffn_{part}_exps.weight", stacks[part]) for part in ("gate", "up", "down")]
        elif layout == "fused":
            names = [(f"blk.{layer}.ffn_gate_up_exps.weight", np.concatenate([stacks["gate"], stacks["up"]], axis=1)),
                     (f"blk.{layer}.ffn_down_exps.weight", stacks["down"])]
        elif layout == "per_expert":
            names = [(f"blk.{layer}.ffn_{part}.{e}.weight", stacks[part][e])
                     for e in range(n_experts) for part in ("gate", "up", "down")]
        else:
            raise ValueError(f"unknown layout {layout!r}")
        for name, array in names:
            if name not in skip:
                _add(writer, name, array, expert_type)

    for name, array in (extra or {}).items():
        writer.add_tensor(name, array)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="session")
def gguf_writer() -> Callable[..., Path]:
    return write_llama_gguf


@pytest.fixture(scope="session")
def expert_reference() -> Callable[..., dict[tuple[int, int], dict[str, np.ndarray]]]:
    return hf_experts
