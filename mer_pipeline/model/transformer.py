"""The Mixtral forward pass: embedding, RMSNorm, rotary grouped-query attention with a KV
cache, the softmax top-k router, the expert FFNs through an ExpertBackend, and the output head.

All activations are float32. Per layer, for the tokens of one chunk at positions p..p+T-1:

    x = rmsnorm(h) * attn_norm
    h = h + o_proj(attention(rope(q_proj x), rope(k_proj x), v_proj x, cache up to p+T))
    x = rmsnorm(h) * ffn_norm
    probs = softmax(router x) over all experts; keep the top k and divide by their sum
    h = h + sum over the k ranks of prob * FFN(expert)(x)

A chunk's tokens are grouped by expert, so each expert is requested once per layer per
chunk, with every row routed to it. Each token's expert outputs are added in rank order
(highest probability first), so the result does not depend on the order in which the expert results arrive.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from mer_pipeline.model.config import ModelConfig, ModelError
from mer_pipeline.model.experts import ExpertBackend
from mer_pipeline.model.weights import DenseWeights, LayerWeights

log = logging.getLogger(__name__)

# Tokens per prefill chunk: the most rows one expert request carries.
DEFAULT_CHUNK_TOKENS = 64
# Lookahead distances whose router precision is measured on every layer step.
MEASURED_DISTANCES = 4


def rmsnorm(h: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """weight * h / sqrt(mean(h^2) + eps), per row, in float32."""
    variance = np.mean(h * h, axis=-1, keepdims=True, dtype=np.float32)
    return (weight * (h / np.sqrt(variance + np.float32(eps)))).astype(np.float32)


def route(logits: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """Return (experts [T, k], weights [T, k]): softmax over all experts, the top k (highest
    first, lower expert id on ties), renormalised to sum to 1."""
    shifted = logits - logits.max(axis=-1, keepdims=True)
    probs = np.exp(shifted)
    probs /= probs.sum(axis=-1, keepdims=True)
    experts = np.argsort(-probs, axis=-1, kind="stable")[:, :top_k]
    weights = np.take_along_axis(probs, experts, axis=-1)
    weights = (weights / weights.sum(axis=-1, keepdims=True)).astype(np.float32)
    return experts, weights


class RotaryEmbedding:
    """Hugging Face "rotate half" rotary embedding: x * cos + rotate_half(x) * sin."""

    def __init__(self, head_dim: int, theta: float) -> None:
        self.head_dim = head_dim
        self.inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))

    def tables(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        angles = positions[:, None].astype(np.float64) * self.inv_freq[None, :]
        angles = np.concatenate([angles, angles], axis=-1)
        return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)

    @staticmethod
    def apply(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
        """x: [T, heads, head_dim]; cos, sin: [T, head_dim]."""
        half = x.shape[-1] // 2
        rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
        return (x * cos[:, None, :] + rotated * sin[:, None, :]).astype(np.float32)


@dataclasses.dataclass
class KVCache:
    """Keys and values of every position so far: float32 [layers, kv_heads, capacity, head_dim]."""

    keys: np.ndarray
    values: np.ndarray
    length: int = 0

    @classmethod
    def empty(cls, config: ModelConfig, capacity: int) -> "KVCache":
        shape = (config.n_layers, config.n_kv_heads, capacity, config.head_dim)
        return cls(np.zeros(shape, np.float32), np.zeros(shape, np.float32))

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]


@dataclasses.dataclass
class LookaheadStats:
    """Precision and recall of the lookahead guess at each distance d.

    The guess is layer l+d's router applied to the residual stream entering layer l's MoE
    block. It is compared with the experts that layer l+d then picks, as sets of experts
    per layer step of a chunk."""

    predicted: np.ndarray  # [distance] experts guessed
    actual: np.ndarray     # [distance] experts used at the guessed layers
    correct: np.ndarray    # [distance] guessed experts that were used

    @classmethod
    def empty(cls, distances: int) -> "LookaheadStats":
        return cls(*(np.zeros(distances, np.int64) for _ in range(3)))

    def precision(self) -> list[float]:
        return [float(c / p) if p else 0.0 for c, p in zip(self.correct, self.predicted)]

    def recall(self) -> list[float]:
        return [float(c / a) if a else 0.0 for c, a in zip(self.correct, self.actual)]

    def as_dict(self) -> dict:
        return {"distance": list(range(1, len(self.predicted) + 1)), "precision": self.precision(),
                "recall": self.recall(), "guessed": self.predicted.tolist()}


class MixtralModel:
    """A Mixtral model whose dense weights live in this process and whose experts run in a backend.

    `lookahead` is the farthest distance, in layers, for which the model sends prefetch
    hints from later layers' routers, and 0 sends none. With "auto" the model hints each
    distance whose measured precision so far is at least `min_precision`. Before any
    measurement exists it hints distance 1 only.
    """

    def __init__(self, config: ModelConfig, weights: DenseWeights, experts: ExpertBackend, *,
                 chunk_tokens: int = DEFAULT_CHUNK_TOKENS, lookahead: int | str = "auto",
                 min_precision: float = 0.5) -> None:
        if not 1 <= chunk_tokens <= DEFAULT_CHUNK_TOKENS:
            raise ModelError(f"chunk_tokens ({chunk_tokens}) must be in 1..{DEFAULT_CHUNK_TOKENS}")
        self.config = config
        self.weights = weights
        self.experts = experts
        self.chunk_tokens = chunk_tokens
        self.lookahead = lookahead
        self.min_precision = min_precision
        self.rope = RotaryEmbedding(config.head_dim, config.rope_theta)
        self.lookahead_stats = LookaheadStats.empty(min(MEASURED_DISTANCES, max(config.n_layers - 1, 0)))
        # Guesses awaiting their layer: {target layer: [(distance, set of experts)]}.
        self._guesses: dict[int, list[tuple[int, set[int]]]] = {}
        self.routing_log: list[tuple[int, int, list[list[int]]]] = []  # (first position, layer, experts per token)

    def new_cache(self, capacity: int | None = None) -> KVCache:
        capacity = capacity or self.config.context_length
        return KVCache.empty(self.config, capacity)

    # --- checks -------------------------------------------------------------------------

    def check_tokens(self, token_ids: list[int], cache: KVCache) -> None:
        vocab = self.config.vocab_size
        for index, token in enumerate(token_ids):
            if not 0 <= int(token) < vocab:
                raise ModelError(f"token id {token} at position {index} is outside the vocabulary 0..{vocab - 1}")
        end = cache.length + len(token_ids)
        if end > cache.capacity:
            raise ModelError(
                f"{end} tokens ({cache.length} cached + {len(token_ids)} new) exceed the context of "
                f"{cache.capacity} positions"
            )

    # --- forward ------------------------------------------------------------------------

    def forward(self, token_ids: list[int], cache: KVCache) -> np.ndarray:
        """Run the tokens after those in the cache, chunk by chunk; return float32 logits [T, vocab]."""
        self.check_tokens(token_ids, cache)
        logits = []
        for start in range(0, len(token_ids), self.chunk_tokens):
            chunk = np.asarray(token_ids[start : start + self.chunk_tokens], dtype=np.int64)
            logits.append(self._forward_chunk(chunk, cache))
        return np.concatenate(logits, axis=0)

    def _forward_chunk(self, token_ids: np.ndarray, cache: KVCache) -> np.ndarray:
        c = self.config
        first = cache.length
        positions = np.arange(first, first + len(token_ids))
        cos, sin = self.rope.tables(positions)
        h = self.weights.embed(token_ids)
        for layer, weights in enumerate(self.weights.layers):
            x = rmsnorm(h, weights.attn_norm, c.rms_norm_eps)
            h = h + self._attention(layer, weights, x, cache, first, cos, sin)
            x = rmsnorm(h, weights.ffn_norm, c.rms_norm_eps)
            self._lookahead(layer, h)
            h = h + self._moe(layer, weights, x, first)
        cache.length = first + len(token_ids)
        x = rmsnorm(h, self.weights.final_norm, c.rms_norm_eps)
        return self.weights.output(x)

    def _attention(self, layer: int, weights: LayerWeights, x: np.ndarray, cache: KVCache, first: int,
                   cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
        c = self.config
        n = x.shape[0]
        end = first + n
        q = RotaryEmbedding.apply(weights.q(x).reshape(n, c.n_heads, c.head_dim), cos, sin)
        k = RotaryEmbedding.apply(weights.k(x).reshape(n, c.n_kv_heads, c.head_dim), cos, sin)
        v = weights.v(x).reshape(n, c.n_kv_heads, c.head_dim)
        cache.keys[layer, :, first:end] = k.transpose(1, 0, 2)
        cache.values[layer, :, first:end] = v.transpose(1, 0, 2)

        keys = cache.keys[layer, :, :end]      # [kv_heads, end, head_dim]
        values = cache.values[layer, :, :end]
        # Query head j uses KV head j // group_size: group the query heads by KV head.
        q = q.transpose(1, 0, 2).reshape(c.n_kv_heads, c.group_size * n, c.head_dim)
        scores = np.matmul(q, keys.transpose(0, 2, 1)) * np.float32(1.0 / np.sqrt(c.head_dim))
        scores = scores.reshape(c.n_kv_heads, c.group_size, n, end)
        # Causal mask: the token at position first + i attends to positions 0..first + i.
        future = np.arange(end)[None, :] > (first + np.arange(n))[:, None]
        scores = np.where(future, np.float32(-np.inf), scores)
        scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
        scores /= scores.sum(axis=-1, keepdims=True)
        out = np.matmul(scores.reshape(c.n_kv_heads, c.group_size * n, end), values)
        out = out.reshape(c.n_heads, n, c.head_dim).transpose(1, 0, 2).reshape(n, c.n_heads * c.head_dim)
        return weights.o(np.ascontiguousarray(out, dtype=np.float32))

    def _moe(self, layer: int, weights: LayerWeights, x: np.ndarray, first: int) -> np.ndarray:
        c = self.config
        experts, probs = route(weights.router(x), c.top_k)
        self._score_guesses(layer, experts)
        self.routing_log.append((first, layer, experts.tolist()))
        for row, chosen in enumerate(experts):
            self.experts.observe(first + row, layer, [int(e) for e in chosen])

        # One request per expert, with every row routed to it, in expert id order.
        used = sorted({int(e) for e in experts.reshape(-1)})
        rows_of = {e: np.nonzero((experts == e).any(axis=1))[0] for e in used}
        outputs = self.experts.run(layer, [(e, np.ascontiguousarray(x[rows_of[e]])) for e in used])
        result_of = dict(zip(used, outputs))
        position_of = {e: {int(r): i for i, r in enumerate(rows_of[e])} for e in used}

        total = np.zeros_like(x)
        for rank in range(c.top_k):
            for row in range(x.shape[0]):
                e = int(experts[row, rank])
                total[row] += probs[row, rank] * result_of[e][position_of[e][row]]
        return total

    # --- lookahead ------------------------------------------------------------------------

    def _lookahead(self, layer: int, h: np.ndarray) -> None:
        """Guess the experts of layers layer+1.. from the current residual stream; hint the chosen distances."""
        c = self.config
        distances = len(self.lookahead_stats.predicted)
        hinted = self.hinted_distances()
        for distance in range(1, distances + 1):
            target = layer + distance
            if target >= c.n_layers:
                break
            weights = self.weights.layers[target]
            x = rmsnorm(h, weights.ffn_norm, c.rms_norm_eps)
            experts, probs = route(weights.router(x), c.top_k)
            guess = {int(e) for e in experts.reshape(-1)}
            self._guesses.setdefault(target, []).append((distance, guess))
            if distance <= hinted:
                self.experts.hint(target, sorted(guess), distance, float(probs.mean()))

    def hinted_distances(self) -> int:
        if self.lookahead != "auto":
            return int(self.lookahead)
        precision = self.lookahead_stats.precision()
        hinted = 0
        for distance, value in enumerate(precision, start=1):
            measured = self.lookahead_stats.predicted[distance - 1] > 0
            if (measured and value >= self.min_precision) or (not measured and distance == 1):
                hinted = distance
            else:
                break
        return hinted

    def _score_guesses(self, layer: int, experts: np.ndarray) -> None:
        actual = {int(e) for e in experts.reshape(-1)}
        stats = self.lookahead_stats
        for distance, guess in self._guesses.pop(layer, []):
            stats.predicted[distance - 1] += len(guess)
            stats.actual[distance - 1] += len(actual)
            stats.correct[distance - 1] += len(guess & actual)
