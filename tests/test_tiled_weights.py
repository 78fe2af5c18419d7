"""Matmul weights stored in column panels for the CPU kernels (quant.TiledWeight [..., O/64, 64 I]
and the tied table as TiledEmbedding): the layout is a permutation (re-stated here element by
element), the panel kernels give the float64 product within float32 rounding for every row
count and scale layout, products and lookups equal the plain ones, and engines that store
panels decode the tokens of engines that do not."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import LAYER, leaf_kinds, panel_engine_outputs, random_params, tiny_config

import runtime.cpu_kernels as cpu_kernels
from runtime.products import linear, linears
from runtime.tables import embedding_rows, tied_head
from runtime.quant import (LayerOfStack, QuantizedWeight8bit, TiledEmbedding, TiledWeight,
                           embedding_tileable, quantize, quantize_embedding, tileable, tiled,
                           tiled_embedding, untiled)

RNG = np.random.default_rng(21)
# tiny shapes with whole panels of 64 columns: query, out, FFN and the tied table (key and value,
# 2 heads of 16, stay row-major)
PANEL_SHAPES = {"emb_size": 64, "key_size": 16, "intermediate_size": 128}
SCALE_DTYPES = [jnp.float32, jnp.float16, jnp.bfloat16]


def _int8(inputs, outputs, blocks, lead=()):
    weight = RNG.integers(-127, 128, (*lead, inputs, outputs), dtype=np.int8)
    scales = (RNG.random((*lead, blocks, outputs)) + 0.5).astype(np.float32)
    return QuantizedWeight8bit(jnp.asarray(weight), jnp.asarray(scales))


def test_tiles_hold_each_value_where_the_kernel_reads_it():
    """w[i, c] sits in panel c // 64 at 64 i + c % 64; untiled gives the weight back; Haiku sees
    the logical shape."""
    w = _int8(24, 192, 3)
    t = tiled(w)
    assert isinstance(t, TiledWeight) and t.tiles.shape == (3, 64 * 24) and t.shape == (24, 192)
    weight, tiles = np.asarray(w.weight), np.asarray(t.tiles)
    for i, c in zip(RNG.integers(0, 24, 50), RNG.integers(0, 192, 50)):
        assert tiles[c // 64, 64 * i + c % 64] == weight[i, c]
    back = untiled(t)
    np.testing.assert_array_equal(np.asarray(back.weight), weight)
    assert back.scales is w.scales
    floats = jnp.asarray(RNG.normal(size=(2, 6, 128)).astype(np.float32))  # a stack [L, I, O]
    t = tiled(floats)
    assert t.scales is None and t.tiles.shape == (2, 2, 384) and t.shape == (2, 6, 128)
    np.testing.assert_array_equal(np.asarray(untiled(t)), np.asarray(floats))


def test_what_can_be_tiled():
    assert tileable(_int8(24, 64, 3)) and tileable(jnp.zeros((6, 128), jnp.float32))
    assert tileable(_int8(21, 64, 7))  # any rows per scale block
    assert not tileable(_int8(24, 48, 1))  # O not a multiple of 64
    assert tileable(jnp.zeros((8, 64), jnp.bfloat16)) and tileable(jnp.zeros((8, 64), jnp.float16))
    assert not tileable(jnp.zeros((8, 64), jnp.int32))  # no kernel reads them
    table = quantize_embedding(RNG.normal(size=(128, 24)), 8)  # [V, D]
    assert not tileable(table) and embedding_tileable(table)
    assert not embedding_tileable(quantize_embedding(RNG.normal(size=(96, 24)), 8))  # V % 64


def _tiled_kernel(x, w, layer=None):
    t = tiled(w)
    return cpu_kernels.tiled_linear(x, t.tiles, t.scales, layer)


def _reference(x, w) -> np.ndarray:
    """float64 x @ the dequantised weight (int8 with its scales as stored, or float32)."""
    if not isinstance(w, QuantizedWeight8bit):
        return np.asarray(x, np.float64) @ np.asarray(w, np.float64)
    weight, scales = np.asarray(w.weight, np.float64), np.asarray(w.scales, np.float64)
    per_block = weight.shape[0] // scales.shape[0]
    return np.asarray(x, np.float64) @ (weight * np.repeat(scales, per_block, axis=0))


@pytest.mark.parametrize("rows", [1, 2, 4, 5, 6, 7, 13, 67])  # int8: 4 at a time, float32 6
@pytest.mark.parametrize("inputs,outputs,blocks", [(576, 1536, 9), (96, 192, 3), (8, 64, 1),
                                                   (21, 128, 7), (1536, 576, 24)])
@pytest.mark.parametrize("scale_dtype", SCALE_DTYPES)
def test_panel_kernels_give_the_product(rows, inputs, outputs, blocks, scale_dtype):
    """int8 with its scales as stored and float32, against float64, for every count of x rows
    (blocks of four in registers, and a tail)."""
    x = jnp.asarray(RNG.normal(size=(rows, inputs)).astype(np.float32))
    w = _int8(inputs, outputs, blocks)
    w = QuantizedWeight8bit(w.weight, w.scales.astype(scale_dtype))
    floats = jnp.asarray(RNG.normal(size=(inputs, outputs)).astype(np.float32))
    for weight in (w, floats):
        got, want = np.asarray(jax.jit(_tiled_kernel)(x, weight)), _reference(x, weight)
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * np.abs(want).max())


def test_tiled_stacks_are_read_at_their_layer_and_bad_shapes_refused():
    stack = _int8(32, 128, 2, lead=(3,))
    x = jnp.asarray(RNG.normal(size=(2, 32)).astype(np.float32))
    at = jax.jit(lambda i: _tiled_kernel(x, stack, i))
    for layer in range(3):
        want = _reference(x, QuantizedWeight8bit(stack.weight[layer], stack.scales[layer]))
        np.testing.assert_allclose(np.asarray(at(layer)), want, rtol=2e-5,
                                   atol=2e-5 * np.abs(want).max())
    with pytest.raises(Exception, match="layer in range"):
        np.asarray(at(3))
    ragged = jnp.zeros((2, 64 * 32 + 8), jnp.int8)  # not whole rows of 64
    with pytest.raises(Exception, match="w \\[O/64, 64 I\\]"):
        np.asarray(cpu_kernels.tiled_linear(x, ragged, jnp.ones((1, 128), jnp.float32)))
    with pytest.raises(Exception, match="w \\[O/64, 64 I\\]"):  # 3 scale blocks of 32 rows
        np.asarray(cpu_kernels.tiled_linear(x, tiled(stack).tiles[0],
                                            jnp.ones((3, 128), jnp.float32)))


@pytest.mark.parametrize("rows", [1, 16, 20, 300, 600])  # the kernel up to 512 rows; 600: XLA's
def test_products_of_tiled_weights_equal_the_plain_ones(rows):
    x = jnp.asarray(RNG.normal(size=(rows, 64)).astype(np.float32))
    w = _int8(64, 128, 4)
    floats = jnp.asarray(RNG.normal(size=(64, 128)).astype(np.float32))
    product = jax.jit(lambda x, w: linear(x, w))
    for plain in (w, floats):  # float32 sums in another order: within rounding of the largest
        want = np.asarray(product(x, plain))
        np.testing.assert_allclose(np.asarray(product(x, tiled(plain))), want, rtol=1e-5,
                                   atol=1e-5 * np.abs(want).max())
    stack = QuantizedWeight8bit(jnp.stack([w.weight, -w.weight]), jnp.stack([w.scales] * 2))
    view = jax.jit(lambda x, s: linear(x, LayerOfStack(tiled(s), jnp.int32(1))))
    want = -np.asarray(product(x, w))
    np.testing.assert_allclose(np.asarray(view(x, stack)), want, rtol=1e-5,
                               atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("rows", [1, 5, 16])
def test_products_of_one_x_in_one_call_equal_one_call_each(rows, monkeypatch):
    """products.linears: int8 (scales of two dtypes) and float32 panels, as weights and as views
    of stacks at one layer, in one call: bit for bit the products of one call each (the same
    panel sums); weights it cannot take together (one row-major, views at two layers) go one
    by one; a weight of another input width is refused with the kernel's message."""
    x = jnp.asarray(RNG.normal(size=(rows, 64)).astype(np.float32))
    w = _int8(64, 192, 4)
    weights = [tiled(w), tiled(QuantizedWeight8bit(w.weight[:, :64], w.scales[:, :64]
                                                   .astype(jnp.bfloat16))),
               tiled(jnp.asarray(RNG.normal(size=(64, 128)).astype(np.float32)))]
    stacks = [jax.tree.map(lambda a: jnp.stack([a, -a]), t) for t in weights]
    calls = []  # calls that share one (a single product is a call of one weight)
    real = cpu_kernels.tiled_linears
    monkeypatch.setattr(cpu_kernels, "tiled_linears", lambda *a, **k: (
        len(a[1]) > 1 and calls.append(len(a[1]))) or real(*a, **k))
    one_call = {
        "weights": (jax.jit(lambda x, ws: linears(x, ws)), weights, [linear] * 3),
        "views": (jax.jit(lambda x, ss, i: linears(x, [LayerOfStack(s, i) for s in ss])),
                  stacks, [lambda x, s: linear(x, LayerOfStack(s, jnp.int32(1)))] * 3)}
    for name, (together, operands, alone) in one_call.items():
        got = together(x, operands) if name == "weights" else together(x, operands, 1)
        assert calls.pop() == 3, name
        for g, operand, product in zip(got, operands, alone):
            np.testing.assert_array_equal(np.asarray(g), np.asarray(jax.jit(product)(x, operand)))
    apart = {"row-major": lambda x: linears(x, [weights[0], w]),
             "two layers": lambda x: linears(x, [LayerOfStack(stacks[0], jnp.int32(0)),
                                                 LayerOfStack(stacks[1], jnp.int32(1))])}
    for name, products in apart.items():
        got = jax.jit(products)(x)
        assert not calls, name
        np.testing.assert_allclose(np.asarray(got[0]), np.asarray(jax.jit(linear)(
            x, weights[0] if name == "row-major" else LayerOfStack(stacks[0], jnp.int32(0)))),
            rtol=1e-6)
    narrow = tiled(_int8(32, 64, 1))
    with pytest.raises(Exception, match="w \\[O/64, 64 I\\]"):
        np.asarray(real(x, [(weights[0].tiles, weights[0].scales),
                            (narrow.tiles, narrow.scales)])[0])


@pytest.mark.parametrize("int8", [True, False])
def test_tiled_tables_give_the_same_rows_and_head(int8):
    floats = RNG.normal(size=(128, 24)).astype(np.float32)  # [V, D]
    table = quantize_embedding(floats, 8) if int8 else jnp.asarray(floats)
    stored = tiled_embedding(table)
    assert isinstance(stored, TiledEmbedding) and stored.shape == (128, 24)
    tokens = jnp.asarray([[0, 17, 127], [64, 64, 63]])
    np.testing.assert_array_equal(np.asarray(jax.jit(embedding_rows)(stored, tokens)),
                                  np.asarray(jax.jit(embedding_rows)(table, tokens)))
    for rows in (1, 3, 20):
        x = jnp.asarray(RNG.normal(size=(rows, 24)).astype(np.float32))
        np.testing.assert_allclose(np.asarray(jax.jit(tied_head)(x, stored)),
                                   np.asarray(jax.jit(tied_head)(x, table)),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_engines_that_tile_decode_the_tokens_of_engines_that_do_not():
    """Float32 activations, one slot (scanned and unrolled) and twenty (past the row kernels'
    16): float32 and int8 weights in panels, the int8 table too; bf16 activations, three
    slots: the int8 weights only. An MoE model with int8 experts in groups and int8 attention
    output."""
    config = tiny_config(num_layers=2, tie_embeddings=True, **PANEL_SHAPES)
    params = random_params(config, seed=12)
    for name, blocks in (("moe/linear", 1), ("moe/linear_1", 2),
                         ("multi_head_attention/linear", 4)):
        params[LAYER + name] = {"w": quantize(params[LAYER + name]["w"], blocks)}
    module = "language_model/in_out_embed"
    params[module]["embeddings"] = quantize_embedding(params[module]["embeddings"], 8)

    def tokens(slots, unroll, dtype, tiles):
        out, engine = panel_engine_outputs(config, params, slots, unroll, dtype, tiles)
        kinds = leaf_kinds(engine.params, TiledWeight, QuantizedWeight8bit)
        return out, engine.layout.tiled, kinds

    # greedy float32 tokens do not depend on the layout: one plain engine per dtype
    references = {dtype: tokens(slots, False, dtype, False)
                  for dtype, slots in (("float32", 1), ("bfloat16", 3))}
    for slots, unroll, dtype, kind in ((1, False, "float32", "all"), (1, True, "float32", "all"),
                                       (20, False, "float32", "all"),  # past the row kernels
                                       (3, False, "bfloat16", "quantized")):
        got, chosen, kinds = tokens(slots, unroll, dtype, True)
        want, reference_tiled, reference_kinds = references[dtype]
        assert chosen == kind and reference_tiled is None
        assert "TiledWeight" not in reference_kinds
        assert kinds.get("TiledWeight", 0) > 0 and "TiledEmbedding" in kinds
        assert got == want, (slots, unroll, dtype)


def test_panels_take_prompt_rows_up_to_their_caps():
    """Weights in panels take up to layout.PANEL_MAX_ROWS rows through the kernel (XLA would
    copy them out of their panels first), int4 under float x up to INT4_PANEL_MAX_ROWS; more
    rows go to XLA's GEMM; int4 under int8 x any number."""
    from runtime import layout
    tiles, packed = jnp.zeros((2, 64 * 32), jnp.float32), jnp.zeros((2, 32 * 32), jnp.uint8)
    cap, cap4 = layout.PANEL_MAX_ROWS, layout.INT4_PANEL_MAX_ROWS
    assert cpu_kernels.usable(cap, tiles, False, tiled=True)
    assert not cpu_kernels.usable(cap + 1, tiles, False, tiled=True)
    assert not cpu_kernels.usable(cap, tiles, False)  # row-major float32: one row only
    assert cpu_kernels.int4_panels_usable(cap4, packed, groups=1)
    assert not cpu_kernels.int4_panels_usable(cap4 + 1, packed, groups=1)
    assert cpu_kernels.int4_panels_usable(4 * cap, packed, groups=1, int8_x=True)
