"""The sampling controls (issue 21) against numpy statements of their definitions, as vLLM's
sampler (v1) and transformers define them: logit bias added first; repetition penalty (CTRL,
transformers' RepetitionPenaltyLogitsProcessor, vLLM) on prompt and output tokens: a seen
token's logit divided by the penalty when positive, multiplied when not; presence and frequency
penalties (OpenAI's definition, vLLM) on output tokens: minus presence if generated at all,
minus frequency per occurrence; min_p (vLLM): keep tokens with p >= min_p * p_max of the
temperature-scaled distribution; logprobs: log-softmax of the model's logits (vLLM's raw
logprobs). Then the engine: every control in one compiled step with mixed rows."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from runtime.errors import RequestError
from runtime.request import Request
from runtime.sampling import filter_logits, penalized, token_logprobs
from runtime.sampling_state import MAX_TOP_LOGPROBS, counted, new_history, reset_rows, saw_prompt
from test_engine import full_forward

B, V = 6, 64


def numpy_penalized(logits, bias, prompt_seen, counts, repetition, presence, frequency):
    out = logits.astype(np.float64) + bias
    for b in range(len(out)):
        for v in range(out.shape[1]):
            if prompt_seen[b, v] or counts[b, v] > 0:
                x = out[b, v]
                out[b, v] = x / repetition[b] if x > 0 else x * repetition[b]
            out[b, v] -= frequency[b] * counts[b, v] + presence[b] * (counts[b, v] > 0)
    return out


def test_penalties_and_bias_match_their_definitions():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(B, V)).astype(np.float32) * 3
    bias = np.where(rng.random((B, V)) < 0.1, rng.uniform(-5, 5, (B, V)), 0).astype(np.float32)
    seen = rng.random((B, V)) < 0.2
    counts = np.where(rng.random((B, V)) < 0.2, rng.integers(1, 4, (B, V)), 0).astype(np.int32)
    repetition = np.array([1.0, 1.3, 0.8, 2.0, 1.0, 1.1], np.float32)
    presence = np.array([0.0, 0.5, -0.5, 0.0, 2.0, -2.0], np.float32)
    frequency = np.array([0.0, 0.25, 0.0, -1.0, 1.0, 0.3], np.float32)
    out = jax.jit(penalized)(logits, bias, seen, counts, repetition, presence, frequency)
    want = numpy_penalized(logits, bias, seen, counts, repetition, presence, frequency)
    np.testing.assert_allclose(np.asarray(out), want, rtol=1e-6, atol=1e-5)
    # neutral settings leave the logits bit for bit (greedy rows next to penalised ones)
    neutral = jax.jit(penalized)(logits, np.zeros_like(bias), seen, counts,
                                 np.ones(B, np.float32), np.zeros(B, np.float32),
                                 np.zeros(B, np.float32))
    np.testing.assert_array_equal(np.asarray(neutral), logits)


def test_min_p_keeps_tokens_at_least_min_p_times_the_top_probability():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(B, V)).astype(np.float32) * 2
    temperature = np.array([1.0, 0.5, 2.0, 1.0, 0.7, 1.0], np.float32)
    min_p = np.array([0.0, 0.1, 0.05, 0.5, 0.9, 1.0], np.float32)
    kept = np.isfinite(np.asarray(jax.jit(filter_logits)(
        logits, temperature, np.zeros(B, np.int32), np.ones(B, np.float32), min_p)))
    scaled = logits.astype(np.float64) / temperature[:, None]
    probs = np.exp(scaled - scaled.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    want = probs >= min_p[:, None] * probs.max(-1, keepdims=True) * (1 - 1e-6)
    np.testing.assert_array_equal(kept, want)
    assert kept[0].all() and kept[5].sum() == 1  # min_p 0: all; min_p 1: the top token only


def test_logprobs_are_the_log_softmax_and_its_top_k():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(B, V)).astype(np.float32) * 4
    tokens = rng.integers(0, V, B).astype(np.int32)
    chosen, ids, values = jax.jit(token_logprobs, static_argnums=2)(logits, tokens, 5)
    x = logits.astype(np.float64)
    log_softmax = x - x.max(-1, keepdims=True)
    log_softmax -= np.log(np.exp(log_softmax).sum(-1, keepdims=True))
    np.testing.assert_allclose(np.asarray(chosen), log_softmax[np.arange(B), tokens], atol=1e-5)
    np.testing.assert_array_equal(np.asarray(ids), np.argsort(-log_softmax, -1)[:, :5])
    np.testing.assert_allclose(np.asarray(values), np.sort(log_softmax, -1)[:, ::-1][:, :5],
                               atol=1e-5)


def test_history_tracks_prompt_output_and_bias_per_slot():
    history = new_history(3, V)
    slots = jnp.array([2, 0, 3])  # 3: a padding row (out of range), dropped
    ids = np.full((3, 300), V, np.int32)
    values = np.zeros((3, 300), np.float32)
    ids[0, :2], values[0, :2] = [5, 9], [1.5, -100.0]
    history = reset_rows(history, slots, jnp.array([True, True, True]), ids, values)
    tokens = jnp.array([[4, 4, 7, 60], [1, 2, 3, 0], [8, 8, 8, 8]])
    history = saw_prompt(history, slots, tokens, jnp.array([3, 4, 4]))
    history = counted(history, jnp.arange(3), jnp.array([11, 12, 13]), jnp.array([1, 0, 1]))
    seen, counts, bias = map(np.asarray, history)
    assert set(np.flatnonzero(seen[2])) == {4, 7} and set(np.flatnonzero(seen[0])) == {0, 1, 2,
                                                                                      3}
    assert not seen[1].any() and counts[0, 11] == 1 and counts[1].sum() == 0
    assert counts[2, 13] == 1 and bias[2, 5] == 1.5 and bias[2, 9] == -100 and bias[0].sum() == 0
    # a new request in slot 2 starts afresh
    history = reset_rows(history, jnp.array([2]), jnp.array([True]), np.full((1, 300), V),
                         np.zeros((1, 300), np.float32))
    assert not np.asarray(history.prompt_seen[2]).any() and not np.asarray(history.bias[2]).any()


# --- the engine: one compiled step for mixed rows -------------------------------------------

def penalized_greedy(model, params, prompt, steps, bias=(), repetition=1.0, presence=0.0,
                     frequency=0.0):
    """Greedy tokens from teacher-forced logits with the controls applied in numpy."""
    tokens = list(prompt)
    for _ in range(steps):
        logits = full_forward(model, params, tokens)[-1].astype(np.float64)
        for token, value in bias:
            logits[token] += value
        out = tokens[len(prompt):]
        for v in set(tokens):
            logits[v] = logits[v] / repetition if logits[v] > 0 else logits[v] * repetition
        for v in set(out):
            logits[v] -= frequency * out.count(v) + presence
        tokens.append(int(np.argmax(logits)))
    return tokens[len(prompt):]


def test_greedy_rows_with_controls_match_numpy_and_plain_rows_are_unaffected(engine3, params):
    prompt = (5, 6, 7, 5, 6)
    controls = [dict(repetition_penalty=1.8), dict(frequency_penalty=1.5, presence_penalty=0.5),
                dict(logit_bias=((9, 4.0), (11, -100.0)))]
    alone = engine3.generate([Request(prompt, max_new_tokens=6)])[0].output_ids
    requests = [Request(prompt, max_new_tokens=6, **c) for c in controls]
    # a sampled neighbour with every control, next to a plain greedy row
    noisy = Request(prompt, max_new_tokens=6, temperature=1.3, min_p=0.05, top_k=20,
                    repetition_penalty=1.2, presence_penalty=1.0, logit_bias=((3, 2.0),),
                    seed=7)
    results = engine3.generate(requests + [noisy, Request(prompt, max_new_tokens=6)])
    assert results[-1].output_ids == alone
    numpy_args = [dict(repetition=1.8), dict(frequency=1.5, presence=0.5),
                  dict(bias=((9, 4.0), (11, -100.0)))]
    for result, kwargs in zip(results, numpy_args):
        assert result.output_ids == penalized_greedy(engine3.model, params, prompt, 6, **kwargs)
    assert results[0].output_ids != alone  # the penalty changed something


def test_logprobs_of_generated_tokens_match_the_model(engine3, params):
    prompt = (40, 41, 42)
    request = Request(prompt, max_new_tokens=4, logprobs=True, top_logprobs=3)
    result = engine3.generate([request])[0]
    sequence = list(prompt) + result.output_ids
    logits = full_forward(engine3.model, params, sequence)[len(prompt) - 1:-1].astype(np.float64)
    log_softmax = logits - logits.max(-1, keepdims=True)
    log_softmax -= np.log(np.exp(log_softmax).sum(-1, keepdims=True))
    assert len(result.logprobs) == 4
    for i, (token, (value, top)) in enumerate(zip(result.output_ids, result.logprobs)):
        assert value == pytest.approx(log_softmax[i, token], abs=1e-4)
        assert [t for t, _ in top] == np.argsort(-log_softmax[i])[:3].tolist()
        assert top[0][0] == token  # greedy: the chosen token is the most likely
    assert engine3.generate([Request(prompt, max_new_tokens=2)])[0].logprobs is None


def test_stop_token_ids_end_the_request_without_the_token(engine3):
    prompt = (100, 101)
    free = engine3.generate([Request(prompt, max_new_tokens=8)])[0].output_ids
    stop = free[3]
    cut = free.index(stop)
    result = engine3.generate([Request(prompt, max_new_tokens=8, stop_token_ids=(stop,))])[0]
    assert result.output_ids == free[:cut] and result.finish_reason == "stop"


def test_n_choices_share_one_prefill_and_differ_by_choice(engine3, monkeypatch):
    prompt = (9, 10, 11, 12)
    base = Request(prompt, max_new_tokens=5, temperature=1.5, seed=3)
    rows = []
    real = engine3._prefill

    def spy(params, memory, history, tokens, *rest):
        rows.append(int((np.asarray(tokens) != engine3.config.pad_token).any(-1).sum()))
        return real(params, memory, history, tokens, *rest)

    monkeypatch.setattr(engine3, "_prefill", spy)
    results = engine3.generate([dataclasses.replace(base, choice=c) for c in range(3)])
    assert rows == [1]  # three slots, one prompt computed
    monkeypatch.undo()
    assert len({tuple(r.output_ids) for r in results}) == 3
    again = engine3.generate([dataclasses.replace(base, choice=2)])[0]
    assert again.output_ids == results[2].output_ids  # a choice's stream is its own


@pytest.mark.parametrize("field, value, message", [
    ("min_p", 1.5, "min_p"), ("repetition_penalty", 0.0, "repetition_penalty"),
    ("presence_penalty", 3.0, "presence_penalty"), ("frequency_penalty", -2.5,
                                                     "frequency_penalty"),
    ("logit_bias", ((99999, 1.0),), "logit_bias token id 99999"),
    ("logit_bias", ((3, 500.0),), "logit_bias[3]"),
    ("stop_token_ids", (-1,), "stop_token_ids"),
    ("top_logprobs", MAX_TOP_LOGPROBS + 1, "top_logprobs"), ("logprobs", 1, "logprobs")])
def test_out_of_range_controls_are_refused_naming_the_field(field, value, message):
    with pytest.raises(RequestError, match=message.replace("[", r"\[").replace("]", r"\]")):
        Request((1, 2), **{field: value}).validate(1000, 64)


@pytest.mark.parametrize("family", ["llama", "mamba2"])
def test_prompt_logprobs_are_what_a_prefill_gives_each_next_token(family):
    """Engine.prompt_logprobs (echo with logprobs) of token t equals the raw logprob of a
    prefill of tokens < t forced to pick it by a logit bias (logprobs come before the bias)."""
    from conftest import single_device_mesh
    from runtime.engine import build_engine
    from test_dtype_ladder import weights
    config, params = weights(family, "float")
    engine = build_engine(config, params, single_device_mesh(), slots=2, cache_length=32)
    prompt = np.random.default_rng(5).integers(3, config.vocab_size, 6).tolist()
    scored = engine.prompt_logprobs(prompt, 2)
    assert scored[0] == (None, ()) and len(scored) == len(prompt)
    forced = engine.generate([Request(tuple(prompt[:t]), max_new_tokens=1, logprobs=True,
                                      top_logprobs=2, logit_bias=((prompt[t], 100.0),))
                              for t in range(1, len(prompt))])
    assert [f.output_ids for f in forced] == [[t] for t in prompt[1:]]
    for f, (value, top) in zip(forced, scored[1:]):
        assert f.logprobs[0][0] == pytest.approx(value, abs=1e-4)
        assert [i for i, _ in f.logprobs[0][1]] == [i for i, _ in top]


def test_gpu_form_without_a_branch_samples_the_same(monkeypatch):
    """On GPUs the penalties are always applied (a branch costs a host round trip there):
    neutral rows stay bit for bit, penalised rows equal the branching form."""
    from runtime import layout
    from runtime.sampling_state import choose, neutral_rows
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(4, V)).astype(np.float32)
    history = counted(new_history(4, V), jnp.arange(4), jnp.array([1, 2, 3, 4]), jnp.ones(4))
    for penalised in (False, True):
        settings = neutral_rows(4)
        settings.temperature[1] = 0.9
        if penalised:
            settings.repetition[2], settings.frequency[3] = 1.5, 0.7
        outputs = []
        for branch in (True, False):
            monkeypatch.setattr(layout, "greedy_batches_skip_the_sort", lambda: branch)
            outputs.append(jax.tree.map(np.asarray, choose(
                logits, history, jnp.arange(4), settings, jnp.zeros(4, jnp.int32), True)))
        for a, b in zip(*outputs):
            np.testing.assert_array_equal(a, b)
