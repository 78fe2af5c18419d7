"""Group-wise int8 (--quantize int8 --int8-group-size N) and the int8 tied embedding table.

Every product path an int8 weight with many scale row blocks can take is checked against the
numpy product with the dequantised weight: few rows (float32 partials per block), many rows
(the dequantised weight, exact: float32, or two bf16 halves), the CPU's widening loop over
blocks spanning several groups, the transposed layout, and per-tile expert products.
"""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from conftest import ROOT
from runtime import int8_widening, products
from runtime.checkpoint.hf_config import read_hf_config
from runtime.checkpoint.load import load_params, load_params_on_mesh
from runtime.checkpoint.native import write_native
from runtime.config import DEFAULT_INT8_GROUP_SIZE
from runtime.products import linear, per_tile_linear
from runtime.tables import embedding_rows, tied_head
from runtime.quant import (QuantizedEmbedding, QuantizedWeight8bit, dequantize,
                           quantize_embedding, quantize_grouped, row_blocks_for, transposed)
from runtime.sharding import make_mesh

RNG = np.random.default_rng(3)
FIXTURES = ROOT / "tests" / "fixtures" / "hf"


def test_row_blocks_for_groups_of_at_most_n_rows():
    assert row_blocks_for(4096, 64) == 64 and row_blocks_for(14336, 64) == 224
    assert row_blocks_for(576, 128) == 6  # 4.5 groups of 128 do not divide: 6 of 96 rows
    assert row_blocks_for(100, 64) == 2 and row_blocks_for(7, 2) == 7
    assert row_blocks_for(4096, 0) == row_blocks_for(64, 64) == row_blocks_for(8, 100) == 1
    with pytest.raises(ValueError, match="group size"):
        row_blocks_for(64, -1)


def test_groups_beat_one_scale_per_channel_on_an_outlier_row():
    """One large input row forces a per-channel scale up for every column; groups confine it."""
    w = RNG.normal(size=(256, 32)).astype(np.float32)
    w[7] *= 40.0
    per_channel = np.abs(dequantize(quantize_grouped(w, 0)) - w)[64:].mean()
    grouped = np.abs(dequantize(quantize_grouped(w, 64)) - w)[64:].mean()
    assert grouped < per_channel / 8  # measured 11x


def _close(got, want, dtype):
    """Float32 outputs: float32 rounding-order noise only (activations are exact in dtype)."""
    got = np.asarray(got, np.float32)
    limit = 2e-6 * np.abs(want).max() * (1 if dtype == jnp.float32 else 2)
    assert np.abs(got - want).max() <= limit, (np.abs(got - want).max(), limit)


def _inputs(shape, dtype):
    x = jnp.asarray(RNG.normal(size=shape), dtype)
    return x, np.asarray(x.astype(jnp.float32))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("rows,partials_max", [(3, None), (40, 0)])
def test_grouped_products_equal_the_dequantised_product(dtype, rows, partials_max, monkeypatch):
    """Few rows: per-block float32 partials; with PARTIALS_MAX_BYTES at 0 every product
    dequantises its weight instead (the path of long prefills)."""
    if partials_max is not None:
        monkeypatch.setattr(products, "PARTIALS_MAX_BYTES", partials_max)
    q = quantize_grouped(RNG.normal(size=(192, 40)), 16)  # R = 12
    x, xf = _inputs((rows, 192), dtype)
    product = jax.jit(lambda x, w: linear(x, w, jnp.float32))
    _close(product(x, q), xf @ dequantize(q), dtype)
    _close(product(x, transposed(q)), xf @ dequantize(q), dtype)
    experts = quantize_grouped(RNG.normal(size=(3, 192, 40)), 16)
    tiles, tiles_f = _inputs((3, rows, 192), jnp.float32)
    _close(jax.jit(lambda x, w: per_tile_linear(x, w))(tiles, experts),
           np.einsum("nti,nio->nto", tiles_f, dequantize(experts)), jnp.float32)


def test_the_two_bf16_halves_of_a_dequantised_weight_are_exact():
    """q * s (<= 15 significant bits) = its bf16 rounding + a bf16 remainder, exactly: the
    accelerators' bf16 path of _dequantised_product (the CPU takes the float32 one)."""
    q = quantize_grouped(RNG.normal(size=(128, 24)), 32)
    x, xf = _inputs((5, 128), jnp.bfloat16)
    got = products._dequantised_product("...ri,rio->...ro", x,
                                        q.weight.reshape(q.row_blocks, -1, 24), q.scales[:, None, :])
    _close(got, xf @ dequantize(q), jnp.bfloat16)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("rows", [1, 2])
def test_cpu_widening_loop_spans_several_groups(dtype, rows):
    """A decode-sized product of a weight above WIDEN_BLOCK_BYTES widens blocks of whole groups
    (one row: per-group partial sums; more: dequantised exactly in float32), not one 64-row
    group per loop step."""
    rows_in, out = 1024, 2048  # 8 MB in float32: two widening blocks of 512 rows
    q = quantize_grouped(RNG.normal(size=(rows_in, out)), 64)
    assert int8_widening.widening_block_rows(rows_in, out, q.row_blocks) == 512
    assert products._int8_decode_product_on_cpu(jnp.zeros((2, rows_in)), q)
    x, xf = _inputs((rows, rows_in), dtype)
    _close(jax.jit(lambda x, w: linear(x, w, jnp.float32))(x, q), xf @ dequantize(q), dtype)


@pytest.mark.parametrize("group,block_rows", [(0, None), (16, None), (16, 7)])
def test_int8_embedding_rows_and_tied_head(group, block_rows, monkeypatch):
    """block_rows: the CPU head's widening loop in blocks of 7 of the 50 vocab rows (7 blocks
    and a last one of 1), else all in one block."""
    if block_rows:
        monkeypatch.setattr(int8_widening, "WIDEN_BLOCK_BYTES", block_rows * 48 * 4)
    table = RNG.normal(size=(50, 48)).astype(np.float32)
    q = quantize_embedding(table, group)
    assert isinstance(q, QuantizedEmbedding) and q.weight.shape == (50, 48)
    assert q.scales.shape == (row_blocks_for(48, group), 50)
    dense = dequantize(q)
    assert np.abs(dense - table).max() <= np.abs(table).max() / 127
    tokens = np.array([[0, 49, 7], [7, 3, 3]])
    np.testing.assert_array_equal(np.asarray(embedding_rows(q, jnp.asarray(tokens))), dense[tokens])
    for dtype in (jnp.float32, jnp.bfloat16):
        for rows in ((2, 3), (70,)):  # the CPU's decode loop; a plain product past 64 rows
            x, xf = _inputs((*rows, 48), dtype)
            _close(jax.jit(lambda x, q: tied_head(x, q))(x, q), xf @ dense.T, dtype)


def test_load_quantizes_groups_and_the_tied_table_and_the_converter_keeps_them(tmp_path):
    """--quantize int8 on a tied Llama-3 fixture: every matmul weight in groups, the table a
    QuantizedEmbedding; the native file written from it reads back the same leaves, eagerly
    and lazily, and the lazy quantising reader gives what the eager one gives."""
    config = read_hf_config(FIXTURES / "llama3")
    assert config.tie_embeddings
    eager = load_params(FIXTURES / "llama3", config, "int8", int8_group_size=16)
    table = eager["language_model/in_out_embed"]["embeddings"]
    assert isinstance(table, QuantizedEmbedding)
    query = eager["language_model/transformer/layers/decoder_layer/multi_head_attention/query"]["w"]
    assert isinstance(query, QuantizedWeight8bit)
    assert query.scales.shape[-2] == row_blocks_for(config.emb_size, 16) > 1
    mesh = make_mesh({"data": 1, "model": 1})
    lazy = load_params_on_mesh(FIXTURES / "llama3", config, mesh, "int8", int8_group_size=16)
    write_native(eager, tmp_path, config)
    native = load_params(tmp_path, config)
    native_lazy = load_params_on_mesh(tmp_path, config, mesh)
    for other in (lazy, native, native_lazy):
        assert jax.tree.structure(other, is_leaf=lambda x: isinstance(x, QuantizedWeight8bit)) \
            == jax.tree.structure(eager, is_leaf=lambda x: isinstance(x, QuantizedWeight8bit))
        assert isinstance(other["language_model/in_out_embed"]["embeddings"], QuantizedEmbedding)
        for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(other)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert DEFAULT_INT8_GROUP_SIZE > 0


def test_a_bad_quantized_table_is_named(tmp_path):
    config = read_hf_config(FIXTURES / "llama3")
    params = load_params(FIXTURES / "llama3", config, "int8", int8_group_size=16)
    table = params["language_model/in_out_embed"]["embeddings"]
    params["language_model/in_out_embed"]["embeddings"] = QuantizedEmbedding(
        table.weight, np.ones((5, table.weight.shape[0]), ml_dtypes.bfloat16))
    from runtime.errors import CheckpointError
    with pytest.raises(CheckpointError, match=r"in_out_embed/embeddings: scales \[5, \d+\] do not "
                                              r"fit the table"):
        write_native(params, tmp_path, config)


def test_the_group_size_flag_refuses_a_negative_size(capsys):
    from runtime import cli
    assert cli.parse_args(["--int8-group-size", "32"]).int8_group_size == 32
    assert cli.parse_args([]).int8_group_size == DEFAULT_INT8_GROUP_SIZE
    with pytest.raises(SystemExit):
        cli.parse_args(["--int8-group-size", "-1"])
    assert "argument --int8-group-size: expected 0" in capsys.readouterr().err
