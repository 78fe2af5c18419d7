"""Chunked prefill (Model.chunk_step, scheduler.feed_chunk) and the sliding-window ring memory.

- A prompt fed in chunks over its slot's memory gives the logits of one whole-prompt prefill,
  within the dtype's tolerance (CHUNK_ULPS), for every family and engine layout, with
  the chunk's attention dense and blockwise; decode after it too.
- Through the scheduler: the greedy tokens do not change with chunking; the rows already
  streaming get tokens between a long newcomer's chunks; chunks are padded per chunk.
- A sliding-window model's memory is a ring of its window whatever the prompt and cache length,
  and still gives the tokens of a model that keeps every position.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import random_params, single_device_mesh, tiny_config
from test_dtype_ladder import DECODE_ULPS, prefill_logits, tolerance, weights
from runtime import layout
from runtime.engine import bucket_length, build_engine
from runtime.memory import empty_kv
from runtime.models import build_model
from runtime.request import Request

RNG = np.random.default_rng(11)
# A chunk sums its attention in another order than one whole prompt (memory, then chunk): in
# bf16 the worst measured logit difference was 3.9 ulps of the logits' scale (llama), over the
# 3 a decode step may take (BENCHMARKS.md, "Chunked prefill").
CHUNK_ULPS = {"float32": DECODE_ULPS["float32"], "bfloat16": 6}


def chunked_logits(engine, prompt, chunk: int, slot: int = 0):
    """Logits [V] after `prompt` fed into `slot` in chunks of `chunk` tokens (the model's
    chunk_step, reading the window the engine reads), then [V] after one greedy decode step;
    leaves the engine's memory there."""
    step = jax.jit(engine.model.chunk_step, static_argnums=(6,))
    memory, start = engine.memory, 0
    while start < len(prompt):
        piece = prompt[start:start + chunk]
        tokens = np.full((1, bucket_length(len(piece), chunk)), engine.config.pad_token, np.int32)
        tokens[0, :len(piece)] = piece
        window = None if engine.memory_length < engine.cache_length else \
            bucket_length(start + tokens.shape[1], engine.memory_length)
        logits, memory = step(engine.params, memory, tokens, np.array([len(piece)], np.int32),
                              np.array([slot], np.int32), np.array([start], np.int32), window)
        start += len(piece)
    after = np.asarray(logits, np.float32)[0]
    active = np.zeros(engine.slots, np.int32)
    active[slot] = 1
    last = np.zeros((engine.slots, 1), np.int32)
    last[slot] = after.argmax()
    decoded, memory = jax.jit(engine.model.step)(engine.params, memory, last, active)
    engine.memory = memory
    return after, np.asarray(decoded, np.float32)[slot], int(after.argmax())


CASES = [("grok", "scan-1", "float32"), ("llama", "scan-3", "bfloat16"),
         ("llama", "unrolled-1", "float32"), ("mistral", "unrolled-3", "float32"),
         ("mistral", "scan-1", "bfloat16"), ("mixtral", "scan-1", "float32"),
         ("mamba2", "scan-3", "float32"), ("mamba2", "scan-1", "bfloat16")]
LAYOUTS = {"scan-1": (False, 1), "scan-3": (False, 3), "unrolled-1": (True, 1),
           "unrolled-3": (True, 3)}


# Each case's chunk attention dense; blockwise too where the attention differs (Mamba-2 has
# none; Mixtral's is Llama's): Grok's capped logits, the sliding window, bf16, both layer
# layouts. int8 weights (row blocks R = 8 as Grok-1's checkpoint stores some, R = 1 per
# channel) in the two engine layouts, dense. Unrolled layers with 3 slots: Mistral's here,
# and Grok's through the scheduler in test_greedy_tokens_do_not_change_with_chunking.
DENSE_ONLY = {("mixtral", "scan-1"), ("mamba2", "scan-3"), ("mamba2", "scan-1")}
PARAMS = [pytest.param(*case, "float", blockwise, marks=[pytest.mark.slow]
                       if blockwise and case[0] == "grok" else [])
          for case in CASES for blockwise in (False, True)
          if not (blockwise and case[:2] in DENSE_ONLY)] + [
    ("grok", "scan-3", "bfloat16", "int8r8", False),
    ("llama", "unrolled-1", "float32", "int8", False)]


@pytest.mark.parametrize("family, engine_layout, dtype, weight_format, blockwise", PARAMS)
def test_chunks_equal_whole_prefill(monkeypatch, family, engine_layout, dtype, weight_format,
                                    blockwise):
    if blockwise:  # every chunk's attention blockwise, in blocks of 16 (boundaries inside)
        monkeypatch.setattr(layout, "attention_block",
                            lambda queries, keys: 16 if queries > 1 else None)
    config, params = weights(family, weight_format)
    config = config.replace(dtype=dtype)
    unroll, slots = LAYOUTS[engine_layout]
    engine = build_engine(config, params, single_device_mesh(), slots=slots,
                          cache_length=min(config.sequence_len, 128), unroll_layers=unroll)
    prompt = RNG.integers(3, config.vocab_size, 61).tolist()  # 3 chunks of 24, the last 13
    after, decoded, first = chunked_logits(engine, prompt, 24, slot=slots - 1)
    whole = prefill_logits(engine, [prompt, prompt + [first]])
    for got, want in ((after, whole[0]), (decoded, whole[1])):
        limit = tolerance(dtype, float(np.abs(want).max()), CHUNK_ULPS[dtype])
        worst = float(np.abs(got - want).max())
        assert worst <= limit, f"{family} {dtype}: chunked differs by {worst:.4g} > {limit:.4g}"


@pytest.mark.parametrize("engine_layout", ["unrolled-1", "scan-1"])
def test_a_last_chunk_whose_padding_passes_the_memorys_end(engine_layout):
    """A memory of 62 slots, a 61-token prompt in chunks of 24: the last chunk's bucket of 16
    reaches position 63. Its padding must not wrap onto slots 0 and 1 (an unrolled engine
    writes each chunk into its layers' arrays before reading them: dropped by the rows'
    lengths, and what each slot holds is counted through the chunk's last token only)."""
    config, params = weights("llama", "float")
    unroll, slots = LAYOUTS[engine_layout]
    prompt = RNG.integers(3, config.vocab_size, 61).tolist()
    engine = build_engine(config, params, single_device_mesh(), slots=slots,
                          cache_length=len(prompt) + 1, unroll_layers=unroll)
    after, decoded, first = chunked_logits(engine, prompt, 24, slot=slots - 1)
    whole = prefill_logits(engine, [prompt, prompt + [first]])
    for got, want in ((after, whole[0]), (decoded, whole[1])):
        limit = tolerance("float32", float(np.abs(want).max()), CHUNK_ULPS["float32"])
        worst = float(np.abs(got - want).max())
        assert worst <= limit, f"{engine_layout}: chunked differs by {worst:.4g} > {limit:.4g}"


def _prompts(config, lengths, seed: int = 0):
    """Random prompts, the same whatever tests ran before (the outputs must not hit EOS)."""
    rng = np.random.default_rng(seed)
    return [tuple(int(t) for t in rng.integers(3, config.vocab_size, n)) for n in lengths]


@pytest.mark.slow  # several engines compiled: in the full suite, not the inner loop
def test_greedy_tokens_do_not_change_with_chunking():
    """Unrolled layers (chunks written in place into each layer's memory); a scanned engine's
    chunks go through the same scheduler in test_streams_continue_between_a_long_prompts_chunks
    and its model's chunk step in test_chunks_equal_whole_prefill."""
    config = tiny_config(sequence_len=160, num_layers=3)  # 3: compile time
    params = random_params(config)
    requests = [Request(p, max_new_tokens=8) for p in _prompts(config, (70, 5, 33, 100))]
    outputs = []
    for chunk in (0, 16):
        engine = build_engine(config, params, single_device_mesh(), slots=3,
                              unroll_layers=True, prefill_chunk=chunk)
        outputs.append([r.output_ids for r in engine.generate(requests)])
        assert all(len(out) == 8 for out in outputs[-1])
    assert outputs[0] == outputs[1]


def test_streams_continue_between_a_long_prompts_chunks():
    """Two requests stream while a 100-token prompt arrives: it is fed in 4 chunks of at most
    32 tokens (the last, 4 tokens, padded to its own bucket of 16, not to the whole prompt's
    128), and the streaming rows get a token between every two of its chunks."""
    config = tiny_config(sequence_len=160)
    engine = build_engine(config, random_params(config), single_device_mesh(), slots=3,
                          prefill_chunk=32)
    short_a, short_b, long = _prompts(config, (4, 6, 100))
    events, widths = [], []
    feed, program = engine.prefill_chunk, engine._chunk

    def spy_feed(slot, request, start):
        events.append("chunk")
        return feed(slot, request, start)

    def spy_program(params, memory, history, tokens, *rest):
        widths.append(tokens.shape[1])
        return program(params, memory, history, tokens, *rest)

    engine.prefill_chunk, engine._chunk = spy_feed, spy_program

    def on_token(key, token):
        events.append(key)

    requests = [("a", Request(short_a, max_new_tokens=40)),
                ("b", Request(short_b, max_new_tokens=40)),
                ("long", Request(long, max_new_tokens=3))]
    results = dict(engine.serve(iter(requests), on_token))
    assert [len(results[k].output_ids) for k in "ab"] == [40, 40]
    assert events.count("chunk") == 4 and widths == [32, 32, 32, 16]
    chunks = [i for i, e in enumerate(events) if e == "chunk"]
    for before, after in zip(chunks, chunks[1:]):
        between = events[before + 1:after]
        assert "a" in between and "b" in between, events


@pytest.mark.slow  # several engines compiled: in the full suite, not the inner loop
# whole prompts into scanned layers, chunks into unrolled ones: each axis once (the ring is
# written by the same memory code either way; test_chunks_equal_whole_prefill covers chunks
# of both layouts over mistral's window)
@pytest.mark.parametrize("unroll, chunk", [(False, 0), (True, 16)])
def test_sliding_window_memory_is_a_ring_of_its_window(unroll, chunk):
    """cache 160, window 12: the memory holds 12 positions per row; greedy tokens equal the
    teacher-forced argmax of a forward pass over every position (no ring), for prompts shorter
    and longer than the window and outputs that wrap the ring many times."""
    config = tiny_config(sequence_len=160, sliding_window=12, num_layers=3)
    params = random_params(config)
    engine = build_engine(config, params, single_device_mesh(), slots=2, unroll_layers=unroll,
                          prefill_chunk=chunk)
    keys = engine.memory.keys[0] if unroll else engine.memory.keys[0, 0]
    assert engine.memory_length == 12 and keys.shape[-2] == 12
    prompts = _prompts(config, (5, 30, 70))
    results = engine.generate([Request(p, max_new_tokens=25) for p in prompts])
    model = build_model(config)
    for prompt, result in zip(prompts, results):
        sequence = list(prompt) + result.output_ids
        kv = empty_kv(config, 1, len(sequence), jnp.float32)
        logits = jax.jit(model.apply)(params, jnp.array([sequence]), kv, kv,
                                      jnp.arange(len(sequence))[None])[0]
        teacher = np.asarray(logits[0]).argmax(-1)[len(prompt) - 1:-1].tolist()
        assert result.output_ids == teacher and len(teacher) == 25


def test_plan_counts_one_chunk_not_the_whole_prompt():
    """Llama-3.1-8B at 128k: the prefill working set is a 512-token chunk over its row's memory
    (attended blockwise), far below a whole 128k prompt's."""
    from runtime.config import load_config
    from runtime.planning.plan import make_plan
    config = load_config("llama-3.1-8b")
    chunked = make_plan(config, {"model": 8}, "bfloat16", slots=1, cache_length=131072)
    prefill = chunked.transients["prefill"]
    # each layer gathers its row of the memory: 2 x 131072 x 1 kv head x 128 x 2 bytes
    assert prefill["row gather"] == 2 * 131072 * 128 * 2
    previous = layout.PREFILL_CHUNK
    try:
        layout.PREFILL_CHUNK = 0
        whole = make_plan(config, {"model": 8}, "bfloat16", slots=1, cache_length=131072)
    finally:
        layout.PREFILL_CHUNK = previous
    assert sum(prefill.values()) < sum(whole.transients["prefill"].values()) / 20
