"""Six-bit panels (runtime/six_bit.py, runtime/cpu_panels_six.h): int8 panel weights whose codes
fit six bits (GGUF Q6_K, Q5_K, Q5_0) packed in 3/4 of the bytes. The packing round-trips and
pins its layout; under int8 x, and under float x with the float loops, products equal the int8
panels' bit for bit; x's digits (the default under float x at one row and 9-32) are as
close to float64 as the float loops, a row's y the same alone or among others; XLA's paths read
the packing; engines pack a Q4_K_M-like file's Q6_K and Q5_0 weights, read fewer bytes, and
decode what the int8 panels decode."""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import LAYER, saved_in_fresh_process

import runtime.cpu_kernels as cpu_kernels
from runtime import layout, six_bit
from runtime.products import linear
from runtime.quant import (QuantizedEmbedding, QuantizedWeight8bit, TiledEmbedding, TiledWeight,
                           tiled, tiled_embedding, untiled)
from runtime.super_scales import float_table, super_scaled_on_device

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="no C++ compiler")
six_kernels = pytest.mark.skipif(not cpu_kernels.six_bit_panels(),
                                 reason="an AVX-512 VBMI / VNNI build only")

KINDS = ("f16", "f32 mins", "q6_k")
ROWS = (1, 2, 3, 8, 9, 16, 40)


def _pair(kind: str, rng, inputs: int = 256, outputs: int = 192):
    """(int8 panels, the same packed six-bit) of a weight [I, O]: f16 scales per 32 rows (codes
    -32..31, Q5_0-like: -16..15 and -32..31 mixed), float32 scales and mins per 32 rows (Q5_K-like:
    codes 0..31), or GGUF Q6_K's super-scaled int8 tables per 16 rows."""
    if kind == "q6_k":
        from test_super_scaled_tables import q6_k_like
        q = q6_k_like(rng.normal(size=(inputs, outputs)), 16)
        plain = tiled(jax.tree.map(jnp.asarray, q))
        plain = TiledWeight(plain.tiles, super_scaled_on_device(plain.scales, np.int8))
    else:
        low = 0 if kind == "f32 mins" else -32
        codes = rng.integers(low, 32, (inputs, outputs)).astype(np.int8)
        dtype = np.float16 if kind == "f16" else np.float32
        scales = (rng.uniform(0.5, 1.5, (inputs // 32, outputs)) / 64).astype(dtype)
        mins = (rng.normal(size=(inputs // 32, outputs)) / 8).astype(np.float32) \
            if kind == "f32 mins" else None
        plain = tiled(jax.tree.map(jnp.asarray, QuantizedWeight8bit(codes, scales, mins)))
    assert six_bit.fits(plain.tiles, 16)
    packed = TiledWeight(jnp.asarray(six_bit.packed(np.asarray(plain.tiles))), plain.scales,
                         plain.mins)
    return plain, packed


def _heavy_tailed(rng, rows, inputs):
    return (rng.normal(size=(rows, inputs)) * np.exp(2 * rng.normal(size=(rows, inputs)))
            ).astype(np.float32)


def _product(x, w):
    jax.clear_caches()  # each layout switch traced afresh
    return np.asarray(jax.jit(linear)(jnp.asarray(x), w))


def test_packing_round_trips_gathers_columns_and_keeps_its_layout(monkeypatch):
    rng = np.random.default_rng(3)
    tiles = rng.integers(-32, 32, (2, 3, 64 * 12)).astype(np.int8)  # [L, P, 64 I], I = 12
    packed = six_bit.packed(tiles)
    assert packed.dtype == np.uint8 and packed.shape == (2, 3, 48 * 12)
    monkeypatch.setattr(six_bit, "PACK_CODES", 2 * 64 * 12)  # two panels a slice: the same
    np.testing.assert_array_equal(six_bit.packed(tiles), packed)
    np.testing.assert_array_equal(np.asarray(six_bit.unpacked(jnp.asarray(packed))), tiles)
    table = tiles[0]  # a head [D = 12, V = 192] in panels: token v's codes
    tokens = jnp.asarray([[0, 17, 64], [191, 100, 63]])
    want = table.reshape(3, 12, 64)[np.asarray(tokens) // 64, :, np.asarray(tokens) % 64]
    np.testing.assert_array_equal(
        np.asarray(six_bit.columns(jnp.asarray(six_bit.packed(table)), tokens)), want)
    one = np.zeros((1, 64 * 8), np.int8)
    one[0, 5 * 64 + 17] = -3  # row 5 (quad 1, row 1), column 17: vector 0, lane 1, word 4 + 1
    word = int(six_bit.COLUMN_WORDS.tolist().index(17))
    assert word == 4 * 1 + 1 + 16 * 0 + 0  # column 16 L + 4 k + c at word 16 k + 4 L + c
    bytes_ = six_bit.packed(one).reshape(2, 64, 3)[1, word]
    assert int(bytes_[0]) | int(bytes_[1]) << 8 | int(bytes_[2]) << 16 == (-3 & 63) << 6
    assert not six_bit.packed(one).reshape(2, 64, 3)[0].any()


def test_only_codes_of_six_bits_in_blocks_of_whole_quads_fit():
    codes = np.zeros((1, 64 * 32), np.int8)
    assert six_bit.fits(jnp.asarray(codes), 2)  # blocks of 16 rows
    assert not six_bit.fits(jnp.asarray(codes), 16)  # of 2
    assert not six_bit.fits(jnp.asarray(np.zeros((1, 64 * 6), np.int8)), 1)  # 6 rows
    for bad in (32, -33):
        codes[0, 100] = bad
        assert not six_bit.fits(jnp.asarray(codes), 1)
    assert not six_bit.fits(jnp.asarray(np.zeros((1, 64 * 8), np.float32)), 1)


@six_kernels
@pytest.mark.parametrize("kind", KINDS)
def test_int8_x_products_equal_the_int8_panels_bit_for_bit(kind, monkeypatch):
    rng = np.random.default_rng(5)
    plain, packed = _pair(kind, rng)
    monkeypatch.setattr(layout, "INT8_ACTIVATIONS", True)
    for rows in ROWS:
        x = _heavy_tailed(rng, rows, 256)
        np.testing.assert_array_equal(_product(x, packed), _product(x, plain), err_msg=str(rows))


def float_loop_products(path):
    """y of the int8 and six-bit panels of every kind for ROWS rows, saved to path (a fresh
    process with RUNTIME_KERNEL_INT4_X24=0: the float loops; RUNTIME_KERNEL_MANY_ROWS=12: both
    kinds' chunks past 12 rows, where by default on AMD CPUs int8 panels take them past 128)."""
    rng = np.random.default_rng(11)
    out = {}
    for kind in KINDS:
        plain, packed = _pair(kind, rng)
        for rows in ROWS:
            x = _heavy_tailed(rng, rows, 256)
            out[f"{kind} {rows} int8"], out[f"{kind} {rows} six"] = (_product(x, plain),
                                                                     _product(x, packed))
    np.savez(path, **out)


@six_kernels
def test_float_loops_equal_the_int8_panels_bit_for_bit(tmp_path):
    got = saved_in_fresh_process("test_six_bit_panels", "float_loop_products",
                                 tmp_path / "y.npz", RUNTIME_KERNEL_INT4_X24=0,
                                 RUNTIME_KERNEL_MANY_ROWS=12)
    for kind in KINDS:
        for rows in ROWS:
            np.testing.assert_array_equal(got[f"{kind} {rows} six"], got[f"{kind} {rows} int8"],
                                          err_msg=f"{kind} {rows}")


def _worst(x, w, got) -> float:
    """got's worst error against float64 in units of its row's largest |x| |w| sum."""
    dense = untiled(w)
    values = np.asarray(dense.weight, np.float64) * np.repeat(
        np.asarray(float_table(dense.scales), np.float64), 256 // dense.scales.shape[0], 0)
    if dense.mins is not None:
        values += np.repeat(np.asarray(dense.mins, np.float64), 256 // dense.mins.shape[0], 0)
    want = x.astype(np.float64) @ values
    scale = (np.abs(x).astype(np.float64) @ np.abs(values)).max(axis=-1, keepdims=True)
    return float(np.max(np.abs(got - want) / scale))


@six_kernels
@pytest.mark.parametrize("kind", KINDS)
def test_digits_are_as_close_to_float64_as_the_float_loops(kind):
    """The default under float x (cpu_panels_six_float_x.h): one row and 9-32 take x's
    digits, within float32's rounding of float64 (the float loops' own worst: ~1e-6 of a row's
    |x||w| sum), not the int8 panels' bit for bit (so the digits are what ran); a row's y is
    the same alone and among 9 or 11 rows."""
    if not cpu_kernels.int4_digits():
        pytest.skip("RUNTIME_KERNEL_INT4_X24=0")
    rng = np.random.default_rng(13)
    plain, packed = _pair(kind, rng)
    for rows in (1, 9, 16, 32):
        x = _heavy_tailed(rng, rows, 256)
        got = _product(x, packed)
        assert _worst(x, packed, got) < 1e-6, (kind, rows, _worst(x, packed, got))
        assert not np.array_equal(got, _product(x, plain)), (kind, rows)
    x = _heavy_tailed(rng, 11, 256)
    alone = _product(x[:1], packed)
    for rows in (9, 11):
        np.testing.assert_array_equal(_product(x[:rows], packed)[:1], alone, err_msg=str(rows))


def test_xla_paths_read_the_packing(monkeypatch):
    """Products past the kernel's rows multiply untiled(w) (the packing unpacked: the int8
    panels' product bit for bit), and a packed tied table's lookups gather its columns."""
    from runtime.tables import embedding_rows
    rng = np.random.default_rng(17)
    plain, packed = _pair("q6_k", rng)
    assert packed.shape == plain.shape and packed.dtype == np.int8
    monkeypatch.setattr(layout, "PANEL_MAX_ROWS", 2)
    x = _heavy_tailed(rng, 5, 256)
    np.testing.assert_array_equal(_product(x, packed), _product(x, plain))
    table = tiled_embedding(QuantizedEmbedding(jnp.asarray(np.asarray(untiled(plain).weight).T),
                                               jnp.asarray(float_table(plain.scales))))
    six_table = TiledEmbedding(jnp.asarray(six_bit.packed(np.asarray(table.tiles))), table.scales)
    assert six_table.shape == table.shape == (192, 256)
    tokens = jnp.asarray([[3, 191, 64], [0, 127, 100]])
    np.testing.assert_array_equal(np.asarray(jax.jit(embedding_rows)(six_table, tokens)),
                                  np.asarray(embedding_rows(table, tokens)))


@pytest.mark.slow  # four engines over the GGUF model: in the full suite
@six_kernels
def test_engines_pack_six_bit_codes_and_decode_as_the_int8_panels(tmp_path, monkeypatch):
    """A Q4_K_M-like file (test_layer_types: Q6_K attn_v / ffn_down in two of three layers, the
    head and table Q6_K, ffn_up Q5_0 / Q8_0): the engine packs the Q6_K stacks, the head and the
    table (Q8_0's codes do not fit), reads fewer bytes a step, decodes = prefills; under int8 x
    its logits equal the int8 panels' engine's bit for bit, under float x within float32's
    rounding."""
    from conftest import single_device_mesh
    from test_dtype_ladder import assert_decode_equals_prefill
    from test_layer_types import HF3, _engine_logits, _q4_k_m_file
    from runtime.benchmark import weight_bytes_per_step
    from runtime.checkpoint.load import default_config, load_params_on_mesh
    path, _ = _q4_k_m_file(tmp_path, HF3, seed=9)
    config = default_config(path)
    params = load_params_on_mesh(path, config, single_device_mesh())
    runs = {}
    for int8_x in (False, True):
        monkeypatch.setattr(layout, "INT8_ACTIVATIONS", int8_x)
        for six in (True, False):
            monkeypatch.setattr(layout, "SIX_BIT_PANELS", six)
            jax.clear_caches()
            logits, (decoded, prefilled, _), engine = _engine_logits(config, params, 3, False)
            assert_decode_equals_prefill(decoded, prefilled, "float32")
            runs[int8_x, six] = logits, engine
    engine = runs[False, True][1]
    for module in ("multi_head_attention/value", "mlp/linear_1"):  # Q4_K, Q6_K stacks
        six_stack = engine.params[LAYER + module]["w"].stacks[1]
        assert isinstance(six_stack, TiledWeight) and six_stack.tiles.dtype == jnp.uint8, module
    assert engine.params[LAYER + "mlp/linear_v"]["w"].tiles.dtype == jnp.int8  # Q8_0 in it
    assert engine.params["language_model/unembed"]["w"].tiles.dtype == jnp.uint8
    six_bytes, int8_bytes = (sum(weight_bytes_per_step(config, runs[False, six][1].params, 3)
                                 .values()) for six in (True, False))
    assert six_bytes < int8_bytes, (six_bytes, int8_bytes)
    np.testing.assert_array_equal(runs[True, True][0], runs[True, False][0])
    error = np.abs(runs[False, True][0] - runs[False, False][0]).max()
    assert error < 1e-5 * np.abs(runs[False, False][0]).max(), error


@six_kernels
def test_engines_pack_only_where_their_products_read_the_packing(monkeypatch):
    """compact_panels packs where the kernel multiplies six-bit panels, not where int8
    activations take AMX tiles (int8 panels only), nor with the switch off."""
    from runtime.models.stored_weights import compact_panels
    plain, _ = _pair("q6_k", np.random.default_rng(19))
    params = {"m": {"w": plain}}
    assert compact_panels(params)["m"]["w"].tiles.dtype == jnp.uint8
    monkeypatch.setattr(layout, "INT8_ACTIVATIONS", True)
    assert compact_panels(params)["m"]["w"].tiles.dtype == jnp.uint8
    monkeypatch.setattr(cpu_kernels, "amx_tiles", lambda: True)
    assert compact_panels(params)["m"]["w"].tiles.dtype == jnp.int8
    monkeypatch.setattr(layout, "INT8_ACTIVATIONS", False)
    assert compact_panels(params)["m"]["w"].tiles.dtype == jnp.uint8
    monkeypatch.setattr(layout, "SIX_BIT_PANELS", False)
    assert compact_panels(params)["m"]["w"].tiles.dtype == jnp.int8
