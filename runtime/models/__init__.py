"""The model families, each a pure `Model` (api.py) built from a ModelConfig.

layers.py holds what the families share (matmul weights, norms, embedding table, head);
transformer.py the Grok-1/Llama/Mixtral/PaLM-style decoder; mamba2.py the state-space family;
palm.py Palm (SrijanSriv211/Palm: Attention On Detail blocks, factorized linears).
"""

from __future__ import annotations

from runtime.config import ModelConfig
from runtime.models.api import Model
from runtime.models.mamba2 import build_mamba2
from runtime.models.palm import build_palm
from runtime.models.transformer import build_transformer

__all__ = ["Model", "build_model"]


def build_model(config: ModelConfig, unroll_layers: bool = False,
                layer_views: bool = False) -> Model:
    """The Model of `config`'s architecture; unroll_layers, layer_views: see build_transformer
    (the layout decides them; Mamba-2 and Palm always scan over sliced layers)."""
    if config.architecture == "mamba2":
        return build_mamba2(config)
    if config.architecture == "palm":
        return build_palm(config)
    return build_transformer(config, unroll_layers, layer_views)
