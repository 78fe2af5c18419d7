"""The decode attention kernel (runtime/cpu_attention.cc): one query token per row over a KV
memory read in place, against a float64 numpy re-statement of attention, and a scanned
model's decode steps with it against the same steps through XLA's attention."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_params, tiny_config

import runtime.cpu_kernels as cpu_kernels
from runtime import layout
from runtime.memory import held_positions
from runtime.models.transformer import build_transformer

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="no C++ compiler")


def _reference(q, keys, values, held, positions, new_k, new_v, scale, cap, window, rows):
    """float64: y [B, K, G, H] = softmax over the visible keys of the memory (held positions
    <= the query's, within the window) then the token's own, of scale q.k (capped), times v."""
    batch, heads, groups, dim = q.shape
    out = np.zeros(q.shape)
    for b in range(batch):
        at = np.concatenate([held[b], np.full(new_k.shape[1], positions[b])])
        seen = (at >= 0) & (at <= positions[b])
        if window:
            seen &= positions[b] - at < window
        for k in range(heads):
            read = held.shape[1]
            ks = np.concatenate([keys[rows[b], k, :read], new_k[b, :, k]]).astype(np.float64)
            vs = np.concatenate([values[rows[b], k, :read], new_v[b, :, k]]).astype(np.float64)
            logits = scale * ks @ q[b, k].astype(np.float64).T  # [S', G]
            if cap:
                logits = cap * np.tanh(logits / cap)
            logits = np.where(seen[:, None], logits, -np.inf)
            p = np.exp(logits - logits.max(0))
            out[b, k] = (p / p.sum(0)).T @ vs
    return out


# (B, memory rows, K, G, S, read, H, chunk, window, cap, stacked, memory dtype): H 64, 80 and
# 128 take the 16-lane path, 24 the plain one; read < S is a windowed read; a window of 5 with
# held positions a ring holds (out of order); rows not the identity (the busy-rows step).
CASES = [
    (1, 1, 3, 3, 97, 97, 64, 1, 0, 0.0, True, "float32"),
    (2, 4, 2, 5, 40, 33, 80, 1, 0, 30.0, True, "float32"),
    (3, 3, 1, 8, 16, 16, 128, 1, 5, 0.0, False, "float32"),
    (2, 2, 2, 2, 20, 20, 24, 1, 7, 5.0, True, "float32"),
    (2, 2, 2, 3, 24, 24, 64, 0, 0, 0.0, True, "float32"),
    (2, 3, 3, 2, 30, 25, 64, 1, 6, 30.0, True, "bfloat16"),
    (1, 1, 2, 2, 12, 12, 24, 0, 0, 0.0, False, "bfloat16"),
    (2, 3, 3, 3, 40, 40, 64, 1, 0, 30.0, True, "float16"),  # --kv-dtype float16
    (1, 2, 1, 2, 20, 14, 24, 1, 5, 0.0, False, "float16"),  # float16, plain loops (H 24)
]


@pytest.mark.parametrize("batch,memory_rows,heads,groups,slots,read,dim,chunk,window,cap,"
                         "stacked,dtype", CASES)
def test_kernel_gives_attention(batch, memory_rows, heads, groups, slots, read, dim, chunk, window,
                                cap, stacked, dtype):
    rng = np.random.default_rng(slots + dim)
    layers, layer = (3, 2) if stacked else (1, 0)
    keys = rng.standard_normal((layers, memory_rows, heads, slots, dim)).astype(np.float32)
    values = rng.standard_normal(keys.shape).astype(np.float32)
    q = rng.standard_normal((batch, heads, groups, dim)).astype(np.float32)
    new_k = rng.standard_normal((batch, chunk, heads, dim)).astype(np.float32)
    new_v = rng.standard_normal(new_k.shape).astype(np.float32)
    if dtype != "float32":  # the kernel reads 2-byte floats; the reference their float32 values
        keys, values, new_k, new_v = (np.asarray(jnp.asarray(a, dtype).astype(jnp.float32))
                                      for a in (keys, values, new_k, new_v))
    positions = rng.integers(3, 3 * slots, batch).astype(np.int32)
    size = slots if window == 0 else min(slots, window)  # a ring for the window
    held = np.asarray(held_positions(size, min(read, size), jnp.asarray(positions - 1)))
    rows = rng.permutation(memory_rows)[:batch].astype(np.int32)
    as_memory = (lambda a: jnp.asarray(a, dtype))
    got = cpu_kernels.decode_attention(
        jnp.asarray(q), as_memory(keys if stacked else keys[0]),
        as_memory(values if stacked else values[0]), jnp.asarray(held), jnp.asarray(positions),
        as_memory(new_k), as_memory(new_v), scale=0.3, cap=cap or None, window=window or None,
        layer=layer if stacked else None, rows=jnp.asarray(rows))
    want = _reference(q, keys[layer], values[layer], held, positions, new_k, new_v, 0.3, cap,
                      window, rows)
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-5)


def test_kernel_refuses_bad_operands_in_one_line():
    q = jnp.zeros((1, 2, 2, 16))
    keys = jnp.zeros((3, 1, 2, 8, 16))
    held, positions = jnp.zeros((1, 8), jnp.int32), jnp.zeros((1,), jnp.int32)
    new = jnp.zeros((1, 1, 2, 16))
    cases = [dict(layer=3),  # a layer out of range
             dict(layer=0, values=jnp.zeros((3, 1, 2, 8, 8))),  # values unlike keys
             dict(layer=0, held=jnp.zeros((1, 9), jnp.int32)),  # more slots read than held
             dict(layer=0, rows=jnp.array([1], jnp.int32))]  # a memory row out of range
    for change in cases:
        args = {**dict(q=q, keys=keys, values=keys, held=held, positions=positions,
                       new_keys=new, new_values=new, scale=1.0), **change}
        with pytest.raises(Exception) as error:
            jax.block_until_ready(cpu_kernels.decode_attention(**args))
        assert "decode_attention:" in str(error.value), change


def _steps(config, params, prompts, decode_steps: int, kernel: bool, monkeypatch,
           unrolled=False):
    """Float32 logits of a prefill then `decode_steps` greedy steps of a scanned model whose
    layers read their weights and memory as views (or of the unrolled model, its layers
    writing and then reading their own memory arrays), with or without the attention kernel."""
    monkeypatch.setattr(layout, "DECODE_ATTENTION_IN_KERNEL", kernel)
    model = build_transformer(config, unroll_layers=unrolled, layer_views=not unrolled)
    params = model.prepare_params(params)
    step = jax.jit(model.step)
    memory = model.new_memory(len(prompts), 24)
    width = max(map(len, prompts))
    tokens = jnp.asarray([p + [0] * (width - len(p)) for p in prompts], jnp.int32)
    logits, memory = step(params, memory, tokens, jnp.asarray([len(p) for p in prompts]))
    seen = [np.asarray(logits)]
    ones = jnp.ones(len(prompts), jnp.int32)
    program = step.lower(params, memory, tokens[:, :1], ones).as_text()
    assert ("runtime_decode_attention" in program) == kernel  # the path under test
    assert {a.dtype for a in jax.tree.leaves((memory.keys, memory.values))} == \
        {jnp.dtype(config.kv_dtype or config.dtype)}
    for _ in range(decode_steps):
        following = jnp.argmax(logits, -1).astype(jnp.int32)[:, None]
        logits, memory = step(params, memory, following, ones)
        seen.append(np.asarray(logits))
    return np.stack(seen)


@pytest.mark.parametrize("kv_dtype", [None, "bfloat16", "float16"])
@pytest.mark.parametrize("unrolled", [False, True])
@pytest.mark.parametrize("window,cap", [(None, 30.0), (6, None)])
def test_model_decode_steps_equal_xla_attention(window, cap, unrolled, kv_dtype, monkeypatch):
    """A sliding window of 6 keeps a ring of 6 slots, which the 12 steps wrap twice. Float32
    activations over a float32 memory, or over a 2-byte float one (--kv-dtype)."""
    config = tiny_config(num_layers=2, num_experts=0, num_selected_experts=0, key_size=16,
                         emb_size=64, sliding_window=window, attn_logit_cap=cap,
                         kv_dtype=kv_dtype)
    params = jax.tree.map(jnp.asarray, random_params(config, seed=3, scale=0.3))
    prompts = [[5, 9, 11], [7, 3, 200, 17, 4]]
    with_kernel = _steps(config, params, prompts, 12, True, monkeypatch, unrolled)
    through_xla = _steps(config, params, prompts, 12, False, monkeypatch, unrolled)
    # a 2-byte memory: a key whose float32 values differ in their last bits on the two paths
    # (a layer's attention summed in another order) can round to neighbouring bf16 values,
    # one bf16 ulp of one key (2e-4 in a logit here; the memory's dtype itself moves them 2e-2)
    tolerance = 1e-5 if kv_dtype is None else 1e-3
    np.testing.assert_allclose(with_kernel, through_xla, rtol=tolerance, atol=tolerance)
