"""Reader of the on-disk expert store (format described in docs/STORE_FORMAT.md).

A store is a directory:

    manifest.json      format version, model config, dtype, one entry per expert
    experts.bin        expert regions, each aligned to `align_bytes` (4096)
    dense.gguf         optional: the model's non-expert tensors, unchanged

Expert id = layer * n_experts + expert, everywhere in MER.

open_store() validates the manifest and does a cheap size check of the files it names;
verify_store() reads every expert region and compares its checksum.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from collections.abc import Callable
from typing import Any

import numpy as np
import xxhash

from mer_pipeline.quant import ExpertLayout, LayoutError, check_dtype, dequantize_packed, expert_layout

FORMAT_NAME = "mer-expert-store"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
DATA_FILE_NAME = "experts.bin"
DENSE_FILE_NAME = "dense.gguf"
ALIGN_BYTES = 4096
CHECKSUM_ALGORITHM = "xxh3_64"
# Bytes read per call when verify_store() checksums a file other than experts.bin.
VERIFY_CHUNK_BYTES = 16 << 20


class StoreError(ValueError):
    """A store that is missing, malformed or does not match its manifest."""


def checksum_bytes(data: bytes | memoryview | np.ndarray) -> str:
    """Return the checksum the manifest records for an expert region: xxh3-64, hex."""
    return xxhash.xxh3_64_hexdigest(data)


def checksum_hasher() -> "xxhash.xxh3_64":
    """Return an incremental form of `checksum_bytes`: update() in order, then hexdigest()."""
    return xxhash.xxh3_64()


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


@dataclasses.dataclass(frozen=True)
class BadExpert:
    """An expert region whose bytes do not match the manifest, as found by verify_store()."""

    expert_id: int
    layer: int
    expert: int
    file: str
    offset: int
    reason: str

    def describe(self) -> str:
        return (
            f"expert {self.expert_id} (layer={self.layer}, expert={self.expert}) in {self.file} "
            f"at offset {self.offset}: {self.reason}"
        )


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

    @property
    def model(self) -> dict[str, Any]:
        """The model config: the shape fields plus whatever the source recorded (None if unknown)."""
        return self.manifest["model"]

    @property
    def source(self) -> dict[str, Any] | None:
        return self.manifest.get("source")

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

    def expert_weights(self, expert_id: int) -> dict[str, np.ndarray]:
        """Return the float32 gate [d_ff, d_model], up [d_ff, d_model] and down [d_model, d_ff]
        matrices of one expert, dequantized (tests and tools)."""
        region = self.read_expert(expert_id)
        return {
            section.name: dequantize_packed(
                region[section.offset : section.offset + section.nbytes], section.rows, section.cols, self.dtype
            )
            for section in self.layout.sections
        }

    @property
    def dense_path(self) -> Path | None:
        dense = self.manifest.get("dense")
        if not dense:
            return None
        return self.path / dense["file"]

    def open_dense(self) -> Any:
        """Open dense.gguf with gguf.GGUFReader (memory-mapped); raise StoreError if the store has none."""
        from gguf import GGUFReader

        if self.dense_path is None:
            raise StoreError(f"{self.path}: the store has no dense tensors (manifest 'dense' is null)")
        return GGUFReader(self.dense_path)


def _require(mapping: dict[str, Any], key: str, where: str) -> Any:
    if key not in mapping:
        raise StoreError(f"{where}: missing key {key!r}")
    return mapping[key]


def _check_plain_name(name: str, where: str) -> None:
    if Path(name).is_absolute() or ".." in Path(name).parts:
        raise StoreError(f"{where}: file {name!r} must be a plain name inside the store")


def _check_file_sizes(root: Path, manifest: dict[str, Any], entries: list[ExpertEntry], where: str) -> None:
    """Compare file sizes with the manifest: a cheap check that catches truncated or replaced files."""
    recorded = {}
    for index, raw in enumerate(manifest.get("files") or []):
        name = str(_require(raw, "name", f"{where}: files[{index}]"))
        _check_plain_name(name, f"{where}: files[{index}]")
        recorded[name] = int(_require(raw, "bytes", f"{where}: files[{index}]"))
    dense = manifest.get("dense")
    if dense:
        _check_plain_name(str(_require(dense, "file", f"{where}: dense")), f"{where}: dense")
        recorded.setdefault(dense["file"], None)

    ends: dict[str, int] = {}
    for entry in entries:
        ends[entry.file] = max(ends.get(entry.file, 0), entry.offset + entry.length)
    for name in sorted(set(recorded) | set(ends)):
        path = root / name
        try:
            actual = path.stat().st_size
        except FileNotFoundError:
            raise StoreError(f"{path} not found; the store is incomplete") from None
        expected = recorded.get(name)
        if expected is not None and actual != expected:
            raise StoreError(
                f"{path} is {actual} bytes but the manifest records {expected}; the file was changed or "
                "truncated after the store was written (run `mer store verify` to find the bad experts)"
            )
        if actual < ends.get(name, 0):
            raise StoreError(
                f"{path} is {actual} bytes but its expert regions end at byte {ends[name]}; the store is truncated"
            )


def open_store(path: str | os.PathLike[str]) -> Store:
    """Open and validate a store directory. Checks file sizes but does not read expert data."""
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
    algorithm = manifest.get("checksum_algorithm", CHECKSUM_ALGORITHM)
    if algorithm != CHECKSUM_ALGORITHM:
        raise StoreError(
            f"{manifest_path}: checksum_algorithm {algorithm!r} is not supported (expected {CHECKSUM_ALGORITHM!r})"
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
    try:
        dtype = check_dtype(_require(manifest, "dtype", str(manifest_path)))
        align_bytes = int(manifest.get("align_bytes", ALIGN_BYTES))
        layout = expert_layout(shape.d_model, shape.d_ff, dtype, align_bytes)
    except LayoutError as exc:
        raise StoreError(f"{manifest_path}: {exc}") from exc

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
        _check_plain_name(entry.file, where)
        entries.append(entry)
    if len(entries) != shape.n_layers * shape.n_experts:
        raise StoreError(
            f"{manifest_path}: {len(entries)} expert entries, expected "
            f"{shape.n_layers} layers x {shape.n_experts} experts"
        )
    _check_file_sizes(root, manifest, entries, str(manifest_path))
    return Store(root, shape, dtype, layout, entries, manifest)


def checksum_file(path: Path) -> str:
    """Return the xxh3-64 checksum (hex) of a whole file, read in chunks."""
    digest = xxhash.xxh3_64()
    with open(path, "rb") as f:
        while chunk := f.read(VERIFY_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


@dataclasses.dataclass(frozen=True)
class BadFile:
    """A whole file (dense.gguf) whose checksum does not match the manifest."""

    file: str
    reason: str

    def describe(self) -> str:
        return f"{self.file}: {self.reason}"


@dataclasses.dataclass
class VerifyResult:
    bad_experts: list[BadExpert]
    bad_files: list[BadFile]

    @property
    def ok(self) -> bool:
        return not self.bad_experts and not self.bad_files


def verify_store(store: Store, on_progress: Callable[[int], None] | None = None) -> VerifyResult:
    """Read every expert region and compare its checksum with the manifest.

    Files that the manifest gives a whole-file checksum (dense.gguf) are checked too.
    `on_progress(n_bytes)` is called after each expert region.
    """
    bad_experts = []
    handles: dict[str, Any] = {}
    try:
        for expert_id, entry in enumerate(store.experts):
            f = handles.get(entry.file)
            if f is None:
                f = handles[entry.file] = open(store.path / entry.file, "rb")
            f.seek(entry.offset)
            data = f.read(entry.length)
            reason = None
            if len(data) != entry.length:
                reason = f"the file ends {len(data)} bytes into the {entry.length}-byte region"
            else:
                actual = checksum_bytes(data)
                if actual != entry.checksum:
                    reason = f"checksum {actual} does not match the manifest's {entry.checksum}"
            if reason is not None:
                bad_experts.append(BadExpert(expert_id, entry.layer, entry.expert, entry.file, entry.offset, reason))
            if on_progress is not None:
                on_progress(entry.length)
    finally:
        for f in handles.values():
            f.close()

    bad_files = []
    for raw in store.manifest.get("files") or []:
        if raw.get("checksum") is None:
            continue  # experts.bin: checked region by region above
        actual = checksum_file(store.path / raw["name"])
        if actual != raw["checksum"]:
            bad_files.append(BadFile(raw["name"], f"checksum {actual} does not match the manifest's {raw['checksum']}"))
    return VerifyResult(bad_experts, bad_files)
