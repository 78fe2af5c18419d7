"""Layers unrolled over per-layer parameter buffers (the engine's default on the CPU) compute
what the scan over the stacked parameters computes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import random_params, single_device_mesh, tiny_config
from runtime.engine import build_engine
from runtime.models import build_model
from runtime.quant import quantize
from runtime.request import Request
from runtime.memory import empty_kv


@pytest.mark.slow
@pytest.mark.parametrize("int8", [False, True])
def test_unrolled_logits_match_the_scan(int8):
    config = tiny_config(num_layers=3)
    params = random_params(config, seed=3)
    if int8:
        key = "language_model/transformer/layers/decoder_layer/moe/linear"
        params[key]["w"] = quantize(params[key]["w"])
    tokens = jnp.array([[5, 6, 7, 8]])
    kv = empty_kv(config, 1, 4, jnp.float32)
    positions = jnp.arange(4)[None]
    scan, unrolled = build_model(config), build_model(config, unroll_layers=True)
    want = jax.jit(scan.apply)(params, tokens, kv, kv, positions)
    got = jax.jit(unrolled.apply)(unrolled.prepare_params(params), tokens, kv, kv, positions)
    for a, b in zip(want, got):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def tokens_scan_and_unrolled(config, params, requests):
    """Greedy output ids of the requests through an engine with the scan, then unrolled."""
    return [[c.output_ids for c in build_engine(config, params, single_device_mesh(),
                                                slots=2, cache_length=16,
                                                unroll_layers=unroll).generate(requests)]
            for unroll in (False, True)]


@pytest.mark.slow
@pytest.mark.parametrize("options", [{}, {"sliding_window": 3}, {"recursion_steps": 2}])
def test_engine_greedy_tokens_do_not_depend_on_unrolling(options):
    """The unrolled layers decode over per-layer memory arrays written in place before they are
    read (the scan: a stacked memory written after the layers); both give the same tokens,
    with a sliding window and with recursion over the layer stack too."""
    config = tiny_config(num_layers=2, **options)
    params = random_params(config, seed=4)
    requests = [Request((5, 6, 7), max_new_tokens=8), Request((9, 10), max_new_tokens=8)]
    outputs = tokens_scan_and_unrolled(config, params, requests)
    assert outputs[0] == outputs[1]


def test_engine_unrolls_big_layers_with_one_memory_array_per_layer(monkeypatch):
    from runtime import layout as layout_module

    config = tiny_config(num_layers=2)
    params = random_params(config, seed=5)

    def engine():
        return build_engine(config, params, single_device_mesh(), slots=2,
                            cache_length=16)

    small = engine()  # tiny layers: the scan over stacked parameters and memory
    assert not any("/layer_0/" in path for path in small.params)
    assert not small.memory.per_layer
    monkeypatch.setattr(layout_module, "UNROLL_MIN_LAYER_BYTES", 0)
    big = engine()  # "big" layers: unrolled, each layer with its own memory arrays
    assert any("/layer_0/" in path for path in big.params)
    assert big.memory.per_layer and len(big.memory.keys) == config.num_layers
    assert big.memory.keys[0].shape == (2, config.num_kv_heads, 16, config.key_size)


def test_big_layers_stay_scanned_where_the_scan_reads_them_in_place(monkeypatch):
    """Weights in panels, read in place by the layer scan: no slice copies for unrolling to
    avoid, so big dense layers keep the scan (and its compile time); without panels they
    unroll, and so do MoE layers, whose expert stacks a scan would still copy."""
    from runtime import cpu_kernels
    from runtime import layout as layout_module

    if not cpu_kernels.available():
        pytest.skip("no C++ compiler")
    shapes = dict(num_layers=2, emb_size=64, key_size=16, intermediate_size=128)
    dense = tiny_config(num_experts=0, num_selected_experts=0, **shapes)
    moe = tiny_config(**shapes)
    monkeypatch.setattr(layout_module, "UNROLL_MIN_LAYER_BYTES", 100_000)  # experts: 393 KB
    for config, tiles, unrolled in ((dense, True, False), (dense, False, True),
                                    (moe, True, True)):
        monkeypatch.setattr(layout_module, "TILED_WEIGHTS", tiles)
        params = random_params(config, seed=8)
        chosen = layout_module.Layout.choose(config, params, model_axis=1, slots=1)
        assert (chosen.unrolled, chosen.layer_views) == (unrolled, not unrolled), \
            (config.num_experts, tiles)


@pytest.mark.slow
def test_bfloat16_engine_runs_on_the_cpu_in_both_layouts():
    """bf16 activations and memory through both the scan and the unrolled in-place decode
    (XLA:CPU lacks some bf16 x bf16 -> f32 matmul forms; the attention avoids them)."""
    config = tiny_config(num_layers=2, dtype="bfloat16")
    params = jax.tree.map(lambda a: np.asarray(a).astype(jnp.bfloat16),
                          random_params(config, seed=6))
    requests = [Request((5, 6, 7), max_new_tokens=6), Request((9, 10), max_new_tokens=6)]
    outputs = tokens_scan_and_unrolled(config, params, requests)
    assert outputs[0] == outputs[1]
    assert all(len(ids) > 0 for ids in outputs[0])


@pytest.mark.parametrize("backend, unrolled", [("gpu", True), ("tpu", False)])
def test_engine_unrolls_big_layers_on_gpus_and_keeps_the_scan_on_tpus(monkeypatch, backend,
                                                                       unrolled):
    """XLA:GPU copies a scan's slice of each stacked weight every step (measured on an H200):
    GPU engines unroll big layers as CPU engines do; TPUs keep the scan."""
    from runtime import layout as layout_module

    config = tiny_config(num_layers=2)
    params = random_params(config, seed=7)
    monkeypatch.setattr(layout_module, "UNROLL_MIN_LAYER_BYTES", 0)
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    engine = build_engine(config, params, single_device_mesh(), slots=2, cache_length=16)
    assert any("/layer_0/" in path for path in engine.params) == unrolled
    assert engine.memory.per_layer == unrolled


@pytest.mark.parametrize("weights", ["float", "int8"])
def test_expert_ffn_in_one_switch_decodes_the_same_tokens(monkeypatch, weights):
    """Batch-1 MoE decode over split experts: each routed pair's whole expert FFN in one switch
    (gate and up in one kernel call, layout.EXPERT_FFN_IN_ONE_SWITCH) decodes the tokens of a
    switch per matmul, the experts in panels (int8) or not (float, no kernels at 2 slots)."""
    from runtime import layout, products

    config = tiny_config(num_layers=2)
    params = random_params(config, seed=6)
    if weights == "int8":
        for name in ("moe/linear", "moe/linear_v", "moe/linear_1"):
            key = "language_model/transformer/layers/decoder_layer/" + name
            params[key]["w"] = quantize(params[key]["w"], 2)
    requests = [Request((5, 6, 7), max_new_tokens=8)]
    outputs, branches = [], []
    real = products.switched_tiles
    monkeypatch.setattr(products, "switched_tiles",
                        lambda *a: branches.append(a[1][0].func.__name__) or real(*a))
    monkeypatch.setattr("runtime.models.transformer.switched_tiles", products.switched_tiles)
    for one in (True, False):
        monkeypatch.setattr(layout, "EXPERT_FFN_IN_ONE_SWITCH", one)
        jax.clear_caches()
        del branches[:]
        engine = build_engine(config, params, single_device_mesh(), slots=1, cache_length=16,
                              unroll_layers=True)
        outputs.append([c.output_ids for c in engine.generate(requests)])
        # each switch's branches: an expert's whole FFN, or one matmul
        assert branches and set(branches) == {"_expert_ffn" if one else "linear"}
    assert outputs[0] == outputs[1]


@pytest.mark.parametrize("emb_size, experts, tiled, unrolled", [
    (64, "int8-1", True, True),    # experts that go into panels once split: unrolled
    (64, "int8-8", True, True),    # (int8-R: R scale row blocks)
    (64, "float32", True, True),   # float32 experts too (panels of every kind)
    (64, "int8-8", False, False),  # panels off: the scan
    (32, "int8-1", True, False),   # down projections of 32 columns (a panel: 64): the scan
])
def test_small_moe_layers_unroll_where_their_experts_go_into_panels(monkeypatch, emb_size,
                                                                     experts, tiled, unrolled):
    """A scan keeps an MoE layer's expert stacks out of the panel kernels, so layers whose
    experts would all go into panels unroll however small
    (stacked_weights.experts_in_panels_unrolled): the engine then holds per-layer parameters
    and the experts split per expert."""
    from runtime import cpu_kernels, layout as layout_module

    if not cpu_kernels.available():
        pytest.skip("no C++ compiler: no kernels, no panels")
    config = tiny_config(num_layers=2, emb_size=emb_size, key_size=16, intermediate_size=128)
    params = random_params(config, seed=8)
    if experts.startswith("int8"):
        for name, leaf in params.items():
            if "/moe/" in name:
                params[name] = {"w": quantize(leaf["w"], int(experts.split("-")[1]))}
    monkeypatch.setattr(layout_module, "TILED_WEIGHTS", tiled)
    assert layout_module.UNROLL_MIN_LAYER_BYTES > 1 << 20  # these layers are far smaller
    engine = build_engine(config, params, single_device_mesh(), slots=2, cache_length=16)
    assert any("/layer_0/" in path for path in engine.params) == unrolled
    assert any(path.endswith("/moe/linear") and "w_0" in leaves
               for path, leaves in engine.params.items()) == unrolled
