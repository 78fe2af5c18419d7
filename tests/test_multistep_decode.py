"""Several decode steps per dispatch (runtime/multistep.py, Engine.decode_block): k = 4 gives
exactly the tokens, finish reasons, logprobs and on_token calls of k = 1, for every family
through Model.step, while dispatching about 1/k as many decode programs."""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pytest

from conftest import single_device_mesh
from runtime import layout
from runtime.benchmark import weight_bytes_per_step
from runtime.engine import build_engine
from runtime.errors import RuntimeInputError
from runtime.request import Request
from test_dtype_ladder import prompt_for, weights

K = 4


@functools.lru_cache(maxsize=None)
def _engine(family: str, slots: int = 3, weight_format: str = "float", dtype=None):
    config, params = weights(family, weight_format)
    config = config if dtype is None else config.replace(dtype=dtype)
    return build_engine(config, params, single_device_mesh(), slots=slots, cache_length=64,
                        decode_steps=K)


def _counted(engine, monkeypatch) -> dict:
    """Counts of the engine's block and single-step decode dispatches."""
    counts = {"block": 0, "single": 0}

    def counting(name, program):
        def call(*args):
            counts[name] += 1
            return program(*args)
        return call

    monkeypatch.setattr(engine, "_block", counting("block", engine._block))
    monkeypatch.setattr(engine, "_decode", counting("single", engine._decode))
    return counts


def _run(engine, requests, k: int, cancel_key=None, cancel_at=0):
    """Completions and the on_token calls with k steps per dispatch; on_token ends request
    cancel_key at its cancel_at-th token."""
    engine.decode_steps = k
    calls = []

    def on_token(key, token):
        calls.append((key, token))
        return key == cancel_key and sum(c[0] == key for c in calls) == cancel_at

    return engine.generate(requests, on_token), calls


def _fresh(tokens, start=2):
    """The first token of `tokens` from index `start` on not seen before it (else the last):
    as a stop id, it ends the sequence there, inside a block."""
    for i in range(start, len(tokens)):
        if tokens[i] not in tokens[:i]:
            return tokens[i]
    return tokens[-1]


def _compare(family: str, monkeypatch, weight_format: str = "float", dtype=None):
    engine = _engine(family, 3, weight_format, dtype)
    config = engine.config
    prompts = [tuple(prompt_for(config, seed=s, length=7 + s)) for s in range(4)]
    # the rows ended by a stop id and by an EOS sample (a trained model's greedy rows repeat):
    # their tokens up to that id are those of a probe without it
    stopped = Request(prompts[1], max_new_tokens=12, temperature=1.0, seed=5)
    ended = Request(prompts[2], max_new_tokens=12, temperature=1.0, seed=9)
    probe, _ = _run(engine, [stopped, ended], 1)
    stop_id, eos_id = _fresh(probe[0].output_ids), _fresh(probe[1].output_ids, 3)
    requests = [
        Request(prompts[0], max_new_tokens=10),  # ended by on_token inside a block
        dataclasses.replace(stopped, stop_token_ids=(stop_id,)),
        Request(prompts[2], max_new_tokens=7, temperature=0.8, top_p=0.9, seed=7,
                repetition_penalty=1.3, frequency_penalty=0.5),
        Request(prompts[3], max_new_tokens=9, temperature=0.8, top_p=0.95, seed=11,
                logprobs=True, top_logprobs=2),
        ended,  # arrives while the others decode; ends at the EOS
        Request(prompts[3], max_new_tokens=6, presence_penalty=1.0),
    ]
    # the engine's own view of EOS (the scheduler reads engine.config): one more end id
    monkeypatch.setattr(engine, "config", config.replace(extra_eos_tokens=(eos_id,)))
    single, single_calls = _run(engine, requests, 1, cancel_key=0, cancel_at=3)
    counts = _counted(engine, monkeypatch)
    multi, multi_calls = _run(engine, requests, K, cancel_key=0, cancel_at=3)
    # per request (admissions, and so the interleaving of requests, move with the blocks)
    for key in range(len(requests)):
        assert [t for k, t in multi_calls if k == key] == [t for k, t in single_calls if k == key]
    for a, b in zip(single, multi):
        assert (b.output_ids, b.finish_reason) == (a.output_ids, a.finish_reason)
        if a.logprobs is not None:
            np.testing.assert_allclose([e[0] for e in b.logprobs], [e[0] for e in a.logprobs],
                                       rtol=1e-5, atol=1e-5)
            assert [[i for i, _ in e[1]] for e in b.logprobs] == \
                [[i for i, _ in e[1]] for e in a.logprobs]
    reasons = [c.finish_reason for c in single]
    assert reasons[0] == "stop" and len(single[0].output_ids) == 3
    assert reasons[1] == "stop" and 2 <= len(single[1].output_ids) < 12
    assert reasons[4] == "eos" and 3 <= len(single[4].output_ids) < 12
    assert counts["block"] >= 2


def test_llama_multistep_matches_single_steps(monkeypatch):
    """int8 weights (one scale per channel) under bf16 activations: the block program computes
    the single step's function (bf16 programs keep every rounding: layout.py)."""
    _compare("llama", monkeypatch, "int8", "bfloat16")


# MoE: Grok-1 as it ships and Mixtral in int4, below
@pytest.mark.slow
@pytest.mark.parametrize("family", ["mamba2", "palm"])
def test_multistep_matches_single_steps(family, monkeypatch):
    _compare(family, monkeypatch)


@pytest.mark.slow
@pytest.mark.parametrize("family,weight_format,dtype", [
    ("grok", "int8r8", "bfloat16"), ("mixtral", "int4g16", "float32")])
def test_multistep_matches_single_steps_in_other_formats(family, weight_format, dtype,
                                                         monkeypatch):
    """The same with int8 in 8 row blocks (bf16) and int4 weights (float32)."""
    _compare(family, monkeypatch, weight_format, dtype)


def test_a_block_dispatch_per_k_steps(monkeypatch):
    engine = _engine("llama", slots=2)
    prompts = [tuple(prompt_for(engine.config, seed=s)) for s in (5, 6)]
    # the first token comes from prefill, then 4 * K - 2 decode steps: blocks of 4, 4, 4, 2
    requests = [Request(p, max_new_tokens=4 * K - 1) for p in prompts]
    counts = _counted(engine, monkeypatch)
    single, _ = _run(engine, requests, 1)
    # (k = 1 runs one step ahead: the step after the last is dispatched, then dropped)
    assert counts["block"] == 0 and counts["single"] in (4 * K - 2, 4 * K - 1)
    counts.update(block=0, single=0)
    multi, _ = _run(engine, requests, K)
    assert counts == {"block": 4, "single": 0}
    assert [c.output_ids for c in multi] == [c.output_ids for c in single]
    assert all(c.finish_reason == "length" for c in multi)
    # rows stop on the device at their length: their memory holds every token but the last
    fed = [len(p) + 4 * K - 2 for p in prompts]
    assert engine._positions.tolist() == fed
    assert np.asarray(engine.memory.positions).tolist() == fed


def test_the_memory_window_covers_the_block(monkeypatch):
    # a block that crosses the smallest window (engine.MIN_DECODE_WINDOW, 512 positions) reads
    # the next window from its first step on
    config, params = weights("llama", "float")
    engine = build_engine(config.replace(sequence_len=2048), params, single_device_mesh(),
                          slots=1, decode_steps=K)
    requests = [Request(tuple(prompt_for(config, seed=8, length=510)), max_new_tokens=9,
                        logprobs=True)]
    single, _ = _run(engine, requests, 1)
    windows = []
    real = engine._decode_window
    monkeypatch.setattr(engine, "_decode_window",
                        lambda *args: windows.append(real(*args)) or windows[-1])
    multi, _ = _run(engine, requests, K)
    assert windows == [1024, 1024]  # positions 510..513, then 514..517
    assert multi[0].output_ids == single[0].output_ids
    # (a token missing from the window moves its step's logprobs more than this)
    np.testing.assert_allclose([e[0] for e in multi[0].logprobs],
                               [e[0] for e in single[0].logprobs], rtol=1e-5, atol=1e-5)


def test_decode_steps_default_and_bounds(monkeypatch):
    config, params = weights("llama", "float")
    engine = build_engine(config, params, single_device_mesh(), slots=1, cache_length=32)
    assert engine.decode_steps == 1  # a tiny model's steps on the CPU: single, pipelined
    # one slot's steps reading 16-256 MB of weights run in blocks on the CPU: those that read
    # ~0.5 GB (CPU_BLOCK_READ), 4 to 16 of them
    fewest, most = layout.CPU_BLOCK_STEPS
    assert [layout.decode_steps_per_dispatch(b)
            for b in (15e6, 16e6, 23e6, 44e6, 100e6, 143e6, 256e6, 538e6)] \
        == [1, most, most, 11, 5, fewest, fewest, 1]
    assert layout.decode_steps_per_dispatch(44e6, slots=2) == 1
    asked = []  # the engine asks with its own step's bytes and slots
    monkeypatch.setattr(layout, "decode_steps_per_dispatch",
                        lambda step_bytes, slots: asked.append((step_bytes, slots)) or 3)
    engine = build_engine(config, params, single_device_mesh(), slots=2, cache_length=32)
    step_bytes = sum(weight_bytes_per_step(engine.config, engine.params, 2).values())
    assert engine.decode_steps == 3 and asked == [(step_bytes, 2)] and step_bytes > 0
    with pytest.raises(RuntimeInputError, match="decode steps"):
        build_engine(config, params, single_device_mesh(), cache_length=32, decode_steps=0)
