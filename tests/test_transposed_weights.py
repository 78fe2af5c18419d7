"""Matmul weights stored transposed, [O, I] (quant.TransposedWeight): the product equals the
plain one for float and int8 weights, and engines pick the layout per backend (one CPU slot:
float32 weights only; GPUs: all) while decoding the same tokens as the [I, O] layout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import LAYER, random_params, single_device_mesh, tiny_config

from runtime.engine import build_engine
from runtime.layout import transposed_layout
from runtime.quant import QuantizedWeight8bit, TransposedWeight, quantize, transposed
from runtime.products import linear
from runtime.request import Request

RNG = np.random.default_rng(11)
product = jax.jit(lambda x, w: linear(x, w, jnp.float32))
UNROLLED_LAYER = "language_model/transformer/layer_0/"
HEAD = "language_model/unembed"


@pytest.mark.parametrize("rows", [1, 3])
def test_transposed_float_weights_give_the_plain_product(rows):
    w = RNG.normal(size=(48, 40)).astype(np.float32)
    x = RNG.normal(size=(rows, 48)).astype(np.float32)
    stored = transposed(jnp.asarray(w))
    assert stored.shape == (48, 40) and stored.ndim == 2  # Haiku checks the logical shape
    np.testing.assert_array_equal(np.asarray(stored.weight_t), w.T)
    assert stored.scales is None
    np.testing.assert_allclose(np.asarray(jax.jit(linear)(jnp.asarray(x), stored)), x @ w,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("row_blocks", [1, 4])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_transposed_int8_weights_give_the_plain_int8_product(row_blocks, dtype):
    """int8 [O, I] with its [R, O] scales: the same float32 sums as the [I, O] product, each
    row block's partial sum scaled by its own scale row (R = 4), up to summation order."""
    q = quantize(RNG.normal(size=(64, 24)), row_blocks)  # [I, O]
    x = jnp.asarray(RNG.normal(size=(2, 3, 64)), dtype)  # [B, T, I]
    stored = transposed(QuantizedWeight8bit(jnp.asarray(q.weight), jnp.asarray(q.scales)))
    assert stored.shape == (64, 24) and stored.weight_t.dtype == jnp.int8
    np.testing.assert_array_equal(np.asarray(stored.weight_t), q.weight.T)
    got = product(x, stored)
    want = product(x, QuantizedWeight8bit(jnp.asarray(q.weight), jnp.asarray(q.scales)))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    if row_blocks > 1:  # a wrong scale row per block would be off by far more
        one_scale = transposed(QuantizedWeight8bit(jnp.asarray(q.weight),
                                                   jnp.asarray(q.scales[:1])))
        assert not np.allclose(np.asarray(product(x, one_scale)),
                               np.asarray(want), rtol=1e-3, atol=1e-3)


def test_transposed_layout_by_backend(monkeypatch):
    config = tiny_config(dtype="float32")
    assert transposed_layout(config, 1) == "float"  # this CPU, one device, one slot
    assert transposed_layout(config, 2) is None
    assert transposed_layout(config.replace(dtype="bfloat16"), 1) is None
    for backend, layout in (("gpu", "all"), ("tpu", None)):
        monkeypatch.setattr(jax, "default_backend", lambda backend=backend: backend)
        assert transposed_layout(config, 1) == layout
        assert transposed_layout(config, 8) == layout


def _engine(config, params, slots, **options):
    return build_engine(config, params, single_device_mesh(), slots=slots,
                        cache_length=16, unroll_layers=True, **options)


def _has(params, kind) -> bool:
    return any(isinstance(leaf, kind) for leaf in jax.tree.leaves(
        params, is_leaf=lambda a: isinstance(a, (TransposedWeight, QuantizedWeight8bit))))


@pytest.mark.slow
def test_a_one_slot_engine_reads_transposed_weights_and_decodes_the_same_tokens(monkeypatch):
    """One slot on the CPU without tiled weights (test_tiled_weights: the default where the
    kernels build): the layers' float32 matmul weights are stored [O, I] (int8 ones, norms and
    the head as they were); the greedy tokens equal a two-slot engine's, which keeps the
    [I, O] layout."""
    from runtime import layout

    monkeypatch.setattr(layout, "TILED_WEIGHTS", False)
    config = tiny_config(num_layers=2)
    params = random_params(config, seed=8)
    params[LAYER + "moe/linear_1"] = {"w": quantize(params[LAYER + "moe/linear_1"]["w"])}
    requests = [Request((5, 6, 7), max_new_tokens=8), Request((9, 10, 11, 12), max_new_tokens=8)]

    one, two = _engine(config, params, 1), _engine(config, params, 2)
    assert one.transposed == "float" and two.transposed is None
    layer = one.params
    assert isinstance(layer[UNROLLED_LAYER + "multi_head_attention/query"]["w"], TransposedWeight)
    assert isinstance(layer[UNROLLED_LAYER + "moe/linear"]["w_0"], TransposedWeight)
    assert isinstance(layer[UNROLLED_LAYER + "moe/linear_1"]["w_0"], QuantizedWeight8bit)
    assert not _has(two.params, TransposedWeight)
    query = np.asarray(params[LAYER + "multi_head_attention/query"]["w"][0])
    np.testing.assert_array_equal(
        np.asarray(layer[UNROLLED_LAYER + "multi_head_attention/query"]["w"].weight_t), query.T)
    got = [[c.output_ids for c in one.generate([r])] for r in requests]
    assert got == [[c.output_ids] for c in two.generate(requests)]


@pytest.mark.slow
def test_all_weights_transposed_decode_the_same_tokens():
    """The GPU layout (transposed_layout "all"), forced on the CPU: float and int8 matmul
    weights [O, I], the int8 ones with per-channel and with row-block scales, the experts'
    split weights included, and the untied int8 head [V, D]; greedy tokens equal the [I, O]
    layout's, prefill and decode."""
    config = tiny_config(num_layers=2, tie_embeddings=False)
    params = random_params(config, seed=9)
    for name, blocks in (("moe/linear", 1), ("moe/linear_1", 2),
                         ("multi_head_attention/linear", 4)):
        params[LAYER + name] = {"w": quantize(params[LAYER + name]["w"], blocks)}
    params[HEAD] = {"w": quantize(params[HEAD]["w"], 2)}
    requests = [Request((5, 6, 7), max_new_tokens=8), Request(tuple(range(3, 12)),
                                                             max_new_tokens=6)]

    stored = _engine(config, params, 2, transpose_weights=False)
    flipped = _engine(config, params, 2, transpose_weights=True)
    assert stored.transposed is None and flipped.transposed == "all"
    assert not _has(stored.params, TransposedWeight)
    out = flipped.params[UNROLLED_LAYER + "multi_head_attention/linear"]["w"]
    assert isinstance(out, TransposedWeight) and out.weight_t.dtype == jnp.int8
    assert out.scales.shape[-2] == 4
    assert isinstance(flipped.params[UNROLLED_LAYER + "moe/linear_1"]["w_1"], TransposedWeight)
    head = flipped.params[HEAD]["w"]
    assert isinstance(head, TransposedWeight) and head.weight_t.shape == (config.vocab_size,
                                                                          config.emb_size)
    assert not _has(flipped.params, QuantizedWeight8bit)  # every int8 weight is a layer's
    assert [c.output_ids for c in flipped.generate(requests)] == \
        [c.output_ids for c in stored.generate(requests)]
