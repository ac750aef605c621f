"""Routing predictors: from the experts observed so far, guess the experts of coming
layer steps so the I/O daemon can read them before they are demanded.

Decode visits layers 0..L-1 for each token, then starts over. An observation is
(token, layer, expert ids). `predict` returns hints (expert id, steps ahead,
confidence) for the next `lookahead` layer steps; steps past the last layer wrap
to the next token.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Hint:
    expert: int
    steps_ahead: int
    confidence: float


class Predictor:
    """Base class: observes routing, predicts nothing."""

    name = "none"

    def __init__(self, n_layers: int, n_experts: int) -> None:
        self.n_layers = n_layers
        self.n_experts = n_experts

    def observe(self, token: int, layer: int, expert_ids: list[int]) -> None:
        pass

    def predict(self, layer: int, lookahead: int, max_hints: int, min_confidence: float) -> list[Hint]:
        return []

    def _target_layers(self, layer: int, lookahead: int) -> list[tuple[int, int]]:
        """(steps ahead, target layer) for the next `lookahead` layer steps."""
        return [(d, (layer + d) % self.n_layers) for d in range(1, lookahead + 1)]

    @staticmethod
    def _select(scored: list[Hint], max_hints: int, min_confidence: float) -> list[Hint]:
        # Nearest steps first, then most likely: a near read is the one that can still be hidden.
        kept = [h for h in scored if h.confidence >= min_confidence]
        kept.sort(key=lambda h: (h.steps_ahead, -h.confidence))
        return kept[:max_hints]


class FrequencyPredictor(Predictor):
    """Hints the most frequently routed experts of each coming layer."""

    name = "frequency"

    def __init__(self, n_layers: int, n_experts: int) -> None:
        super().__init__(n_layers, n_experts)
        self.counts = np.zeros((n_layers, n_experts), dtype=np.float64)
        self.routed_per_step = 1

    def observe(self, token: int, layer: int, expert_ids: list[int]) -> None:
        self.routed_per_step = max(1, len(expert_ids))
        for expert_id in expert_ids:
            self.counts[layer, expert_id % self.n_experts] += 1

    def predict(self, layer: int, lookahead: int, max_hints: int, min_confidence: float) -> list[Hint]:
        hints = []
        for steps_ahead, target in self._target_layers(layer, lookahead):
            total = self.counts[target].sum()
            if total == 0:
                continue
            share = self.counts[target] * self.routed_per_step / total
            for expert in np.argsort(-share)[: self.routed_per_step]:
                hints.append(Hint(target * self.n_experts + int(expert), steps_ahead, float(min(1.0, share[expert]))))
        return self._select(hints, max_hints, min_confidence)


class PreviousTokenPredictor(Predictor):
    """Baseline: hints, for each coming layer, the experts it routed to at its last visit."""

    name = "previous"

    def __init__(self, n_layers: int, n_experts: int) -> None:
        super().__init__(n_layers, n_experts)
        self.last: dict[int, list[int]] = {}

    def observe(self, token: int, layer: int, expert_ids: list[int]) -> None:
        self.last[layer] = [e % self.n_experts for e in expert_ids]

    def predict(self, layer: int, lookahead: int, max_hints: int, min_confidence: float) -> list[Hint]:
        hints = [
            Hint(target * self.n_experts + expert, steps_ahead, 1.0)
            for steps_ahead, target in self._target_layers(layer, lookahead)
            for expert in self.last.get(target, [])
        ]
        return self._select(hints, max_hints, min_confidence)


class TransitionPredictor(Predictor):
    """Learns online which experts follow which.

    Two count tables. Within a token, one counts expert a at layer l with expert b at a
    later layer m (cross-layer co-activation). Across tokens, the other counts expert a at
    layer l of one token with expert b at layer l of the next (temporal reuse). A coming layer m of the same token
    is scored from the current layer's experts; a layer that wraps to the next token is
    scored from this token's experts at that layer.
    """

    name = "transition"

    def __init__(self, n_layers: int, n_experts: int) -> None:
        super().__init__(n_layers, n_experts)
        shape = (n_layers, n_experts, n_layers, n_experts)
        self.cross_layer = np.zeros(shape, dtype=np.float32)
        self.cross_layer_total = np.zeros((n_layers, n_experts), dtype=np.float32)
        self.next_token = np.zeros((n_layers, n_experts, n_experts), dtype=np.float32)
        self.next_token_total = np.zeros((n_layers, n_experts), dtype=np.float32)
        self.current_token: int | None = None
        self.current: dict[int, list[int]] = {}
        self.previous: dict[int, list[int]] = {}

    def observe(self, token: int, layer: int, expert_ids: list[int]) -> None:
        experts = [e % self.n_experts for e in expert_ids]
        if token != self.current_token:
            self.previous = self.current
            self.current = {}
            self.current_token = token
        for earlier_layer, earlier in self.current.items():
            for a in earlier:
                self.cross_layer_total[earlier_layer, a] += 1
                for b in experts:
                    self.cross_layer[earlier_layer, a, layer, b] += 1
        for a in self.previous.get(layer, []):
            self.next_token_total[layer, a] += 1
            for b in experts:
                self.next_token[layer, a, b] += 1
        self.current[layer] = experts

    def predict(self, layer: int, lookahead: int, max_hints: int, min_confidence: float) -> list[Hint]:
        hints = []
        source = self.current.get(layer, [])
        for steps_ahead, target in self._target_layers(layer, lookahead):
            if layer + steps_ahead < self.n_layers:
                scores = self._score(source, lambda a: (self.cross_layer[layer, a, target], self.cross_layer_total[layer, a] / max(1, self.n_layers - layer - 1)))
            else:
                scores = self._score(self.current.get(target, []), lambda a: (self.next_token[target, a], self.next_token_total[target, a]))
            if scores is None:
                continue
            for expert in np.argsort(-scores)[: max(1, len(source))]:
                hints.append(Hint(target * self.n_experts + int(expert), steps_ahead, float(min(1.0, scores[expert]))))
        return self._select(hints, max_hints, min_confidence)

    def _score(self, experts: list[int], table) -> np.ndarray | None:
        """Average over the given experts of P(next expert | expert), or None without data."""
        scores = np.zeros(self.n_experts, dtype=np.float64)
        used = 0
        for a in experts:
            counts, total = table(a)
            if total > 0:
                scores += counts / max(counts.sum(), 1.0) * len(experts)
                used += 1
        if used == 0:
            return None
        return scores / used


PREDICTORS = {cls.name: cls for cls in (Predictor, FrequencyPredictor, PreviousTokenPredictor, TransitionPredictor)}


def make_predictor(kind: str, n_layers: int, n_experts: int) -> Predictor:
    if kind not in PREDICTORS:
        raise ValueError(f"predictor {kind!r} is unknown; choose one of {', '.join(PREDICTORS)}")
    return PREDICTORS[kind](n_layers, n_experts)


def evaluate(predictor: Predictor, access_steps: list[tuple[int, int, list[int]]], lookahead: int, max_hints: int) -> dict[int, dict[str, float]]:
    """Replay (token, layer, expert ids) steps through a predictor and score its hints.

    For each lookahead distance d, precision is the share of hinted experts used d steps
    later, and recall the share of used experts that were hinted d steps earlier. Returns
    {d: {"precision": ..., "recall": ...}}."""
    hinted: dict[int, list[set[int]]] = {d: [] for d in range(1, lookahead + 1)}
    for token, layer, expert_ids in access_steps:
        predictor.observe(token, layer, expert_ids)
        per_distance: dict[int, set[int]] = {d: set() for d in range(1, lookahead + 1)}
        for hint in predictor.predict(layer, lookahead, max_hints, 0.0):
            per_distance[hint.steps_ahead].add(hint.expert)
        for d in per_distance:
            hinted[d].append(per_distance[d])
    result = {}
    for d in range(1, lookahead + 1):
        true_positive = hinted_total = used_total = 0
        for i in range(len(access_steps) - d):
            used = set(access_steps[i + d][2])
            true_positive += len(hinted[d][i] & used)
            hinted_total += len(hinted[d][i])
            used_total += len(used)
        result[d] = {
            "precision": true_positive / hinted_total if hinted_total else 0.0,
            "recall": true_positive / used_total if used_total else 0.0,
        }
    return result


def compare(
    access_steps: list[tuple[int, int, list[int]]], n_layers: int, n_experts: int, lookahead: int, max_hints: int
) -> dict[str, dict[int, dict[str, float]]]:
    """Run `evaluate` for every predictor on the same steps, so `transition` is read
    against the baselines `previous` (last visit's experts) and `frequency`."""
    return {
        kind: evaluate(make_predictor(kind, n_layers, n_experts), access_steps, lookahead, max_hints)
        for kind in PREDICTORS
        if kind != "none"
    }
