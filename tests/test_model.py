"""The whole-model forward pass against Hugging Face logits and an independent float64 reference."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import hf_experts
from safetensors.numpy import load_file, save_file

from mer_pipeline.importers import import_checkpoint
from mer_pipeline.model import LocalExperts, ModelError, load_model
from mer_pipeline.model.transformer import route
from mer_pipeline.synth import SynthConfig, write_synth_store

TOLERANCE = 1e-4


def reference_logits(tensors: dict[str, np.ndarray], config: dict, ids: list[int]) -> np.ndarray:
    """A float64 Mixtral forward pass over the whole sequence, written from the Hugging Face
    modeling code's equations and sharing no code with mer_pipeline.model."""
    n_heads = config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads", n_heads)
    head_dim = config.get("head_dim") or config["hidden_size"] // n_heads
    eps = config.get("rms_norm_eps", 1e-5)
    top_k = config["num_experts_per_tok"]
    experts = hf_experts(tensors, config)

    def weight(name):
        return tensors[name].astype(np.float64)

    def norm(x, w):
        return w * x / np.sqrt((x * x).mean(-1, keepdims=True) + eps)

    n = len(ids)
    inv_freq = 1.0 / config.get("rope_theta", 1e6) ** (np.arange(0, head_dim, 2) / head_dim)
    angles = np.outer(np.arange(n), inv_freq)
    cos, sin = np.cos(np.hstack([angles, angles])), np.sin(np.hstack([angles, angles]))

    def rope(x):
        half = head_dim // 2
        return x * cos[:, None] + np.concatenate([-x[..., half:], x[..., :half]], -1) * sin[:, None]

    h = weight("model.embed_tokens.weight")[ids]
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        x = norm(h, weight(p + "input_layernorm.weight"))
        q = rope((x @ weight(p + "self_attn.q_proj.weight").T).reshape(n, n_heads, head_dim))
        k = rope((x @ weight(p + "self_attn.k_proj.weight").T).reshape(n, n_kv, head_dim))
        v = (x @ weight(p + "self_attn.v_proj.weight").T).reshape(n, n_kv, head_dim)
        attn = np.zeros((n, n_heads, head_dim))
        for head in range(n_heads):
            kv = head // (n_heads // n_kv)
            scores = q[:, head] @ k[:, kv].T / np.sqrt(head_dim)
            scores[np.triu_indices(n, 1)] = -np.inf
            probs = np.exp(scores - scores.max(-1, keepdims=True))
            attn[:, head] = (probs / probs.sum(-1, keepdims=True)) @ v[:, kv]
        h = h + attn.reshape(n, -1) @ weight(p + "self_attn.o_proj.weight").T

        x = norm(h, weight(p + "post_attention_layernorm.weight"))
        router = p + ("mlp.gate.weight" if p + "mlp.gate.weight" in tensors else "block_sparse_moe.gate.weight")
        logits = x @ weight(router).T
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        for t in range(n):
            chosen = np.argsort(-probs[t])[:top_k]
            for e in chosen:
                w = {part: m.astype(np.float64) for part, m in experts[layer, int(e)].items()}
                g = w["gate"] @ x[t]
                h[t] += probs[t, e] / probs[t, chosen].sum() * (w["down"] @ (g / (1 + np.exp(-g)) * (w["up"] @ x[t])))
    return norm(h, weight("model.norm.weight")) @ weight("lm_head.weight").T


def local_logits(store, ids: list[int], **options) -> np.ndarray:
    model = load_model(store, LocalExperts(store), **options)
    return model.forward(ids, model.new_cache(len(ids)))


@pytest.fixture(scope="module")
def full_reference(hf_tiny):
    reference = json.loads((hf_tiny / "full_mixtral.json").read_text())
    return reference["input_ids"], np.array(reference["hf_logits"]).reshape(len(reference["input_ids"]), -1)


@pytest.fixture(scope="module")
def full_f32(fixtures, tmp_path_factory):
    fixture = fixtures["full"]
    return import_checkpoint(fixture["path"], tmp_path_factory.mktemp("full") / "s", dtype="f32",
                             config=fixture["config_path"])


def test_hf_logits_match(full_f32, full_reference):
    ids, hf_logits = full_reference
    logits = local_logits(full_f32, ids)
    assert logits.shape == hf_logits.shape
    assert np.abs(logits - hf_logits).max() < TOLERANCE


def test_gguf_import_gives_same_logits(fixtures, gguf_writer, full_f32, full_reference, tmp_path):
    ids, hf_logits = full_reference
    fixture = fixtures["full"]
    source = gguf_writer(tmp_path / "full.gguf", fixture["tensors"], fixture["config"])
    store = import_checkpoint(source, tmp_path / "store", dtype="f32")
    assert store.manifest["dense"]["naming"] == "gguf"
    logits = local_logits(store, ids)
    assert np.abs(logits - hf_logits).max() < TOLERANCE
    assert np.array_equal(logits, local_logits(full_f32, ids))


def test_chunked_prefill_and_decode_agree(full_f32, full_reference):
    ids, hf_logits = full_reference
    model = load_model(full_f32, LocalExperts(full_f32), chunk_tokens=2)
    cache = model.new_cache(len(ids))
    chunked = model.forward(ids[:3], cache)
    stepped = [model.forward([token], cache) for token in ids[3:]]
    logits = np.concatenate([chunked, *stepped])
    assert np.abs(logits - hf_logits).max() < TOLERANCE


def test_classic_matches_float64_reference(fixtures, tmp_path):
    fixture = fixtures["classic"]
    store = import_checkpoint(fixture["path"], tmp_path / "store", dtype="f32", config=fixture["config_path"])
    ids = [3, 17, 4, 40, 22, 9, 31]
    expected = reference_logits(fixture["tensors"], fixture["config"], ids)
    assert np.abs(local_logits(store, ids) - expected).max() < TOLERANCE


GQA_CONFIG = {
    "model_type": "mixtral", "vocab_size": 40, "hidden_size": 64, "intermediate_size": 96,
    "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 8,
    "max_position_embeddings": 32, "num_local_experts": 4, "num_experts_per_tok": 2,
    "rope_theta": 10000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
}


@pytest.fixture(scope="module")
def gqa_checkpoint(tmp_path_factory):
    """A random Mixtral with 8 query heads sharing 2 KV heads, in the packed HF naming."""
    c = GQA_CONFIG
    rng = np.random.default_rng(11)
    d, f, e = c["hidden_size"], c["intermediate_size"], c["num_local_experts"]
    q_rows, kv_rows = c["num_attention_heads"] * c["head_dim"], c["num_key_value_heads"] * c["head_dim"]

    def normal(*shape):
        return (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)

    tensors = {"model.embed_tokens.weight": rng.standard_normal((c["vocab_size"], d)).astype(np.float32),
               "model.norm.weight": (1 + 0.1 * rng.standard_normal(d)).astype(np.float32),
               "lm_head.weight": normal(c["vocab_size"], d)}
    for layer in range(c["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        tensors.update({
            p + "input_layernorm.weight": (1 + 0.1 * rng.standard_normal(d)).astype(np.float32),
            p + "post_attention_layernorm.weight": (1 + 0.1 * rng.standard_normal(d)).astype(np.float32),
            p + "self_attn.q_proj.weight": normal(q_rows, d),
            p + "self_attn.k_proj.weight": normal(kv_rows, d),
            p + "self_attn.v_proj.weight": normal(kv_rows, d),
            p + "self_attn.o_proj.weight": normal(d, q_rows),
            p + "mlp.gate.weight": normal(e, d),
            p + "mlp.experts.gate_up_proj": normal(e, 2 * f, d),
            p + "mlp.experts.down_proj": normal(e, d, f),
        })
    folder = tmp_path_factory.mktemp("gqa")
    save_file(tensors, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(c))
    return folder, tensors


def test_gqa_matches_float64_reference(gqa_checkpoint, gguf_writer, tmp_path):
    folder, tensors = gqa_checkpoint
    ids = [1, 7, 39, 2, 2, 18, 25, 0, 11]
    expected = reference_logits(tensors, GQA_CONFIG, ids)
    hf_store = import_checkpoint(folder / "model.safetensors", tmp_path / "hf", dtype="f32")
    assert hf_store.model["n_kv_heads"] == 2
    logits = local_logits(hf_store, ids)
    assert np.abs(logits - expected).max() < TOLERANCE

    # GGUF permutes attn_k with the KV head count, not the query head count.
    gguf_store = import_checkpoint(gguf_writer(tmp_path / "gqa.gguf", tensors, GQA_CONFIG), tmp_path / "gguf", dtype="f32")
    assert np.array_equal(local_logits(gguf_store, ids), logits)


def test_q4_0_experts_stay_close(fixtures, hf_tiny, full_reference, tmp_path):
    ids, hf_logits = full_reference
    fixture = fixtures["full"]
    store = import_checkpoint(fixture["path"], tmp_path / "q4", dtype="q4_0", config=fixture["config_path"])
    error = float(np.abs(local_logits(store, ids) - hf_logits).max())
    print(f"q4_0 experts: max abs logit error {error:.2e} against the float64 Hugging Face logits")
    assert error < 0.05

    generation = json.loads((hf_tiny / "full_mixtral_gen.json").read_text())
    model = load_model(store, LocalExperts(store))
    cache = model.new_cache(16)
    logits = model.forward(generation["prompt_ids"], cache)[-1]
    tokens = []
    for _ in generation["generated_ids"]:
        tokens.append(int(np.argmax(logits)))
        logits = model.forward([tokens[-1]], cache)[-1]
    assert tokens == generation["generated_ids"]


def test_route_renormalises_top_k():
    logits = np.array([[0.0, 2.0, 1.0, 2.0]], np.float32)
    experts, weights = route(logits, 2)
    assert experts.tolist() == [[1, 3]]
    assert np.allclose(weights, [[0.5, 0.5]])


# --- bad input ------------------------------------------------------------------------------


def test_token_outside_vocabulary_rejected(full_f32):
    model = load_model(full_f32, LocalExperts(full_f32))
    with pytest.raises(ModelError, match="token id 48 at position 1 is outside the vocabulary 0..47"):
        model.forward([1, 48], model.new_cache(4))


def test_prompt_longer_than_context_rejected(full_f32):
    from mer_pipeline.generate import generate

    model = load_model(full_f32, LocalExperts(full_f32))
    with pytest.raises(ModelError, match="the prompt has 65 tokens, longer than the context of 64"):
        generate(model, [1] * 65, 1)


def test_store_without_dense_tensors_rejected(tmp_path):
    store = write_synth_store(tmp_path / "s", SynthConfig(n_layers=1, n_experts=2, top_k=1, d_model=32, d_ff=32))
    with pytest.raises(ModelError, match="has no dense tensors"):
        load_model(store, LocalExperts(store))


def test_unsupported_architecture_rejected(full_f32, tmp_path):
    from mer_pipeline.store import open_store

    copy = tmp_path / "copy"
    shutil.copytree(full_f32.path, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["model"]["architecture"] = "qwen2_moe"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    store = open_store(copy)
    with pytest.raises(ModelError, match="architecture 'qwen2_moe' is not supported"):
        load_model(store, LocalExperts(store))


def test_unknown_dense_tensor_rejected(fixtures, gguf_writer, tmp_path):
    fixture = fixtures["full"]
    extra = {"blk.0.attn_q.bias": np.zeros(32, np.float32)}
    source = gguf_writer(tmp_path / "bias.gguf", fixture["tensors"], fixture["config"], extra=extra)
    store = import_checkpoint(source, tmp_path / "store", dtype="f32")
    with pytest.raises(ModelError, match="blk.0.attn_q.bias"):
        load_model(store, LocalExperts(store))


def test_synthetic_full_model_runs(tmp_path):
    config = SynthConfig(n_layers=2, n_experts=4, top_k=2, d_model=64, d_ff=64, dtype="q4_0", seed=3,
                         full_model=True, vocab_size=96, n_heads=4, n_kv_heads=2)
    store = write_synth_store(tmp_path / "s", config)
    assert store.model["n_kv_heads"] == 2
    logits = local_logits(store, [1, 2, 3])
    again = local_logits(write_synth_store(tmp_path / "t", config), [1, 2, 3])
    assert logits.shape == (3, 96)
    assert np.isfinite(logits).all()
    assert np.array_equal(logits, again)
