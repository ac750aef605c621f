"""Bad sources and damaged stores: one typed error naming the file, tensor and rule; no store left."""

from __future__ import annotations

import json

import numpy as np
import pytest
from gguf import GGMLQuantizationType as GGMLType
from gguf import GGUFReader
from safetensors.numpy import save_file
from typer.testing import CliRunner

from mer_pipeline import importers
from mer_pipeline.cli_store import app
from mer_pipeline.importers import SourceError, import_checkpoint
from mer_pipeline.store import DATA_FILE_NAME, DENSE_FILE_NAME, StoreError, open_store, verify_store
from mer_pipeline.store_writer import StoreWriteError

runner = CliRunner()


@pytest.fixture
def full_gguf(fixtures, gguf_writer, tmp_path):
    fixture = fixtures["full"]
    return gguf_writer(tmp_path / "full.gguf", fixture["tensors"], fixture["config"], expert_type=GGMLType.Q8_0)


def assert_no_store(out):
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.tmp-*"))


# --- GGUF ----------------------------------------------------------------------------------


def test_truncated_gguf_data(full_gguf, tmp_path):
    reader = GGUFReader(full_gguf)
    last = max(reader.tensors, key=lambda t: t.data_offset)
    relative_offset = last.data_offset - reader.data_offset  # GGUF offsets count from the data section
    data = full_gguf.read_bytes()
    full_gguf.write_bytes(data[: last.data_offset + 10])
    out = tmp_path / "store"
    with pytest.raises(SourceError) as error:
        import_checkpoint(full_gguf, out, dtype="q8_0")
    message = str(error.value)
    assert str(full_gguf) in message
    assert repr(last.name) in message
    assert "the file is truncated" in message
    assert f"only {last.data_offset + 10} bytes long" in message
    assert f"data at offset {relative_offset} of the data section (file offset {last.data_offset})" in message
    assert_no_store(out)


def test_truncated_gguf_header(full_gguf, tmp_path):
    full_gguf.write_bytes(full_gguf.read_bytes()[:200])
    out = tmp_path / "store"
    with pytest.raises(SourceError) as error:
        import_checkpoint(full_gguf, out)
    assert str(full_gguf) in str(error.value)
    assert "invalid or truncated GGUF header" in str(error.value)
    assert_no_store(out)


def test_wrong_magic(tmp_path):
    source = tmp_path / "model.gguf"
    source.write_bytes(b"GGML" + bytes(100))
    out = tmp_path / "store"
    with pytest.raises(SourceError) as error:
        import_checkpoint(source, out)
    assert str(source) in str(error.value)
    assert "not a GGUF file: magic b'GGML', expected b'GGUF'" in str(error.value)
    assert_no_store(out)


def test_unsupported_expert_type(fixtures, gguf_writer, tmp_path):
    fixture = fixtures["full"]
    name = "blk.1.ffn_down_exps.weight"
    path = gguf_writer(tmp_path / "model.gguf", fixture["tensors"], fixture["config"], skip=(name,),
                       extra={name: np.zeros((4, 32, 64), dtype=np.int32)})
    out = tmp_path / "store"
    with pytest.raises(SourceError) as error:
        import_checkpoint(path, out)
    message = str(error.value)
    assert str(path) in message
    assert f"tensor {name!r}" in message
    assert "unsupported tensor type I32" in message
    assert_no_store(out)


def narrow_fixture(tensors: dict[str, np.ndarray], d_model: int) -> dict[str, np.ndarray]:
    """Cut the layer0 checkpoint to a hidden size that is not a multiple of 32."""
    return {
        "model.layers.0.mlp.experts.gate_up_proj": tensors["model.layers.0.mlp.experts.gate_up_proj"][:, :, :d_model],
        "model.layers.0.mlp.experts.down_proj": tensors["model.layers.0.mlp.experts.down_proj"][:, :d_model, :],
        "model.layers.0.mlp.gate.weight": tensors["model.layers.0.mlp.gate.weight"][:, :d_model],
    }


def test_gguf_row_length_not_multiple_of_32(fixtures, gguf_writer, tmp_path):
    config = {**fixtures["layer0"]["config"], "hidden_size": 40}
    path = gguf_writer(tmp_path / "model.gguf", narrow_fixture(fixtures["layer0"]["tensors"], 40), config)
    out = tmp_path / "store"
    with pytest.raises(SourceError) as error:
        import_checkpoint(path, out, dtype="q4_0")
    message = str(error.value)
    assert str(path) in message
    assert "'blk.0.ffn_gate_exps.weight'" in message
    assert "row length 40 is not a multiple of the q4_0 block size (32)" in message
    assert_no_store(out)
    assert import_checkpoint(path, out, dtype="f32").shape.d_model == 40


def test_hf_row_length_not_multiple_of_32(fixtures, tmp_path):
    source = tmp_path / "narrow.safetensors"
    save_file(narrow_fixture(fixtures["layer0"]["tensors"], 40), source)
    out = tmp_path / "store"
    with pytest.raises(SourceError) as error:
        import_checkpoint(source, out, dtype="q8_0", top_k=2)
    message = str(error.value)
    assert str(source) in message
    assert "'model.layers.0.mlp.experts.gate_up_proj'" in message
    assert "row length 40 is not a multiple of the q8_0 block size (32)" in message
    assert_no_store(out)


def test_gguf_missing_tensor(fixtures, gguf_writer, tmp_path):
    fixture = fixtures["full"]
    path = gguf_writer(tmp_path / "model.gguf", fixture["tensors"], fixture["config"],
                       skip=("blk.1.ffn_up_exps.weight",))
    out = tmp_path / "store"
    with pytest.raises(SourceError) as error:
        import_checkpoint(path, out)
    assert str(path) in str(error.value)
    assert "tensor 'blk.1.ffn_up_exps.weight': missing tensor" in str(error.value)
    assert_no_store(out)


def test_gguf_missing_per_expert_tensor(fixtures, gguf_writer, tmp_path):
    fixture = fixtures["classic"]
    path = gguf_writer(tmp_path / "model.gguf", fixture["tensors"], fixture["config"], layout="per_expert",
                       skip=("blk.0.ffn_down.2.weight", "blk.1.ffn_down.3.weight"))
    out = tmp_path / "store"
    with pytest.raises(SourceError, match=r"tensor 'blk\.0\.ffn_down\.2\.weight': missing tensor"):
        import_checkpoint(path, out)
    assert_no_store(out)


def test_gguf_expert_count_mismatch(fixtures, gguf_writer, tmp_path):
    fixture = fixtures["full"]
    path = gguf_writer(tmp_path / "model.gguf", fixture["tensors"], fixture["config"],
                       overrides={"expert_count": 5})
    out = tmp_path / "store"
    with pytest.raises(SourceError) as error:
        import_checkpoint(path, out)
    message = str(error.value)
    assert "'blk.0.ffn_gate_exps.weight'" in message
    assert "shape (4, 64, 32) does not match (n_experts, d_ff, d_model) = (5, 64, 32)" in message
    assert "it holds 4 experts but llama.expert_count is 5" in message
    assert_no_store(out)


def test_gguf_extra_per_expert_tensors(fixtures, gguf_writer, tmp_path):
    fixture = fixtures["classic"]
    path = gguf_writer(tmp_path / "model.gguf", fixture["tensors"], fixture["config"], layout="per_expert",
                       overrides={"expert_count": 3, "expert_used_count": 2})
    out = tmp_path / "store"
    with pytest.raises(SourceError) as error:
        import_checkpoint(path, out)
    assert "'blk.0.ffn_gate.3.weight': expert 3 is beyond llama.expert_count (3)" in str(error.value)
    assert_no_store(out)


def test_gguf_d_ff_mismatch(fixtures, gguf_writer, tmp_path):
    fixture = fixtures["full"]
    path = gguf_writer(tmp_path / "model.gguf", fixture["tensors"], fixture["config"], layout="fused",
                       overrides={"feed_forward_length": 96})
    out = tmp_path / "store"
    with pytest.raises(SourceError) as error:
        import_checkpoint(path, out)
    message = str(error.value)
    assert "'blk.0.ffn_gate_up_exps.weight'" in message
    assert "shape (4, 128, 32) does not match (n_experts, 2 * d_ff, d_model) = (4, 192, 32)" in message
    assert_no_store(out)


# --- safetensors ---------------------------------------------------------------------------


def test_hf_missing_classic_tensor(fixtures, tmp_path):
    fixture = fixtures["classic"]
    source = tmp_path / "model.safetensors"
    missing = "model.layers.1.block_sparse_moe.experts.3.w2.weight"
    save_file({n: a for n, a in fixture["tensors"].items() if n != missing}, source)
    out = tmp_path / "store"
    with pytest.raises(SourceError) as error:
        import_checkpoint(source, out, config=fixture["config_path"])
    assert str(source) in str(error.value)
    assert f"tensor {missing!r}: missing tensor" in str(error.value)
    assert_no_store(out)


def test_hf_expert_count_mismatch(fixtures, tmp_path):
    fixture = fixtures["full"]
    config = tmp_path / "config.json"
    config.write_text(json.dumps({**fixture["config"], "num_local_experts": 3}))
    out = tmp_path / "store"
    with pytest.raises(SourceError) as error:
        import_checkpoint(fixture["path"], out, config=config)
    message = str(error.value)
    assert "'model.layers.0.mlp.experts.gate_up_proj'" in message
    assert "it holds 4 experts but the config has 3" in message
    assert_no_store(out)


def test_hf_truncated_file(fixtures, tmp_path):
    source = tmp_path / "model.safetensors"
    source.write_bytes(fixtures["full"]["path"].read_bytes()[:-100])
    out = tmp_path / "store"
    with pytest.raises(SourceError) as error:
        import_checkpoint(source, out, config=fixtures["full"]["config_path"])
    assert str(source) in str(error.value)
    assert "not a valid safetensors file" in str(error.value)
    assert_no_store(out)


def test_hf_ambiguous_config(fixtures, tmp_path):
    out = tmp_path / "store"
    with pytest.raises(SourceError) as error:
        import_checkpoint(fixtures["full"]["path"], out)
    message = str(error.value)
    assert "mixtral_classic_config.json, mixtral_tiny_config.json" in message
    assert "pass --config FILE" in message
    assert_no_store(out)


# --- the import as a whole -----------------------------------------------------------------


def test_failure_mid_import_leaves_no_store(full_gguf, tmp_path, monkeypatch):
    real_pack = importers._Packer.pack
    calls = []

    def failing_pack(self, matrices):
        calls.append(1)
        if len(calls) == 5:
            raise SourceError(full_gguf, "simulated read failure", matrices[0].tensor)
        return real_pack(self, matrices)

    monkeypatch.setattr(importers._Packer, "pack", failing_pack)
    out = tmp_path / "store"
    with pytest.raises(SourceError, match="simulated read failure"):
        import_checkpoint(full_gguf, out, dtype="q8_0")
    assert_no_store(out)


def test_existing_out_is_kept(full_gguf, tmp_path):
    out = tmp_path / "store"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(StoreWriteError, match="already exists"):
        import_checkpoint(full_gguf, out, dtype="q8_0")
    assert (out / "keep.txt").read_text() == "mine"


def test_cli_reports_bad_source_without_traceback(tmp_path):
    source = tmp_path / "model.gguf"
    source.write_bytes(b"junk" * 10)
    out = tmp_path / "store"
    result = runner.invoke(app, ["import", str(source), str(out)])
    assert result.exit_code == 2
    assert "error:" in result.output
    assert "not a GGUF file" in result.output
    assert "Traceback" not in result.output
    assert_no_store(out)


# --- stores changed after they were written ------------------------------------------------


@pytest.fixture
def imported_store(full_gguf, tmp_path):
    return import_checkpoint(full_gguf, tmp_path / "store", dtype="q8_0")


def test_truncated_data_file(imported_store):
    data = imported_store.path / DATA_FILE_NAME
    size = data.stat().st_size
    with open(data, "r+b") as f:
        f.truncate(size - 4096)
    with pytest.raises(StoreError) as error:
        open_store(imported_store.path)
    assert str(data) in str(error.value)
    assert f"is {size - 4096} bytes but the manifest records {size}" in str(error.value)
    result = runner.invoke(app, ["info", str(imported_store.path)])
    assert result.exit_code == 2
    assert "Traceback" not in result.output


def test_changed_data_file_found_by_verify(imported_store):
    entry = imported_store.entry(imported_store.expert_id(0, 3))
    with open(imported_store.path / DATA_FILE_NAME, "r+b") as f:
        f.seek(entry.offset)
        f.write(b"\xff\xff")
    result = verify_store(open_store(imported_store.path))
    assert [(b.layer, b.expert, b.offset) for b in result.bad_experts] == [(0, 3, entry.offset)]
    assert "does not match the manifest's" in result.bad_experts[0].reason


def test_changed_dense_file_found_by_verify(imported_store):
    dense = imported_store.path / DENSE_FILE_NAME
    data = bytearray(dense.read_bytes())
    data[-1] ^= 0xFF
    dense.write_bytes(bytes(data))
    result = verify_store(open_store(imported_store.path))
    assert result.bad_experts == []
    assert [b.file for b in result.bad_files] == [DENSE_FILE_NAME]
    cli = runner.invoke(app, ["verify", str(imported_store.path)])
    assert cli.exit_code == 1
    assert "bad dense.gguf: checksum" in cli.output
