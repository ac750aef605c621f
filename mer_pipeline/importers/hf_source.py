"""Read a Hugging Face Mixtral checkpoint: one .safetensors file, or a directory of shards.

Expert tensors come in two namings, detected from the checkpoint:

    packed    model.layers.N.mlp.experts.gate_up_proj  [E, 2 * d_ff, d_model] (gate rows first)
              model.layers.N.mlp.experts.down_proj     [E, d_model, d_ff]
    classic   model.layers.N.block_sparse_moe.experts.E.w1.weight [d_ff, d_model]   gate
              model.layers.N.block_sparse_moe.experts.E.w3.weight [d_ff, d_model]   up
              model.layers.N.block_sparse_moe.experts.E.w2.weight [d_model, d_ff]   down

Tensors are read one expert at a time with safetensors' safe_open. safetensors cannot
hand bfloat16 to numpy, so bfloat16 tensors are memory-mapped from the offsets in the
file header instead.

The model config comes from --config, else `<stem>_config.json` or `config.json` next to
the checkpoint, else the only `*_config.json` there. Without one the shape is taken from
the tensors and top_k must be given.
"""

from __future__ import annotations

import json
import logging
import os
import re
import struct
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter
from safetensors import SafetensorError, safe_open

from mer_pipeline.importers import CheckpointSource, DenseTensor, ExpertMatrix, SourceError

logger = logging.getLogger(__name__)

INDEX_FILE_NAME = "model.safetensors.index.json"
PACKED_RE = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")
CLASSIC_RE = re.compile(r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w1|w2|w3)\.weight$")
CLASSIC_PARTS = {"gate": "w1", "up": "w3", "down": "w2"}
# safetensors dtype -> GGML type of the same bytes. Expert tensors must be one of the first three.
GGML_TYPE_OF = {
    "F32": GGMLQuantizationType.F32,
    "F16": GGMLQuantizationType.F16,
    "BF16": GGMLQuantizationType.BF16,
    "F64": GGMLQuantizationType.F64,
    "I8": GGMLQuantizationType.I8,
    "I16": GGMLQuantizationType.I16,
    "I32": GGMLQuantizationType.I32,
    "I64": GGMLQuantizationType.I64,
}
EXPERT_DTYPES = ("F32", "F16", "BF16")


class _SafetensorsFile:
    """One .safetensors file: safe_open for reading, plus the header for bfloat16 offsets."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.handle = safe_open(str(path), framework="numpy")
        except (SafetensorError, OSError) as exc:
            raise SourceError(path, f"not a valid safetensors file ({exc})") from exc
        with open(path, "rb") as f:
            (header_bytes,) = struct.unpack("<Q", f.read(8))
            self.header = json.loads(f.read(header_bytes))
        self.data_start = 8 + header_bytes

    def keys(self) -> list[str]:
        return list(self.handle.keys())

    def dtype(self, name: str) -> str:
        return self.header[name]["dtype"]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in self.header[name]["shape"])

    def read(self, name: str, index: int | None = None) -> np.ndarray:
        """Return a tensor, or its slice [index] along the first axis; bfloat16 as uint16 bits."""
        if self.dtype(name) == "BF16":
            begin, end = self.header[name]["data_offsets"]
            raw = np.memmap(self.path, dtype=np.uint16, mode="r", offset=self.data_start + begin,
                            shape=((end - begin) // 2,)).reshape(self.shape(name))
            return raw if index is None else raw[index]
        if index is None:
            return self.handle.get_tensor(name)
        return self.handle.get_slice(name)[index]


def _checkpoint_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    index = path / INDEX_FILE_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise SourceError(index, f"invalid shard index ({exc!r}); expected a JSON object with 'weight_map'") from exc
        files = [path / name for name in sorted(set(weight_map.values()))]
        for file in files:
            if not file.is_file():
                raise SourceError(index, f"shard {file.name} listed in weight_map not found")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise SourceError(path, "no .safetensors files in the directory")
    return files


def _find_config(path: Path, explicit: str | os.PathLike[str] | None, top_k: int | None) -> Path | None:
    if explicit is not None:
        config = Path(explicit)
        if not config.is_file():
            raise SourceError(config, "config file not found")
        return config
    folder = path if path.is_dir() else path.parent
    names = ([f"{path.stem}_config.json"] if path.is_file() else []) + ["config.json"]
    for name in names:
        if (folder / name).is_file():
            return folder / name
    others = sorted(folder.glob("*_config.json"))
    if len(others) == 1:
        return others[0]
    if top_k is not None:
        logger.info("no config for %s; the shape is taken from the tensors (candidates ignored: %s)",
                    path, ", ".join(p.name for p in others) or "none")
        return None
    looked_for = ", ".join(names)
    if others:
        found = f"several candidates ({', '.join(p.name for p in others)})"
    else:
        found = "no *_config.json either"
    raise SourceError(path, f"no model config: looked for {looked_for} in {folder} and found {found}; "
                      "pass --config FILE, or --top-k N to take the shape from the tensors")


class HFSource(CheckpointSource):
    kind = "safetensors"
    naming = "hf"

    def __init__(self, path: str | os.PathLike[str], *, config: str | os.PathLike[str] | None = None,
                 top_k: int | None = None):
        self.path = Path(path)
        self.files = _checkpoint_files(self.path)
        self.config_path = _find_config(self.path, config, top_k)
        self.config = self._read_config()
        self.opened = [_SafetensorsFile(file) for file in self.files]
        self.file_of: dict[str, _SafetensorsFile] = {}
        for opened in self.opened:
            for name in opened.keys():
                if name in self.file_of:
                    raise SourceError(opened.path, f"tensor also present in {self.file_of[name].path.name}", name)
                self.file_of[name] = opened
        self.architecture = str(self.config.get("model_type") or "mixtral")
        self.packed = not any(CLASSIC_RE.match(name) for name in self.file_of)
        self.model = self._model_config(top_k)
        self._check_experts()

    # --- config -------------------------------------------------------------------------

    def _read_config(self) -> dict[str, Any]:
        if self.config_path is None:
            return {}
        try:
            config = json.loads(self.config_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise SourceError(self.config_path, f"invalid JSON ({exc})") from exc
        if not isinstance(config, dict):
            raise SourceError(self.config_path, "config must be a JSON object")
        logger.info("config path=%s model_type=%s", self.config_path, config.get("model_type"))
        return config

    def _shape(self, name: str) -> tuple[int, ...]:
        return self.file_of[name].shape(name)

    def _tensor_shape_fields(self) -> dict[str, int]:
        """n_layers, n_experts, d_model and d_ff as the expert tensors show them."""
        layers = set()
        for name in self.file_of:
            match = PACKED_RE.match(name) or CLASSIC_RE.match(name)
            if match:
                layers.add(int(match.group(1)))
        if not layers:
            first = ("model.layers.0.mlp.experts.gate_up_proj" if self.packed
                     else "model.layers.0.block_sparse_moe.experts.0.w1.weight")
            raise SourceError(self.files[0], "missing tensor; the checkpoint has no Mixtral expert tensors", first)
        first_layer = min(layers)
        if self.packed:
            down = self._require(f"model.layers.{first_layer}.mlp.experts.down_proj")
            n_experts, d_model, d_ff = self._shape(down)
        else:
            n_experts = 1 + max(int(m.group(2)) for m in map(CLASSIC_RE.match, self.file_of) if m)
            d_model, d_ff = self._shape(self._require(f"model.layers.{first_layer}.block_sparse_moe.experts.0.w2.weight"))
        return {"n_layers": max(layers) + 1, "n_experts": n_experts, "d_model": d_model, "d_ff": d_ff}

    def _model_config(self, top_k: int | None) -> dict[str, Any]:
        c = self.config
        inferred = self._tensor_shape_fields()
        n_heads = c.get("num_attention_heads")
        d_model = c.get("hidden_size", inferred["d_model"])
        head_dim = c.get("head_dim") or (d_model // n_heads if n_heads else None)
        if top_k is None:
            top_k = c.get("num_experts_per_tok")
        if top_k is None:
            raise SourceError(self.config_path or self.path, "missing num_experts_per_tok; pass --top-k N")
        return {
            "n_layers": c.get("num_hidden_layers", inferred["n_layers"]),
            "n_experts": c.get("num_local_experts", inferred["n_experts"]),
            "top_k": top_k,
            "d_model": d_model,
            "d_ff": c.get("intermediate_size", inferred["d_ff"]),
            "vocab_size": c.get("vocab_size"),
            "n_heads": n_heads,
            "n_kv_heads": c.get("num_key_value_heads", n_heads),
            "head_dim": head_dim,
            "rope_theta": c.get("rope_theta"),
            "rms_norm_eps": c.get("rms_norm_eps"),
            "context_length": c.get("max_position_embeddings"),
            "tie_word_embeddings": c.get("tie_word_embeddings", False) if c else None,
            "bos_token_id": c.get("bos_token_id"),
            "eos_token_id": c.get("eos_token_id"),
        }

    def add_metadata(self, writer: GGUFWriter) -> None:
        if self.config_path is not None:
            writer.add_string("mer.hf_config_json", self.config_path.read_text())

    # --- expert tensors -----------------------------------------------------------------

    def _require(self, name: str) -> str:
        if name not in self.file_of:
            raise SourceError(self.path, "missing tensor", name)
        return name

    def _check_tensor(self, name: str, expected: tuple[int, ...], meaning: str) -> None:
        self._require(name)
        shape = self._shape(name)
        if shape != expected:
            detail = ""
            if len(shape) == 3 and shape[0] != expected[0]:
                detail = f"; it holds {shape[0]} experts but the config has {self.model['n_experts']}"
            raise SourceError(self.file_of[name].path, f"shape {shape} does not match {meaning} = {expected}{detail}",
                              name)
        dtype = self.file_of[name].dtype(name)
        if dtype not in EXPERT_DTYPES:
            raise SourceError(self.file_of[name].path,
                              f"unsupported dtype {dtype}; expert tensors must be {', '.join(EXPERT_DTYPES)}", name)

    def _expert_names(self, layer: int, expert: int) -> tuple[str, str, str]:
        if self.packed:
            prefix = f"model.layers.{layer}.mlp.experts."
            return (prefix + "gate_up_proj", prefix + "gate_up_proj", prefix + "down_proj")
        prefix = f"model.layers.{layer}.block_sparse_moe.experts.{expert}."
        return tuple(prefix + CLASSIC_PARTS[part] + ".weight" for part in ("gate", "up", "down"))  # type: ignore

    def _check_experts(self) -> None:
        m = self.model
        e, d_model, d_ff = m["n_experts"], m["d_model"], m["d_ff"]
        for layer in range(m["n_layers"]):
            if self.packed:
                gate_up, _, down = self._expert_names(layer, 0)
                self._check_tensor(gate_up, (e, 2 * d_ff, d_model), "(n_experts, 2 * d_ff, d_model)")
                self._check_tensor(down, (e, d_model, d_ff), "(n_experts, d_model, d_ff)")
                continue
            for expert in range(e):
                gate, up, down = self._expert_names(layer, expert)
                self._check_tensor(gate, (d_ff, d_model), "(d_ff, d_model)")
                self._check_tensor(up, (d_ff, d_model), "(d_ff, d_model)")
                self._check_tensor(down, (d_model, d_ff), "(d_model, d_ff)")
        for name in self.file_of:
            match = PACKED_RE.match(name) or CLASSIC_RE.match(name)
            if match is None:
                continue
            if int(match.group(1)) >= m["n_layers"]:
                raise SourceError(self.file_of[name].path,
                                  f"layer {match.group(1)} is beyond num_hidden_layers ({m['n_layers']})", name)
            if not self.packed and int(match.group(2)) >= e:
                raise SourceError(self.file_of[name].path,
                                  f"expert {match.group(2)} is beyond num_local_experts ({e})", name)

    def _matrix(self, name: str, data: np.ndarray) -> ExpertMatrix:
        ggml_type = GGML_TYPE_OF[self.file_of[name].dtype(name)]
        rows, cols = data.shape
        return ExpertMatrix(name, ggml_type, rows, cols, data)

    def expert_matrices(self, layer: int, expert: int) -> tuple[ExpertMatrix, ExpertMatrix, ExpertMatrix]:
        gate, up, down = self._expert_names(layer, expert)
        if self.packed:
            d_ff = self.model["d_ff"]
            gate_up = self.file_of[gate].read(gate, expert)
            return (self._matrix(gate, gate_up[:d_ff]), self._matrix(up, gate_up[d_ff:]),
                    self._matrix(down, self.file_of[down].read(down, expert)))
        return tuple(self._matrix(name, self.file_of[name].read(name)) for name in (gate, up, down))  # type: ignore

    # --- dense tensors ------------------------------------------------------------------

    def dense_tensors(self) -> list[DenseTensor]:
        dense = []
        for name, opened in self.file_of.items():
            if PACKED_RE.match(name) or CLASSIC_RE.match(name):
                continue
            dtype = opened.dtype(name)
            if dtype not in GGML_TYPE_OF:
                raise SourceError(opened.path, f"unsupported dtype {dtype} for a dense tensor; supported: "
                                  f"{', '.join(GGML_TYPE_OF)}", name)
            shape = opened.shape(name)
            begin, end = opened.header[name]["data_offsets"]
            if dtype == "BF16":
                def load(opened: _SafetensorsFile = opened, name: str = name, shape: tuple[int, ...] = shape):
                    return opened.read(name).view(np.uint8).reshape(*shape[:-1], shape[-1] * 2)
            else:
                def load(opened: _SafetensorsFile = opened, name: str = name):
                    return opened.read(name)
            dense.append(DenseTensor(name, GGML_TYPE_OF[dtype], shape, end - begin, load))
        return dense
