"""Routing traces: the recorded routing of a MoE model, replayed by `mer stream`.

File format (JSON lines), one row per (problem, layer, generated token):
    {"problem_id": ..., "layer": 0..L-1, "token_idx": int,
     "experts": [e0, e1, ...], "gating_probs": [p0, p1, ...]}
Rows may come in any order. Tokens are replayed in (problem, token index) order,
and within a token layer by layer. A (token, layer) cell with no row is unknown:
that layer is skipped for that token and counted, not treated as an error.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Iterator

import numpy as np


class TraceError(ValueError):
    """A malformed routing trace row."""


@dataclasses.dataclass
class TokenRouting:
    """The routing of one token: for each known layer, its experts and their weights."""

    problem: str
    token_idx: int
    layers: list[int]
    experts: list[list[int]]
    probs: list[list[float]]


@dataclasses.dataclass
class Trace:
    n_layers: int
    n_experts: int
    top_k: int
    tokens: list[TokenRouting]
    missing_cells: int

    def access_ids(self) -> list[int]:
        """Expert ids (layer * n_experts + expert) in replay order."""
        return [
            layer * self.n_experts + expert
            for token in self.tokens
            for layer, experts in zip(token.layers, token.experts)
            for expert in experts
        ]


def _row_error(path: Path, line_no: int, message: str) -> TraceError:
    return TraceError(f"{path}:{line_no}: {message}")


def _parse_row(raw: str, path: Path, line_no: int, n_layers: int, n_experts: int) -> tuple:
    try:
        row = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise _row_error(path, line_no, f"invalid JSON ({exc.msg})") from None
    if not isinstance(row, dict):
        raise _row_error(path, line_no, "row is not a JSON object")
    for key in ("problem_id", "layer", "token_idx", "experts", "gating_probs"):
        if key not in row:
            raise _row_error(path, line_no, f"missing key {key!r}")
    layer, token_idx, experts, probs = row["layer"], row["token_idx"], row["experts"], row["gating_probs"]
    if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < n_layers:
        raise _row_error(path, line_no, f"layer {layer!r} is outside 0..{n_layers - 1}")
    if not isinstance(token_idx, int) or isinstance(token_idx, bool) or token_idx < 0:
        raise _row_error(path, line_no, f"token_idx {token_idx!r} is not a non-negative integer")
    if not isinstance(experts, list) or not experts or len(experts) != len(set(map(repr, experts))):
        raise _row_error(path, line_no, f"experts {experts!r} must be a non-empty list of distinct ids")
    for expert in experts:
        if not isinstance(expert, int) or isinstance(expert, bool) or not 0 <= expert < n_experts:
            raise _row_error(path, line_no, f"expert id {expert!r} is outside 0..{n_experts - 1}")
    if not isinstance(probs, list) or len(probs) != len(experts):
        raise _row_error(path, line_no, f"gating_probs {probs!r} must have one weight per expert ({len(experts)})")
    for p in probs:
        if not isinstance(p, (int, float)) or isinstance(p, bool) or not math.isfinite(p):
            raise _row_error(path, line_no, f"gating_probs {probs!r} must be finite numbers")
    return str(row["problem_id"]), token_idx, layer, experts, [float(p) for p in probs]


def load_trace(path: str | Path, n_layers: int = 32, n_experts: int = 8) -> Trace:
    """Read and validate a JSON-lines routing trace."""
    path = Path(path)
    cells: dict[tuple[str, int], dict[int, tuple[list[int], list[float]]]] = {}
    problem_order: dict[str, int] = {}
    top_k = 0
    with path.open("r", encoding="utf-8") as f:
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            problem, token_idx, layer, experts, probs = _parse_row(raw, path, line_no, n_layers, n_experts)
            if top_k and len(experts) != top_k:
                raise _row_error(path, line_no, f"{len(experts)} experts, but earlier rows route to {top_k}")
            top_k = len(experts)
            problem_order.setdefault(problem, len(problem_order))
            token_cells = cells.setdefault((problem, token_idx), {})
            if layer in token_cells:
                raise _row_error(path, line_no, f"duplicate row for problem {problem!r} token {token_idx} layer {layer}")
            token_cells[layer] = (experts, probs)
    if not cells:
        raise TraceError(f"{path}: no routing rows")

    tokens = []
    missing = 0
    for problem, token_idx in sorted(cells, key=lambda key: (problem_order[key[0]], key[1])):
        token_cells = cells[(problem, token_idx)]
        layers = sorted(token_cells)
        missing += n_layers - len(layers)
        tokens.append(
            TokenRouting(
                problem=problem,
                token_idx=token_idx,
                layers=layers,
                experts=[token_cells[layer][0] for layer in layers],
                probs=[token_cells[layer][1] for layer in layers],
            )
        )
    return Trace(n_layers, n_experts, top_k, tokens, missing)


def synthetic_trace(kind: str, n_layers: int, n_experts: int, top_k: int, n_tokens: int, seed: int = 0) -> Trace:
    """Make a routing trace: `uniform`, `zipf:S` (per-layer popularity ~ rank^-S) or
    `markov:P` (each layer repeats the previous token's experts with probability P)."""
    rng = np.random.default_rng(seed)
    name, _, arg = kind.partition(":")
    if top_k > n_experts:
        raise TraceError(f"top_k {top_k} exceeds the {n_experts} experts per layer")
    if name == "uniform":
        weights = np.ones((n_layers, n_experts))
    elif name == "zipf":
        s = float(arg or 1.0)
        weights = np.stack([rng.permutation(1.0 / np.arange(1, n_experts + 1) ** s) for _ in range(n_layers)])
    elif name == "markov":
        weights = np.ones((n_layers, n_experts))
    else:
        raise TraceError(f"synthetic trace kind {kind!r} is unknown; use uniform, zipf:S or markov:P")
    repeat_p = float(arg or 0.5) if name == "markov" else 0.0
    weights = weights / weights.sum(axis=1, keepdims=True)

    tokens = []
    previous: list[list[int]] | None = None
    for t in range(n_tokens):
        experts = []
        for layer in range(n_layers):
            if previous is not None and rng.random() < repeat_p:
                chosen = previous[layer]
            else:
                chosen = [int(e) for e in rng.choice(n_experts, size=top_k, replace=False, p=weights[layer])]
            experts.append(chosen)
        probs = []
        for _ in range(n_layers):
            raw = rng.random(top_k) + 0.1
            probs.append([float(p) for p in raw / raw.sum()])
        tokens.append(TokenRouting("synthetic", t, list(range(n_layers)), experts, probs))
        previous = experts
    return Trace(n_layers, n_experts, top_k, tokens, 0)


def iter_inputs(n_tokens: int, d_model: int, inputs: np.ndarray | None, seed: int) -> Iterator[np.ndarray]:
    """Yield each token's starting hidden state: a row of `inputs`, else seeded N(0, 1)."""
    if inputs is not None:
        if inputs.ndim != 2 or inputs.shape[1] != d_model or inputs.shape[0] < n_tokens:
            raise TraceError(
                f"inputs of shape {inputs.shape} do not cover {n_tokens} tokens of d_model {d_model}"
            )
        for row in inputs[:n_tokens]:
            yield np.ascontiguousarray(row, dtype=np.float32)
        return
    rng = np.random.default_rng(seed)
    for _ in range(n_tokens):
        yield rng.standard_normal(d_model, dtype=np.float32)
