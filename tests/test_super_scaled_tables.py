"""int4 panel weights' scales and mins super-scaled (quant4.super_scaled, read by the panel
kernel, cpu_panels.cc): GGUF Q4_K's own form (an f16 super-scale times 6-bit sub-scales per
block of 8 groups), held in 1.25 bytes a group and column instead of float32's 4. Exact: the
products equal the float32 tables' bit for bit, and engines decode the same tokens."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import LAYER, panel_engine_outputs, random_params, single_device_mesh, tiny_config

import runtime.cpu_kernels as cpu_kernels
from runtime import layout
from runtime.products import linear, linears
from runtime.quant import (LayerOfStack, QuantizedEmbedding, QuantizedWeight8bit, TiledEmbedding,
                           TiledWeight, tiled, tiled_embedding)
from runtime.super_scales import super_scaled_on_device
from runtime.quant4 import (QuantizedWeight4bit, TiledWeight4, dequantize_int4, pack_codes,
                            super_scaled_panels, tiled4, untiled4)
from runtime.super_scales import _by_gcd, float_table, super_scaled, table_groups

RNG = np.random.default_rng(61)


def q4_k_like(w, group: int) -> QuantizedWeight4bit:
    """w [..., I, O] quantised as llama.cpp's Q4_K is: per group of `group` rows a scale and a
    min, each an f16 super-value (per 8 groups) times a 6-bit sub-value; codes 0..15; the
    tables as the GGUF reader loads them (float32 products, mins negated)."""
    w = np.asarray(w, np.float32)
    *lead, rows, cols = w.shape
    blocks = w.reshape(*lead, rows // group // 8, 8, group, cols)
    low = np.minimum(blocks.min(axis=-2), 0)  # [..., B, 8, O]
    scale = (blocks.max(axis=-2) - low) / 15
    d = (scale.max(axis=-2, keepdims=True) / 63).astype(np.float16).astype(np.float32)
    dmin = (-low.min(axis=-2, keepdims=True) / 63).astype(np.float16).astype(np.float32)
    scales = d * np.rint(scale / np.where(d == 0, 1, d))
    mins = -(dmin * np.rint(-low / np.where(dmin == 0, 1, dmin)))
    safe = np.where(scales == 0, 1, scales)[..., None, :]
    codes = np.clip(np.rint((blocks - mins[..., None, :]) / safe), 0, 15)
    return QuantizedWeight4bit(pack_codes(codes.reshape(*lead, rows // group, group, cols)),
                               scales.reshape(*lead, rows // group, cols).astype(np.float32),
                               mins.reshape(*lead, rows // group, cols).astype(np.float32))


def q6_k_like(w, group: int) -> QuantizedWeight8bit:
    """w [..., I, O] quantised as llama.cpp's Q6_K is: codes -32..31 per group of `group` rows
    scaled by an f16 super-scale (per 16 groups) times an int8 sub-scale, the largest -128
    (or 127); the scales as the GGUF reader loads them (float32 products)."""
    w = np.asarray(w, np.float32)
    *lead, rows, cols = w.shape
    per = min(16, rows // group)
    blocks = w.reshape(*lead, rows // group // per, per, group, cols)
    peak = np.take_along_axis(blocks, np.argmax(np.abs(blocks), axis=-2)[..., None, :],
                              -2)[..., 0, :] / -32  # [..., B, per, O] signed group scales
    top = np.take_along_axis(peak, np.argmax(np.abs(peak), axis=-2)[..., None, :], -2)
    d = (top / -128).astype(np.float16).astype(np.float32)  # [..., B, 1, O]
    sub = np.clip(np.rint(peak / np.where(d == 0, 1, d)), -128, 127)
    scales = d * sub
    safe = np.where(scales == 0, 1, scales)[..., None, :]
    codes = np.clip(np.rint(blocks / safe), -32, 31).astype(np.int8)
    return QuantizedWeight8bit(codes.reshape(w.shape),
                               scales.reshape(*lead, rows // group, cols).astype(np.float32))


def test_tables_hold_q4_k_values_exactly_or_are_refused():
    w = q4_k_like(RNG.normal(size=(3, 512, 128)), 32)  # 3 layers of 2 blocks of 8 groups
    w.scales[1, :8, 5] = 0  # a block of zeros
    for table in (w.scales, w.mins):
        form = super_scaled(table)
        assert form.dtype == np.uint8 and form.shape == (3, 20, 128)
        assert table_groups(jnp.asarray(form)) == 16 == table_groups(jnp.asarray(table))
        np.testing.assert_array_equal(np.asarray(float_table(jnp.asarray(form))), table)
    assert np.asarray(w.mins).max() <= 0 < np.asarray(w.scales).max()
    assert super_scaled(RNG.normal(size=(16, 64)).astype(np.float32)) is None  # no super-scale
    assert super_scaled(w.scales[:, :12]) is None  # 12 groups: not whole blocks of 8
    assert super_scaled(w.scales.astype(np.float16)) is None  # f16 tables stay as they are
    mixed = w.scales.copy()
    mixed[0, 3, 0] = -mixed[0, 3, 0] - 1  # signs mixed in a block
    assert super_scaled(mixed) is None


def test_signed_tables_hold_q6_k_values_exactly():
    w = q6_k_like(RNG.normal(size=(2, 512, 64)), 16)  # 32 groups: 4 blocks of 8 per layer
    table = np.asarray(w.scales)
    assert table.min() < 0 < table.max()
    form = super_scaled(table, np.int8)
    assert form.dtype == np.int8 and form.shape == (2, 40, 64)
    np.testing.assert_array_equal(np.asarray(float_table(jnp.asarray(form))), table)
    assert super_scaled(table) is None  # signs mixed in a block: not unsigned sub-scales


def test_blocks_without_the_largest_sub_are_solved_by_their_divisor():
    """Half of Q6_K's blocks of 8 groups miss its largest sub-scale (-128): the divisor of their
    values gives them in one pass (_by_gcd); where that divisor is no f16 the search still
    finds an exact form."""
    d = (RNG.uniform(1e-3, 1e-2, 4096) * RNG.choice([-1, 1], 4096)).astype(np.float16)
    subs = RNG.integers(-100, 101, (4096, 8))
    blocks = (d.astype(np.float32)[:, None] * subs).astype(np.float32)
    supers, got, solved = _by_gcd(blocks, np.int8)
    assert solved.mean() > 0.99  # the few left: subs sharing a factor, their divisor no f16
    np.testing.assert_array_equal(supers[solved].astype(np.float32)[:, None] * got[solved],
                                  blocks[solved])
    odd = np.float16(1.9990234375 / 256)  # all 11 bits: 3 x odd is no f16
    block = (np.float32(odd) * np.array([3, 6, -9, 12, 30, 33, 3, 0]))[None].astype(np.float32)
    assert not _by_gcd(block, np.int8)[2][0]
    table = np.repeat(block.T, 4, axis=1)  # [8 groups, 4 columns]
    np.testing.assert_array_equal(
        np.asarray(float_table(jnp.asarray(super_scaled(table, np.int8)))), table)


@pytest.mark.skipif(not cpu_kernels.available(), reason="no C++ compiler")
def test_a_tied_tables_lookups_and_head_read_its_signed_tables():
    """A Q6_K-like tied table [V, D] as its head in panels: token rows (each column's
    sub-scales, and its super-scale from two bytes of the block's super rows) and the head's
    products equal the float32 table's."""
    from runtime.tables import embedding_rows, tied_head
    head = q6_k_like(RNG.normal(size=(64, 256)), 8)  # [D, V]
    plain = tiled_embedding(QuantizedEmbedding(jnp.asarray(head.weight.T.copy()),
                                               jnp.asarray(head.scales)))
    compact = TiledEmbedding(plain.tiles, super_scaled_on_device(plain.scales, np.int8))
    assert compact.scales.dtype == jnp.int8
    tokens = jnp.asarray([[3, 200, 128], [64, 255, 0]])  # both super rows' halves
    np.testing.assert_array_equal(np.asarray(jax.jit(embedding_rows)(compact, tokens)),
                                  np.asarray(embedding_rows(plain, tokens)))
    for rows in (1, 3):
        x = jnp.asarray(RNG.normal(size=(rows, 64)).astype(np.float32))
        np.testing.assert_array_equal(np.asarray(jax.jit(tied_head)(x, compact)),
                                      np.asarray(jax.jit(tied_head)(x, plain)))


def _pair(shape, group):
    """(float32 tables, super-scaled tables) panels of one Q4_K-like weight."""
    panels = jax.tree.map(jnp.asarray, tiled4(q4_k_like(RNG.normal(size=shape), group)))
    compact = super_scaled_panels(panels)
    assert compact.scales.dtype == compact.mins.dtype == jnp.uint8
    return panels, compact


@pytest.mark.skipif(not cpu_kernels.available(), reason="no C++ compiler")
@pytest.mark.parametrize("int8_x", [False, True])
def test_products_equal_the_float32_tables_bit_for_bit(monkeypatch, int8_x):
    monkeypatch.setattr(layout, "INT8_ACTIVATIONS", int8_x)
    plain, compact = _pair((512, 192), 32)
    other_plain, other_compact = _pair((512, 64), 16)
    stack_plain, stack_compact = _pair((2, 256, 128), 32)
    for rows in (1, 3, 8, 20):
        x = jnp.asarray(RNG.normal(size=(rows, 512)).astype(np.float32))
        want = np.asarray(jax.jit(linear)(x, plain))
        np.testing.assert_array_equal(np.asarray(jax.jit(linear)(x, compact)), want)
        together = jax.jit(linears)(x, [compact, other_compact])
        np.testing.assert_array_equal(np.asarray(together[0]), want)
        np.testing.assert_array_equal(np.asarray(together[1]),
                                      np.asarray(jax.jit(linear)(x, other_plain)))
        y = x[:, :256]
        for layer in (0, 1):
            np.testing.assert_array_equal(
                np.asarray(jax.jit(linear)(y, LayerOfStack(stack_compact, jnp.int32(layer)))),
                np.asarray(jax.jit(linear)(y, LayerOfStack(stack_plain, jnp.int32(layer)))))
    for rows in (1, 3, 20):  # int8 panels, signed sub-scales (Q6_K)
        plain8 = jax.tree.map(jnp.asarray, tiled(q6_k_like(RNG.normal(size=(256, 128)), 16)))
        compact8 = TiledWeight(plain8.tiles, super_scaled_on_device(plain8.scales, np.int8))
        assert compact8.scales.dtype == jnp.int8
        x = jnp.asarray(RNG.normal(size=(rows, 256)).astype(np.float32))
        np.testing.assert_array_equal(np.asarray(jax.jit(linear)(x, compact8)),
                                      np.asarray(jax.jit(linear)(x, plain8)))
    back = untiled4(compact)  # what a product the kernel does not take multiplies
    np.testing.assert_array_equal(dequantize_int4(jax.tree.map(np.asarray, back)),
                                  dequantize_int4(jax.tree.map(np.asarray, untiled4(plain))))


def _table_dtypes(params) -> dict:
    """{kind of panel weight: {its scale tables' dtypes}} of an engine's parameters."""
    kinds: dict = {}
    for leaf in jax.tree.leaves(params, is_leaf=lambda a: isinstance(a, (TiledWeight,
                                                                          TiledWeight4))):
        if isinstance(leaf, (TiledWeight, TiledWeight4)) and leaf.scales is not None:
            kinds.setdefault(type(leaf).__name__, set()).add(str(leaf.scales.dtype))
    return kinds


@pytest.mark.slow  # engines built and traced twice per layout: in the full suite
@pytest.mark.skipif(not cpu_kernels.available(), reason="no C++ compiler")
def test_engines_decode_the_tokens_of_float32_tables(monkeypatch):
    """Q4_K-like int4 weights and Q6_K-like int8 ones (the FFN's down projection, the tied
    table) in panels (groups of 8 rows: blocks of 64 and 128 rows), unrolled with one slot and
    scanned with three, float32 and bf16 activations: the engine holds their tables
    super-scaled (unsigned and signed) and decodes the tokens of an engine holding them
    float32; decode logits equal prefill logits."""
    from test_dtype_ladder import assert_decode_equals_prefill, ladder, prompt_for
    from runtime.benchmark import weight_bytes_per_step
    from runtime.engine import build_engine

    config = tiny_config(num_layers=2, num_experts=0, num_selected_experts=0, emb_size=64,
                         key_size=16, intermediate_size=128, tie_embeddings=True)
    params = random_params(config, seed=17, scale=0.3)
    for name in ("mlp/linear", "mlp/linear_v", "multi_head_attention/query",
                 "multi_head_attention/linear"):
        params[LAYER + name] = {"w": q4_k_like(params[LAYER + name]["w"], 8)}
    down = LAYER + "mlp/linear_1"  # Q6_K, as Q4_K_M files keep some layers' ffn_down
    params[down] = {"w": q6_k_like(params[down]["w"], 8)}
    module = "language_model/in_out_embed"
    head = q6_k_like(np.asarray(params[module]["embeddings"]).T, 8)  # [D, V]
    params[module] = {"embeddings": QuantizedEmbedding(head.weight.T.copy(), head.scales)}
    for slots, unroll, dtype in ((1, True, "float32"), (3, False, "float32"),
                                 (3, False, "bfloat16")):
        got, engine = panel_engine_outputs(config, params, slots, unroll, dtype, True)
        assert _table_dtypes(engine.params) == {"TiledWeight4": {"uint8"},
                                                "TiledWeight": {"int8"},
                                                "TiledEmbedding": {"int8"}}, (slots, dtype)
        monkeypatch.setattr(layout, "SUPER_SCALED_TABLES", False)
        want, plain = panel_engine_outputs(config, params, slots, unroll, dtype, True)
        monkeypatch.setattr(layout, "SUPER_SCALED_TABLES", True)
        assert all(kinds == {"float32"} for kinds in _table_dtypes(plain.params).values())
        assert got == want, (slots, unroll, dtype)
        # the bench's bytes a step (scripts/bench_runtime.py) count the engine's own tree
        super_bytes, float_bytes = (sum(weight_bytes_per_step(config, e.params, slots).values())
                                    for e in (engine, plain))
        assert super_bytes < float_bytes, (super_bytes, float_bytes)
    engine = build_engine(config, params, single_device_mesh(), slots=2, cache_length=48)
    prompts = [prompt_for(config, seed) for seed in range(2)]
    decoded, prefilled, _ = ladder(engine, prompts, slot=1)
    assert_decode_equals_prefill(decoded, prefilled, "float32")
