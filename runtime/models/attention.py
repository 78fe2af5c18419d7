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

from runtime import cpu_kernels, layout
from runtime.config import ModelConfig
from runtime.memory import held_positions
from runtime.models.blockwise import NO_POSITION, KeySource, blockwise_attention
from runtime.models.layers import F32, LayerNorm, RMSNorm, matmul_weight
from runtime.products import linear, linears
from runtime.quant import LayerOfStack

MASKED = -1e30  # replaces masked attention logits (far below any real one, capped or not)


def rope_frequencies(c: ModelConfig) -> np.ndarray:
    """Inverse frequencies [H/2] (float32), with Llama-3 scaling when configured: wavelengths
    longer than original_len / low_freq_factor are divided by the factor, shorter than
    original_len / high_freq_factor kept, and those between interpolated smoothly."""
    inv_freq = 1.0 / (c.rope_base ** (np.arange(0, c.key_size, 2, dtype=np.float32)
                                      / np.float32(c.key_size)))
    if c.rope_freq_factors:  # the same scaling as per-frequency divisors (GGUF's rope_freqs)
        return (inv_freq / np.asarray(c.rope_freq_factors, np.float32)).astype(np.float32)
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


def _rows_and_columns(batch: int, length: int, starts, size: int, lengths=None, rows=None):
    """Scatter indices of a chunk of `length` tokens at row-wise positions starts [B] into a
    memory of `size` slots: rows [B, 1] (the memory rows `rows` [B], default the first B) and
    slots [B, T] (position mod size: see memory.held_positions). With lengths [B], the chunk's
    padding and any token a later one of the chunk overwrites go out of range (dropped): a ring
    must keep the last `size` tokens."""
    offsets = jnp.arange(length)
    positions = starts[:, None] + offsets
    slots = positions % size
    if lengths is not None:
        kept = (offsets < lengths[:, None]) & (offsets >= lengths[:, None] - size)
        slots = jnp.where(kept, slots, size)
    return (jnp.arange(batch) if rows is None else rows)[:, None], slots


def _write_chunk(cache, new, rows, columns):
    """cache [L, B, K, S, H] (or one layer's [B, K, S, H]) with new [L, n, T, K, H] (or
    [n, T, K, H]) at memory rows rows [n, 1] and slots columns [n, T], out of range dropped:
    in place by cpu_kernels.write_kv where it applies (a bf16 memory on one CPU device, whose
    scatter XLA:CPU widens to float32), else one scatter."""
    if cpu_kernels.write_kv_usable(cache.dtype):
        return cpu_kernels.write_kv(cache, new, rows[:, 0], columns)
    new = new.astype(cache.dtype)
    if cache.ndim == 4:  # the two index arrays, split by a slice, lead: [n, T, K, H]
        return cache.at[rows, :, columns].set(new, mode="drop")
    # the indexed shape is [n, T, L, K, H]
    return cache.at[:, rows, :, columns].set(new.transpose(1, 2, 0, 3, 4), mode="drop")


def write_layer_rows(cache, new, starts, lengths=None, rows=None):
    """One layer's memory cache [B, K, S, H] with new [n, T, K, H] written at row-wise
    positions starts [n] (see _rows_and_columns)."""
    rows, columns = _rows_and_columns(new.shape[0], new.shape[1], starts, cache.shape[2],
                                      lengths, rows)
    return _write_chunk(cache, new, rows, columns)


def write_rows(cache, new, starts, lengths=None, rows=None):
    """Write new [L, n, T, K, H] (a chunk, as the layers return it) into cache [L, B, K, S, H]
    (or per layer: L x [B, K, S, H]) at row-wise positions starts [n] of its rows `rows` [n]
    (default the first n; see _rows_and_columns).

    One scatter per array after the layers (not an update inside the layer that reads it), so
    XLA updates the donated buffer in place: a decode step writes T tokens, it does not copy S."""
    if isinstance(cache, (tuple, list)):
        return tuple(write_layer_rows(layer, new[i], starts, lengths, rows)
                     for i, layer in enumerate(cache))
    rows, columns = _rows_and_columns(new.shape[1], new.shape[2], starts, cache.shape[3],
                                      lengths, rows)
    return _write_chunk(cache, new, rows, columns)


class MultiHeadAttention(hk.Module):
    def __init__(self, config: ModelConfig, name: str = "multi_head_attention"):
        super().__init__(name=name)
        self.c = config

    def __call__(self, x, keys, values, positions, window=None, in_place=False, rows=None,
                 lengths=None):
        # x [B, T, D]; keys, values [B, K, S, H]: this layer's memory before the chunk (S may be 0:
        # a fresh prompt; LayerOfStack: a scanned decode step's view, for the kernel); positions
        # [B, T], consecutive per row; window (static): positions < window only; rows [B]: the
        # memory rows the chunk continues. in_place False: the memory is read only, attention
        # covers it plus the chunk, which is returned [B, T, K, H] to write (write_rows). True (an
        # unrolled model's own arrays): the chunk written first, lengths [B] of each row (XLA
        # copied a donated array read and then written twice), the memory returned.
        c = self.c
        batch, length, width = x.shape
        q, new_k, new_v = _project(c, x, positions)
        new_k, new_v = new_k.astype(keys.dtype), new_v.astype(values.dtype)
        if isinstance(keys, LayerOfStack):  # layer_scan's decode step: the kernel's memory view
            out = _kernel_attention(c, q, keys, values, positions, window, (new_k, new_v), rows)
            return _output(c, out, x), new_k, new_v
        size = keys.shape[2]  # S: the memory's slots (a ring for sliding windows)
        if in_place:
            keys = write_layer_rows(keys, new_k, positions[:, 0], lengths, rows)
            values = write_layer_rows(values, new_v, positions[:, 0], lengths, rows)
            if length == 1 and rows is None and \
                    cpu_kernels.decode_attention_usable(1, keys.dtype, q.dtype):
                out = _kernel_attention(c, q, keys, values, positions, window)
                return _output(c, out, x), keys, values
        read_k, read_v = (keys, values) if window is None else \
            (keys[:, :, :window], values[:, :, :window])
        if rows is not None:  # one layer's rows: a copy of n rows, not of the memory
            read_k, read_v = read_k[rows], read_v[rows]
        q = q.reshape(batch, length, c.num_kv_heads, c.q_per_kv, c.key_size)  # [B, T, K, G, H]
        stored = read_k.shape[2]  # S (or the window)
        # what each memory slot holds: through the chunk in place, else up to just before it
        last = positions[:, 0] - 1 + ((length if lengths is None else lengths) if in_place else 0)
        held = held_positions(size, stored, last)  # [B, S'], negative: empty
        fused = None if in_place else layout.fused_prompt_attention(c, stored, length, q.dtype)
        if fused is not None:  # a fresh prompt from position 0: causal by index
            out = _fused_prompt_attention(c, q, new_k, new_v, fused)
            return _output(c, out, x), new_k, new_v
        seen = stored + (0 if in_place else length)  # keys per query, at most
        block = layout.attention_block(length, seen)
        in_kernel = cpu_kernels.prefill_attention_usable(length, seen, keys.dtype, q.dtype)
        if block is not None or in_kernel:  # a long prompt or chunk: never the [T, S] logits
            out = _long_attention(c, q, positions, (keys, values), (read_k, read_v), held,
                                  size, None if in_place else (new_k, new_v), rows,
                                  None if in_kernel else block)
            out = _output(c, out, x)
            return (out, keys, values) if in_place else (out, new_k, new_v)
        logits, key_positions, visible = _logits_and_visibility(
            q, read_k, None if in_place else new_k, positions, held)
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
    q, new_k, new_v = linears(x, [matmul_weight("query", [width, n * h]),
                                  matmul_weight("key", [width, k * h]),
                                  matmul_weight("value", [width, k * h])])
    q = q.reshape(batch, length, n, h)
    new_k, new_v = new_k.reshape(batch, length, k, h), new_v.reshape(batch, length, k, h)
    if c.qk_norm:  # over each head's H features, before RoPE
        norm_kind = LayerNorm if c.norm_type == "layer" else RMSNorm
        q = norm_kind(c.norm_eps, name="query_norm")(q)
        new_k = norm_kind(c.norm_eps, name="key_norm")(new_k)
    inv_freq = rope_frequencies(c)
    return rotary(q, positions, inv_freq), rotary(new_k, positions, inv_freq), new_v


def _kernel_attention(c: ModelConfig, q, keys, values, positions, window, chunk=None,
                      rows=None):
    """Decode attention (one query per row) in the CPU kernel over a memory read in place:
    keys/values [B', K, S, H] (or LayerOfStack views: the scanned step's layer of the stacks
    [L, B', K, S, H]), q [B, 1, N, H] -> float32 [B, 1, K, G, H], as the XLA path computes it.
    chunk: the token's own new_k/new_v [B, 1, K, H] after the memory; None: the memory holds
    the token already (the unrolled step writes first, so XLA keeps updating the donated array
    in place; the kernel outran XLA's attention there: BENCHMARKS.md, "Decode step
    overheads")."""
    layer = None
    if isinstance(keys, LayerOfStack):
        keys, values, layer = keys.stack, values.stack, keys.index
    batch, size = q.shape[0], keys.shape[-2]
    read = size if window is None else min(window, size)
    last = positions[:, 0] - (0 if chunk is None else 1)  # the memory holds positions <= last
    if chunk is None:
        nothing = jnp.zeros((batch, 0, keys.shape[-3], keys.shape[-1]), keys.dtype)
        chunk = (nothing, nothing)  # [B, 0, K, H]
    out = cpu_kernels.decode_attention(
        q.reshape(batch, c.num_kv_heads, c.q_per_kv, c.key_size), keys, values,
        held_positions(size, read, last), positions[:, 0], *chunk,
        scale=c.attn_output_multiplier, cap=c.attn_logit_cap, window=c.sliding_window,
        layer=layer, rows=rows)
    return out[:, None]


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


def _long_attention(c: ModelConfig, q, positions, memory, read, held, size: int, chunk, rows,
                    block):
    """A long prompt's or chunk's attention, never its [T, S] logits: q [B, T, K, G, H] at
    positions [B, T] over the memory and then (unless chunk is None: in place) the chunk's own
    keys and values [B, T, K, H] -> float32 [B, T, K, G, H]. block None: the CPU kernel,
    reading the layer's memory (keys, values [B', K, S, H]) in place at `rows`; else
    blockwise.py in blocks of `block`, reading the slots as read (read_k, read_v
    [B, K, S', H]). Either way S' slots hold positions held [B, S']."""
    keys, values = memory
    if block is None:
        batch, _, heads, _, dim = q.shape
        new_k, new_v = chunk if chunk is not None else \
            (jnp.zeros((batch, 0, heads, dim), keys.dtype),) * 2
        return cpu_kernels.prefill_attention(
            q, positions, keys, values, held, new_k, new_v, scale=c.attn_output_multiplier,
            cap=c.attn_logit_cap, window=c.sliding_window, rows=rows)
    return blockwise_attention(
        q, positions, _key_sources(c, *read, held, size,
                                   None if chunk is None else (*chunk, positions)),
        scale=c.attn_output_multiplier, cap=c.attn_logit_cap, window=c.sliding_window,
        block=block)


def _key_sources(c: ModelConfig, read_k, read_v, held, size: int, chunk):
    """Blockwise attention's key sources: the memory [B, K, S', H] (slots holding positions
    `held` [B, S'], negative: empty), then, unless chunk is None (in place: the memory holds
    it), the chunk's own (keys, values [B, T, K, H], positions [B, T])."""
    sources = []
    if read_k.shape[2]:
        # a ring (a sliding window's memory, when it may wrap) holds its positions out of order
        ring = c.sliding_window is not None and size <= c.sliding_window
        sources.append(KeySource(read_k, read_v, jnp.where(held >= 0, held, NO_POSITION),
                                 ordered=not ring))
    if chunk is not None:
        new_k, new_v, positions = chunk
        sources.append(KeySource(new_k.transpose(0, 2, 1, 3), new_v.transpose(0, 2, 1, 3),
                                 positions))
    return sources


def _fused_prompt_attention(c: ModelConfig, q, new_k, new_v, implementation: str):
    """A fresh prompt's causal attention through jax.nn.dot_product_attention (cuDNN's fused
    kernel on GPUs): q [B, T, K, G, H], new_k/new_v [B, T, K, H] -> float32 [B, T, K, G, H].
    Query head k * G + g reads kv head k there as here; a sliding window of W sees W - 1 keys
    back."""
    batch, length, kv_heads, groups, dim = q.shape
    window = None if c.sliding_window is None else (c.sliding_window - 1, 0)
    out = jax.nn.dot_product_attention(
        q.reshape(batch, length, kv_heads * groups, dim), new_k.astype(q.dtype),
        new_v.astype(q.dtype), scale=c.attn_output_multiplier, is_causal=True,
        local_window_size=window, implementation=implementation)
    return out.reshape(q.shape).astype(F32)


def _logits_and_visibility(q, read_k, new_k, positions, held):
    """Attention logits of queries q [B, T, K, G, H] against the memory read_k [B, K, S, H]
    (slots holding positions held [B, S], negative: empty) and, unless new_k is None (in place:
    the memory already holds the chunk), the chunk's own keys new_k [B, T, K, H]: float32
    logits [B, K, G, T, S'], key positions [B, 1, S'] and which keys each query sees [B, T, S']
    (S' = S, or S + T with the chunk)."""
    memory_logits = jnp.einsum("btkgh,bksh->bkgts", q, read_k.astype(q.dtype),
                               preferred_element_type=F32)  # [B, K, G, T, S]
    # the memory holds positions before the chunk (or the chunk itself, in place): causal
    visible = (held[:, None, :] >= 0) & (held[:, None, :] <= positions[:, :, None])
    if new_k is None:
        return memory_logits, held[:, None, :], visible
    logits = jnp.concatenate([memory_logits, jnp.einsum(
        "btkgh,bukh->bkgtu", q, new_k.astype(q.dtype), preferred_element_type=F32)],
        axis=-1)  # [B, K, G, T, S + T]
    within = positions[:, None, :] <= positions[:, :, None]  # [B, T, T] causal in the chunk
    return (logits, jnp.concatenate([held, positions], axis=1)[:, None, :],
            jnp.concatenate([visible, within], axis=-1))
