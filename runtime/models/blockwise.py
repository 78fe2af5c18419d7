"""Blockwise attention with an online softmax (flash-attention style), in pure JAX: queries and
keys in blocks, a running max and sum per query, never the full [T, S] logit matrix. Memory per
layer is O(T x block) instead of O(T x S); causal key blocks past a query block are skipped.

Shape glossary: B batch rows, T queries, S keys, K kv heads, G query heads per kv head, H head
dim, bq / bk queries / keys per block, nq / nk blocks.

The keys come from one or more sources, each in the KV memory's layout [B, K, S, H] with a
position per key: a fresh prompt's own keys; or a prefill chunk's keys after the memory its
row already holds (the memory's stale or empty slots at NO_POSITION). The online softmax runs
over the sources one after the other with one running state, so the memory is read where it
lies, never concatenated with the chunk. It computes what attention.py's dense path computes
(causal by position, sliding window, soft cap, GQA, per-row positions) with float32 softmax
statistics; the probabilities meet the values in the activation dtype, as there.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp

F32 = jnp.float32
NO_POSITION = jnp.iinfo(jnp.int32).max  # a padded or stale key: after every query, never seen
MASKED = -1e30


class KeySource(NamedTuple):
    keys: jax.Array  # [B, K, S, H]
    values: jax.Array  # [B, K, S, H]
    positions: jax.Array  # [B, S] int32, NO_POSITION for keys no query may see
    # whether the visible positions increase along S, so that blocks past a query block's
    # last position can be skipped (a ring buffer's wrap breaks the order)
    ordered: bool = True


def _pad(x, axis: int, size: int, value=0):
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def _blocks(source: KeySource, block: int):
    """A source cut into nk key blocks: keys/values [B, K, nk, bk, H], positions [B, nk, bk],
    and the first and last visible position of each block [B, nk] (for skipping)."""
    batch, heads, stored, dim = source.keys.shape
    nk = math.ceil(stored / block)
    keys = _pad(source.keys, 2, nk * block).reshape(batch, heads, nk, block, dim)
    values = _pad(source.values, 2, nk * block).reshape(batch, heads, nk, block, dim)
    positions = _pad(source.positions, 1, nk * block, NO_POSITION).reshape(batch, nk, block)
    first = positions.min(-1)
    last = jnp.where(positions == NO_POSITION, -1, positions).max(-1)
    return keys, values, positions, first, last


def blockwise_attention(q, q_positions, sources: Sequence[KeySource], *, scale: float,
                        cap=None, window=None, block: int = 512):
    """q [B, T, K, G, H] at q_positions [B, T] int32, over the keys of `sources`. A key is
    visible to a query when its position is <= the query's (and within `window` positions of
    it). Logits are (q . k) * scale, capped by cap * tanh(x / cap). -> float32 [B, T, K, G, H]"""
    batch, length = q.shape[:2]
    nq = math.ceil(length / block)
    q = _pad(q, 1, nq * block)
    q_positions = _pad(q_positions, 1, nq * block, -1)  # padded queries see nothing
    cut = [(_blocks(source, block), source.ordered) for source in sources]

    def query_block(args):
        qb, qpos = args  # [B, bq, K, G, H], [B, bq]
        _, _, k, g, h = qb.shape
        state = (jnp.full((batch, k, g, block), MASKED, F32),
                 jnp.zeros((batch, k, g, block), F32), jnp.zeros((batch, k, g, block, h), F32))
        for (keys, values, positions, first, last), ordered in cut:
            lo, hi = 0, keys.shape[2]
            if ordered:  # key blocks [lo, hi) hold every key some query of this block may see
                hi = jnp.sum(jnp.any(first <= qpos.max(-1, keepdims=True), axis=0))
                if window is not None:
                    lo = jnp.sum(jnp.all(
                        last < jnp.maximum(qpos.min(-1, keepdims=True), 0) - window + 1, axis=0))
            state = _attend_blocks(qb, qpos, (keys, values, positions), lo, hi, state, scale,
                                   cap, window)
        _, total, acc = state
        out = acc / jnp.where(total > 0, total, 1.0)[..., None]  # rows that saw nothing: 0
        return out.transpose(0, 3, 1, 2, 4)  # [B, bq, K, G, H]

    q_blocks = jnp.moveaxis(q.reshape(batch, nq, block, *q.shape[2:]), 1, 0)
    pos_blocks = jnp.moveaxis(q_positions.reshape(batch, nq, block), 1, 0)
    out = jax.lax.map(query_block, (q_blocks, pos_blocks))  # [nq, B, bq, K, G, H]
    return jnp.moveaxis(out, 0, 1).reshape(batch, nq * block, *q.shape[2:])[:, :length]


def _attend_blocks(qb, qpos, key_blocks, lo, hi, state, scale, cap, window):
    """The online softmax of one query block over key blocks lo..hi-1, continuing `state`
    (running max, sum [B, K, G, bq] and output [B, K, G, bq, H], float32)."""
    keys, values, key_positions = key_blocks
    dtype = qb.dtype

    def step(j, carry):
        m, total, acc = carry
        kb, vb = keys[:, :, j], values[:, :, j]  # [B, K, bk, H]
        kpos = key_positions[:, j]  # [B, bk]
        logits = jnp.einsum("bqkgh,bksh->bkgqs", qb, kb.astype(dtype),
                            preferred_element_type=F32) * scale  # [B, K, G, bq, bk]
        if cap is not None:
            logits = cap * jnp.tanh(logits / cap)
        visible = kpos[:, None, :] <= qpos[:, :, None]  # [B, bq, bk]
        if window is not None:
            visible &= qpos[:, :, None] - kpos[:, None, :] < window
        visible = visible[:, None, None]
        logits = jnp.where(visible, logits, MASKED)
        m_new = jnp.maximum(m, logits.max(-1))
        p = jnp.where(visible, jnp.exp(logits - m_new[..., None]), 0.0)
        correction = jnp.exp(m - m_new)
        acc = acc * correction[..., None] + jnp.einsum(
            "bkgqs,bksh->bkgqh", p.astype(dtype), vb.astype(dtype), preferred_element_type=F32)
        return m_new, total * correction + p.sum(-1), acc

    return jax.lax.fori_loop(lo, hi, step, state)
