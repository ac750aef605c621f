"""Importing the tiny Mixtral checkpoints, as safetensors and as GGUF files written from them."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import struct

import numpy as np
import pytest
from gguf import GGMLQuantizationType as GGMLType
from gguf import GGUFReader, quants

from mer_pipeline import quant
from mer_pipeline.importers import import_checkpoint
from mer_pipeline.store import verify_store

GGML_OF_DTYPE = {"q4_0": GGMLType.Q4_0, "q8_0": GGMLType.Q8_0}
PARTS = ("gate", "up", "down")


def expected_weights(source: np.ndarray, dtype: str) -> np.ndarray:
    """What the store must hold for a float source matrix: itself for f32, else gguf's round trip."""
    if dtype == "f32":
        return source.astype(np.float32)
    blocks = quants.quantize(source.astype(np.float32), GGML_OF_DTYPE[dtype])
    return quants.dequantize(blocks, GGML_OF_DTYPE[dtype])


def import_fixture(fixture, out, dtype):
    return import_checkpoint(fixture["path"], out, dtype=dtype, config=fixture["config_path"],
                             top_k=None if fixture["config_path"] else 2)


def assert_experts_match(store, reference, transform):
    for (layer, expert), parts in reference.items():
        stored = store.expert_weights(store.expert_id(layer, expert))
        for part in PARTS:
            assert np.array_equal(stored[part], transform(parts[part])), (layer, expert, part)


# --- safetensors sources -------------------------------------------------------------------


@pytest.mark.parametrize("name", ["full", "classic", "layer0"])
@pytest.mark.parametrize("dtype", ["f32", "q8_0", "q4_0"])
def test_hf_import_matches_source(fixtures, expert_reference, tmp_path, name, dtype):
    fixture = fixtures[name]
    store = import_fixture(fixture, tmp_path / "store", dtype)
    reference = expert_reference(fixture["tensors"], fixture["config"])
    assert store.shape.n_experts == fixture["config"]["num_local_experts"]
    assert store.shape.n_layers == fixture["config"]["num_hidden_layers"]
    assert store.dtype == dtype
    assert_experts_match(store, reference, lambda w: expected_weights(w, dtype))
    assert verify_store(store).ok


def test_hf_manifest_records_config_and_source(fixtures, tmp_path):
    fixture = fixtures["full"]
    store = import_fixture(fixture, tmp_path / "store", "q4_0")
    model = store.model
    assert model["vocab_size"] == 48
    assert model["n_heads"] == 4
    assert model["n_kv_heads"] == 4
    assert model["head_dim"] == 8
    assert model["rope_theta"] == 10000.0
    assert model["rms_norm_eps"] == 1e-5
    assert model["context_length"] == 64
    assert model["tie_word_embeddings"] is False
    assert model["top_k"] == 2
    source = store.source
    raw = fixture["path"].read_bytes()
    assert source["kind"] == "safetensors"
    assert source["sha256"] == hashlib.sha256(raw).hexdigest()
    assert source["size"] == len(raw)
    assert store.manifest["dense"]["naming"] == "hf"


@pytest.mark.parametrize("name", ["full", "classic", "layer0"])
def test_hf_dense_tensors_unchanged(fixtures, tmp_path, name):
    fixture = fixtures[name]
    store = import_fixture(fixture, tmp_path / "store", "q4_0")
    reader = store.open_dense()
    dense = {t.name: t for t in reader.tensors}
    expert_names = [n for n in fixture["tensors"] if ".experts." in n]
    expected_names = sorted(set(fixture["tensors"]) - set(expert_names))
    assert sorted(dense) == expected_names
    for name_, array in fixture["tensors"].items():
        if name_ in dense:
            assert dense[name_].tensor_type == GGMLType.F32
            assert np.array_equal(np.asarray(dense[name_].data), array), name_
    assert reader.get_field("mer.tensor_naming").contents() == "hf"
    assert [t["name"] for t in store.manifest["dense"]["tensors"]] == [t.name for t in reader.tensors]


def test_hf_sharded_directory(fixtures, tmp_path):
    from safetensors.numpy import save_file

    fixture = fixtures["full"]
    names = sorted(fixture["tensors"])
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2 :]}
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    for shard, shard_names in shards.items():
        save_file({n: fixture["tensors"][n] for n in shard_names}, checkpoint / shard)
    weight_map = {n: shard for shard, shard_names in shards.items() for n in shard_names}
    (checkpoint / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    shutil.copy(fixture["config_path"], checkpoint / "config.json")

    sharded = import_checkpoint(checkpoint, tmp_path / "sharded", dtype="q8_0")
    single = import_fixture(fixture, tmp_path / "single", "q8_0")
    assert [e.checksum for e in sharded.experts] == [e.checksum for e in single.experts]
    assert len(sharded.source["files"]) == 2
    assert sharded.model["vocab_size"] == 48


def write_bf16_safetensors(path, tensors):
    """safetensors.numpy cannot write bfloat16, so build the file from its header format."""
    header, blobs, offset = {}, [], 0
    for name, array in tensors.items():
        bits = quants.quantize(array.astype(np.float32), GGMLType.BF16).tobytes()
        header[name] = {"dtype": "BF16", "shape": list(array.shape), "data_offsets": [offset, offset + len(bits)]}
        blobs.append(bits)
        offset += len(bits)
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + b"".join(blobs))


def test_hf_bf16_source(fixtures, expert_reference, tmp_path):
    fixture = fixtures["layer0"]
    source = tmp_path / "bf16.safetensors"
    write_bf16_safetensors(source, fixture["tensors"])
    store = import_checkpoint(source, tmp_path / "store", dtype="f32", top_k=2)

    def bf16_round_trip(w):
        return quants.dequantize(quants.quantize(w.astype(np.float32), GGMLType.BF16), GGMLType.BF16)

    assert_experts_match(store, expert_reference(fixture["tensors"], fixture["config"]), bf16_round_trip)
    router = {t.name: t for t in store.open_dense().tensors}["model.layers.0.mlp.gate.weight"]
    assert router.tensor_type == GGMLType.BF16
    assert np.array_equal(np.asarray(router.data).view(np.uint16),
                          quants.quantize(fixture["tensors"]["model.layers.0.mlp.gate.weight"], GGMLType.BF16)
                          .view(np.uint16))


# --- GGUF sources --------------------------------------------------------------------------

GGUF_CASES = [
    # (fixture, layout, source type, store dtype)
    ("full", "stacked", GGMLType.F32, "f32"),
    ("full", "fused", GGMLType.F16, "f32"),
    ("full", "per_expert", GGMLType.Q8_0, "q8_0"),
    ("classic", "stacked", GGMLType.Q4_0, "q4_0"),
    ("classic", "fused", GGMLType.Q8_0, "q8_0"),
    ("classic", "per_expert", GGMLType.F32, "q4_0"),
    ("layer0", "stacked", GGMLType.Q4_0, "q4_0"),
    ("layer0", "fused", GGMLType.Q4_0, "q4_0"),
    ("layer0", "per_expert", GGMLType.F16, "q8_0"),
    ("layer0", "stacked", GGMLType.BF16, "f32"),
    ("classic", "fused", GGMLType.BF16, "q4_0"),
]


def gguf_expected(source: np.ndarray, source_type: GGMLType, dtype: str) -> np.ndarray:
    """Float weights the store must hold for a GGUF tensor written from `source`."""
    if source_type == GGMLType.F16:
        source = source.astype(np.float16).astype(np.float32)
    elif source_type in (GGMLType.Q4_0, GGMLType.Q8_0, GGMLType.BF16):
        source = quants.dequantize(quants.quantize(source, source_type), source_type)
    return expected_weights(source, dtype)


@pytest.mark.parametrize(("name", "layout", "source_type", "dtype"), GGUF_CASES)
def test_gguf_import_matches_source(fixtures, expert_reference, gguf_writer, tmp_path, name, layout, source_type,
                                    dtype):
    fixture = fixtures[name]
    path = gguf_writer(tmp_path / "model.gguf", fixture["tensors"], fixture["config"], layout=layout,
                       expert_type=source_type)
    store = import_checkpoint(path, tmp_path / "store", dtype=dtype)
    reference = expert_reference(fixture["tensors"], fixture["config"])
    assert_experts_match(store, reference, lambda w: gguf_expected(w, source_type, dtype))
    assert store.source["kind"] == "gguf"
    assert store.source["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert store.manifest["dense"]["naming"] == "gguf"
    assert store.model["architecture"] == "llama"
    assert store.model["top_k"] == 2


@pytest.mark.parametrize("layout", ["stacked", "fused", "per_expert"])
@pytest.mark.parametrize("dtype", ["q4_0", "q8_0"])
def test_gguf_blocks_repack_bit_exact(fixtures, gguf_writer, tmp_path, layout, dtype):
    fixture = fixtures["full"]
    path = gguf_writer(tmp_path / "model.gguf", fixture["tensors"], fixture["config"], layout=layout,
                       expert_type=GGML_OF_DTYPE[dtype])
    store = import_checkpoint(path, tmp_path / "store", dtype=dtype)
    tensors = {t.name: np.asarray(t.data) for t in GGUFReader(path).tensors}
    d_ff = fixture["config"]["intermediate_size"]
    for layer in range(2):
        for expert in range(4):
            region = store.read_expert(store.expert_id(layer, expert))
            if layout == "stacked":
                source = {p: tensors[f"blk.{layer}.ffn_{p}_exps.weight"][expert] for p in PARTS}
            elif layout == "fused":
                gate_up = tensors[f"blk.{layer}.ffn_gate_up_exps.weight"][expert]
                source = {"gate": gate_up[:d_ff], "up": gate_up[d_ff:],
                          "down": tensors[f"blk.{layer}.ffn_down_exps.weight"][expert]}
            else:
                source = {p: tensors[f"blk.{layer}.ffn_{p}.{expert}.weight"] for p in PARTS}
            for section in store.layout.sections:
                blocks = quant.unpack_ggml(region[section.offset : section.offset + section.nbytes],
                                           section.rows, section.cols, dtype)
                assert np.array_equal(blocks, source[section.name]), (layer, expert, section.name)


def test_gguf_dense_tensors_and_metadata_unchanged(fixtures, gguf_writer, tmp_path):
    fixture = fixtures["full"]
    path = gguf_writer(tmp_path / "model.gguf", fixture["tensors"], fixture["config"], expert_type=GGMLType.Q4_0)
    store = import_checkpoint(path, tmp_path / "store", dtype="q4_0")
    source = GGUFReader(path)
    dense = {t.name: t for t in store.open_dense().tensors}
    expected = [t for t in source.tensors if "_exps" not in t.name]
    assert sorted(dense) == sorted(t.name for t in expected)
    assert "blk.0.attn_q.weight" in dense
    assert "blk.1.ffn_gate_inp.weight" in dense
    for tensor in expected:
        stored = dense[tensor.name]
        assert stored.tensor_type == tensor.tensor_type, tensor.name
        assert stored.shape.tolist() == tensor.shape.tolist(), tensor.name
        assert np.asarray(stored.data).tobytes() == np.asarray(tensor.data).tobytes(), tensor.name
    assert dense["blk.0.attn_q.weight"].tensor_type == GGMLType.Q4_0
    metadata = store.open_dense()
    assert metadata.get_field("llama.expert_count").contents() == 4
    assert metadata.get_field("general.architecture").contents() == "llama"
    assert metadata.get_field("tokenizer.ggml.tokens").contents()[:2] == ["<tok0>", "<tok1>"]
    assert metadata.get_field("mer.tensor_naming").contents() == "gguf"
    model = store.model
    assert model["vocab_size"] == 48
    assert model["n_kv_heads"] == 4
    assert model["rms_norm_eps"] == 1e-5
    assert model["rope_theta"] == 10000.0
    assert model["context_length"] == 64
    assert model["eos_token_id"] == 20


def test_gguf_q_rows_are_llama_permuted(fixtures, gguf_writer, tmp_path):
    from conftest import llama_permute

    fixture = fixtures["full"]
    path = gguf_writer(tmp_path / "model.gguf", fixture["tensors"], fixture["config"])
    store = import_checkpoint(path, tmp_path / "store", dtype="f32")
    dense = {t.name: np.asarray(t.data) for t in store.open_dense().tensors}
    q_hf = fixture["tensors"]["model.layers.0.self_attn.q_proj.weight"]
    assert np.array_equal(dense["blk.0.attn_q.weight"], llama_permute(q_hf, 4))
    assert not np.array_equal(dense["blk.0.attn_q.weight"], q_hf)


def test_gguf_q8_0_requantized_to_q4_0(fixtures, expert_reference, gguf_writer, tmp_path, caplog):
    fixture = fixtures["full"]
    path = gguf_writer(tmp_path / "model.gguf", fixture["tensors"], fixture["config"], expert_type=GGMLType.Q8_0)
    with caplog.at_level(logging.WARNING, logger="mer_pipeline.importers"):
        store = import_checkpoint(path, tmp_path / "store", dtype="q4_0")
    assert "type Q8_0 are dequantized and requantized to q4_0" in caplog.text

    def round_trips(w):
        q8 = quants.dequantize(quants.quantize(w, GGMLType.Q8_0), GGMLType.Q8_0)
        return expected_weights(q8, "q4_0")

    assert_experts_match(store, expert_reference(fixture["tensors"], fixture["config"]), round_trips)


def test_gguf_other_block_type_requantized(fixtures, expert_reference, gguf_writer, tmp_path, caplog):
    fixture = fixtures["classic"]
    path = gguf_writer(tmp_path / "model.gguf", fixture["tensors"], fixture["config"], expert_type=GGMLType.Q5_1)
    with caplog.at_level(logging.WARNING, logger="mer_pipeline.importers"):
        store = import_checkpoint(path, tmp_path / "store", dtype="q8_0")
    assert "type Q5_1 are dequantized and requantized to q8_0" in caplog.text

    def round_trips(w):
        q5 = quants.dequantize(quants.quantize(w, GGMLType.Q5_1), GGMLType.Q5_1)
        return expected_weights(q5, "q8_0")

    assert_experts_match(store, expert_reference(fixture["tensors"], fixture["config"]), round_trips)


# --- compute checks ------------------------------------------------------------------------


def swiglu_f64(parts: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    gate, up, down = (parts[p].astype(np.float64) for p in PARTS)
    x = x.astype(np.float64)
    g = x @ gate.T
    return ((g / (1.0 + np.exp(-g))) * (x @ up.T)) @ down.T


@pytest.mark.parametrize("dtype", ["f32", "q8_0", "q4_0"])
@pytest.mark.parametrize("name", ["full", "classic", "layer0"])
def test_kernel_on_imported_experts(fixtures, expert_reference, tmp_path, name, dtype):
    kernels = pytest.importorskip("mer_pipeline.kernels")
    fixture = fixtures[name]
    store = import_fixture(fixture, tmp_path / "store", dtype)
    reference = expert_reference(fixture["tensors"], fixture["config"])
    x = np.random.default_rng(0).standard_normal((3, store.shape.d_model)).astype(np.float32)
    for (layer, expert), parts in reference.items():
        expert_id = store.expert_id(layer, expert)
        weights = parts if dtype == "f32" else store.expert_weights(expert_id)
        expected = swiglu_f64(weights, x)
        got = kernels.swiglu(store.read_expert(expert_id), store.layout, x)
        error = np.abs(got - expected).max() / np.abs(expected).max()
        assert error <= 1e-5, (layer, expert, error)


def moe_block(store, router: np.ndarray, x: np.ndarray, layer: int = 0) -> np.ndarray:
    """float64 Mixtral MoE: softmax over all experts, top-k, renormalise, weighted sum of experts."""
    logits = router.astype(np.float64) @ x.astype(np.float64)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    top = np.argsort(-probs, kind="stable")[: store.shape.top_k]
    weights = probs[top] / probs[top].sum()
    out = np.zeros(store.shape.d_model)
    for weight, expert in zip(weights, top):
        out += weight * swiglu_f64(store.expert_weights(store.expert_id(layer, int(expert))), x[None, :])[0]
    return out


@pytest.mark.parametrize("via", ["safetensors", "gguf"])
def test_moe_block_matches_hf_reference(fixtures, gguf_writer, hf_tiny, tmp_path, via):
    fixture = fixtures["layer0"]
    reference = json.loads((hf_tiny / "mixtral_layer0.json").read_text())
    if via == "gguf":
        path = gguf_writer(tmp_path / "layer0.gguf", fixture["tensors"], fixture["config"])
        store = import_checkpoint(path, tmp_path / "store", dtype="f32")
        router_name = "blk.0.ffn_gate_inp.weight"
    else:
        store = import_fixture(fixture, tmp_path / "store", "f32")
        router_name = "model.layers.0.mlp.gate.weight"
    router = np.asarray({t.name: t for t in store.open_dense().tensors}[router_name].data)
    out = moe_block(store, router, np.asarray(reference["input"], dtype=np.float32))
    hf_ref = np.asarray(reference["hf_ref"])
    assert np.abs(out - hf_ref).max() <= 1e-4 * max(1.0, np.abs(hf_ref).max())


def test_cli_import_and_info(fixtures, gguf_writer, tmp_path):
    from typer.testing import CliRunner

    from mer_pipeline.cli_store import app

    fixture = fixtures["classic"]
    path = gguf_writer(tmp_path / "model.gguf", fixture["tensors"], fixture["config"], layout="per_expert",
                       expert_type=GGMLType.Q8_0)
    out = tmp_path / "store"
    runner = CliRunner()
    result = runner.invoke(app, ["import", str(path), str(out), "--dtype", "q8_0"])
    assert result.exit_code == 0, result.output
    info = runner.invoke(app, ["info", str(out), "--json"])
    summary = json.loads(info.stdout)
    assert summary["source"]["kind"] == "gguf"
    assert summary["dense"]["naming"] == "gguf"
    assert summary["dense"]["tensors"] == 17
    assert summary["experts"] == 8
    assert runner.invoke(app, ["verify", str(out)]).exit_code == 0
