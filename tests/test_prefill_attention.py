"""The CPU prefill attention kernel (cpu_prefill_attention.cc) against a float64 numpy
re-statement of attention over a memory and a chunk, at and around its block edges (64 keys,
16 queries), with windows, caps, GQA, rings, row indices and bf16 memories; and models whose
long prompts take it against the same models through blockwise.py."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from runtime import cpu_kernels, layout

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="no C++ compiler")


def reference(q, positions, keys, values, held, rows, new_k, new_v, scale, cap, window):
    """float64 [B, T, K, G, H]: each query over every memory slot and chunk key it sees."""
    batch, length, heads, groups, dim = q.shape
    out = np.zeros(q.shape)
    for b in range(batch):
        mem_k = keys[rows[b], :, :held.shape[1]].astype(np.float64)  # [K, S', H]
        mem_v = values[rows[b], :, :held.shape[1]].astype(np.float64)
        key_pos = np.asarray(held[b], np.int64)
        all_k, all_v = mem_k, mem_v
        if new_k.shape[1]:
            all_k = np.concatenate([mem_k, new_k[b].astype(np.float64).transpose(1, 0, 2)], 1)
            all_v = np.concatenate([mem_v, new_v[b].astype(np.float64).transpose(1, 0, 2)], 1)
            key_pos = np.concatenate([key_pos, positions[b]])
        for t in range(length):
            seen = (key_pos >= 0) & (key_pos <= positions[b, t])
            if window:
                seen &= positions[b, t] - key_pos < window
            if not seen.any():
                continue
            logits = np.einsum("kgh,ksh->kgs", q[b, t].astype(np.float64), all_k) * scale
            if cap:
                logits = cap * np.tanh(logits / cap)
            logits = np.where(seen, logits, -np.inf)
            p = np.exp(logits - logits.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            out[b, t] = np.einsum("kgs,ksh->kgh", p, all_v)
    return out


def operands(batch, length, heads, groups, dim, slots, filled, chunk, dtype, seed=0,
             ring=False, window=None):
    """Random operands: each row's memory holds positions 0..filled-1 (a ring of `slots` when
    `ring`: position p in slot p % slots, the last `slots` of them), the queries continue at
    filled.. (T of them), their own keys present unless chunk is False (in place)."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, length, heads, groups, dim)).astype(np.float32)
    keys = rng.standard_normal((batch + 1, heads, slots, dim)).astype(dtype)
    values = rng.standard_normal((batch + 1, heads, slots, dim)).astype(dtype)
    held = np.full((batch, slots), -1, np.int32)
    for b in range(batch):
        kept = range(max(0, filled - slots), filled) if ring else range(min(filled, slots))
        for p in kept:
            held[b, p % slots if ring else p] = p
    positions = (filled + np.arange(length, dtype=np.int32))[None].repeat(batch, 0)
    size = length if chunk else 0
    new_k = rng.standard_normal((batch, size, heads, dim)).astype(dtype)
    new_v = rng.standard_normal((batch, size, heads, dim)).astype(dtype)
    rows = np.arange(batch, dtype=np.int32)[::-1] + 1  # row b reads memory row B - b
    return q, positions, keys, values, held, rows, new_k, new_v


CASES = [  # batch, T, K, G, H, slots, filled, chunk, dtype, cap, window, ring
    (1, 63, 1, 1, 64, 0, 0, True, np.float32, None, None, False),  # a fresh prompt, T = 64 - 1
    (2, 64, 2, 3, 32, 0, 0, True, np.float32, 30.0, None, False),  # T = 64, capped, GQA
    (1, 65, 3, 1, 64, 0, 0, True, np.float32, None, None, False),  # T = 64 + 1
    (2, 17, 2, 2, 64, 128, 100, True, np.float32, None, None, False),  # a chunk after memory
    (1, 40, 2, 4, 8, 96, 70, True, np.float32, 5.0, 33, False),  # H 8 (plain loops), window
    (2, 33, 1, 2, 80, 64, 150, True, ml_dtypes.bfloat16, None, 64, True),  # a ring, bf16, H 80
    (2, 20, 2, 2, 64, 64, 30, True, np.float16, 30.0, None, False),  # --kv-dtype float16
    (1, 9, 1, 3, 24, 32, 12, True, np.float16, None, 6, False),  # float16, plain loops (H 24)
    (1, 20, 2, 2, 128, 128, 80, False, np.float32, None, None, False),  # in place: memory only
]


@pytest.mark.parametrize("case", CASES)
def test_the_kernel_matches_attention_in_float64(case):
    batch, length, heads, groups, dim, slots, filled, chunk, dtype, cap, window, ring = case
    q, positions, keys, values, held, rows, new_k, new_v = operands(
        batch, length, heads, groups, dim, slots, filled, chunk, dtype, ring=ring)
    if not chunk:  # in place: the memory holds the queries' own keys too
        for b in range(batch):
            held[b, filled:filled + length] = positions[b]
    scale = dim ** -0.5
    got = np.asarray(cpu_kernels.prefill_attention(
        jnp.asarray(q), jnp.asarray(positions), jnp.asarray(keys), jnp.asarray(values),
        jnp.asarray(held), jnp.asarray(new_k), jnp.asarray(new_v), scale=scale, cap=cap,
        window=window, rows=jnp.asarray(rows)))
    want = reference(q, positions, keys, values, held, rows, new_k, new_v, scale, cap, window)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


def test_queries_that_see_nothing_give_zero():
    """A query whose keys are all outside the window or empty gets 0, as blockwise.py's."""
    q, positions, keys, values, held, rows, new_k, new_v = operands(
        1, 4, 1, 1, 16, 8, 0, False, np.float32)
    got = np.asarray(cpu_kernels.prefill_attention(
        jnp.asarray(q), jnp.asarray(positions), jnp.asarray(keys), jnp.asarray(values),
        jnp.asarray(held), jnp.asarray(new_k), jnp.asarray(new_v), scale=1.0))
    assert np.all(got == 0.0)


def test_malformed_operands_are_refused():
    q, positions, keys, values, held, rows, new_k, new_v = operands(
        1, 4, 2, 1, 16, 8, 2, True, np.float32)
    with pytest.raises(Exception, match="prefill_attention: shapes must be"):
        cpu_kernels.prefill_attention(
            jnp.asarray(q), jnp.asarray(positions), jnp.asarray(keys[:, :1]),
            jnp.asarray(values[:, :1]), jnp.asarray(held), jnp.asarray(new_k),
            jnp.asarray(new_v), scale=1.0)
    with pytest.raises(Exception, match="row index is out of range"):
        cpu_kernels.prefill_attention(
            jnp.asarray(q), jnp.asarray(positions), jnp.asarray(keys), jnp.asarray(values),
            jnp.asarray(held), jnp.asarray(new_k), jnp.asarray(new_v), scale=1.0,
            rows=jnp.asarray([7], jnp.int32))


# --- models: every prompt and chunk through the kernel, against XLA's attention ---------------

MODEL_CASES = [("grok", False, 1), ("llama", True, 3), ("mistral", False, 3),
               ("mixtral", True, 1)]  # family, unrolled, slots


@pytest.mark.parametrize("family, unroll, slots", MODEL_CASES)
def test_models_prefill_the_same_logits_through_the_kernel(monkeypatch, family, unroll, slots):
    """Whole prompts and chunks over a slot's memory (Grok-1's cap, GQA, Mistral's sliding
    window ring, MoE): the kernel forced for every multi-query attention gives XLA's logits
    within the float32 decode tolerance, and is called."""
    from test_chunked_prefill import chunked_logits
    from test_dtype_ladder import DECODE_ULPS, prefill_logits, tolerance, weights
    from conftest import single_device_mesh
    from runtime.engine import build_engine

    config, params = weights(family, "float")
    engine = build_engine(config, params, single_device_mesh(), slots=slots,
                          cache_length=min(config.sequence_len, 128), unroll_layers=unroll)
    prompt = np.random.default_rng(3).integers(3, config.vocab_size, 61).tolist()
    monkeypatch.setattr(layout, "PREFILL_ATTENTION_IN_KERNEL", False)
    jax.clear_caches()
    want = prefill_logits(engine, [prompt, prompt[:40]])
    calls = []
    real = cpu_kernels.prefill_attention
    monkeypatch.setattr(layout, "PREFILL_ATTENTION_IN_KERNEL", True)
    monkeypatch.setattr(layout, "PREFILL_KERNEL_MIN_PAIRS", 1)
    monkeypatch.setattr(cpu_kernels, "prefill_attention",
                        lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    jax.clear_caches()
    whole = prefill_logits(engine, [prompt, prompt[:40]])
    assert calls, "the kernel was not called"
    chunked, _, _ = chunked_logits(engine, prompt, 24, slot=slots - 1)
    for got, expected in ((whole[0], want[0]), (whole[1], want[1]), (chunked, want[0])):
        limit = tolerance("float32", float(np.abs(expected).max()), DECODE_ULPS["float32"])
        worst = float(np.abs(got - expected).max())
        assert worst <= limit, f"{family}: the kernel differs by {worst:.4g} > {limit:.4g}"
