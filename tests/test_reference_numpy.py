"""Self-checks of the independent numpy reference (tests/reference_numpy.py)."""

import math
import os
import sys
import types

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reference_numpy as ref  # noqa: E402


def small_config(**overrides):
    cfg = dict(
        vocab_size=64, emb_size=32, key_size=8, num_q_heads=4, num_kv_heads=2, num_layers=2,
        num_experts=4, num_selected_experts=2, attn_output_multiplier=1 / math.sqrt(8),
        embedding_multiplier_scale=math.sqrt(32), output_multiplier_scale=1 / math.sqrt(3),
        rope_base=10000.0, norm_eps=1e-5, attn_logit_cap=30.0, ffn_size=48,
    )
    cfg.update(overrides)
    return types.SimpleNamespace(**cfg)


def test_forward_shape_and_finite():
    cfg = small_config()
    params = ref.random_params(cfg, np.random.default_rng(0))
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, size=(2, 7))
    logits = ref.forward(params, cfg, tokens)
    assert logits.shape == (2, 7, cfg.vocab_size)
    assert logits.dtype == np.float32
    assert np.all(np.isfinite(logits))
    # Rows are independent: batching must not mix sequences.
    np.testing.assert_allclose(logits[1:], ref.forward(params, cfg, tokens[1:]), rtol=1e-5, atol=1e-5)


def test_causality():
    cfg = small_config()
    params = ref.random_params(cfg, np.random.default_rng(0))
    rng = np.random.default_rng(2)
    tokens = rng.integers(0, cfg.vocab_size, size=(1, 8))
    changed = tokens.copy()
    changed[0, 5:] = (changed[0, 5:] + 1 + rng.integers(0, cfg.vocab_size - 1, size=3)) % cfg.vocab_size
    assert np.all(changed[0, 5:] != tokens[0, 5:])
    a = ref.forward(params, cfg, tokens)
    b = ref.forward(params, cfg, changed)
    np.testing.assert_allclose(a[:, :5], b[:, :5], rtol=1e-5, atol=1e-5)
    assert not np.allclose(a[:, 5:], b[:, 5:], atol=1e-3)  # later positions do see the change


def _expert_independent(x, w, wv, w1):
    a = x @ w
    g = 0.5 * a * (1 + np.tanh(np.sqrt(2 / np.pi) * (a + 0.044715 * a**3)))
    return (g * (x @ wv)) @ w1


def test_moe_uniform_gates_with_zero_router():
    cfg = small_config(num_selected_experts=4)
    layer = ref.random_params(cfg, np.random.default_rng(0))["layers"][0]
    layer["router"] = np.zeros_like(layer["router"])
    x = np.random.default_rng(3).standard_normal((2, 3, cfg.emb_size)).astype(np.float32)
    got = ref.moe(x, layer, cfg)
    want = np.zeros_like(got, dtype=np.float64)
    for e in range(cfg.num_experts):
        want += (1.0 / cfg.num_experts) * _expert_independent(
            x.astype(np.float64), layer["moe_linear"][e], layer["moe_linear_v"][e], layer["moe_linear_1"][e])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_moe_top_k_uses_raw_probabilities():
    cfg = small_config()  # top-2 of 4
    layer = ref.random_params(cfg, np.random.default_rng(0))["layers"][0]
    x = np.random.default_rng(4).standard_normal((1, 1, cfg.emb_size)).astype(np.float32)
    tok = x[0, 0].astype(np.float64)
    logits = tok @ layer["router"]
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    top = np.argsort(-probs)[:2]
    want = sum(probs[e] * _expert_independent(
        tok, layer["moe_linear"][e], layer["moe_linear_v"][e], layer["moe_linear_1"][e]) for e in top)
    np.testing.assert_allclose(ref.moe(x, layer, cfg)[0, 0], want, rtol=1e-4, atol=1e-5)


def test_rope_depends_only_on_relative_offset():
    rng = np.random.default_rng(5)
    hd = 16
    q = rng.standard_normal((1, 1, hd)).astype(np.float32)  # [T=1, N=1, H]
    k = rng.standard_normal((1, 1, hd)).astype(np.float32)

    def score(pq, pk):
        rq = ref.rope(q, np.array([pq]), 10000.0)
        rk = ref.rope(k, np.array([pk]), 10000.0)
        return float(np.sum(rq * rk))

    for p, d in [(3, 2), (7, 0), (11, 5), (40, 9)]:
        assert abs(score(p, p + d) - score(0, d)) < 1e-4
    assert abs(score(0, 3) - score(0, 0)) > 1e-3  # RoPE actually rotates
    # Rotation preserves norms.
    np.testing.assert_allclose(np.linalg.norm(ref.rope(q, np.array([13]), 10000.0)),
                               np.linalg.norm(q), rtol=1e-5)


def test_greedy_matches_teacher_forced_forward():
    cfg = small_config()
    params = ref.random_params(cfg, np.random.default_rng(0))
    prompt = [5, 17, 3]
    steps = 4
    gen = ref.greedy(params, cfg, prompt, steps)
    assert len(gen) == steps
    full = np.array([prompt + gen])
    logits = ref.forward(params, cfg, full)
    pred = np.argmax(logits[0, len(prompt) - 1 : -1], axis=-1).tolist()
    assert pred == gen
