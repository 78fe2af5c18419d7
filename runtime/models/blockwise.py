"""Blockwise attention with an online softmax (flash-attention style), in pure JAX: queries and
keys in blocks, a running max and sum per query, never the full [T, S] logit matrix. Memory per
layer is O(T x block) instead of O(T x S); causal key blocks past a query block are skipped.

Shape glossary: B batch rows, T queries, S keys, K kv heads, G query heads per kv head, H head
dim, bq / bk queries / keys per block, nq / nk blocks.

It computes what attention.py's dense path computes for a fresh prompt (keys = the prompt's own:
causal by position, sliding window, soft cap, GQA, per-row positions), in float32 softmax
statistics; the probabilities meet the values in the activation dtype, as there.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

F32 = jnp.float32
NO_POSITION = jnp.iinfo(jnp.int32).max  # a padded key: after every query, never visible
MASKED = -1e30


def _pad(x, axis: int, size: int, value=0):
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def blockwise_attention(q, keys, values, q_positions, key_positions, *, scale: float,
                        cap=None, window=None, block: int = 512):
    """q [B, T, K, G, H]; keys, values [B, S, K, H]; q_positions [B, T] and key_positions [B, S]
    int32, keys in increasing position order. A key is visible to a query when its position is
    <= the query's (and within `window` positions of it). Logits are (q . k) * scale, capped
    by cap * tanh(x / cap). Returns float32 [B, T, K, G, H]."""
    batch, length = q.shape[:2]
    stored = keys.shape[1]
    nq, nk = math.ceil(length / block), math.ceil(stored / block)
    q = _pad(q, 1, nq * block)
    q_positions = _pad(q_positions, 1, nq * block, -1)  # padded queries see nothing
    keys, values = _pad(keys, 1, nk * block), _pad(values, 1, nk * block)
    key_positions = _pad(key_positions, 1, nk * block, NO_POSITION)
    key_blocks = (keys.reshape(batch, nk, block, *keys.shape[2:]),
                  values.reshape(batch, nk, block, *values.shape[2:]),
                  key_positions.reshape(batch, nk, block))
    first_key = key_positions.reshape(batch, nk, block)[:, :, 0]  # [B, nk]
    last_key = jnp.where(key_positions == NO_POSITION, -1, key_positions).reshape(
        batch, nk, block).max(-1)  # [B, nk]

    def query_block(args):
        qb, qpos = args  # [B, bq, K, G, H], [B, bq]
        # key blocks [lo, hi) hold every key some query of this block may see
        hi = jnp.sum(jnp.any(first_key <= qpos.max(-1, keepdims=True), axis=0))
        lo = 0 if window is None else jnp.sum(jnp.all(
            last_key < jnp.maximum(qpos.min(-1, keepdims=True), 0) - window + 1, axis=0))
        return _attend_block(qb, qpos, key_blocks, lo, hi, scale, cap, window)

    q_blocks = jnp.moveaxis(q.reshape(batch, nq, block, *q.shape[2:]), 1, 0)
    pos_blocks = jnp.moveaxis(q_positions.reshape(batch, nq, block), 1, 0)
    out = jax.lax.map(query_block, (q_blocks, pos_blocks))  # [nq, B, bq, K, G, H]
    return jnp.moveaxis(out, 0, 1).reshape(batch, nq * block, *q.shape[2:])[:, :length]


def _attend_block(qb, qpos, key_blocks, lo, hi, scale, cap, window):
    """One query block against key blocks lo..hi-1: the online softmax. -> f32 [B, bq, K, G, H]"""
    keys, values, key_positions = key_blocks
    batch, bq, k, g, h = qb.shape
    dtype = qb.dtype

    def step(j, carry):
        m, l, acc = carry  # [B, K, G, bq], [B, K, G, bq], [B, K, G, bq, H]
        kb, vb = keys[:, j], values[:, j]  # [B, bk, K, H]
        kpos = key_positions[:, j]  # [B, bk]
        logits = jnp.einsum("bqkgh,bskh->bkgqs", qb, kb.astype(dtype),
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
            "bkgqs,bskh->bkgqh", p.astype(dtype), vb.astype(dtype), preferred_element_type=F32)
        return m_new, l * correction + p.sum(-1), acc

    init = (jnp.full((batch, k, g, bq), MASKED, F32), jnp.zeros((batch, k, g, bq), F32),
            jnp.zeros((batch, k, g, bq, h), F32))
    _, l, acc = jax.lax.fori_loop(lo, hi, step, init)
    out = acc / jnp.where(l > 0, l, 1.0)[..., None]  # rows that saw nothing: 0
    return out.transpose(0, 3, 1, 2, 4)  # [B, bq, K, G, H]
