"""Attention with rotary positions over a KV memory (the transformer families' attention).

Shape glossary: B batch rows, T query length, S cache length (or the decode window), D model
width, N query heads, K kv heads, G query heads per kv head (N = K * G), H head dim, L layers.
Logits and softmax run in float32, as in the reference.
"""

from __future__ import annotations

import math

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from runtime import layout
from runtime.config import ModelConfig
from runtime.models.blockwise import blockwise_attention
from runtime.models.layers import F32, LayerNorm, RMSNorm, matmul_weight
from runtime.products import linear

MASKED = -1e30  # replaces masked attention logits (far below any real one, capped or not)


def rope_frequencies(c: ModelConfig) -> np.ndarray:
    """Inverse frequencies [H/2] (float32), with Llama-3 scaling when configured: wavelengths
    longer than original_len / low_freq_factor are divided by the factor, shorter than
    original_len / high_freq_factor kept, and those between interpolated smoothly."""
    inv_freq = 1.0 / (c.rope_base ** (np.arange(0, c.key_size, 2, dtype=np.float32)
                                      / np.float32(c.key_size)))
    if c.rope_scaling_factor is None:
        return inv_freq.astype(np.float32)
    factor, original = c.rope_scaling_factor, c.rope_original_max_len
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > original / c.rope_low_freq_factor, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - c.rope_low_freq_factor) / (c.rope_high_freq_factor
                                                               - c.rope_low_freq_factor)
    medium = (wavelen >= original / c.rope_high_freq_factor) \
        & (wavelen <= original / c.rope_low_freq_factor)
    scaled = np.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled)
    return scaled.astype(np.float32)


def rotary(x, positions, inv_freq):
    """Rotate-half (GPT-NeoX) RoPE in float32. x [B, T, n, H], positions [B, T] -> x.dtype."""
    phase = positions.astype(F32)[..., None] * jnp.asarray(inv_freq)  # [B, T, H/2]
    phase = jnp.concatenate([phase, phase], axis=-1)[:, :, None, :]  # [B, T, 1, H]
    x32 = x.astype(F32)
    first, second = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-second, first], axis=-1)
    return (x32 * jnp.cos(phase) + rotated * jnp.sin(phase)).astype(x.dtype)


def _rows_and_columns(batch: int, length: int, starts):
    """Scatter indices of a chunk of `length` tokens at row-wise offsets starts [B]:
    rows [B, 1] and memory positions [B, T]."""
    return jnp.arange(batch)[:, None], starts[:, None] + jnp.arange(length)


def write_layer_rows(cache, new, starts):
    """One layer's memory cache [B, K, S, H] with new [B, T, K, H] written at row-wise offsets
    starts [B] (positions past S are dropped)."""
    rows, columns = _rows_and_columns(new.shape[0], new.shape[1], starts)
    # the two index arrays, split by a slice, lead the indexed shape: [B, T, K, H]
    return cache.at[rows, :, columns].set(new.astype(cache.dtype), mode="drop")


def write_rows(cache, new, starts):
    """Write new [L, B, T, K, H] (a chunk, as the layers return it) into cache [L, B, K, S, H]
    (or per layer: L x [B, K, S, H]) at row-wise offsets starts [B] (positions past S are
    dropped).

    One scatter per array after the layers (not an update inside the layer that reads it), so
    XLA updates the donated buffer in place: a decode step writes T tokens, it does not copy S."""
    if isinstance(cache, (tuple, list)):
        return tuple(write_layer_rows(layer, new[i], starts) for i, layer in enumerate(cache))
    rows, columns = _rows_and_columns(new.shape[1], new.shape[2], starts)
    # the indexed shape is [B, T, L, K, H]
    return cache.at[:, rows, :, columns].set(
        new.transpose(1, 2, 0, 3, 4).astype(cache.dtype), mode="drop")


class MultiHeadAttention(hk.Module):
    def __init__(self, config: ModelConfig, name: str = "multi_head_attention"):
        super().__init__(name=name)
        self.c = config

    def __call__(self, x, keys, values, positions, window=None, in_place=False):
        # x [B, T, D]; keys, values [B, K, S, H]: this layer's memory before this chunk (S may
        # be 0: a fresh prompt); positions [B, T], consecutive in each row.
        # in_place False: the memory is read only; attention covers the memory before the
        # chunk plus the chunk itself; returns the chunk's keys/values [B, T, K, H] for the
        # caller to write (one scatter for all layers, see write_rows).
        # in_place True (this layer's own memory array, the unrolled model's decode): the
        # chunk is written into the memory first and attention reads the memory alone; returns
        # the updated memory. Written before it is read, the donated array is updated in
        # place; read and then written, XLA copied all of it (twice) every step.
        # window (static): attend over memory positions < window only. Sliced here, per layer,
        # so XLA fuses the slice into this layer's read instead of copying a window of the
        # whole memory first.
        c = self.c
        batch, length, width = x.shape
        q, new_k, new_v = _project(c, x, positions)
        new_k, new_v = new_k.astype(keys.dtype), new_v.astype(values.dtype)
        if in_place:
            keys = write_layer_rows(keys, new_k, positions[:, 0])
            values = write_layer_rows(values, new_v, positions[:, 0])
        read_k, read_v = (keys, values) if window is None else \
            (keys[:, :, :window], values[:, :, :window])
        q = q.reshape(batch, length, c.num_kv_heads, c.q_per_kv, c.key_size)  # [B, T, K, G, H]
        stored = read_k.shape[2]  # S (or the window)
        block = layout.attention_block(length) if not in_place and stored == 0 else None
        if block is not None:  # a fresh prompt, long: never the [T, T] logits
            out = blockwise_attention(q, new_k, new_v, positions, positions,
                                      scale=c.attn_output_multiplier, cap=c.attn_logit_cap,
                                      window=c.sliding_window, block=block)
            return _output(c, out, x), new_k, new_v
        logits, key_positions, visible = _logits_and_visibility(
            q, read_k, None if in_place else new_k, positions)
        probs = _probabilities(c, logits, key_positions, visible, positions).astype(x.dtype)
        # [B, K, G, T, H], then [B, T, K, G, H]: written as "...->btkgh" directly, XLA:CPU
        # hands this bf16 x bf16 -> f32 product to a kernel that has no bf16
        out = jnp.einsum("bkgts,bksh->bkgth", probs[..., :stored], read_v.astype(x.dtype),
                         preferred_element_type=F32).transpose(0, 3, 1, 2, 4)
        if not in_place:
            out = out + jnp.einsum("bkgtu,bukh->btkgh", probs[..., stored:],
                                   new_v.astype(x.dtype), preferred_element_type=F32)
        out = _output(c, out, x)
        if in_place:
            return out, keys, values  # [B, T, D], [B, K, S, H], [B, K, S, H]
        return out, new_k, new_v  # [B, T, D], [B, T, K, H], [B, T, K, H]

# The helpers below are functions, not methods: Haiku names a method's parameters after it
# (multi_head_attention/~_project/...), and the parameter paths are the checkpoints' names.

def _output(c: ModelConfig, out, x):
    """Heads [B, T, K, G, H] (float32) -> the output projection [B, T, D] (the calling
    module's `linear` parameter)."""
    batch, length, width = x.shape
    heads = c.num_q_heads * c.key_size
    return linear(out.astype(x.dtype).reshape(batch, length, heads),
                  matmul_weight("linear", [heads, width]))


def _project(c: ModelConfig, x, positions):
    """x [B, T, D] -> queries [B, T, N, H], keys and values [B, T, K, H]; QK-norm and RoPE
    applied (inside the calling module's scope: its query/key/value parameters)."""
    batch, length, width = x.shape
    n, k, h = c.num_q_heads, c.num_kv_heads, c.key_size
    q = linear(x, matmul_weight("query", [width, n * h])).reshape(batch, length, n, h)
    new_k = linear(x, matmul_weight("key", [width, k * h])).reshape(batch, length, k, h)
    new_v = linear(x, matmul_weight("value", [width, k * h])).reshape(batch, length, k, h)
    if c.qk_norm:  # over each head's H features, before RoPE
        norm_kind = LayerNorm if c.norm_type == "layer" else RMSNorm
        q = norm_kind(c.norm_eps, name="query_norm")(q)
        new_k = norm_kind(c.norm_eps, name="key_norm")(new_k)
    inv_freq = rope_frequencies(c)
    return rotary(q, positions, inv_freq), rotary(new_k, positions, inv_freq), new_v


def _probabilities(c: ModelConfig, logits, key_positions, visible, positions):
    """Softmax over the keys of the scaled, capped logits [B, K, G, T, S'], the invisible
    ones (and those beyond a sliding window) masked: float32."""
    logits = logits * c.attn_output_multiplier
    if c.attn_logit_cap is not None:
        logits = c.attn_logit_cap * jnp.tanh(logits / c.attn_logit_cap)
    if c.sliding_window is not None:
        visible &= positions[:, :, None] - key_positions < c.sliding_window
    logits = jnp.where(visible[:, None, None], logits, MASKED)
    return jax.nn.softmax(logits, axis=-1)


def _logits_and_visibility(q, read_k, new_k, positions):
    """Attention logits of queries q [B, T, K, G, H] against the memory read_k [B, K, S, H] and,
    unless new_k is None (in place: the memory already holds the chunk), the chunk's own keys
    new_k [B, T, K, H]: float32 logits [B, K, G, T, S'], key positions [B|1, 1, S'] and which
    keys each query sees [B, T, S'] (S' = S, or S + T with the chunk)."""
    batch, length = q.shape[:2]
    stored = read_k.shape[2]
    memory_logits = jnp.einsum("btkgh,bksh->bkgts", q, read_k.astype(q.dtype),
                               preferred_element_type=F32)  # [B, K, G, T, S]
    if new_k is None:  # the memory holds the chunk: causal over it, stale slots past it
        key_positions = jnp.arange(stored)[None, None, :]  # [1, 1, S]
        return memory_logits, key_positions, key_positions <= positions[:, :, None]
    logits = jnp.concatenate([memory_logits, jnp.einsum(
        "btkgh,bukh->bkgtu", q, new_k.astype(q.dtype), preferred_element_type=F32)],
        axis=-1)  # [B, K, G, T, S + T]
    # Memory slots at or past the chunk's start are stale or empty; within the chunk, causal.
    start = positions[:, :1]  # [B, 1]
    key_positions = jnp.concatenate(
        [jnp.broadcast_to(jnp.arange(stored), (batch, stored)), positions],
        axis=1)[:, None, :]  # [B, 1, S + T]
    in_memory = jnp.arange(stored + length) < stored  # [S + T]
    visible = jnp.where(in_memory, key_positions < start[:, :, None],
                        key_positions <= positions[:, :, None])  # [B, T, S + T]
    return logits, key_positions, visible
