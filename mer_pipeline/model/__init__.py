"""Run a whole Mixtral model from an expert store: dense weights in this process, experts
in an ExpertBackend (in process, or streamed through the pipeline).

Modules: config (the model config from the manifest), weights (dense.gguf), transformer
(the forward pass, KV cache, router and lookahead), experts (the backends), tokenizer.
"""

from __future__ import annotations

from mer_pipeline.model.config import ModelConfig, ModelError, model_config
from mer_pipeline.model.experts import ExpertBackend, LocalExperts, PipelineExperts
from mer_pipeline.model.transformer import KVCache, LookaheadStats, MixtralModel
from mer_pipeline.model.weights import DenseWeights, load_dense
from mer_pipeline.store import Store


def load_model(store: Store, experts: ExpertBackend, **options) -> MixtralModel:
    """Read the config and the dense weights of `store` and return a model whose experts run in `experts`."""
    config = model_config(store)
    return MixtralModel(config, load_dense(store, config), experts, **options)


__all__ = [
    "DenseWeights", "ExpertBackend", "KVCache", "LocalExperts", "LookaheadStats", "MixtralModel", "ModelConfig",
    "ModelError", "PipelineExperts", "load_dense", "load_model", "model_config",
]
