"""The model config that the whole-model runtime needs, read from a store's manifest."""

from __future__ import annotations

import dataclasses
import logging

from mer_pipeline.store import Store

log = logging.getLogger(__name__)

# llama.cpp writes Mixtral GGUF files with general.architecture "llama"; Hugging Face
# checkpoints have model_type "mixtral". Both are a Mixtral block: RMSNorm, rotary GQA
# attention without biases, a softmax top-k router and SwiGLU experts.
SUPPORTED_ARCHITECTURES = ("mixtral", "llama")

# Hugging Face MixtralConfig defaults (transformers 4.x), used when the source did not
# record a value.
DEFAULT_ROPE_THETA = 1e6
DEFAULT_RMS_NORM_EPS = 1e-5
DEFAULT_CONTEXT_LENGTH = 4096 * 32


class ModelError(ValueError):
    """A store or an input that the whole-model runtime cannot run."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    architecture: str
    naming: str
    n_layers: int
    n_experts: int
    top_k: int
    d_model: int
    d_ff: int
    vocab_size: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    context_length: int
    bos_token_id: int | None
    eos_token_id: int | None

    @property
    def group_size(self) -> int:
        """Query heads per KV head."""
        return self.n_heads // self.n_kv_heads


def _default(model: dict, key: str, default: float, where: str) -> float:
    value = model.get(key)
    if value is None:
        log.warning("model config has no %s; using the Mixtral default %s store=%s", key, default, where)
        return default
    return value


def model_config(store: Store) -> ModelConfig:
    """Read the model config from the store's manifest; raise ModelError for a store the
    runtime cannot run (no dense tensors, another architecture, inconsistent head counts)."""
    where = str(store.path)
    dense = store.manifest.get("dense")
    if not dense:
        raise ModelError(
            f"store {where} has no dense tensors (manifest 'dense' is null), so only its experts can run; "
            "import a checkpoint with `mer store import` or make one with `mer store synth --full-model`"
        )
    model = store.model
    architecture = model.get("architecture")
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ModelError(
            f"store {where}: architecture {architecture!r} is not supported; "
            f"the runtime runs {', '.join(SUPPORTED_ARCHITECTURES)} (Mixtral) models"
        )

    naming = dense.get("naming")
    if naming not in ("gguf", "hf"):
        raise ModelError(f"store {where}: dense tensor naming {naming!r} is not one of gguf, hf")
    for key in ("vocab_size", "n_heads"):
        if not model.get(key):
            raise ModelError(f"store {where}: the model config has no {key}; the runtime needs it")

    n_heads = int(model["n_heads"])
    n_kv_heads = int(model.get("n_kv_heads") or n_heads)
    head_dim = int(model.get("head_dim") or model["d_model"] // n_heads)
    if n_heads % n_kv_heads:
        raise ModelError(f"store {where}: n_heads ({n_heads}) is not a multiple of n_kv_heads ({n_kv_heads})")
    if head_dim % 2:
        raise ModelError(f"store {where}: head_dim ({head_dim}) must be even for rotary embedding")
    context = model.get("context_length")
    if context is None:
        log.warning("model config has no context_length; using the Mixtral default %d store=%s",
                    DEFAULT_CONTEXT_LENGTH, where)
        context = DEFAULT_CONTEXT_LENGTH
    return ModelConfig(
        architecture=architecture,
        naming=naming,
        n_layers=store.shape.n_layers,
        n_experts=store.shape.n_experts,
        top_k=store.shape.top_k,
        d_model=store.shape.d_model,
        d_ff=store.shape.d_ff,
        vocab_size=int(model["vocab_size"]),
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        head_dim=head_dim,
        rope_theta=float(_default(model, "rope_theta", DEFAULT_ROPE_THETA, where)),
        rms_norm_eps=float(_default(model, "rms_norm_eps", DEFAULT_RMS_NORM_EPS, where)),
        context_length=int(context),
        bos_token_id=model.get("bos_token_id"),
        eos_token_id=model.get("eos_token_id"),
    )
