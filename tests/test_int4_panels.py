"""int4 weights in column panels (quant4.TiledWeight4, the panel kernel's int4 path in
runtime/cpu_panels.cc): values where the kernel reads them, products against float64, views of
stacks, one call with int8 and float32 panels, malformed operands refused, and engines that
store int4 in panels decoding the tokens of engines that do not."""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import (LAYER, leaf_kinds, panel_engine_outputs, random_params,
                      saved_in_fresh_process, tiny_config)

import runtime.cpu_kernels as cpu_kernels
from runtime.products import linear, linears
from runtime.quant import LayerOfStack, quantize, tiled
from runtime.quant4 import (QuantizedWeight4bit, TiledWeight4, dequantize_int4, quantize_int4,
                            tileable4, tiled4, untiled4)

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="no C++ compiler")
RNG = np.random.default_rng(44)


def _int4(inputs, outputs, group, symmetric, scale_dtype=np.float16, lead=()):
    w = RNG.normal(size=(*lead, inputs, outputs)).astype(np.float32)
    q = quantize_int4(w, group, symmetric=symmetric, scale_dtype=scale_dtype)
    return jax.tree.map(jnp.asarray, q)


def test_panels_hold_the_packed_rows_and_come_back():
    w = _int4(64, 128, 32, symmetric=False)
    t = tiled4(w)
    assert isinstance(t, TiledWeight4) and t.shape == (64, 128) and t.tiles.shape == (2, 64 * 32)
    packed = np.asarray(w.packed)  # [32, 128]
    for p, j, c in ((0, 0, 0), (1, 5, 3), (1, 31, 63)):  # packed row j, column 64 p + c
        assert np.asarray(t.tiles)[p, 64 * j + c] == packed[j, 64 * p + c]
    back = untiled4(t)
    np.testing.assert_array_equal(np.asarray(back.packed), packed)
    assert back.mins is w.mins and back.scales is w.scales
    assert not tileable4(_int4(64, 96, 32, True)) and tileable4(w)


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 9, 16])
@pytest.mark.parametrize("inputs,outputs,group", [(576, 192, 32), (96, 64, 16), (576, 128, 96)])
@pytest.mark.parametrize("symmetric,scale_dtype", [(True, np.float16), (False, np.float16),
                                                   (True, np.float32), (False, jnp.bfloat16)])
def test_int4_panels_give_the_product(rows, inputs, outputs, group, symmetric, scale_dtype):
    w = _int4(inputs, outputs, group, symmetric, scale_dtype)
    x = jnp.asarray(RNG.normal(size=(rows, inputs)).astype(np.float32))
    want = np.asarray(x, np.float64) @ dequantize_int4(w).astype(np.float64)
    got = np.asarray(jax.jit(linear)(x, tiled4(w)))
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * np.abs(want).max())


def test_stacks_are_read_at_their_layer_and_prefill_takes_the_weight_back():
    stack = _int4(64, 128, 16, symmetric=False, lead=(3,))
    x = jnp.asarray(RNG.normal(size=(2, 64)).astype(np.float32))
    at = jax.jit(lambda i: linear(x, LayerOfStack(tiled4(stack), i)))
    for layer in range(3):
        one = QuantizedWeight4bit(stack.packed[layer], stack.scales[layer], stack.mins[layer])
        want = np.asarray(x, np.float64) @ dequantize_int4(one).astype(np.float64)
        np.testing.assert_allclose(np.asarray(at(layer)), want, rtol=2e-5,
                                   atol=2e-5 * np.abs(want).max())
    many = jnp.asarray(RNG.normal(size=(600, 64)).astype(np.float32))  # past the kernel's cap
    one = QuantizedWeight4bit(stack.packed[0], stack.scales[0], stack.mins[0])
    np.testing.assert_allclose(np.asarray(jax.jit(linear)(many, tiled4(one))),
                               np.asarray(jax.jit(linear)(many, one)), rtol=1e-5, atol=1e-4)


def test_int4_int8_and_float32_panels_share_one_call_bit_for_bit():
    x = jnp.asarray(RNG.normal(size=(3, 64)).astype(np.float32))
    weights = [tiled4(_int4(64, 128, 32, True)), tiled4(_int4(64, 64, 16, False)),
               tiled(quantize(RNG.normal(size=(64, 192)).astype(np.float32), 2)),
               tiled(jnp.asarray(RNG.normal(size=(64, 64)).astype(np.float32)))]
    together = jax.jit(lambda x, ws: linears(x, ws))(x, weights)
    for got, w in zip(together, weights):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(jax.jit(linear)(x, w)))


def test_malformed_int4_panels_are_refused_in_one_line():
    x = jnp.zeros((1, 64), jnp.float32)
    w = tiled4(_int4(64, 128, 32, symmetric=False))
    cases = [(w.tiles, w.scales[:1], w.mins),  # scales of another group count than the mins
             (w.tiles, jnp.ones((64, 128), jnp.float16), None),  # groups of one row (odd)
             (w.tiles[:, :100], w.scales, w.mins)]  # not whole packed rows of 64 columns
    for tiles, scales, mins in cases:
        with pytest.raises(Exception, match="panels: shapes must be"):
            np.asarray(cpu_kernels.tiled_linears(x, [(tiles, scales, mins)])[0])


@pytest.mark.slow
def test_engines_with_int4_panels_decode_the_tokens_of_engines_without():
    """int4 layer weights (symmetric and asymmetric, groups of 16 and 32) in panels, read in
    place by the scan (one and three slots) and unrolled, float32 and bf16 activations."""
    config = tiny_config(num_layers=2, num_experts=0, num_selected_experts=0, emb_size=64,
                         key_size=16, intermediate_size=128)
    params = random_params(config, seed=13, scale=0.3)
    for i, name in enumerate(("mlp/linear", "mlp/linear_v", "mlp/linear_1",
                              "multi_head_attention/query", "multi_head_attention/linear")):
        params[LAYER + name] = {"w": quantize_int4(params[LAYER + name]["w"], 16 * (1 + i % 2),
                                                   symmetric=i % 2 == 0)}

    def tokens(slots, unroll, dtype, tiles):
        out, engine = panel_engine_outputs(config, params, slots, unroll, dtype, tiles)
        return out, leaf_kinds(engine.params, TiledWeight4, QuantizedWeight4bit)

    for slots, unroll, dtype in ((1, False, "float32"), (1, True, "float32"),
                                 (3, False, "bfloat16")):
        got, kinds = tokens(slots, unroll, dtype, True)
        want, plain = tokens(slots, unroll, dtype, False)
        stored = 5 * (config.num_layers if unroll else 1)  # unrolled: one per layer
        assert kinds.get("TiledWeight4", 0) == stored and "TiledWeight4" not in plain, kinds
        assert got == want, (slots, unroll, dtype)


def table_kind_panels(rng, shapes):
    """int4 panels of every table kind (symmetric f16 / f32, mins in bf16) for each (I, O, group)
    of `shapes`, and one of GGUF Q4_K's super-scaled tables [512, 256], by name."""
    from test_super_scaled_tables import q4_k_like
    from runtime.quant4 import super_scaled_panels

    def panels(q):
        return tiled4(jax.tree.map(jnp.asarray, q))
    weights = {f"{i}x{o} g{g} {name}": panels(quantize_int4(
                   rng.normal(size=(i, o)).astype(np.float32), g, symmetric=sym,
                   scale_dtype=dtype))
               for i, o, g in shapes
               for name, sym, dtype in (("f16", True, np.float16), ("f32", True, np.float32),
                                        ("bf16 mins", False, jnp.bfloat16))}
    weights["q4_k 512x256"] = super_scaled_panels(panels(q4_k_like(rng.normal(size=(512, 256)),
                                                                   32)))
    return weights


def _one_row_products(path):
    """x [1, I] @ int4 panels of every table kind (table_kind_panels; groups of 16-128, one and
    several panels), saved to path."""
    rng = np.random.default_rng(7)  # its own: both processes draw the same weights
    weights = table_kind_panels(rng, ((96, 64, 16), (576, 192, 32), (256, 320, 128),
                                      (576, 128, 96)))
    out = {}
    for name, w in weights.items():
        x = jnp.asarray(rng.normal(size=(1, w.shape[0])).astype(np.float32))
        out[name] = np.asarray(jax.jit(linear)(x, w))
    np.savez(path, **out)


@pytest.mark.slow
def test_one_row_read_a_packed_row_at_a_time_equals_the_widening_loads_bit_for_bit(tmp_path):
    """A single x row reads each packed row as one vector (cpu_panels.cc, int4_panel_row_wide,
    its sums in strided lanes); RUNTIME_KERNEL_INT4_WIDE=0 (a fresh process: the switch is read
    once) widens 16 bytes at a time. Same products, same order: the same y, bit for bit. Both
    in fresh processes with the float loops on (RUNTIME_KERNEL_INT4_X24=0: one row otherwise
    takes x's digits on the integer dots, cpu_panels_x24.h)."""
    wide, widened = (saved_in_fresh_process("test_int4_panels", "_one_row_products",
                                            tmp_path / name, RUNTIME_KERNEL_INT4_WIDE=switch,
                                            RUNTIME_KERNEL_INT4_X24=0)
                     for name, switch in (("wide.npz", 1), ("widened.npz", 0)))
    assert sorted(wide) == sorted(widened) and len(wide) == 13
    for name in wide:
        np.testing.assert_array_equal(wide[name], widened[name], err_msg=name)


@pytest.mark.parametrize("symmetric", [True, False])
def test_f16_tables_in_registers_equal_the_same_tables_as_float32_bit_for_bit(symmetric):
    """A few-row product widens f16 group tables straight into registers (cpu_panels.cc,
    int4_group_vectors); float32 tables of the same values take the arrays. Same values, same
    arithmetic: the same y, bit for bit, under float and int8 x, one to four rows."""
    from runtime import layout
    w = _int4(576, 320, 32, symmetric)
    as_f32 = QuantizedWeight4bit(w.packed, w.scales.astype(jnp.float32),
                                 None if w.mins is None else w.mins.astype(jnp.float32))
    assert w.scales.dtype == jnp.float16
    saved = layout.INT8_ACTIVATIONS
    try:
        for int8_x in (False, True):
            layout.INT8_ACTIVATIONS = int8_x
            for rows in (1, 2, 4):
                x = jnp.asarray(RNG.normal(size=(rows, 576)).astype(np.float32))
                product = jax.jit(lambda x, w: linear(x, w))  # traced anew: int8 x or not
                f16, f32 = product(x, tiled4(w)), product(x, tiled4(as_f32))
                np.testing.assert_array_equal(f16, f32, err_msg=f"int8 x {int8_x}, {rows} rows")
                assert np.abs(np.asarray(f16)).max() > 1.0
    finally:
        layout.INT8_ACTIVATIONS = saved
