"""Matmul weights stored in the CPU row kernel's reading order (quant.TiledWeight [..., I/4, 4 O]
and the tied table as TiledEmbedding): the layout is a permutation (re-stated here element by
element), the tiled kernels give the row-major kernels' sums bit for bit, products and lookups
equal the plain ones, and engines that tile decode the tokens of engines that do not."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import LAYER, random_params, single_device_mesh, tiny_config

import runtime.cpu_kernels as cpu_kernels
from runtime import layout
from runtime.engine import build_engine
from runtime.products import embedding_rows, linear, tied_head
from runtime.quant import (LayerOfStack, QuantizedWeight8bit, TiledEmbedding, TiledWeight,
                           embedding_tileable, quantize, quantize_embedding, tileable, tiled,
                           tiled_embedding, untiled)
from runtime.request import Request

RNG = np.random.default_rng(21)
SCALE_DTYPES = [jnp.float32, jnp.float16, jnp.bfloat16]


def _int8(inputs, outputs, blocks, lead=()):
    weight = RNG.integers(-127, 128, (*lead, inputs, outputs), dtype=np.int8)
    scales = (RNG.random((*lead, blocks, outputs)) + 0.5).astype(np.float32)
    return QuantizedWeight8bit(jnp.asarray(weight), jnp.asarray(scales))


def test_tiles_hold_each_value_where_the_kernel_reads_it():
    """w[i, c] sits in row i // 4 of the tiles, at 64 * (c // 16) + 16 * (i % 4) + c % 16;
    untiled gives the weight back; Haiku sees the logical shape."""
    w = _int8(24, 48, 3)
    t = tiled(w)
    assert isinstance(t, TiledWeight) and t.tiles.shape == (6, 192) and t.shape == (24, 48)
    weight, tiles = np.asarray(w.weight), np.asarray(t.tiles)
    for i, c in zip(RNG.integers(0, 24, 50), RNG.integers(0, 48, 50)):
        assert tiles[i // 4, 64 * (c // 16) + 16 * (i % 4) + c % 16] == weight[i, c]
    back = untiled(t)
    np.testing.assert_array_equal(np.asarray(back.weight), weight)
    assert back.scales is w.scales
    floats = jnp.asarray(RNG.normal(size=(2, 8, 32)).astype(np.float32))  # a stack [L, I, O]
    t = tiled(floats)
    assert t.scales is None and t.tiles.shape == (2, 2, 128) and t.shape == (2, 8, 32)
    np.testing.assert_array_equal(np.asarray(untiled(t)), np.asarray(floats))


def test_what_can_be_tiled():
    assert tileable(_int8(24, 48, 3)) and tileable(jnp.zeros((8, 32), jnp.float32))
    assert not tileable(_int8(24, 40, 1))  # O not a multiple of 16
    assert not tileable(_int8(24, 48, 4))  # I/R = 6 rows per scale block
    assert not tileable(jnp.zeros((8, 32), jnp.bfloat16))  # no bf16 kernel
    table = quantize_embedding(RNG.normal(size=(32, 24)), 8)  # [V, D], D/R = 8
    assert not tileable(table) and embedding_tileable(table)
    assert not embedding_tileable(quantize_embedding(RNG.normal(size=(40, 24)), 8))  # V % 16


def _tiled_kernel(x, w, layer=None):
    t = tiled(w)
    return cpu_kernels.tiled_rows_linear(x, t.tiles, t.scales, layer)


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 16])
@pytest.mark.parametrize("inputs,outputs,blocks", [(576, 1536, 9), (96, 208, 3),  # rows split
                                                   (8, 320, 1), (12, 512, 3)])  # column chunks
@pytest.mark.parametrize("scale_dtype", SCALE_DTYPES)
def test_tiled_kernels_sum_as_the_row_major_ones(rows, inputs, outputs, blocks, scale_dtype):
    """The same sums in the same order as the row-major kernel: equal bit for bit, int8 with its
    scales as stored and float32; and within float32 rounding of the float64 product."""
    x = jnp.asarray(RNG.normal(size=(rows, inputs)).astype(np.float32))
    w = _int8(inputs, outputs, blocks)
    w = QuantizedWeight8bit(w.weight, w.scales.astype(scale_dtype))
    floats = jnp.asarray(RNG.normal(size=(inputs, outputs)).astype(np.float32))
    row_major = jax.jit(cpu_kernels.rows_linear)
    np.testing.assert_array_equal(np.asarray(jax.jit(_tiled_kernel)(x, w)),
                                  np.asarray(row_major(x, w.weight, w.scales)))
    got = np.asarray(jax.jit(_tiled_kernel)(x, floats))
    np.testing.assert_array_equal(got, np.asarray(row_major(x, floats)))
    want = np.asarray(x, np.float64) @ np.asarray(floats, np.float64)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * np.abs(want).max())


def test_tiled_stacks_are_read_at_their_layer_and_bad_shapes_refused():
    stack = _int8(32, 48, 2, lead=(3,))
    x = jnp.asarray(RNG.normal(size=(2, 32)).astype(np.float32))
    at = jax.jit(lambda i: _tiled_kernel(x, stack, i))
    for layer in range(3):
        plain = QuantizedWeight8bit(stack.weight[layer], stack.scales[layer])
        np.testing.assert_array_equal(np.asarray(at(layer)), np.asarray(
            cpu_kernels.rows_linear(x, plain.weight, plain.scales)))
    with pytest.raises(Exception, match="layer in range"):
        np.asarray(at(3))
    odd = jnp.zeros((8, 4 * 40), jnp.int8)  # O = 40: not whole 16-column blocks
    with pytest.raises(Exception, match="multiple of 16"):
        np.asarray(cpu_kernels.tiled_rows_linear(x, odd, jnp.ones((1, 40), jnp.float32)))
    blocks6 = jnp.zeros((8, 4 * 48), jnp.int8)  # 32 rows in 16 scale blocks of 2 rows
    with pytest.raises(Exception, match="multiple of 16"):
        np.asarray(cpu_kernels.tiled_rows_linear(x, blocks6, jnp.ones((16, 48), jnp.float32)))


@pytest.mark.parametrize("rows", [1, 16, 20])  # the kernel for decode; 20: untiled for XLA
def test_products_of_tiled_weights_equal_the_plain_ones(rows):
    x = jnp.asarray(RNG.normal(size=(rows, 64)).astype(np.float32))
    w = _int8(64, 32, 4)
    floats = jnp.asarray(RNG.normal(size=(64, 32)).astype(np.float32))
    product = jax.jit(lambda x, w: linear(x, w))
    for plain in (w, floats):
        np.testing.assert_allclose(np.asarray(product(x, tiled(plain))),
                                   np.asarray(product(x, plain)), rtol=1e-5, atol=1e-5)
    stack = QuantizedWeight8bit(jnp.stack([w.weight, -w.weight]), jnp.stack([w.scales] * 2))
    view = jax.jit(lambda x, s: linear(x, LayerOfStack(tiled(s), jnp.int32(1))))
    np.testing.assert_allclose(np.asarray(view(x, stack)), -np.asarray(product(x, w)),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("int8", [True, False])
def test_tiled_tables_give_the_same_rows_and_head(int8):
    floats = RNG.normal(size=(48, 24)).astype(np.float32)  # [V, D]
    table = quantize_embedding(floats, 8) if int8 else jnp.asarray(floats)
    stored = tiled_embedding(table)
    assert isinstance(stored, TiledEmbedding) and stored.shape == (48, 24)
    tokens = jnp.asarray([[0, 17, 47], [5, 5, 31]])
    np.testing.assert_array_equal(np.asarray(jax.jit(embedding_rows)(stored, tokens)),
                                  np.asarray(jax.jit(embedding_rows)(table, tokens)))
    for rows in (1, 3, 20):
        x = jnp.asarray(RNG.normal(size=(rows, 24)).astype(np.float32))
        np.testing.assert_allclose(np.asarray(jax.jit(tied_head)(x, stored)),
                                   np.asarray(jax.jit(tied_head)(x, table)),
                                   rtol=1e-5, atol=1e-5)


def _kinds(params) -> dict:
    leaves = jax.tree.leaves(params, is_leaf=lambda a: isinstance(a, (TiledWeight,
                                                                      QuantizedWeight8bit)))
    names = [type(leaf).__name__ for leaf in leaves]
    return {name: names.count(name) for name in set(names)}


@pytest.mark.slow
def test_engines_that_tile_decode_the_tokens_of_engines_that_do_not(monkeypatch):
    """One slot (scanned and unrolled: float32 and int8 weights tiled, the int8 table too) and
    three slots (int8 only); an MoE model with int8 experts in groups and a float attention."""
    config = tiny_config(num_layers=2, tie_embeddings=True)
    params = random_params(config, seed=12)
    for name, blocks in (("moe/linear", 1), ("moe/linear_1", 2),
                         ("multi_head_attention/linear", 4)):
        params[LAYER + name] = {"w": quantize(params[LAYER + name]["w"], blocks)}
    module = "language_model/in_out_embed"
    params[module]["embeddings"] = quantize_embedding(params[module]["embeddings"], 8)
    requests = [Request((5, 6, 7), max_new_tokens=8), Request(tuple(range(3, 12)),
                                                             max_new_tokens=6)]

    def tokens(slots, unroll, tiles):
        monkeypatch.setattr(layout, "TILED_WEIGHTS", tiles)
        engine = build_engine(config, params, single_device_mesh(), slots=slots,
                              cache_length=24, unroll_layers=unroll)
        if slots == 1:
            out = [c.output_ids for r in requests for c in engine.generate([r])]
        else:
            out = [c.output_ids for c in engine.generate(requests)]
        return out, engine.layout.tiled, _kinds(engine.params)

    for slots, unroll, kind in ((1, False, "all"), (1, True, "all"), (3, False, "int8")):
        got, chosen, kinds = tokens(slots, unroll, True)
        want, plain, plain_kinds = tokens(slots, unroll, False)
        assert chosen == kind and plain is None and "TiledWeight" not in plain_kinds
        assert kinds.get("TiledWeight", 0) > 0 and (kind != "all" or "TiledEmbedding" in kinds)
        assert got == want, (slots, unroll)
