"""Grok-1 family decoder in Haiku: the math, top to bottom.

Shape glossary (einsum letters and shape comments):
  B batch rows, T query length, S cache length, D model width (emb_size), N query heads,
  K kv heads, G query heads per kv head (N = K * G), H head dim (key_size), E experts,
  F expert ffn width, V vocab, L layers, M routed (token, expert) pairs, R scale row blocks.

Weights are float32 arrays or QuantizedWeight8bit (see quant.py); every matmul goes through the
helpers there. Activations are in `config.dtype`; norms, RoPE, attention logits/softmax and the
router run in float32, as in the reference. Layers run under hk.layer_stack (a scan over stacked
per-layer parameters and KV memory) so compile time does not grow with depth.

Parameter paths (the one path language of partition rules, readers and error messages):
  language_model/in_out_embed/embeddings                         [V, D]
  language_model/rms_norm/scale                                  [D]      final norm
  language_model/transformer/layers/decoder_layer/<module>/<param>  [L, ...] stacked layers:
    multi_head_attention/{query,key,value,linear}/w, rms_norm{,_1,_2,_3}/scale, router/w,
    moe/{linear,linear_v,linear_1}/w
"""

from __future__ import annotations

import math
from typing import NamedTuple

import haiku as hk
import jax
import jax.numpy as jnp

from runtime.config import ModelConfig
from runtime.quant import QuantizedWeight8bit, grouped_linear, linear, per_row_linear

F32 = jnp.float32
MASKED = -1e30  # added to masked attention logits (after the soft cap, which bounds real ones)


def _weight(name: str, shape: list[int]):
    """The matmul weight `<scope>/<name>/w`: float32 or QuantizedWeight8bit of that shape."""
    with hk.name_scope(name):
        stddev = 1.0 / math.sqrt(shape[-2])
        return hk.get_parameter("w", shape, F32, init=hk.initializers.TruncatedNormal(stddev))


class RMSNorm(hk.Module):
    def __init__(self, eps: float, name: str):
        super().__init__(name=name)
        self.eps = eps

    def __call__(self, x):  # [..., D]
        scale = hk.get_parameter("scale", [x.shape[-1]], F32, init=hk.initializers.Constant(1.0))
        x32 = x.astype(F32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return (normed * scale.astype(F32)).astype(x.dtype)


def rotary(x, positions, base: float):
    """Rotate-half (GPT-NeoX) RoPE in float32. x [B, T, n, H], positions [B, T] -> x.dtype."""
    head_dim = x.shape[-1]
    inv_freq = 1.0 / (base ** (jnp.arange(0, head_dim, 2, dtype=F32) / head_dim))  # [H/2]
    phase = positions.astype(F32)[..., None] * inv_freq  # [B, T, H/2]
    phase = jnp.concatenate([phase, phase], axis=-1)[:, :, None, :]  # [B, T, 1, H]
    x32 = x.astype(F32)
    first, second = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-second, first], axis=-1)
    return (x32 * jnp.cos(phase) + rotated * jnp.sin(phase)).astype(x.dtype)


def _write_rows(cache, new, starts):
    """Write new [B, T, K, H] into cache [B, S, K, H] at row-wise offsets starts [B]."""
    def write(row_cache, row_new, start):
        return jax.lax.dynamic_update_slice_in_dim(row_cache, row_new.astype(row_cache.dtype),
                                                   start, axis=0)
    return jax.vmap(write)(cache, new, starts)


class MultiHeadAttention(hk.Module):
    def __init__(self, config: ModelConfig, name: str = "multi_head_attention"):
        super().__init__(name=name)
        self.c = config

    def __call__(self, x, keys, values, positions):
        # x [B, T, D]; keys, values [B, S, K, H] (this layer's memory); positions [B, T]
        c = self.c
        batch, length, width = x.shape
        n, k, h = c.num_q_heads, c.num_kv_heads, c.key_size
        q = linear(x, _weight("query", [width, n * h])).reshape(batch, length, n, h)
        new_k = linear(x, _weight("key", [width, k * h])).reshape(batch, length, k, h)
        new_v = linear(x, _weight("value", [width, k * h])).reshape(batch, length, k, h)
        q = rotary(q, positions, c.rope_base)
        new_k = rotary(new_k, positions, c.rope_base)

        # Write this chunk's keys/values at each row's own offset, then attend over the cache.
        keys = _write_rows(keys, new_k, positions[:, 0])  # [B, S, K, H]
        values = _write_rows(values, new_v, positions[:, 0])  # [B, S, K, H]

        q = q.reshape(batch, length, k, c.q_per_kv, h)  # [B, T, K, G, H]: head j uses kv j // G
        logits = jnp.einsum("btkgh,bskh->bkgts", q, keys.astype(q.dtype),
                            preferred_element_type=F32)  # [B, K, G, T, S]
        logits = logits * c.attn_output_multiplier
        logits = c.attn_logit_cap * jnp.tanh(logits / c.attn_logit_cap)
        # Causal over absolute positions; cache slots past a query's position are stale or empty.
        visible = jnp.arange(keys.shape[1])[None, None, :] <= positions[:, :, None]  # [B, T, S]
        logits = jnp.where(visible[:, None, None], logits, MASKED)
        probs = jax.nn.softmax(logits, axis=-1).astype(x.dtype)
        out = jnp.einsum("bkgts,bskh->btkgh", probs, values.astype(x.dtype),
                         preferred_element_type=F32).astype(x.dtype)
        out = linear(out.reshape(batch, length, n * h), _weight("linear", [n * h, width]))
        return out, keys, values  # [B, T, D], [B, S, K, H], [B, S, K, H]


class MixtureOfExperts(hk.Module):
    """Top-k routed experts; each token is multiplied only by the weights of its own experts."""

    def __init__(self, config: ModelConfig, name: str = "moe"):
        super().__init__(name=name)
        self.c = config

    def __call__(self, x, gates, experts):
        # x [B, T, D]; gates, experts [B, T, k]: router probability and index of each choice
        c = self.c
        width, ffn, top = c.emb_size, c.ffn_size, c.num_selected_experts
        w_in = _weight("linear", [c.num_experts, width, ffn])
        w_gate = _weight("linear_v", [c.num_experts, width, ffn])
        w_out = _weight("linear_1", [c.num_experts, ffn, width])

        tokens = x.reshape(-1, width)  # [B*T, D]
        choice = experts.reshape(-1)  # [M], M = B*T*k, token-major
        if choice.shape[0] <= c.num_experts:
            # Few pairs (decode): gather just the chosen experts' weights, one matrix per pair.
            take = lambda w: jax.tree.map(lambda a: a[choice], w)
            rows = jnp.repeat(tokens, top, axis=0)  # [M, D]
            hidden = jax.nn.gelu(per_row_linear(rows, take(w_in)), approximate=True) \
                * per_row_linear(rows, take(w_gate))  # [M, F]
            out = per_row_linear(hidden, take(w_out))  # [M, D]
        else:
            # Many pairs (prefill, large batches): sort pairs by expert, one ragged product each.
            order = jnp.argsort(choice, stable=True)  # [M]
            sorted_experts = choice[order]
            sizes = jnp.zeros((c.num_experts,), jnp.int32).at[choice].add(1)  # [E]
            rows = tokens[order // top]  # [M, D]
            hidden = jax.nn.gelu(grouped_linear(rows, w_in, sizes, sorted_experts),
                                 approximate=True) \
                * grouped_linear(rows, w_gate, sizes, sorted_experts)  # [M, F]
            out = jnp.zeros((choice.shape[0], width), x.dtype).at[order].set(
                grouped_linear(hidden, w_out, sizes, sorted_experts))  # [M, D]
        out = out.reshape(*gates.shape, width).astype(F32)  # [B, T, k, D]
        return jnp.einsum("btkd,btk->btd", out, gates).astype(x.dtype)


class DecoderLayer(hk.Module):
    def __init__(self, config: ModelConfig, name: str = "decoder_layer"):
        super().__init__(name=name)
        self.c = config

    def __call__(self, x, keys, values, positions):
        c = self.c
        normed = RMSNorm(c.norm_eps, name="rms_norm")(x)
        attn, keys, values = MultiHeadAttention(c)(normed, keys, values, positions)
        h = x + RMSNorm(c.norm_eps, name="rms_norm_1")(attn)

        normed = RMSNorm(c.norm_eps, name="rms_norm_2")(h)
        router = _weight("router", [c.emb_size, c.num_experts])
        probs = jax.nn.softmax(linear(normed.astype(F32), router), axis=-1)  # [B, T, E]
        gates, experts = jax.lax.top_k(probs, c.num_selected_experts)  # raw probs, no renorm
        moe = MixtureOfExperts(c)(normed, gates, experts)
        return h + RMSNorm(c.norm_eps, name="rms_norm_3")(moe), keys, values


class Transformer(hk.Module):
    def __init__(self, config: ModelConfig, name: str = "transformer"):
        super().__init__(name=name)
        self.c = config

    def __call__(self, x, keys, values, positions):
        # x [B, T, D]; keys, values [L, B, S, K, H]; positions [B, T]
        def layer(x, layer_keys, layer_values):
            x, layer_keys, layer_values = DecoderLayer(self.c)(x, layer_keys, layer_values,
                                                               positions)
            return x, (layer_keys, layer_values)

        stack = hk.layer_stack(self.c.num_layers, with_per_layer_inputs=True, name="layers")
        x, (keys, values) = stack(layer)(x, keys, values)
        return x, keys, values


class LanguageModel(hk.Module):
    def __init__(self, config: ModelConfig, name: str = "language_model"):
        super().__init__(name=name)
        self.c = config

    def __call__(self, tokens, keys, values, positions, output_index=None):
        """tokens [B, T] at absolute positions [B, T]; keys/values [L, B, S, K, H].

        Returns float32 logits [B, T, V] (or [B, V] at output_index [B] only) and the updated
        keys/values with this chunk written at each row's positions.
        """
        c = self.c
        dtype = jnp.dtype(c.dtype)
        with hk.name_scope("in_out_embed"):
            embeddings = hk.get_parameter("embeddings", [c.vocab_size, c.emb_size], F32,
                                          init=hk.initializers.TruncatedNormal(
                                              1.0 / math.sqrt(c.emb_size)))
        x = (embeddings[tokens].astype(dtype) * c.embedding_multiplier_scale).astype(dtype)
        x, keys, values = Transformer(c)(x, keys, values, positions)  # [B, T, D]
        x = RMSNorm(c.norm_eps, name="rms_norm")(x)
        if output_index is not None:
            x = jnp.take_along_axis(x, output_index[:, None, None], axis=1)[:, 0]  # [B, D]
        logits = jnp.einsum("...d,vd->...v", x, embeddings.astype(dtype),
                            preferred_element_type=F32)
        return logits * c.output_multiplier_scale, keys, values


class Model(NamedTuple):
    """Pure functions of the model for one config."""
    config: ModelConfig
    init: callable  # (rng) -> params
    apply: callable  # (params, tokens, keys, values, positions, output_index=None) -> ...


def build_model(config: ModelConfig) -> Model:
    def forward(tokens, keys, values, positions, output_index=None):
        return LanguageModel(config)(tokens, keys, values, positions, output_index)

    transformed = hk.without_apply_rng(hk.transform(forward))

    @jax.jit
    def init(rng):
        # A one-token dummy batch: parameter shapes do not depend on it. Jitted: eager Haiku
        # init of a layer stack dispatches op by op and is slow.
        kv = jnp.zeros((config.num_layers, 1, 1, config.num_kv_heads, config.key_size), F32)
        return transformed.init(rng, jnp.zeros((1, 1), jnp.int32), kv, kv,
                                jnp.zeros((1, 1), jnp.int32))

    return Model(config, init, transformed.apply)


def abstract_params(config: ModelConfig):
    """The parameter tree as ShapeDtypeStructs (float32 logical shapes), without allocating."""
    return jax.eval_shape(build_model(config).init, jax.random.PRNGKey(0))
