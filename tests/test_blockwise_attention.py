"""Blockwise attention (runtime/models/blockwise.py) against the dense softmax over every (query,
key) pair, at block boundaries, with sliding windows, soft caps, GQA and per-row positions; and
the model's prefill logits with the blockwise path forced against its dense path."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import random_params, tiny_config
from runtime import layout
from runtime.models import build_model
from runtime.models.blockwise import NO_POSITION, KeySource, blockwise_attention

RNG = np.random.default_rng(5)


def dense_reference(q, k, v, qpos, kpos, scale, cap, window):
    """numpy: softmax over all keys; q [B, T, K, G, H], k/v [B, S, K, H] -> [B, T, K, G, H]."""
    logits = np.einsum("btkgh,bskh->bkgts", q, k) * scale
    if cap is not None:
        logits = cap * np.tanh(logits / cap)
    visible = kpos[:, None, :] <= qpos[:, :, None]
    if window is not None:
        visible &= qpos[:, :, None] - kpos[:, None, :] < window
    logits = np.where(visible[:, None, None], logits, -np.inf)
    logits = logits - logits.max(-1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("bkgts,bskh->btkgh", probs, v)


@pytest.mark.parametrize("length", [15, 16, 17, 47, 48, 49])
@pytest.mark.parametrize("window, cap", [(None, None), (20, None), (16, 30.0), (None, 5.0)])
def test_blockwise_equals_dense_at_block_boundaries(length, window, cap):
    batch, kv, groups, head, block = 2, 2, 3, 8, 16
    q = RNG.normal(size=(batch, length, kv, groups, head)).astype(np.float32)
    k = RNG.normal(size=(batch, length, kv, head)).astype(np.float32)
    v = RNG.normal(size=(batch, length, kv, head)).astype(np.float32)
    start = np.array([0, 5])[:, None]  # per-row positions: the second row starts at 5
    positions = (start + np.arange(length)).astype(np.int32)
    got = jax.jit(lambda q, k, v, pos: blockwise_attention(
        q, pos, [KeySource(k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), pos)], scale=0.3,
        cap=cap, window=window, block=block))(q, k, v, positions)
    want = dense_reference(q, k, v, positions, positions, 0.3, cap, window)
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-5)


def test_blockwise_keeps_memory_linear_in_the_prompt():
    """The compiled program's temporaries at 4,096 tokens stay far below one [T, T] logit
    matrix per head (what the dense path materialises)."""
    batch, length, kv, groups, head = 1, 4096, 2, 4, 32
    q = jax.ShapeDtypeStruct((batch, length, kv, groups, head), jnp.float32)
    k = jax.ShapeDtypeStruct((batch, kv, length, head), jnp.float32)
    positions = jax.ShapeDtypeStruct((batch, length), jnp.int32)
    compiled = jax.jit(lambda q, k, pos: blockwise_attention(
        q, pos, [KeySource(k, k, pos)], scale=0.2, block=256)).lower(q, k, positions).compile()
    temporaries = compiled.memory_analysis().temp_size_in_bytes
    dense_logits = batch * kv * groups * length * length * 4
    assert temporaries < dense_logits / 8, (temporaries, dense_logits)


@pytest.mark.parametrize("family", [dict(), dict(sliding_window=24),
                                    dict(attn_logit_cap=10.0, qk_norm=True)])
def test_prefill_logits_blockwise_equal_dense(monkeypatch, family):
    config = tiny_config().replace(**family)
    params = random_params(config)
    tokens = jnp.asarray(RNG.integers(3, config.vocab_size, (2, 40)), jnp.int32)
    lengths = jnp.asarray([40, 29], jnp.int32)

    def prefill_logits():
        model = build_model(config)
        return np.asarray(jax.jit(model.prefill)(params, tokens, lengths)[0])

    dense = prefill_logits()
    monkeypatch.setattr(layout, "attention_block", lambda queries, keys: 16)
    blockwise = prefill_logits()
    np.testing.assert_allclose(blockwise, dense, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("start, length", [(0, 16), (15, 17), (16, 16), (33, 31), (40, 1)])
@pytest.mark.parametrize("window, cap, ring", [(None, None, False), (12, None, False),
                                               (None, 5.0, False), (24, None, True)])
def test_chunk_over_memory_equals_dense(start, length, window, cap, ring):
    """A chunk's queries over two sources (the memory before it, stale slots at NO_POSITION,
    then its own keys) equal the dense softmax over the memory's live keys and the chunk's.
    ring: the memory is a ring of `window` slots holding the last positions out of order."""
    batch, kv, groups, head, block, size = 2, 2, 2, 8, 16, 48
    starts = np.array([start, max(start - 7, 0)])  # per-row positions
    q = RNG.normal(size=(batch, length, kv, groups, head)).astype(np.float32)
    new_k = RNG.normal(size=(batch, length, kv, head)).astype(np.float32)
    new_v = RNG.normal(size=(batch, length, kv, head)).astype(np.float32)
    slots = window if ring else size
    mem_k = RNG.normal(size=(batch, kv, slots, head)).astype(np.float32)
    mem_v = RNG.normal(size=(batch, kv, slots, head)).astype(np.float32)
    qpos = (starts[:, None] + np.arange(length)).astype(np.int32)
    j = np.arange(slots)
    held = (starts[:, None] - 1) - np.mod(starts[:, None] - 1 - j, slots)  # [B, slots]
    mem_pos = np.where(held >= 0, held, NO_POSITION).astype(np.int32)
    sources = lambda mk, mv, mp, nk, nv, qp: [  # noqa: E731
        KeySource(mk, mv, mp, ordered=not ring),
        KeySource(nk.transpose(0, 2, 1, 3), nv.transpose(0, 2, 1, 3), qp)]
    got = jax.jit(lambda q, *a: blockwise_attention(q, a[-1], sources(*a), scale=0.3, cap=cap,
                                                   window=window, block=block))(
        q, mem_k, mem_v, mem_pos, new_k, new_v, qpos)
    keys = np.concatenate([mem_k.transpose(0, 2, 1, 3), new_k], axis=1)
    values = np.concatenate([mem_v.transpose(0, 2, 1, 3), new_v], axis=1)
    # a never-written slot: a position no query reaches
    kpos = np.concatenate([np.where(held >= 0, held, 1 << 30), qpos], axis=1)
    want = dense_reference(q, keys, values, qpos, kpos, 0.3, cap, window)
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("family", [dict(attn_logit_cap=None),
                                    dict(attn_logit_cap=None, sliding_window=24)])
@pytest.mark.parametrize("dtype, tolerance", [("float32", 2e-4), ("bfloat16", 5e-2)])
def test_prefill_logits_fused_attention_equal_dense(monkeypatch, family, dtype, tolerance):
    """The fused prompt path (jax.nn.dot_product_attention; cuDNN on GPUs, its XLA form here)
    wired as the dense path computes: GQA head order, scale, causal, window, padded rows."""
    config = tiny_config().replace(**family, dtype=dtype)
    assert config.q_per_kv > 1  # GQA: query head k * G + g must read kv head k
    params = random_params(config)
    tokens = jnp.asarray(RNG.integers(3, config.vocab_size, (2, 40)), jnp.int32)
    lengths = jnp.asarray([40, 29], jnp.int32)
    calls = []

    def prefill_logits():
        model = build_model(config)
        return np.asarray(jax.jit(model.prefill)(params, tokens, lengths)[0])

    dense = prefill_logits()
    monkeypatch.setattr(layout, "FUSED_ATTENTION", "xla")
    monkeypatch.setattr(layout, "BLOCKWISE_MIN_LENGTH", 16)
    real = jax.nn.dot_product_attention
    monkeypatch.setattr(jax.nn, "dot_product_attention",
                        lambda *a, **k: calls.append(k["implementation"]) or real(*a, **k))
    fused = prefill_logits()
    assert calls and set(calls) == {"xla"}  # the fused path ran, once per layer
    np.testing.assert_allclose(fused, dense, rtol=tolerance, atol=tolerance)


def test_fused_attention_only_where_its_constraints_hold(monkeypatch):
    config = tiny_config().replace(attn_logit_cap=None)
    long = 2 * layout.BLOCKWISE_MIN_LENGTH
    assert layout.fused_prompt_attention(config, 0, long, jnp.bfloat16) is None  # CPU: cuDNN no
    monkeypatch.setattr(layout, "platform", lambda: "gpu")
    gpu_config = config.replace(key_size=128)
    assert layout.fused_prompt_attention(gpu_config, 0, long, jnp.bfloat16) == "cudnn"
    assert layout.fused_prompt_attention(gpu_config, 0, long, jnp.float32) is None
    assert layout.fused_prompt_attention(gpu_config, 0, 64, jnp.bfloat16) is None  # short
    assert layout.fused_prompt_attention(gpu_config, 512, long, jnp.bfloat16) is None  # memory
    assert layout.fused_prompt_attention(gpu_config.replace(key_size=80), 0, long,
                                         jnp.bfloat16) is None
    assert layout.fused_prompt_attention(gpu_config.replace(attn_logit_cap=30.0), 0, long,
                                         jnp.bfloat16) is None  # Grok-1's soft cap
