"""Import a Mixtral checkpoint (GGUF or Hugging Face safetensors) into an expert store.

A source module opens the checkpoint, checks every tensor it will need up front (names,
shapes, types) and then hands out one expert at a time, so that memory stays bounded by
about one layer's experts whatever the checkpoint size. import_checkpoint() drives it:

    open source -> check -> for each expert id: matrices -> pack -> StoreWriter
                         -> dense tensors -> dense.gguf -> manifest -> rename into place

Expert matrices are repacked bit-exactly when the source already stores GGML blocks of
the store's dtype. Any other type is converted to float32 (dequantized if needed) and
quantized with gguf's rounding.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter, quants

from mer_pipeline import quant
from mer_pipeline.quant import ExpertLayout, expert_layout
from mer_pipeline.store import DENSE_FILE_NAME, Store
from mer_pipeline.store_writer import StoreWriter, new_region, put_packed, quantize_pack, section_view

logger = logging.getLogger(__name__)

HASH_CHUNK_BYTES = 8 << 20
SECTION_NAMES = ("gate", "up", "down")
# Model config keys every manifest carries, None where the source does not record them.
OPTIONAL_MODEL_KEYS = (
    "vocab_size", "n_heads", "n_kv_heads", "head_dim", "rope_theta", "rms_norm_eps",
    "context_length", "tie_word_embeddings", "bos_token_id", "eos_token_id",
)
# Source tensor types that are float already: converted to float32 without dequantizing.
FLOAT_TYPES = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16)
STORE_GGML_TYPES = {name: quant.GGML_TYPES[name] for name in ("q4_0", "q8_0")}


class SourceError(ValueError):
    """A checkpoint that cannot be imported: the message names the file, the tensor and the rule."""

    def __init__(self, path: str | os.PathLike[str], message: str, tensor: str | None = None):
        self.path = Path(path)
        self.tensor = tensor
        where = f"{self.path}: tensor {tensor!r}" if tensor else str(self.path)
        super().__init__(f"{where}: {message}")


@dataclasses.dataclass
class ExpertMatrix:
    """One expert matrix as the source stores it.

    `data` is float32/float16 [rows, cols], uint16 bfloat16 bits [rows, cols], or uint8
    GGML blocks [rows, row_bytes] for quantized types.
    """

    tensor: str
    ggml_type: GGMLQuantizationType
    rows: int
    cols: int
    data: np.ndarray


@dataclasses.dataclass
class DenseTensor:
    """A non-expert tensor, copied to dense.gguf with its name, GGML type and bytes unchanged.

    `shape` is in numpy order (row length last); `data` is what GGUFWriter.write_tensor_data
    takes: elements for float/int types, uint8 bytes for quantized and bfloat16 types.
    `load` returns `data` when the writer reaches the tensor, so at most one is in memory.
    """

    name: str
    ggml_type: GGMLQuantizationType
    shape: tuple[int, ...]
    nbytes: int
    load: Callable[[], np.ndarray]


class CheckpointSource:
    """Interface of an opened checkpoint, implemented by gguf_source.GGUFSource and hf_source.HFSource."""

    kind: str          # "gguf" or "safetensors", recorded as source.kind
    naming: str        # "gguf" or "hf": the tensor naming convention of dense.gguf
    path: Path
    files: list[Path]  # every file read, hashed into the manifest
    model: dict[str, Any]
    architecture: str

    def expert_matrices(self, layer: int, expert: int) -> tuple[ExpertMatrix, ExpertMatrix, ExpertMatrix]:
        raise NotImplementedError

    def dense_tensors(self) -> list[DenseTensor]:
        raise NotImplementedError

    def add_metadata(self, writer: GGUFWriter) -> None:
        """Add the source's own key/value metadata (model config, tokenizer) to dense.gguf."""
        raise NotImplementedError

    def close(self) -> None:
        pass


def check_model_shape(model: dict[str, Any], path: Path) -> None:
    for key in ("n_layers", "n_experts", "top_k", "d_model", "d_ff"):
        value = model.get(key)
        if not isinstance(value, int) or value <= 0:
            raise SourceError(path, f"model {key} must be a positive integer, got {value!r}")
    if model["top_k"] > model["n_experts"]:
        raise SourceError(path, f"top_k ({model['top_k']}) must not exceed the expert count ({model['n_experts']})")
    for key in OPTIONAL_MODEL_KEYS:
        model.setdefault(key, None)


def check_row_length(path: Path, tensor: str, row_length: int, dtype: str) -> None:
    """Raise if a matrix with rows of `row_length` cannot be stored as `dtype`."""
    if dtype != "f32" and row_length % quant.BLOCK_WEIGHTS:
        raise SourceError(
            path,
            f"row length {row_length} is not a multiple of the {dtype} block size ({quant.BLOCK_WEIGHTS}); "
            "import with --dtype f32 to keep it unquantized",
            tensor,
        )


def _float32_of(matrix: ExpertMatrix, path: Path) -> np.ndarray:
    data = matrix.data
    if matrix.ggml_type == GGMLQuantizationType.F32:
        return np.asarray(data, dtype=np.float32).reshape(matrix.rows, matrix.cols)
    if matrix.ggml_type == GGMLQuantizationType.F16:
        return np.asarray(data).view(np.float16).astype(np.float32).reshape(matrix.rows, matrix.cols)
    if matrix.ggml_type == GGMLQuantizationType.BF16:
        bits = np.asarray(data).view(np.uint16).astype(np.uint32) << 16
        return bits.view(np.float32).reshape(matrix.rows, matrix.cols)
    try:
        return quants.dequantize(np.asarray(data, dtype=np.uint8), matrix.ggml_type).reshape(matrix.rows, matrix.cols)
    except NotImplementedError as exc:
        raise SourceError(path, f"tensor type {matrix.ggml_type.name} cannot be dequantized by gguf ({exc})",
                          matrix.tensor) from exc


class _Packer:
    """Pack source matrices into expert regions; logs each kind of conversion once."""

    def __init__(self, layout: ExpertLayout, path: Path):
        self.layout = layout
        self.path = path
        self.logged: set[tuple[str, str]] = set()
        self.counts = dict.fromkeys(("repacked", "quantized", "requantized", "copied", "dequantized"), 0)

    def _note(self, matrix: ExpertMatrix, action: str) -> None:
        self.counts[action] += 1
        key = (matrix.ggml_type.name, action)
        if key in self.logged:
            return
        self.logged.add(key)
        if action == "requantized":
            logger.warning("expert tensors of type %s are dequantized and requantized to %s, which adds rounding "
                           "error; first tensor=%s", matrix.ggml_type.name, self.layout.dtype, matrix.tensor)
        else:
            logger.info("expert tensors of type %s are %s to %s; first tensor=%s",
                        matrix.ggml_type.name, action, self.layout.dtype, matrix.tensor)

    def pack(self, matrices: tuple[ExpertMatrix, ExpertMatrix, ExpertMatrix]) -> np.ndarray:
        region = new_region(self.layout)
        dtype = self.layout.dtype
        for name, matrix in zip(SECTION_NAMES, matrices):
            section = getattr(self.layout, name)
            if (matrix.rows, matrix.cols) != (section.rows, section.cols):
                raise SourceError(self.path, f"{name} matrix is {matrix.rows} x {matrix.cols}, the store expects "
                                  f"{section.rows} x {section.cols}", matrix.tensor)
            if dtype in STORE_GGML_TYPES and matrix.ggml_type == STORE_GGML_TYPES[dtype]:
                put_packed(region, self.layout, name, quant.pack_ggml(matrix.data, matrix.rows, matrix.cols, dtype))
                self._note(matrix, "repacked")
                continue
            if matrix.ggml_type in FLOAT_TYPES:
                action = "copied" if dtype == "f32" else "quantized"
            else:
                action = "dequantized" if dtype == "f32" else "requantized"
            quantize_pack(_float32_of(matrix, self.path), dtype, out=section_view(region, self.layout, name))
            self._note(matrix, action)
        return region


class _SourceHasher:
    """sha256 of the source files, computed by a background thread while the import reads them."""

    def __init__(self, files: list[Path]):
        self.files = files
        self.digests: dict[Path, str] = {}
        self.error: OSError | None = None
        self._cancelled = threading.Event()
        self._thread = threading.Thread(target=self._run, name="source-sha256", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for path in self.files:
                digest = hashlib.sha256()
                with open(path, "rb") as f:
                    while not self._cancelled.is_set() and (chunk := f.read(HASH_CHUNK_BYTES)):
                        digest.update(chunk)
                self.digests[path] = digest.hexdigest()
        except OSError as exc:
            self.error = exc

    def cancel(self) -> None:
        """Stop reading, so that a failed import does not go on hashing a large file."""
        self._cancelled.set()
        self._thread.join()

    def result(self) -> dict[str, Any]:
        self._thread.join()
        if self.error is not None:
            raise SourceError(self.error.filename or self.files[0], f"read failed while hashing ({self.error})")
        entries = [{"name": path.name, "size": path.stat().st_size, "sha256": self.digests[path]} for path in self.files]
        if len(entries) == 1:
            return {"sha256": entries[0]["sha256"], "size": entries[0]["size"], "files": entries}
        # Several files: sha256 over "name sha256\n" lines, so one value still names the whole checkpoint.
        listing = "".join(f"{e['name']} {e['sha256']}\n" for e in entries)
        return {"sha256": hashlib.sha256(listing.encode()).hexdigest(),
                "size": sum(e["size"] for e in entries), "files": entries}


def _write_dense(source: CheckpointSource, path: Path) -> list[dict[str, Any]]:
    """Write the dense tensors and metadata to a GGUF file, one tensor in memory at a time."""
    tensors = source.dense_tensors()
    writer = GGUFWriter(path, source.architecture)
    source.add_metadata(writer)
    writer.add_string("mer.tensor_naming", source.naming)
    for tensor in tensors:
        block_size, type_size = quants.GGML_QUANT_SIZES[tensor.ggml_type]
        row_bytes = tensor.shape[-1] // block_size * type_size
        byte_shape = (*tensor.shape[:-1], row_bytes)
        is_bytes = tensor.ggml_type not in _NUMPY_GGML_TYPES
        writer.add_tensor_info(tensor.name, byte_shape if is_bytes else tensor.shape,
                               np.dtype(np.uint8) if is_bytes else _NUMPY_GGML_TYPES[tensor.ggml_type],
                               tensor.nbytes, raw_dtype=tensor.ggml_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor in tensors:
        data = np.ascontiguousarray(tensor.load())
        if data.nbytes != tensor.nbytes:
            raise SourceError(source.path, f"tensor has {data.nbytes} bytes, expected {tensor.nbytes}", tensor.name)
        writer.write_tensor_data(data)
    writer.close()
    return [{"name": t.name, "type": t.ggml_type.name, "shape": list(t.shape)} for t in tensors]


_NUMPY_GGML_TYPES = {
    GGMLQuantizationType.F32: np.dtype(np.float32),
    GGMLQuantizationType.F16: np.dtype(np.float16),
    GGMLQuantizationType.F64: np.dtype(np.float64),
    GGMLQuantizationType.I8: np.dtype(np.int8),
    GGMLQuantizationType.I16: np.dtype(np.int16),
    GGMLQuantizationType.I32: np.dtype(np.int32),
    GGMLQuantizationType.I64: np.dtype(np.int64),
}


def open_source(src: str | os.PathLike[str], *, config: str | os.PathLike[str] | None = None,
                top_k: int | None = None) -> CheckpointSource:
    """Open a checkpoint, choosing the reader from the file's magic bytes or the directory's content."""
    from mer_pipeline.importers import gguf_source, hf_source

    path = Path(src)
    if not path.exists():
        raise SourceError(path, "not found")
    if path.is_dir():
        return hf_source.HFSource(path, config=config, top_k=top_k)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == gguf_source.GGUF_MAGIC_BYTES:
        if config is not None:
            raise SourceError(path, "--config applies to safetensors sources; a GGUF file carries its own config")
        return gguf_source.GGUFSource(path, top_k=top_k)
    if path.suffix == ".gguf":
        raise SourceError(path, f"not a GGUF file: magic {magic!r}, expected {gguf_source.GGUF_MAGIC_BYTES!r}")
    if path.suffix == ".safetensors":
        return hf_source.HFSource(path, config=config, top_k=top_k)
    raise SourceError(path, f"unrecognized checkpoint: magic {magic!r} is not GGUF and the name does not end "
                      "in .safetensors")


def _expert_ids(model: dict[str, Any]) -> Iterator[tuple[int, int]]:
    for layer in range(model["n_layers"]):
        for expert in range(model["n_experts"]):
            yield layer, expert


def import_checkpoint(src: str | os.PathLike[str], out: str | os.PathLike[str], *, dtype: str = "q4_0",
                      config: str | os.PathLike[str] | None = None, top_k: int | None = None,
                      force: bool = False, on_expert: Callable[[int, int], None] | None = None) -> Store:
    """Import a checkpoint into a new store at `out` and return it opened.

    on_expert(expert_id, n_experts_total) reports progress. Raises SourceError for a
    checkpoint that breaks a rule; `out` is then left as it was.
    """
    dtype = quant.check_dtype(dtype)
    started_s = time.monotonic()
    source = open_source(src, config=config, top_k=top_k)
    hasher: _SourceHasher | None = None
    try:
        model = source.model
        check_model_shape(model, source.path)
        for matrix in source.expert_matrices(0, 0):
            check_row_length(source.path, matrix.tensor, matrix.cols, dtype)
        layout = expert_layout(model["d_model"], model["d_ff"], dtype)
        n_total = model["n_layers"] * model["n_experts"]
        logger.info("import start src=%s kind=%s out=%s dtype=%s layers=%d experts=%d d_model=%d d_ff=%d",
                    source.path, source.kind, out, dtype, model["n_layers"], model["n_experts"],
                    model["d_model"], model["d_ff"])
        packer = _Packer(layout, source.path)
        writer = StoreWriter(out, layout, n_total, force=force)
        hasher = _SourceHasher(source.files)
        with writer:
            for expert_id, (layer, expert) in enumerate(_expert_ids(model)):
                writer.add_expert(layer, expert, packer.pack(source.expert_matrices(layer, expert)))
                if on_expert is not None:
                    on_expert(expert_id, n_total)
            dense_tensors = _write_dense(source, writer.path / DENSE_FILE_NAME)
            writer.add_file(DENSE_FILE_NAME)
            store = writer.commit({
                "model": {"architecture": source.architecture, **model},
                "dtype": dtype,
                "source": {"kind": source.kind, "path": str(source.path.resolve()), **hasher.result()},
                "dense": {"file": DENSE_FILE_NAME, "naming": source.naming, "tensors": dense_tensors},
            })
    except BaseException:
        if hasher is not None:
            hasher.cancel()
        raise
    finally:
        source.close()
    counts = " ".join(f"{action}={count}" for action, count in packer.counts.items())
    logger.info("import done src=%s out=%s experts=%d matrices: %s elapsed_s=%.1f",
                source.path, out, n_total, counts, time.monotonic() - started_s)
    return store
