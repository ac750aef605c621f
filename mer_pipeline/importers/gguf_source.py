"""Read a llama.cpp Mixtral GGUF with gguf.GGUFReader (memory-mapped, so tensors stream).

Expert tensors come in three layouts, detected per layer:

    stacked      blk.N.ffn_gate_exps.weight, ffn_up_exps, ffn_down_exps   [E, rows, cols]
    fused        blk.N.ffn_gate_up_exps.weight [E, 2 * d_ff, d_model] (gate rows first),
                 blk.N.ffn_down_exps.weight
    per-expert   blk.N.ffn_gate.E.weight, ffn_up.E, ffn_down.E            [rows, cols]

Shapes here are in numpy order, [..., rows, row length]. GGUF lists dimensions the other
way round (ne[0] is the row length), and GGUFReader's `shape` field keeps that order.
Tensor data offsets in a GGUF file count from the start of the data section, which
follows the header and the tensor infos, padded to `general.alignment`.

All other tensors (token_embd, attention, norms, the router ffn_gate_inp, output) are
dense tensors and go to dense.gguf unchanged, together with the metadata. llama.cpp's
converter permutes the rows of attn_q and attn_k for its rotary layout. They are stored
as they are, and the manifest's dense.naming = "gguf" records that for a model loader.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter, quants

from mer_pipeline.importers import (
    FLOAT_TYPES,
    STORE_GGML_TYPES,
    CheckpointSource,
    DenseTensor,
    ExpertMatrix,
    SourceError,
)

logger = logging.getLogger(__name__)

GGUF_MAGIC_BYTES = b"GGUF"
# Magic, version, tensor count and metadata count: the smallest file that can be a GGUF.
MIN_HEADER_BYTES = 24
EXPERT_TENSOR_RE = re.compile(r"blk\.(\d+)\.ffn_(gate|up|down|gate_up)(_exps|\.\d+)\.weight$")
# Metadata the writer sets itself, or that describes the source file's own layout.
SKIPPED_METADATA = ("general.architecture", "general.alignment")


class _CheckedReader(GGUFReader):
    """GGUFReader that checks each tensor's type, row length and extent before mapping it.

    GGUFReader itself fails on these with a bare reshape or enum error that names no tensor.
    """

    def __init__(self, path: Path):
        self._source_path = path
        super().__init__(path)

    def _build_tensors(self, start_offs: int, fields: list[Any]) -> None:
        file_bytes = len(self.data)
        for field in fields:
            _name_len, name_data, _n_dims, dims, raw_dtype, offset_tensor = field.parts
            name = bytes(name_data).decode("utf-8", errors="replace")
            try:
                ggml_type = GGMLQuantizationType(int(raw_dtype[0]))
            except ValueError:
                raise SourceError(self._source_path, f"unknown GGML type id {int(raw_dtype[0])}", name) from None
            block_size, type_size = GGML_QUANT_SIZES[ggml_type]
            ne = [int(d) for d in dims]
            if ne and ne[0] % block_size:
                raise SourceError(
                    self._source_path,
                    f"row length {ne[0]} is not a multiple of the {ggml_type.name} block size ({block_size})",
                    name,
                )
            n_bytes = int(np.prod(ne, dtype=np.int64)) * type_size // block_size
            relative = int(offset_tensor[0])
            end = start_offs + relative + n_bytes
            if end > file_bytes:
                raise SourceError(
                    self._source_path,
                    f"data at offset {relative} of the data section (file offset {start_offs + relative}) needs "
                    f"{n_bytes} bytes, but the file is only {file_bytes} bytes long; the file is truncated",
                    name,
                )
        super()._build_tensors(start_offs, fields)


def _open_reader(path: Path) -> GGUFReader:
    size = path.stat().st_size
    if size < MIN_HEADER_BYTES:
        raise SourceError(path, f"file is {size} bytes, too short for a GGUF header ({MIN_HEADER_BYTES} bytes)")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC_BYTES:
        raise SourceError(path, f"not a GGUF file: magic {magic!r}, expected {GGUF_MAGIC_BYTES!r}")
    try:
        return _CheckedReader(path)
    except SourceError:
        raise
    except (ValueError, KeyError, IndexError, OverflowError, UnicodeDecodeError) as exc:
        # A header cut short or corrupted makes GGUFReader index past the end or misread a type.
        raise SourceError(path, f"invalid or truncated GGUF header ({type(exc).__name__}: {exc})") from exc


def _decimal(value: float | None) -> float | None:
    """Return a float32 metadata value as the shortest decimal that rounds to it (1e-05, not 9.99999974e-06)."""
    return None if value is None else float(str(np.float32(value)))


def _logical_shape(tensor: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in reversed(tensor.shape.tolist()))


class GGUFSource(CheckpointSource):
    kind = "gguf"
    naming = "gguf"

    def __init__(self, path: str | os.PathLike[str], *, top_k: int | None = None):
        self.path = Path(path)
        self.files = [self.path]
        self.reader = _open_reader(self.path)
        self.tensors = {t.name: t for t in self.reader.tensors}
        self.architecture = self._string("general.architecture", required=True)
        self.model = self._model_config(top_k)
        self.layers = [self._layer_plan(layer) for layer in range(self.model["n_layers"])]
        self._check_unexpected_expert_tensors()

    # --- metadata -----------------------------------------------------------------------

    def _value(self, key: str, required: bool = False) -> Any:
        field = self.reader.get_field(key)
        if field is None:
            if required:
                raise SourceError(self.path, f"missing metadata key {key!r}")
            return None
        return field.contents()

    def _string(self, key: str, required: bool = False) -> Any:
        value = self._value(key, required)
        if value is not None and not isinstance(value, str):
            raise SourceError(self.path, f"metadata key {key!r} must be a string, got {value!r}")
        return value

    def _int(self, key: str, required: bool = False) -> int | None:
        value = self._value(key, required)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise SourceError(self.path, f"metadata key {key!r} must be an integer, got {value!r}")
        return value

    def _model_config(self, top_k: int | None) -> dict[str, Any]:
        arch = self.architecture
        d_model = self._int(f"{arch}.embedding_length", required=True)
        d_ff = self._int(f"{arch}.expert_feed_forward_length")
        if d_ff is None:
            d_ff = self._int(f"{arch}.feed_forward_length", required=True)

        n_heads = self._int(f"{arch}.attention.head_count")
        vocab_size = self._int(f"{arch}.vocab_size")
        tokens = self.reader.get_field("tokenizer.ggml.tokens")
        if vocab_size is None and tokens is not None:
            vocab_size = len(tokens.data)
        if vocab_size is None and "token_embd.weight" in self.tensors:
            vocab_size = _logical_shape(self.tensors["token_embd.weight"])[0]

        head_dim = self._int(f"{arch}.attention.key_length")
        if head_dim is None and n_heads:
            head_dim = d_model // n_heads
        n_kv_heads = self._int(f"{arch}.attention.head_count_kv")
        rope_theta = self._value(f"{arch}.rope.freq_base")
        rms_norm_eps = self._value(f"{arch}.attention.layer_norm_rms_epsilon")

        return {
            "n_layers": self._int(f"{arch}.block_count", required=True),
            "n_experts": self._int(f"{arch}.expert_count", required=True),
            "top_k": top_k if top_k is not None else self._int(f"{arch}.expert_used_count", required=True),
            "d_model": d_model,
            "d_ff": d_ff,
            "vocab_size": vocab_size,
            "n_heads": n_heads,
            "n_kv_heads": n_kv_heads if n_kv_heads is not None else n_heads,
            "head_dim": head_dim,
            "rope_theta": _decimal(rope_theta),
            "rms_norm_eps": _decimal(rms_norm_eps),
            "context_length": self._int(f"{arch}.context_length"),
            "tie_word_embeddings": "output.weight" not in self.tensors,
            "bos_token_id": self._int("tokenizer.ggml.bos_token_id"),
            "eos_token_id": self._int("tokenizer.ggml.eos_token_id"),
        }

    def add_metadata(self, writer: GGUFWriter) -> None:
        for field in self.reader.fields.values():
            if field.name.startswith("GGUF.") or field.name in SKIPPED_METADATA:
                continue
            vtype = field.types[0]
            sub_type = None
            if vtype == GGUFValueType.ARRAY:
                sub_type = GGUFValueType(int(field.parts[3][0]))
                if sub_type == GGUFValueType.ARRAY or not field.data:
                    logger.warning("metadata key %s is a nested or empty array; it is not copied to dense.gguf",
                                   field.name)
                    continue
            writer.add_key_value(field.name, field.contents(), vtype, sub_type)

    # --- expert tensors -----------------------------------------------------------------

    def _tensor(self, name: str) -> Any:
        tensor = self.tensors.get(name)
        if tensor is None:
            raise SourceError(self.path, "missing tensor", name)
        return tensor

    def _check_type(self, tensor: Any) -> None:
        ggml_type = tensor.tensor_type
        if ggml_type not in FLOAT_TYPES and ggml_type not in STORE_GGML_TYPES.values():
            block_size, type_size = GGML_QUANT_SIZES[ggml_type]
            try:
                quants.dequantize(np.zeros(type_size, dtype=np.uint8), ggml_type)
            except NotImplementedError:
                raise SourceError(
                    self.path,
                    f"unsupported tensor type {ggml_type.name}: expert tensors must be F32, F16, BF16 or a "
                    "GGML block type that gguf can dequantize",
                    tensor.name,
                ) from None

    def _check_shape(self, tensor: Any, expected: tuple[int, ...], meaning: str) -> None:
        shape = _logical_shape(tensor)
        if shape != expected:
            detail = ""
            n_experts = self.model["n_experts"]
            if len(shape) == 3 and len(expected) == 3 and shape[0] != expected[0]:
                detail = f"; it holds {shape[0]} experts but {self.architecture}.expert_count is {n_experts}"
            raise SourceError(
                self.path, f"shape {shape} does not match {meaning} = {expected}{detail}", tensor.name
            )
        self._check_type(tensor)

    def _layer_plan(self, layer: int) -> dict[str, Any]:
        m = self.model
        e, d_model, d_ff = m["n_experts"], m["d_model"], m["d_ff"]
        prefix = f"blk.{layer}."
        down = f"{prefix}ffn_down_exps.weight"
        if f"{prefix}ffn_gate_up_exps.weight" in self.tensors:
            gate_up = self._tensor(f"{prefix}ffn_gate_up_exps.weight")
            self._check_shape(gate_up, (e, 2 * d_ff, d_model), "(n_experts, 2 * d_ff, d_model)")
            self._check_shape(self._tensor(down), (e, d_model, d_ff), "(n_experts, d_model, d_ff)")
            return {"layout": "fused", "gate_up": gate_up, "down": self.tensors[down]}
        if f"{prefix}ffn_gate_exps.weight" in self.tensors or f"{prefix}ffn_gate.0.weight" not in self.tensors:
            # Stacked is llama.cpp's current layout, so a layer with no expert tensors at all
            # is reported by its first stacked name.
            plan: dict[str, Any] = {"layout": "stacked"}
            for part, expected, meaning in (
                ("gate", (e, d_ff, d_model), "(n_experts, d_ff, d_model)"),
                ("up", (e, d_ff, d_model), "(n_experts, d_ff, d_model)"),
                ("down", (e, d_model, d_ff), "(n_experts, d_model, d_ff)"),
            ):
                plan[part] = self._tensor(f"{prefix}ffn_{part}_exps.weight")
                self._check_shape(plan[part], expected, meaning)
            return plan
        plan = {"layout": "per_expert", "gate": [], "up": [], "down": []}
        for expert in range(e):
            for part, expected, meaning in (
                ("gate", (d_ff, d_model), "(d_ff, d_model)"),
                ("up", (d_ff, d_model), "(d_ff, d_model)"),
                ("down", (d_model, d_ff), "(d_model, d_ff)"),
            ):
                tensor = self._tensor(f"{prefix}ffn_{part}.{expert}.weight")
                self._check_shape(tensor, expected, meaning)
                plan[part].append(tensor)
        return plan

    def _check_unexpected_expert_tensors(self) -> None:
        """Reject expert tensors beyond block_count or expert_count instead of dropping them."""
        m = self.model
        for name in self.tensors:
            match = EXPERT_TENSOR_RE.match(name)
            if match is None:
                continue
            layer = int(match.group(1))
            if layer >= m["n_layers"]:
                raise SourceError(
                    self.path, f"layer {layer} is beyond {self.architecture}.block_count ({m['n_layers']})", name
                )
            if match.group(3) != "_exps":
                expert = int(match.group(3)[1:])
                if expert >= m["n_experts"]:
                    raise SourceError(
                        self.path,
                        f"expert {expert} is beyond {self.architecture}.expert_count ({m['n_experts']})",
                        name,
                    )

    def expert_matrices(self, layer: int, expert: int) -> tuple[ExpertMatrix, ExpertMatrix, ExpertMatrix]:
        plan = self.layers[layer]
        d_model, d_ff = self.model["d_model"], self.model["d_ff"]
        if plan["layout"] == "per_expert":
            tensors = [plan[part][expert] for part in ("gate", "up", "down")]
            datas = [t.data for t in tensors]
        elif plan["layout"] == "stacked":
            tensors = [plan[part] for part in ("gate", "up", "down")]
            datas = [t.data[expert] for t in tensors]
        else:
            gate_up = plan["gate_up"].data[expert]
            tensors = [plan["gate_up"], plan["gate_up"], plan["down"]]
            datas = [gate_up[:d_ff], gate_up[d_ff:], plan["down"].data[expert]]
        shapes = ((d_ff, d_model), (d_ff, d_model), (d_model, d_ff))
        return tuple(  # type: ignore[return-value]
            ExpertMatrix(t.name, t.tensor_type, rows, cols, data)
            for t, data, (rows, cols) in zip(tensors, datas, shapes)
        )

    # --- dense tensors ------------------------------------------------------------------

    def dense_tensors(self) -> list[DenseTensor]:
        dense = []
        for tensor in self.reader.tensors:
            if EXPERT_TENSOR_RE.match(tensor.name):
                continue
            dense.append(DenseTensor(tensor.name, tensor.tensor_type, _logical_shape(tensor), int(tensor.n_bytes),
                                     load=lambda t=tensor: t.data))
        return dense

    def close(self) -> None:
        # Dropping the reader unmaps the file once no array view into it is left.
        self.reader = None  # type: ignore[assignment]
        self.tensors = {}
        self.layers = []
