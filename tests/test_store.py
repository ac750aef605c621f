"""Store layout, the numba quantizer against gguf, synthetic stores, verify and the writer."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from mer_pipeline import quant
from mer_pipeline.cli_store import app
from mer_pipeline.store import DATA_FILE_NAME, StoreError, open_store, verify_store
from mer_pipeline.store_writer import StoreWriteError, StoreWriter, new_region, quantize_pack
from mer_pipeline.synth import SynthConfig, expert_weights, synth_matrix, write_synth_store

runner = CliRunner()
SMALL = SynthConfig(n_layers=2, n_experts=4, top_k=2, d_model=64, d_ff=96, dtype="q4_0", seed=7)


def gguf_packed(weights: np.ndarray, dtype: str) -> np.ndarray:
    rows, cols = weights.shape
    return quant.pack_ggml(quant.quantize_ggml(weights, dtype), rows, cols, dtype)


# --- layout --------------------------------------------------------------------------------


def test_mixtral_q4_0_expert_size():
    layout = quant.expert_layout(4096, 14336, "q4_0")
    ggml_bytes = 3 * 14336 * (4096 // 32) * 18  # the same expert as three GGUF q4_0 tensors
    assert ggml_bytes == 99_090_432
    assert layout.region_bytes <= 1.01 * ggml_bytes
    assert layout.region_bytes % 4096 == 0


# --- quantize_pack against gguf ------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["q4_0", "q8_0", "f32"])
@pytest.mark.parametrize("rows", [1, 7, 8, 13, 64])
def test_quantize_pack_matches_gguf(dtype, rows):
    rng = np.random.default_rng(rows)
    weights = rng.normal(size=(rows, 96)).astype(np.float32)
    assert np.array_equal(quantize_pack(weights, dtype), gguf_packed(weights, dtype))


@pytest.mark.parametrize("dtype", ["q4_0", "q8_0"])
def test_quantize_pack_edge_blocks(dtype):
    weights = np.random.default_rng(1).normal(size=(9, 64)).astype(np.float32)
    weights[0, :32] = 0.0                               # zero block, +0.0 scale
    weights[1, :32] = -0.0                              # zero block whose first weight is -0.0
    weights[2, :32] = 0.0
    weights[2, 0] = -0.0
    weights[3, :32] = 1.0                               # ties of magnitude: the first one sets the sign
    weights[3, 7] = -1.0
    weights[4, :32] = -1.0
    weights[4, 3] = 1.0
    weights[5, :32] = 6.5e4                             # scale near the float16 maximum
    weights[6, :32] = np.linspace(-1, 1, 32) * 1e-6     # scale in float16's subnormal range
    weights[7, 32:] = np.arange(32) - 16.0              # values exactly on rounding boundaries
    weights[8, :32] = np.float32(0.5) + np.arange(32, dtype=np.float32) * 0.25
    ours = quantize_pack(weights, dtype)
    reference = gguf_packed(weights, dtype)
    assert np.array_equal(ours, reference)
    if dtype == "q4_0":
        # q4_0's scale is (first weight of largest magnitude) / -8, so +0.0 gives a -0.0 scale.
        scales = quant.unpack_ggml(ours, 9, 64, dtype)[:, :2].copy().view(np.float16)
        assert np.signbit(scales[0, 0])
        assert not np.signbit(scales[1, 0])


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 20),
    blocks=st.integers(1, 4),
    scale=st.sampled_from([1e-4, 1e-2, 1.0, 100.0]),
    seed=st.integers(0, 2**32 - 1),
    dtype=st.sampled_from(["q4_0", "q8_0"]),
)
def test_quantize_pack_random_matches_gguf(rows, blocks, scale, seed, dtype):
    rng = np.random.default_rng(seed)
    weights = (rng.standard_t(3, size=(rows, 32 * blocks)) * scale).astype(np.float32)
    weights[rng.random(weights.shape) < 0.1] = 0.0
    assert np.array_equal(quantize_pack(weights, dtype), gguf_packed(weights, dtype))


@pytest.mark.parametrize("dtype", ["q4_0", "q8_0"])
def test_quantize_pack_overwrites_dirty_buffer(dtype):
    weights = np.random.default_rng(2).normal(size=(13, 64)).astype(np.float32)
    out = np.full(quant.matrix_nbytes(13, 64, dtype), 0xFF, dtype=np.uint8)
    quantize_pack(weights, dtype, out=out)
    assert np.array_equal(out, gguf_packed(weights, dtype))


def test_quantize_pack_rejects_bad_row_length():
    with pytest.raises(quant.LayoutError, match=r"row length 40 is not a multiple of the q4_0 block size \(32\)"):
        quantize_pack(np.zeros((8, 40), np.float32), "q4_0")


# --- synthetic weights ---------------------------------------------------------------------


def test_synth_matrix_scale():
    weights = synth_matrix(seed=3, expert_id=5, section_index=1, rows=256, cols=1024)
    assert abs(float(weights.std()) * np.sqrt(1024) - 1.0) < 0.01
    assert abs(float(weights.mean())) * np.sqrt(1024) < 0.01
    assert float(np.abs(weights).max()) * np.sqrt(1024) < 4.5


def test_synth_matrix_depends_on_key_only():
    whole = synth_matrix(seed=3, expert_id=1, section_index=2, rows=40, cols=33)
    again = synth_matrix(seed=3, expert_id=1, section_index=2, rows=40, cols=33)
    other_expert = synth_matrix(seed=3, expert_id=2, section_index=2, rows=40, cols=33)
    other_seed = synth_matrix(seed=4, expert_id=1, section_index=2, rows=40, cols=33)
    assert np.array_equal(whole, again)
    assert not np.array_equal(whole, other_expert)
    assert not np.array_equal(whole, other_seed)


# --- synthetic stores ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_store(tmp_path_factory):
    return write_synth_store(tmp_path_factory.mktemp("synth") / "store", SMALL)


def test_synth_store_manifest(small_store):
    manifest = small_store.manifest
    assert manifest["format"] == "mer-expert-store"
    assert manifest["format_version"] == 1
    assert manifest["align_bytes"] == 4096
    assert manifest["checksum_algorithm"] == "xxh3_64"
    assert manifest["dense"] is None
    assert manifest["source"]["kind"] == "synthetic"
    assert manifest["model"] == {"n_layers": 2, "n_experts": 4, "top_k": 2, "d_model": 64, "d_ff": 96}
    assert [(e["layer"], e["expert"]) for e in manifest["experts"]] == [(l, e) for l in range(2) for e in range(4)]
    assert all(e["offset"] % 4096 == 0 for e in manifest["experts"])


def test_synth_store_regions_are_packed_gguf_blocks(small_store):
    for expert_id in (0, 5, 7):
        region = small_store.read_expert(expert_id)
        weights = expert_weights(SMALL, expert_id)
        for section in small_store.layout.sections:
            stored = region[section.offset : section.offset + section.nbytes]
            assert np.array_equal(stored, gguf_packed(weights[section.name], "q4_0")), (expert_id, section.name)
        assert not region[small_store.layout.payload_bytes :].any()  # alignment padding is zero


def test_synth_is_deterministic(small_store, tmp_path):
    again = write_synth_store(tmp_path / "again", SMALL)
    other = write_synth_store(tmp_path / "other", SynthConfig(**{**SMALL.__dict__, "seed": 8}))
    same_bytes = (small_store.path / DATA_FILE_NAME).read_bytes() == (again.path / DATA_FILE_NAME).read_bytes()
    assert same_bytes
    assert [e.checksum for e in again.experts] == [e.checksum for e in small_store.experts]
    assert [e.checksum for e in other.experts] != [e.checksum for e in small_store.experts]


@pytest.mark.parametrize("dtype", ["q8_0", "f32"])
def test_synth_other_dtypes(tmp_path, dtype):
    config = SynthConfig(n_layers=1, n_experts=2, top_k=1, d_model=32, d_ff=40 if dtype == "f32" else 64,
                         dtype=dtype, seed=1)
    store = write_synth_store(tmp_path / "store", config)
    weights = expert_weights(config, 1)
    stored = store.expert_weights(1)
    if dtype == "f32":
        assert np.array_equal(stored["down"], weights["down"])
    else:
        expected = quant.dequantize_packed(gguf_packed(weights["down"], dtype), 32, 64, dtype)
        assert np.array_equal(stored["down"], expected)
    assert verify_store(store).ok


def test_verify_clean_store(small_store):
    result = verify_store(small_store)
    assert result.ok
    assert result.bad_experts == []


def test_verify_names_flipped_expert(tmp_path):
    store = write_synth_store(tmp_path / "store", SMALL)
    entry = store.entry(store.expert_id(1, 2))
    with open(store.path / DATA_FILE_NAME, "r+b") as f:
        f.seek(entry.offset + 100)
        byte = f.read(1)
        f.seek(entry.offset + 100)
        f.write(bytes([byte[0] ^ 0x01]))

    result = verify_store(open_store(store.path))
    assert len(result.bad_experts) == 1
    bad = result.bad_experts[0]
    assert (bad.layer, bad.expert, bad.file, bad.offset) == (1, 2, DATA_FILE_NAME, entry.offset)

    cli = runner.invoke(app, ["verify", str(store.path)])
    assert cli.exit_code == 1
    assert f"layer=1, expert=2) in experts.bin at offset {entry.offset}" in cli.output


def test_cli_synth_info_verify(tmp_path):
    out = tmp_path / "cli"
    result = runner.invoke(app, ["synth", str(out), "--layers", "1", "--experts", "2", "--top-k", "1",
                                 "--d-model", "32", "--d-ff", "64", "--dtype", "q8_0", "--seed", "5"])
    assert result.exit_code == 0, result.output
    info = runner.invoke(app, ["info", str(out), "--json"])
    assert info.exit_code == 0, info.output
    summary = json.loads(info.stdout)
    assert summary["dtype"] == "q8_0"
    assert summary["experts"] == 2
    assert summary["model"]["d_ff"] == 64
    assert summary["source"]["seed"] == 5
    verify = runner.invoke(app, ["verify", str(out)])
    assert verify.exit_code == 0
    assert "ok: 2 experts verified" in verify.output


# --- writer --------------------------------------------------------------------------------


def test_writer_failure_leaves_nothing(tmp_path):
    layout = quant.expert_layout(32, 64, "q8_0")
    out = tmp_path / "store"
    with pytest.raises(RuntimeError, match="packing failed"):
        with StoreWriter(out, layout, 4) as writer:
            writer.add_expert(0, 0, new_region(layout))
            raise RuntimeError("packing failed")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_writer_rejects_existing_out(tmp_path):
    layout = quant.expert_layout(32, 64, "q8_0")
    (tmp_path / "store").mkdir()
    with pytest.raises(StoreWriteError, match="already exists; remove it or pass --force"):
        StoreWriter(tmp_path / "store", layout, 1)


def test_writer_commit_requires_every_expert(tmp_path):
    layout = quant.expert_layout(32, 64, "q8_0")
    with pytest.raises(StoreWriteError, match="1 experts written, the store needs 2"):
        with StoreWriter(tmp_path / "store", layout, 2) as writer:
            writer.add_expert(0, 0, new_region(layout))
            writer.commit({"model": {}, "dtype": "q8_0"})
    assert not (tmp_path / "store").exists()


def test_force_replaces_store(tmp_path, small_store):
    out = tmp_path / "store"
    write_synth_store(out, SMALL)
    replaced = write_synth_store(out, SynthConfig(**{**SMALL.__dict__, "seed": 99}), force=True)
    assert replaced.source["seed"] == 99
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]


def test_open_store_rejects_resized_data_file(tmp_path):
    store = write_synth_store(tmp_path / "store", SMALL)
    with open(store.path / DATA_FILE_NAME, "ab") as f:
        f.write(b"\0")
    with pytest.raises(StoreError, match=r"experts\.bin is \d+ bytes but the manifest records \d+"):
        open_store(store.path)
