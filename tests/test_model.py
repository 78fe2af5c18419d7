"""The Haiku model against the independent numpy reference, in float32."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference_numpy
from conftest import random_params, single_device_mesh, tiny_config, to_reference
from runtime.engine import build_engine
from runtime.models import build_model
from runtime.request import Request
from runtime.memory import empty_kv

PROMPTS = [(5, 6, 7), tuple(range(3, 20)), (9,), (200, 17, 4, 88, 31, 9, 250, 2, 0, 77, 13)]


def forward_logits(model, params, tokens):
    """Plain forward over full rows tokens [B, T] -> logits [B, T, V]."""
    c = model.config
    batch, length = tokens.shape
    kv = empty_kv(c, batch, length, jnp.float32)
    positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
    logits, _, _ = jax.jit(model.apply)(params, tokens, kv, kv, positions)
    return np.asarray(logits)


@pytest.mark.slow
@pytest.mark.parametrize("experts", [4, 8])
def test_logits_match_reference(experts):
    config = tiny_config(num_experts=experts)
    params = random_params(config, seed=experts)
    tokens = np.random.default_rng(1).integers(0, config.vocab_size, (3, 13))
    got = forward_logits(build_model(config), params, tokens)
    want = reference_numpy.forward(to_reference(params), config, tokens)
    assert got.shape == want.shape == (3, 13, config.vocab_size)
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)
    # Not vacuous: the logits carry signal well above the tolerance.
    assert np.std(want) > 0.05


@pytest.mark.slow
@pytest.mark.parametrize("experts", [4, 8])
def test_greedy_matches_reference_for_a_batch_of_prompts(experts):
    config = tiny_config(num_experts=experts)
    params = random_params(config, seed=10 + experts)
    engine = build_engine(config, params, single_device_mesh(), slots=len(PROMPTS))
    steps = 16
    results = engine.generate([Request(p, max_new_tokens=steps) for p in PROMPTS])
    reference = to_reference(params)
    for prompt, result in zip(PROMPTS, results):
        want = reference_numpy.greedy(reference, config, list(prompt), steps)
        if config.eos_token in want:  # the engine stops at EOS, the reference does not
            want = want[:want.index(config.eos_token)]
        assert result.output_ids == want, prompt
    assert len({tuple(r.output_ids) for r in results}) == len(PROMPTS)


def test_each_expert_path_matches_reference():
    """Decode at batch 1 gathers the routed experts; prefill groups pairs by expert. Both
    must equal the reference on the same tokens."""
    config = tiny_config()
    params = random_params(config, seed=3)
    model = build_model(config)
    tokens = np.array([[17, 42, 99, 5, 61, 7]])
    want = reference_numpy.forward(to_reference(params), config, tokens)
    # grouped path: 6 tokens x 2 choices > 4 experts
    np.testing.assert_allclose(forward_logits(model, params, tokens), want, atol=2e-4, rtol=2e-4)
    # gather path: one token at a time (2 pairs <= 4 experts), through the KV memory
    kv = empty_kv(config, 1, 8, jnp.float32)
    keys, values = kv, kv
    apply = jax.jit(model.apply)
    for t in range(tokens.shape[1]):
        logits, keys, values = apply(params, tokens[:, t:t + 1], keys, values,
                                     jnp.array([[t]]))
        np.testing.assert_allclose(np.asarray(logits)[0, 0], want[0, t], atol=2e-4, rtol=2e-4)


FAMILY_FEATURES = {
    "llama-like": dict(num_experts=0, num_selected_experts=0, activation="silu",
                       sandwich_norms=False, tie_embeddings=False, attn_logit_cap=None,
                       embedding_multiplier_scale=1.0, output_multiplier_scale=1.0,
                       intermediate_size=40, rope_base=50000.0),
    "llama3-rope": dict(num_experts=0, num_selected_experts=0, activation="silu",
                        sandwich_norms=False, attn_logit_cap=None, rope_scaling_factor=8.0,
                        rope_original_max_len=16, rope_base=500000.0),
    "mistral-window": dict(num_experts=0, num_selected_experts=0, activation="silu",
                           sandwich_norms=False, attn_logit_cap=None, sliding_window=5),
    "mixtral-like": dict(num_experts=8, activation="silu", sandwich_norms=False,
                         moe_renormalize=True, attn_logit_cap=None, tie_embeddings=False),
    # PaLM: parallel block, multi-query, bias-free LayerNorm, SwiGLU, tied head
    "palm-like": dict(num_experts=0, num_selected_experts=0, activation="silu",
                      norm_type="layer", parallel_block=True, num_kv_heads=1,
                      sandwich_norms=False, attn_logit_cap=None, embedding_multiplier_scale=1.0,
                      output_multiplier_scale=1.0),
    "qk-norm": dict(num_experts=0, num_selected_experts=0, activation="silu", qk_norm=True,
                    sandwich_norms=False, attn_logit_cap=None, tie_embeddings=False),
    "qk-layer-norm-sandwich": dict(qk_norm=True, norm_type="layer"),  # Grok MoE + options
    # parallel blocks for any family: a Grok MoE layer with squared-ReLU, ungated experts
    "parallel-relu2-moe": dict(parallel_block=True, activation="relu_squared", gated_ffn=False,
                               num_experts=8),
    "relu2-dense-ungated": dict(num_experts=0, num_selected_experts=0,
                                activation="relu_squared", gated_ffn=False,
                                sandwich_norms=False),
    "recursion": dict(recursion_steps=3, num_layers=2, tie_embeddings=False),
}


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILY_FEATURES))
def test_family_features_match_reference(family):
    """Each config-driven feature against the numpy reference (long enough for the window
    and the RoPE scaling to matter), through a plain forward and through the engine."""
    config = tiny_config(**{"num_layers": 3, **FAMILY_FEATURES[family]})
    params = random_params(config, seed=30)
    tokens = np.random.default_rng(2).integers(0, config.vocab_size, (2, 24))
    want = reference_numpy.forward(to_reference(params), config, tokens)
    np.testing.assert_allclose(forward_logits(build_model(config), params, tokens), want,
                               rtol=2e-4, atol=2e-4)
    engine = build_engine(config, params, single_device_mesh(), slots=2,
                          cache_length=40)
    prompts = [tuple(tokens[0, :12].tolist()), tuple(tokens[1, :3].tolist())]
    results = engine.generate([Request(p, max_new_tokens=10) for p in prompts])
    for prompt, result in zip(prompts, results):
        expected = reference_numpy.greedy(to_reference(params), config, list(prompt), 10)
        if config.eos_token in expected:
            expected = expected[:expected.index(config.eos_token)]
        assert result.output_ids == expected
