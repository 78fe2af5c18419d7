"""Layers unrolled over per-layer parameter buffers (the engine's default on the CPU) compute
what the scan over the stacked parameters computes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import random_params, single_device_mesh, tiny_config
from runtime.engine import Engine
from runtime.model import build_model
from runtime.quant import quantize
from runtime.request import Request


@pytest.mark.parametrize("int8", [False, True])
def test_unrolled_logits_match_the_scan(int8):
    config = tiny_config(num_layers=3)
    params = random_params(config, seed=3)
    if int8:
        key = "language_model/transformer/layers/decoder_layer/moe/linear"
        params[key]["w"] = quantize(params[key]["w"])
    tokens = jnp.array([[5, 6, 7, 8]])
    kv = jnp.zeros((3, 1, 4, config.num_kv_heads, config.key_size))
    positions = jnp.arange(4)[None]
    scan, unrolled = build_model(config), build_model(config, unroll_layers=True)
    want = jax.jit(scan.apply)(params, tokens, kv, kv, positions)
    got = jax.jit(unrolled.apply)(unrolled.prepare_params(params), tokens, kv, kv, positions)
    for a, b in zip(want, got):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_engine_greedy_tokens_do_not_depend_on_unrolling():
    config = tiny_config()
    params = random_params(config, seed=4)
    requests = [Request((5, 6, 7), max_new_tokens=8), Request((9, 10), max_new_tokens=8)]
    outputs = [[c.output_ids for c in Engine(build_model(config), params, single_device_mesh(),
                                             slots=2, cache_length=16,
                                             unroll_layers=unroll).generate(requests)]
               for unroll in (False, True)]
    assert outputs[0] == outputs[1]


def test_engine_unrolls_big_layers_only_when_the_kv_memory_is_small(monkeypatch):
    from runtime import engine as engine_module

    config = tiny_config(num_layers=2)
    params = random_params(config, seed=5)

    def unrolled():
        engine = Engine(build_model(config), params, single_device_mesh(), slots=2,
                        cache_length=16)
        return any("/layer_0/" in path for path in engine.params)

    assert not unrolled()  # tiny layers: the scan
    monkeypatch.setattr(engine_module, "UNROLL_MIN_LAYER_BYTES", 0)
    assert unrolled()  # "big" layers, small memory
    monkeypatch.setattr(engine_module, "UNROLL_MAX_KV_FRACTION", 1e-6)
    assert not unrolled()  # memory large next to the weights: the scan
