"""A tied int8 table holding int4 codes (a GGUF Q4_0 table, which the reader widens to a
QuantizedEmbedding) stored in int4 panels by a one-device CPU engine (quant4.TiledEmbedding4):
which tables qualify, lookups equal to the int8 table's bit for bit, the head's product against
float64 (and under --int8-activations), and engines decoding the tokens of the int8 table."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import LAYER, random_params, single_device_mesh, tiny_config

import runtime.cpu_kernels as cpu_kernels
from runtime import layout
from runtime.tables import embedding_rows, tied_head
from runtime.quant import QuantizedEmbedding, dequantize, quantize_embedding
from runtime.quant4 import TiledEmbedding4, quantize_int4, table_fits_int4, tiled_embedding4

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="no C++ compiler")
RNG = np.random.default_rng(46)


def q4_0_table(vocab: int, width: int, group: int = 32) -> QuantizedEmbedding:
    """What the GGUF reader makes of a Q4_0 table [V, D]: int8 codes q - 8, float16 scales
    [D / group, V] (quantize_int4 of the head [D, V], symmetric: Q4_0's own rounding)."""
    head = quantize_int4(RNG.normal(size=(width, vocab)).astype(np.float32), group)
    packed = np.asarray(head.packed).reshape(head.groups, -1, vocab)  # [G, n/2, V]
    codes = np.concatenate([packed & 15, packed >> 4], axis=1).reshape(width, vocab)
    weight = (codes.astype(np.int16) - 8).astype(np.int8).T  # [V, D]
    return QuantizedEmbedding(jnp.asarray(weight), jnp.asarray(head.scales))


def test_only_tables_of_int4_codes_qualify():
    assert table_fits_int4(q4_0_table(128, 64))
    assert not table_fits_int4(quantize_embedding(RNG.normal(size=(128, 64)), 32))  # int8 codes
    assert not table_fits_int4(q4_0_table(96, 64))  # V not whole panels
    assert not table_fits_int4(np.zeros((128, 64), np.float32))


def test_lookups_are_the_int8_tables_bit_for_bit():
    table = q4_0_table(192, 96)
    tiled = tiled_embedding4(table)
    assert isinstance(tiled, TiledEmbedding4) and tiled.shape == (192, 96)
    assert tiled.tiles.nbytes * 2 == table.weight.nbytes
    tokens = jnp.asarray([[0, 63, 64], [191, 100, 5]], jnp.int32)
    np.testing.assert_array_equal(np.asarray(jax.jit(embedding_rows)(tiled, tokens)),
                                  np.asarray(jax.jit(embedding_rows)(table, tokens)))


@pytest.mark.parametrize("rows", [1, 3, 20])  # the panel kernel; 20: prefill, XLA
@pytest.mark.parametrize("int8_x", [False, True])
def test_the_head_multiplies_the_same_values(monkeypatch, rows, int8_x):
    monkeypatch.setattr(layout, "INT8_ACTIVATIONS", int8_x)
    table = q4_0_table(256, 64)
    x = RNG.normal(size=(rows, 64)).astype(np.float32)
    if int8_x:  # the rounded x (tests/test_int8_activations.py states it)
        from test_int8_activations import rounded_reference
        x64 = rounded_reference(x, 2)
    else:
        x64 = x.astype(np.float64)
    want = x64 @ dequantize(table).astype(np.float64).T
    got = jax.jit(lambda x, t: tied_head(x, t))(jnp.asarray(x), tiled_embedding4(table))
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=2e-5,
                               atol=2e-5 * np.abs(want).max())


@pytest.mark.slow
def test_engines_store_the_table_in_int4_panels_and_decode_its_tokens(monkeypatch):
    from runtime.engine import build_engine
    from runtime.quant4 import TiledWeight4
    from runtime.request import Request
    from test_dtype_ladder import assert_decode_equals_prefill, ladder, prompt_for
    config = tiny_config(num_layers=2, num_experts=0, num_selected_experts=0, emb_size=64,
                         key_size=16, intermediate_size=128)
    params = random_params(config, seed=19, scale=0.3)
    assert "language_model/unembed" not in params  # tied: the table is the head
    params["language_model/in_out_embed"]["embeddings"] = q4_0_table(config.vocab_size, 64)
    params[LAYER + "mlp/linear"] = {"w": quantize_int4(params[LAYER + "mlp/linear"]["w"], 32)}

    def engine(int4_table: bool, slots: int = 1):
        monkeypatch.setattr(layout, "INT4_TABLE_IN_PANELS", int4_table)
        return build_engine(config, params, single_device_mesh(), slots=slots, cache_length=48)

    requests = [Request((5, 6, 7), max_new_tokens=8), Request(tuple(range(3, 12)),
                                                             max_new_tokens=6)]
    tokens = {}
    for int4_table in (True, False):
        built = engine(int4_table)
        table = built.params["language_model/in_out_embed"]["embeddings"]
        assert isinstance(table, TiledEmbedding4) == int4_table, type(table)
        tokens[int4_table] = [c.output_ids for r in requests for c in built.generate([r])]
    assert tokens[True] == tokens[False]
    built = engine(True, slots=2)
    assert isinstance(built.params[LAYER + "mlp/linear"]["w"], TiledWeight4)  # in panels
    prompts = [prompt_for(config, seed) for seed in range(2)]
    decoded, prefilled, _ = ladder(built, prompts, slot=1)
    assert_decode_equals_prefill(decoded, prefilled, "float32")
