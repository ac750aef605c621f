"""Reader of the on-disk expert store (format described in docs/STORE_FORMAT.md).

A store is a directory:

    manifest.json      format version, model shape, dtype, one entry per expert
    experts.bin        expert regions, each aligned to `align_bytes` (4096)
    dense.gguf         optional: the model's non-expert tensors, unchanged

Expert id = layer * n_experts + expert, everywhere in MER.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from mer_pipeline.quant import ExpertLayout, check_dtype, expert_layout

FORMAT_NAME = "mer-expert-store"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
ALIGN_BYTES = 4096


class StoreError(ValueError):
    """A store that is missing, malformed or does not match its manifest."""


def checksum_bytes(data: bytes | memoryview | np.ndarray) -> str:
    """Return the checksum the manifest records for an expert region: xxh3-64, hex."""
    return xxhash.xxh3_64_hexdigest(data)


@dataclasses.dataclass(frozen=True)
class ModelShape:
    n_layers: int
    n_experts: int
    top_k: int
    d_model: int
    d_ff: int


@dataclasses.dataclass(frozen=True)
class ExpertEntry:
    layer: int
    expert: int
    file: str
    offset: int
    length: int
    checksum: str


@dataclasses.dataclass
class Store:
    """An opened store: its manifest, validated, and paths to its files."""

    path: Path
    shape: ModelShape
    dtype: str
    layout: ExpertLayout
    experts: list[ExpertEntry]
    manifest: dict[str, Any]

    @property
    def n_experts_total(self) -> int:
        return self.shape.n_layers * self.shape.n_experts

    @property
    def region_bytes(self) -> int:
        return self.layout.region_bytes

    def expert_id(self, layer: int, expert: int) -> int:
        if not (0 <= layer < self.shape.n_layers and 0 <= expert < self.shape.n_experts):
            raise StoreError(
                f"expert (layer={layer}, expert={expert}) is outside the store's "
                f"{self.shape.n_layers} layers x {self.shape.n_experts} experts"
            )
        return layer * self.shape.n_experts + expert

    def entry(self, expert_id: int) -> ExpertEntry:
        if not 0 <= expert_id < len(self.experts):
            raise StoreError(f"expert id {expert_id} is outside 0..{len(self.experts) - 1}")
        return self.experts[expert_id]

    def data_path(self, entry: ExpertEntry) -> Path:
        return self.path / entry.file

    def read_expert(self, expert_id: int) -> np.ndarray:
        """Read one expert region with ordinary buffered I/O (tests and tools, not the daemon)."""
        entry = self.entry(expert_id)
        with open(self.data_path(entry), "rb") as f:
            f.seek(entry.offset)
            data = f.read(entry.length)
        if len(data) != entry.length:
            raise StoreError(
                f"{self.data_path(entry)}: expert {expert_id} needs {entry.length} bytes at "
                f"offset {entry.offset} but the file ends after {len(data)}; the store is truncated"
            )
        return np.frombuffer(data, dtype=np.uint8)

    @property
    def dense_path(self) -> Path | None:
        dense = self.manifest.get("dense")
        if not dense:
            return None
        return self.path / dense["file"]


def _require(mapping: dict[str, Any], key: str, where: str) -> Any:
    if key not in mapping:
        raise StoreError(f"{where}: missing key {key!r}")
    return mapping[key]


def open_store(path: str | os.PathLike[str]) -> Store:
    """Open and validate a store directory. Does not read expert data."""
    root = Path(path)
    manifest_path = root / MANIFEST_NAME
    if not manifest_path.is_file():
        raise StoreError(
            f"{manifest_path} not found; create a store with `mer store synth` or `mer store import`"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise StoreError(f"{manifest_path}: invalid JSON ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise StoreError(f"{manifest_path}: not a MER store manifest (format != {FORMAT_NAME!r})")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise StoreError(
            f"{manifest_path}: format_version {version!r} is not supported (expected {FORMAT_VERSION})"
        )

    model = _require(manifest, "model", str(manifest_path))
    try:
        shape = ModelShape(
            n_layers=int(model["n_layers"]),
            n_experts=int(model["n_experts"]),
            top_k=int(model["top_k"]),
            d_model=int(model["d_model"]),
            d_ff=int(model["d_ff"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise StoreError(f"{manifest_path}: invalid model shape ({exc!r})") from exc
    dtype = check_dtype(_require(manifest, "dtype", str(manifest_path)))
    align_bytes = int(manifest.get("align_bytes", ALIGN_BYTES))
    layout = expert_layout(shape.d_model, shape.d_ff, dtype, align_bytes)

    entries = []
    for index, raw in enumerate(_require(manifest, "experts", str(manifest_path))):
        where = f"{manifest_path}: experts[{index}]"
        entry = ExpertEntry(
            layer=int(_require(raw, "layer", where)),
            expert=int(_require(raw, "expert", where)),
            file=str(_require(raw, "file", where)),
            offset=int(_require(raw, "offset", where)),
            length=int(_require(raw, "length", where)),
            checksum=str(_require(raw, "checksum", where)),
        )
        if entry.layer * shape.n_experts + entry.expert != index:
            raise StoreError(f"{where}: entries must be ordered by expert id (layer * n_experts + expert)")
        if entry.offset % align_bytes or entry.length != layout.region_bytes:
            raise StoreError(
                f"{where}: offset {entry.offset} must be a multiple of {align_bytes} and length "
                f"{entry.length} must equal the region size {layout.region_bytes}"
            )
        if Path(entry.file).is_absolute() or ".." in Path(entry.file).parts:
            raise StoreError(f"{where}: file {entry.file!r} must be a plain name inside the store")
        entries.append(entry)
    if len(entries) != shape.n_layers * shape.n_experts:
        raise StoreError(
            f"{manifest_path}: {len(entries)} expert entries, expected "
            f"{shape.n_layers} layers x {shape.n_experts} experts"
        )
    return Store(root, shape, dtype, layout, entries, manifest)
