"""The int4 weight type (runtime/quant4.py) and its products (runtime/products.py,
runtime/int4_widening.py) against numpy: quantisation error bounds, the packed layout, and
linear / per_tile_linear / switched_tile_linear on every path a product can take (the CPU's
blocked loop, the int8 product of the codes, the dequantised blocks of many-row products)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from runtime import int4_widening, int8_widening, layout, products
from runtime.quant4 import (QuantizedWeight4bit, dequantize_int4, groups_for, pack_codes,
                            quantize_int4, unpacked_codes)


def _codes(w: QuantizedWeight4bit) -> np.ndarray:
    return unpacked_codes(np.asarray(w.packed), w.groups, np)


def _grouped(a: np.ndarray, groups: int) -> np.ndarray:  # [..., I, O] -> [..., G, n, O]
    return a.reshape(*a.shape[:-2], groups, -1, a.shape[-1])


# --- quantisation ------------------------------------------------------------------------------

def test_symmetric_error_is_at_most_half_a_step_inside_the_range():
    w = np.random.default_rng(0).normal(size=(3, 96, 40)).astype(np.float32)
    q = quantize_int4(w, 32)
    assert q.packed.shape == (3, 48, 40) and q.scales.shape == (3, 3, 40) and q.mins is None
    assert q.scales.dtype == np.float16
    scale = np.asarray(q.scales, np.float32)[..., None, :]  # [3, G, 1, O]
    blocks, error = _grouped(w, 3), _grouped(np.abs(w - dequantize_int4(q)), 3)
    low, high = np.minimum(-8 * scale, 7 * scale), np.maximum(-8 * scale, 7 * scale)
    inside = (blocks >= low) & (blocks <= high)
    assert inside.mean() > 0.9
    assert np.all(error[inside] <= (np.abs(scale) / 2 * (1 + 1e-6) + 0 * blocks)[inside])
    codes = _codes(q)
    assert set(np.unique(codes)) == set(range(16))  # code 0 is each group's extreme
    extreme = np.take_along_axis(blocks, np.abs(blocks).argmax(-2)[..., None, :], -2)
    assert np.all(_grouped(codes, 3)[np.abs(blocks) == np.abs(extreme)] == 0)


def test_asymmetric_error_is_at_most_half_a_step():
    w = np.random.default_rng(1).uniform(-0.5, 2.0, size=(64, 24)).astype(np.float32)
    q = quantize_int4(w, 16, symmetric=False)
    assert q.mins is not None and q.mins.shape == (4, 24) and q.mins.dtype == np.float16
    scale = np.asarray(q.scales, np.float32)[:, None, :]
    mins = np.asarray(q.mins, np.float32)[:, None, :]
    blocks = _grouped(w, 4)
    # the min is rounded to f16 before the codes: its rounding adds to the bound
    slack = np.abs(mins - blocks.min(axis=1, keepdims=True)) + 1e-6
    error = np.abs(blocks - _grouped(dequantize_int4(q), 4))
    assert np.all(error <= scale / 2 * (1 + 1e-6) + slack)
    assert set(np.unique(_codes(q))) == set(range(16))


@pytest.mark.parametrize("symmetric", [True, False])
def test_all_zero_groups(symmetric):
    w = np.zeros((32, 8), np.float32)
    w[16:, 3] = np.linspace(-1, 1, 16)  # one group of one column not zero
    q = quantize_int4(w, 16, symmetric)
    assert np.all(np.isfinite(np.asarray(q.scales, np.float32)))
    dequantised = dequantize_int4(q)
    assert np.all(dequantised[:16] == 0) and np.all(dequantised[:, :3] == 0)
    assert np.all(_codes(q)[:16] == (8 if symmetric else 0))


def test_scales_are_rounded_to_float16_before_the_codes():
    steps = np.arange(-8, 8, dtype=np.float32)  # every code once
    scale = np.float32(0.1)  # not a float16 number
    w = (steps * scale)[:, None] * np.ones((1, 4), np.float32)  # [16, 4]: one group
    q = quantize_int4(w, 16)
    stored = np.float16(-0.8 / -8.0)
    assert np.all(np.asarray(q.scales) == stored)
    # the codes come from the stored scale: the grid steps * stored exactly
    assert np.array_equal(dequantize_int4(q), (steps * np.float32(stored))[:, None] * np.ones(4))
    assert np.array_equal(_codes(q)[:, 0], np.arange(16))


def test_groups_for():
    assert groups_for(576, 128) == 6 and groups_for(576, 32) == 18 and groups_for(64, 16) == 4
    with pytest.raises(ValueError):
        groups_for(64, 7)


# --- the packed layout --------------------------------------------------------------------------

def test_pack_round_trip():
    codes = np.random.default_rng(2).integers(0, 16, size=(2, 3, 8, 5), dtype=np.uint8)
    packed = pack_codes(codes)  # [2, 3 * 4, 5]
    assert packed.shape == (2, 12, 5) and packed.dtype == np.uint8
    back = unpacked_codes(packed, 3, np)
    assert np.array_equal(back, codes.reshape(2, 24, 5))
    assert np.array_equal(np.asarray(unpacked_codes(jnp.asarray(packed), 3)), back)


def test_nibble_placement_of_a_hand_made_group():
    # one group of 4 rows, one column: rows 0, 1 in the low nibbles of packed rows 0, 1,
    # rows 2, 3 in their high nibbles (GGUF's Q4_0 block layout)
    codes = np.array([1, 2, 3, 4], np.uint8).reshape(1, 4, 1)
    assert pack_codes(codes)[:, 0].tolist() == [0x31, 0x42]
    two_groups = np.array([[1, 2, 3, 4], [5, 6, 7, 8]], np.uint8).reshape(2, 4, 1)
    assert pack_codes(two_groups)[:, 0].tolist() == [0x31, 0x42, 0x75, 0x86]


# --- products ------------------------------------------------------------------------------------

def _weight(shape, group_size, symmetric, seed=3):
    w = np.random.default_rng(seed).normal(size=shape).astype(np.float32) / np.sqrt(shape[-2])
    if not symmetric:
        w = w + 0.05  # groups off centre: the mins matter
    return quantize_int4(w, group_size, symmetric)


def _inputs(shape, dtype, seed=4):
    x = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
    return jnp.asarray(x, dtype)


def _check(got, x, dequantised, dtype):
    """got against x @ dequantised in float64: float32 rounding for float32 (relative 1e-5 of
    the output's scale), bf16 output rounding for bf16."""
    reference = np.asarray(jnp.asarray(x, jnp.float32), np.float64) @ dequantised.astype(np.float64)
    got = np.asarray(jnp.asarray(got, jnp.float32), np.float64)
    scale = np.abs(reference).max()
    limit = 1e-5 * scale + (np.abs(reference) * 2.0 ** -8 if dtype == jnp.bfloat16 else 0)
    assert got.shape == reference.shape
    assert np.all(np.abs(got - reference) <= limit), np.abs(got - reference).max() / scale


@pytest.fixture(params=["blocked", "codes", "dequantised"])
def path(request, monkeypatch):
    """Which path the products take: the CPU's blocked loop (blocks shrunk so that it runs
    several), the int8 product of the codes (widening off, as on GPUs), or the many-row
    dequantised blocks (widening off, partials never small enough)."""
    if request.param == "blocked":
        monkeypatch.setattr(layout, "widening_in_blocks", lambda: True)
        monkeypatch.setattr(int4_widening, "UNPACK_BLOCK_BYTES", 16 << 10)
    else:
        monkeypatch.setattr(layout, "widening_in_blocks", lambda: False)
    if request.param == "dequantised":
        monkeypatch.setattr(products, "PARTIALS_MAX_BYTES", 0)
        monkeypatch.setattr(int8_widening, "WIDEN_BLOCK_BYTES", 16 << 10)
    return request.param


ROWS = {"blocked": (1, 3, 16), "codes": (1, 3, 16), "dequantised": (24, 40)}


@pytest.mark.parametrize("symmetric", [True, False])
def test_linear(path, symmetric):
    w = _weight((256, 96), 16, symmetric)  # G = 16 groups of 16 rows
    if path == "blocked":  # several blocks per product
        assert int4_widening.cache_block_groups(16, 16, 96) < 16
    dequantised = dequantize_int4(w)
    product = jax.jit(lambda xs, w: [products.linear(x, w) for x in xs])  # one program
    for dtype in (jnp.float32, jnp.bfloat16):
        xs = [_inputs((rows, 256), dtype) for rows in ROWS[path]]
        xs.append(_inputs((2, 3, 256), dtype))  # leading axes kept
        for x, got in zip(xs, product(xs, w)):
            assert got.dtype == dtype
            _check(got, x, dequantised, dtype)


@pytest.mark.parametrize("symmetric", [True, False])
def test_expert_products(path, symmetric):
    """per_tile_linear on a gathered [N, P, O] weight and switched_tile_linear over the E
    experts of a stacked [E, I, O] weight, against each tile's own expert."""
    experts, rows_in, out = 3, 128, 48
    w = _weight((experts, rows_in, out), 32, symmetric)
    dequantised = dequantize_int4(w)  # [E, I, O]
    choice = jnp.array([2, 0, 2], jnp.int32)
    rows = 1 if path != "dequantised" else 40
    for dtype in (jnp.float32, jnp.bfloat16):
        x = _inputs((3, rows, rows_in), dtype)  # [N, T, I]
        split = [jax.tree.map(lambda a, e=e: a[e], w) for e in range(experts)]
        gathered, switched = jax.jit(lambda x, w, ws, c: (  # one program
            products.per_tile_linear(x, jax.tree.map(lambda a: a[c], w)),
            products.switched_tile_linear(x, ws, c)))(x, w, split, choice)
        for got in (gathered, switched):
            assert got.shape == (3, rows, out) and got.dtype == dtype
            for tile, expert in enumerate(np.asarray(choice)):
                _check(got[tile], x[tile], dequantised[expert], dtype)


def test_the_blocked_loop_reads_no_whole_unpacked_weight():
    """The CPU decode program of a 2-D int4 product holds no [I, O] array of any dtype: the
    codes are unpacked a block of groups at a time inside the loop."""
    w = _weight((512, 1024), 32, True)
    assert int4_widening.cache_block_groups(16, 32, 1024) < 16  # several steps
    x = _inputs((1, 512), jnp.float32)
    text = jax.jit(int4_widening.blocked_int4_linear).lower(x, w).compile().as_text()
    assert "while" in text
    assert "[512,1024]" not in text.replace(" ", "")
