"""Prefill/decode over KV memory slots, continuous batching, stopping, determinism."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import random_params, single_device_mesh, tiny_config
from runtime.engine import bucket_length, build_engine
from runtime.errors import RequestError
from runtime.models import build_model
from runtime.request import Request
from runtime.sampling_state import neutral_rows
from runtime.memory import empty_kv

PROMPTS = [(5, 6, 7), (40, 41, 42, 43, 44, 45, 46, 47, 48, 49), (9,), (200, 17, 4, 88, 31),
           (100, 101)]


def full_forward(model, params, tokens):
    c = model.config
    length = len(tokens)
    kv = empty_kv(c, 1, length, jnp.float32)
    logits, _, _ = jax.jit(model.apply)(params, jnp.array([tokens]), kv, kv,
                                        jnp.arange(length)[None])
    return np.asarray(logits[0])


@pytest.mark.slow
def test_greedy_decode_equals_teacher_forced_argmax(engine3, params):
    results = engine3.generate([Request(p, max_new_tokens=12) for p in PROMPTS[:3]])
    for prompt, result in zip(PROMPTS, results):
        sequence = list(prompt) + result.output_ids
        logits = full_forward(engine3.model, params, sequence)
        teacher_forced = np.argmax(logits[len(prompt) - 1:-1], axis=-1).tolist()
        assert result.output_ids == teacher_forced
        assert len(result.output_ids) == 12 and result.finish_reason == "length"


@pytest.mark.slow
def test_prefill_then_decode_equals_longer_prefill(config, params):
    """prefill(T) == prefill(T-1) + one decode step: same last logits, same keys/values."""
    model = build_model(config)
    apply = jax.jit(model.apply)
    tokens = jnp.array([[11, 22, 33, 44, 55, 66, 77]])
    kv = empty_kv(config, 1, 16, jnp.float32)
    full_logits, full_k, full_v = apply(params, tokens, kv, kv, jnp.arange(7)[None])
    part_logits, k, v = apply(params, tokens[:, :6], kv, kv, jnp.arange(6)[None])
    step_logits, k, v = apply(params, tokens[:, 6:], k, v, jnp.array([[6]]))
    np.testing.assert_allclose(step_logits[0, 0], full_logits[0, 6], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(part_logits[0], full_logits[0, :6], atol=1e-5, rtol=1e-5)
    # Same tolerance as the logits: the step sums attention over memory and chunk separately,
    # so float rounding differs by ~1e-6 after 12 layers.
    np.testing.assert_allclose(k[:, :, :7], full_k[:, :, :7], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(v[:, :, :7], full_v[:, :, :7], atol=1e-5, rtol=1e-5)


def test_batch_invariance_and_continuous_batching(engine1, engine3):
    """5 requests through 3 slots (slots are reused) give what each gives alone."""
    requests = [Request(p, max_new_tokens=4 + 3 * i) for i, p in enumerate(PROMPTS)]
    batched = engine3.generate(requests)
    for request, result in zip(requests, batched):
        alone = engine1.generate([request])[0]
        assert result.output_ids == alone.output_ids
        assert len(result.output_ids) == request.max_new_tokens
        assert result.prompt_ids == list(request.prompt_ids)


def test_sampling_is_seeded_and_independent_of_batch(engine1, engine3):
    requests = [Request(p, max_new_tokens=8, temperature=1.0, seed=i)
                for i, p in enumerate(PROMPTS)]
    first = [r.output_ids for r in engine3.generate(requests)]
    again = [r.output_ids for r in engine3.generate(requests[::-1])][::-1]
    alone = [engine1.generate([r])[0].output_ids for r in requests[:2]]
    assert first == again
    assert first[:2] == alone
    other_seed = engine1.generate([Request(PROMPTS[0], max_new_tokens=8, temperature=1.0,
                                           seed=99)])[0].output_ids
    assert other_seed != first[0]


def test_streaming_callback_sees_every_token_in_order(engine3):
    seen = {}
    results = engine3.generate([Request(p, max_new_tokens=5) for p in PROMPTS[:4]],
                               on_token=lambda i, t: seen.setdefault(i, []).append(t))
    assert seen == {i: r.output_ids for i, r in enumerate(results)}


@pytest.mark.slow
def test_context_full_stops_with_length(engine3):
    prompt = tuple(range(10, 38))  # 28 tokens in a 32-token cache
    result = engine3.generate([Request(prompt, max_new_tokens=16)])[0]
    assert result.finish_reason == "length"
    assert len(prompt) + len(result.output_ids) == 32


def test_prompt_that_does_not_fit_is_rejected(engine3):
    with pytest.raises(RequestError, match="request 1: prompt of 32 tokens does not fit"):
        engine3.generate([Request((5,)), Request(tuple(range(32)))])
    with pytest.raises(RequestError, match="empty prompt"):
        engine3.generate([Request(())])


def test_stops_at_eos(config, params, engine1):
    free_run = engine1.generate([Request(PROMPTS[1], max_new_tokens=10)])[0].output_ids
    eos = free_run[4]
    stop_at = free_run.index(eos)
    engine = build_engine(config.replace(eos_token=eos), params, single_device_mesh(),
                          slots=1, cache_length=32)
    result = engine.generate([Request(PROMPTS[1], max_new_tokens=10)])[0]
    assert result.finish_reason == "eos"
    assert result.output_ids == free_run[:stop_at]


def test_bucket_lengths():
    assert [bucket_length(n, 64) for n in (1, 16, 17, 33, 64)] == [16, 16, 32, 64, 64]
    assert bucket_length(50, 40) == 40


@pytest.mark.slow
@pytest.mark.parametrize("unroll", [False, True])
def test_decode_reads_only_the_filled_window(config, params, monkeypatch, unroll):
    """Past MIN_DECODE_WINDOW positions decode attends over a power-of-two window of the memory;
    crossing a window boundary changes nothing: tokens equal the whole-memory decode and the
    teacher-forced argmax of a plain forward. Both layouts: the scan's stacked memory written
    after the layers, the unrolled layers' per-layer arrays written in place before reading."""
    from runtime import engine as engine_module

    long_config = config.replace(sequence_len=2048, num_layers=2)
    params = random_params(long_config, seed=5)
    prompt = tuple(np.random.default_rng(4).integers(3, 250, 505).tolist())
    short = (7, 8, 9)  # a second row far behind the first: the window follows the longest

    def run():
        engine = build_engine(long_config, params, single_device_mesh(), slots=2,
                              cache_length=2048, unroll_layers=unroll)
        assert engine.memory.per_layer == unroll
        windows = []
        choose = engine._decode_window
        monkeypatch.setattr(engine, "_decode_window", lambda a: windows.append(choose(a))
                            or windows[-1])
        results = engine.generate([Request(prompt, max_new_tokens=12),
                                   Request(short, max_new_tokens=12)])
        return [r.output_ids for r in results], windows

    windowed, windows = run()
    assert windows[0] == 512 and windows[-1] == 1024  # 505 + 12 tokens cross 512
    monkeypatch.setattr(engine_module, "MIN_DECODE_WINDOW", 4096)
    whole, windows = run()
    assert set(windows) == {None}
    assert windowed == whole
    logits = full_forward(build_model(long_config), params, list(prompt) + windowed[0])
    assert windowed[0] == np.argmax(logits[len(prompt) - 1:-1], axis=-1).tolist()


def test_program_options_per_backend(monkeypatch):
    """A GPU's decode program of a dense model compiles without XLA's command buffers; its
    prefill, and an MoE model's decode, with XLA's defaults; the CPU keeps its float32
    options; other backends get XLA's defaults."""
    from runtime import layout as layout_module

    config = tiny_config(dtype="float32")  # an MoE model
    dense = config.replace(num_experts=0, num_selected_experts=0)
    assert config.is_moe and not dense.is_moe
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert layout_module.program_options(dense, "decode") == layout_module.GPU_DECODE_OPTIONS
    assert layout_module.program_options(dense, "prefill") is None
    assert layout_module.program_options(config, "decode") is None  # its switches in graphs
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert layout_module.program_options(config, "decode") is None
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    assert layout_module.program_options(config, "decode") == layout_module.CPU_FLOAT32_OPTIONS
    # bf16 programs keep every rounding (any backend), merged with the backend's own options
    bf16 = layout_module.BF16_OPTIONS
    assert layout_module.program_options(config.replace(dtype="bfloat16"), "prefill") == bf16
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert layout_module.program_options(dense.replace(dtype="bfloat16"), "decode") == \
        {**layout_module.GPU_DECODE_OPTIONS, **bf16}


def test_gpu_decode_options_are_valid_xla_options():
    """XLA parses every backend's options on any backend: a misspelt option or value fails
    here, not first on a GPU."""
    from runtime.layout import GPU_DECODE_OPTIONS

    double = lambda x: x * 2  # noqa: E731
    compiled = jax.jit(double, compiler_options=GPU_DECODE_OPTIONS).lower(jnp.ones(3)).compile()
    np.testing.assert_array_equal(np.asarray(compiled(jnp.ones(3))), 2.0)
    with pytest.raises(Exception, match="not a valid enum value"):
        wrong = {name: "NOT_A_COMMAND_TYPE" for name in GPU_DECODE_OPTIONS}
        jax.jit(double, compiler_options=wrong).lower(jnp.ones(3)).compile()


def test_serve_dispatches_each_step_from_the_previous_steps_device_tokens(engine1, monkeypatch):
    """While a step runs, the next is dispatched from its tokens still on the device (one step
    ahead); the row's tokens are those of a lone decode loop that reads every step."""
    calls = []
    real = engine1.decode_async

    def recording(tokens, *rest):
        calls.append(isinstance(tokens, jax.Array))
        return real(tokens, *rest)

    monkeypatch.setattr(engine1, "decode_async", recording)
    (result,) = engine1.generate([Request(PROMPTS[1], max_new_tokens=6)])
    # prefill samples token 1; steps 2-6 are dispatched, plus one ahead whose token is dropped
    assert len(calls) == 6 and not calls[0] and all(calls[1:])
    monkeypatch.undo()
    first = engine1.prefill_many([(0, Request(PROMPTS[1], max_new_tokens=6))])
    tokens, step_by_step = np.array(first, np.int32), list(first)
    for step in range(1, 6):  # host round trip every step
        z = np.zeros(1, np.int32)
        tokens = engine1.decode(tokens, np.ones(1, bool), z + step, neutral_rows(1))
        step_by_step.append(int(tokens[0]))
    assert result.output_ids == step_by_step


def test_rows_stopped_while_a_step_runs_ahead_leave_no_trace(engine1):
    """A request stopped by its callback has the token of the step run ahead dropped, and the
    next request in its slot decodes as it would alone (the dropped step wrote its slot)."""
    stop_after = {0: 3}

    def on_token(key, token):
        stop_after[key] = stop_after.get(key, 99) - 1
        return stop_after[key] == 0

    requests = [Request(PROMPTS[0], max_new_tokens=10), Request(PROMPTS[3], max_new_tokens=8)]
    results = [c for _, c in sorted(engine1.serve(enumerate(requests), on_token))]
    alone = engine1.generate([requests[1]])[0]
    assert len(results[0].output_ids) == 3 and results[0].finish_reason == "stop"
    longer = engine1.generate([requests[0]])[0]
    assert results[0].output_ids == longer.output_ids[:3]
    assert results[1].output_ids == alone.output_ids and len(alone.output_ids) == 8


def test_few_busy_slots_decode_on_their_rows_only_with_the_same_tokens(config, params):
    """On the CPU a step with at most half the slots busy runs on those rows only (the chunk
    path's row gather): the same tokens and logprobs as the step over every slot."""
    engine = build_engine(config, params, single_device_mesh(), slots=8, cache_length=32)
    assert engine._decode_rows is not None  # CPU, scanned layers
    calls = []
    real = engine._decode_rows

    def spy(*args):
        calls.append(1)
        return real(*args)

    requests = [Request(PROMPTS[1], max_new_tokens=7, logprobs=True, top_logprobs=2),
                Request(PROMPTS[3], max_new_tokens=7, temperature=0.9, seed=5)]
    engine._decode_rows = spy
    busy_rows = engine.generate(requests)
    assert calls  # two busy of eight: the row path
    engine._decode_rows = None
    every_slot = engine.generate(requests)
    for a, b in zip(busy_rows, every_slot):
        assert a.output_ids == b.output_ids
    for (x, top_x), (y, top_y) in zip(busy_rows[0].logprobs, every_slot[0].logprobs):
        assert x == pytest.approx(y, abs=1e-5) and [i for i, _ in top_x] == [i for i, _ in top_y]
