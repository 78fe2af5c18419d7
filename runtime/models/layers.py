"""The building blocks every model family shares: matmul weights, norms, the embedding table and
the output head (Haiku modules and functions; names and shapes as in paths.py).

Shape glossary: B batch rows, T tokens, D model width, V vocab.
"""

from __future__ import annotations

import math

import haiku as hk
import jax
import jax.numpy as jnp

from runtime.config import ModelConfig
from runtime.products import linear
from runtime.tables import tied_head

F32 = jnp.float32


def matmul_weight(name: str, shape: list[int]):
    """The matmul weight `<scope>/<name>/w`: float32 or QuantizedWeight8bit of that shape."""
    with hk.name_scope(name):
        stddev = 1.0 / math.sqrt(shape[-2])
        return hk.get_parameter("w", shape, F32, init=hk.initializers.TruncatedNormal(stddev))


class RMSNorm(hk.Module):
    """x / RMS(x), times a learned scale, computed in float32."""

    def __init__(self, eps: float, name: str):
        super().__init__(name=name)
        self.eps = eps

    def normalise(self, x32):  # [..., D] float32
        return x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)

    def __call__(self, x):  # [..., D]
        scale = hk.get_parameter("scale", [x.shape[-1]], F32, init=hk.initializers.Constant(1.0))
        return (self.normalise(x.astype(F32)) * scale.astype(F32)).astype(x.dtype)


class LayerNorm(RMSNorm):
    """Bias-free LayerNorm (PaLM): centre, normalise by the standard deviation, scale."""

    def normalise(self, x32):
        return super().normalise(x32 - jnp.mean(x32, axis=-1, keepdims=True))


def norm(c: ModelConfig, suffix: str = ""):
    """The config's norm, named by kind: rms_norm{suffix} or layer_norm{suffix}."""
    if c.norm_type == "layer":
        return LayerNorm(c.norm_eps, name="layer_norm" + suffix)
    return RMSNorm(c.norm_eps, name="rms_norm" + suffix)


def embedding_table(c: ModelConfig):
    """The input embeddings `in_out_embed/embeddings` [V, D] (also the tied output head):
    float32 or, tied, a QuantizedEmbedding."""
    with hk.name_scope("in_out_embed"):
        return hk.get_parameter("embeddings", [c.vocab_size, c.emb_size], F32,
                                init=hk.initializers.TruncatedNormal(1.0 / math.sqrt(c.emb_size)))


def output_logits(c: ModelConfig, x, embeddings, output_index=None):
    """Float32 logits of the final hidden states x [B, T, D] ([B, V] at output_index [B] only):
    the tied embeddings transposed, or `unembed/w` [D, V]."""
    if output_index is not None:
        x = jnp.take_along_axis(x, output_index[:, None, None], axis=1)[:, 0]  # [B, D]
    if c.tie_embeddings:
        return tied_head(x, embeddings)
    return linear(x, matmul_weight("unembed", [c.emb_size, c.vocab_size]), out_dtype=F32)
