"""A checkpoint's 2-byte float weights (F16 / BF16) kept as stored in panels on the CPU: the
panel kernel widens them as it reads them (exact), so products equal the float64 product of
the 2-byte weight within float32 rounding for every row count, at a stack's layer and in the
tied table; the loader keeps matmul weights and the tied table 2-byte where engines put them
in panels; engines decode the tokens of engines given the same weights widened to float32,
decode logits equal prefill logits, and whatever no panel takes is widened at engine build."""

import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from conftest import ROOT, leaf_kinds, panel_engine_outputs, random_params, single_device_mesh, \
    tiny_config

import runtime.cpu_kernels as cpu_kernels
from runtime.products import linear
from runtime.tables import embedding_rows, tied_head
from runtime.quant import LayerOfStack, TiledEmbedding, TiledWeight, tiled, tiled_embedding

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="no C++ compiler")
RNG = np.random.default_rng(33)
TWO_BYTES = [np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16)]
PANEL_SHAPES = {"emb_size": 64, "key_size": 16, "intermediate_size": 128}


def _close(got, want, scale=None):
    scale = np.abs(want).max() if scale is None else scale
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=2e-5, atol=2e-5 * scale)


@pytest.mark.parametrize("dtype", TWO_BYTES, ids=str)
@pytest.mark.parametrize("rows", [1, 2, 6, 7, 13, 67])  # six at a time; past 12: many rows
@pytest.mark.parametrize("inputs,outputs", [(576, 1536), (96, 192), (8, 64)])
def test_two_byte_panels_give_the_product(dtype, rows, inputs, outputs):
    w = RNG.normal(size=(inputs, outputs)).astype(dtype)
    x = jnp.asarray(RNG.normal(size=(rows, inputs)).astype(np.float32))
    t = tiled(jnp.asarray(w))
    assert t.tiles.dtype == dtype  # kept 2-byte in its panels
    got = jax.jit(lambda x: cpu_kernels.tiled_linear(x, t.tiles, None))(x)
    _close(got, np.asarray(x, np.float64) @ w.astype(np.float64))
    if rows <= 4 or rows > 12:  # the float32 panels' loop too: the same sums, bit for bit
        wide = tiled(jnp.asarray(w.astype(np.float32)))
        np.testing.assert_array_equal(np.asarray(got), np.asarray(jax.jit(
            lambda x: cpu_kernels.tiled_linear(x, wide.tiles, None))(x)))


@pytest.mark.parametrize("dtype", TWO_BYTES, ids=str)
def test_stacks_and_tables_of_two_byte_floats(dtype):
    """A stack [L, I, O] read at its layer (scanned layers), prompt rows past the kernel's cap,
    and a tied table [V, D]: its rows widened exactly, its head the float64 product."""
    stack = RNG.normal(size=(3, 64, 128)).astype(dtype)
    x = jnp.asarray(RNG.normal(size=(2, 64)).astype(np.float32))
    view = jax.jit(lambda x, i: linear(x, LayerOfStack(tiled(jnp.asarray(stack)), i)))
    for layer in range(3):
        want = np.asarray(x, np.float64) @ stack[layer].astype(np.float64)
        _close(view(x, jnp.int32(layer)), want)
    for rows in (600,):  # past layout.PANEL_MAX_ROWS: XLA's product of the untiled weight
        x = jnp.asarray(RNG.normal(size=(rows, 64)).astype(np.float32))
        got = jax.jit(lambda x: linear(x, tiled(jnp.asarray(stack[0]))))(x)
        assert got.dtype == jnp.float32
        _close(got, np.asarray(x, np.float64) @ stack[0].astype(np.float64))
    table = RNG.normal(size=(128, 64)).astype(dtype)  # [V, D]
    stored = tiled_embedding(jnp.asarray(table))
    assert isinstance(stored, TiledEmbedding) and stored.tiles.dtype == dtype
    tokens = jnp.asarray([[0, 17, 127], [64, 64, 63]])
    rows = np.asarray(jax.jit(embedding_rows)(stored, tokens))
    assert rows.dtype == np.float32
    np.testing.assert_array_equal(rows, table.astype(np.float32)[np.asarray(tokens)])
    for count in (1, 3, 20):
        x = jnp.asarray(RNG.normal(size=(count, 64)).astype(np.float32))
        want = np.asarray(x, np.float64) @ table.T.astype(np.float64)
        _close(jax.jit(tied_head)(x, stored), want)


def _two_byte_params(config, dtype, seed):
    """Parameters as the loader keeps them for panels: matmul weights and the embedding table in
    `dtype`, the rest (norms) widened to float32; and the float32 widening of all."""
    from runtime.paths import EMBEDDINGS, quantized_kind
    params = random_params(config, seed=seed, scale=0.3)
    kept = lambda path: quantized_kind(path, config) or path == "/".join(EMBEDDINGS)  # noqa
    narrow = {module: {name: np.asarray(leaf).astype(dtype)
                       if kept(f"{module}/{name}") else np.asarray(leaf)
                       for name, leaf in leaves.items()} for module, leaves in params.items()}
    wide = jax.tree.map(lambda a: a.astype(np.float32), narrow)
    return narrow, wide


@pytest.mark.slow
@pytest.mark.parametrize("dtype", TWO_BYTES, ids=str)
def test_engines_of_two_byte_weights_decode_the_widened_tokens(monkeypatch, dtype):
    """Dense (tied table) and MoE models, one slot scanned and unrolled and three slots (the
    dense model's in float16, the MoE's in bf16; the other model one slot scanned): the
    2-byte weights stay 2-byte in their panels, nothing else stays 2-byte, and the greedy
    tokens are those of the float32 widening; with panels off, the engine widens them all."""
    from runtime import layout

    all_layouts = ((1, False), (1, True), (3, False))
    for moe in (False, True):
        config = tiny_config(num_layers=2, tie_embeddings=not moe, **PANEL_SHAPES,
                             **({} if moe else {"num_experts": 0, "num_selected_experts": 0}))
        narrow, wide = _two_byte_params(config, dtype, seed=9)
        # float32 greedy tokens do not depend on the layout (test_tiled_weights): one widened
        # engine gives every layout's tokens
        want, _ = panel_engine_outputs(config, wide, 1, False, "float32", True)
        every_layout = moe == (dtype == ml_dtypes.bfloat16)
        for slots, unroll in all_layouts if every_layout else all_layouts[:1]:
            got, engine = panel_engine_outputs(config, narrow, slots, unroll, "float32", True)
            assert got == want, (moe, slots, unroll)
            tiles = [leaf for leaf in jax.tree.leaves(engine.params, is_leaf=lambda a:
                                                      isinstance(a, TiledWeight))
                     if isinstance(leaf, TiledWeight)]
            assert tiles and all(t.tiles.dtype == dtype for t in tiles if t.scales is None), (
                moe, slots, unroll, [(type(t).__name__, t.tiles.dtype) for t in tiles])
            assert not [leaf for leaf in jax.tree.leaves(engine.params)
                        if leaf.dtype == dtype and leaf.ndim < 2]  # norms widened
        monkeypatch.setattr(layout, "TILED_WEIGHTS", False)
        got, engine = panel_engine_outputs(config, narrow, 1, False, "float32", False)
        assert "TiledWeight" not in leaf_kinds(engine.params, TiledWeight)
        assert all(leaf.dtype != dtype for leaf in jax.tree.leaves(engine.params))
        assert got == want
        monkeypatch.setattr(layout, "TILED_WEIGHTS", True)


@pytest.mark.parametrize("dtype", TWO_BYTES, ids=str)
def test_decode_logits_of_two_byte_panels_equal_their_prefill_logits(dtype):
    from test_dtype_ladder import assert_decode_equals_prefill, ladder, prompt_for
    from runtime.engine import build_engine

    config = tiny_config(num_layers=2, tie_embeddings=True, num_experts=0,
                         num_selected_experts=0, **PANEL_SHAPES)
    narrow, _ = _two_byte_params(config, dtype, seed=10)
    engine = build_engine(config, narrow, single_device_mesh(), slots=2, cache_length=48)
    assert engine.layout.tiled == "all"
    prompts = [prompt_for(config, seed) for seed in range(2)]
    decoded, prefilled, _ = ladder(engine, prompts, slot=1)
    assert_decode_equals_prefill(decoded, prefilled, "float32")


def test_the_loader_keeps_matmul_weights_and_the_table_two_byte(tmp_path):
    """An F16 GGUF read widened to float32 with keep_matmul_floats: matmul weights and the tied
    table stay F16 as stored, the norms are widened; without it, everything is float32."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import bench_llamacpp
    from runtime.checkpoint.load import default_config, load_params_on_mesh

    hf = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True)
    path = tmp_path / "m-F16.gguf"
    bench_llamacpp.write_random_gguf(path, hf, "F16")
    config = default_config(path)
    mesh = single_device_mesh()
    kept = load_params_on_mesh(path, config, mesh, widen_floats_to=np.float32,
                               keep_matmul_floats=True)
    dtypes = {f"{m}/{n}": np.dtype(leaf.dtype) for m, leaves in kept.items()
              for n, leaf in leaves.items()}
    assert dtypes["language_model/in_out_embed/embeddings"] == np.float16
    assert any(k.endswith("/mlp/linear/w") and d == np.float16 for k, d in dtypes.items())
    assert all(d == np.float32 for k, d in dtypes.items() if "norm" in k)
    widened = load_params_on_mesh(path, config, mesh, widen_floats_to=np.float32)
    assert {np.dtype(leaf.dtype) for leaf in jax.tree.leaves(widened)} == {np.dtype(np.float32)}


@pytest.mark.parametrize("dtype", TWO_BYTES, ids=str)
def test_two_byte_weights_beside_int8_ones_and_under_bf16_activations(dtype):
    """int8 weights (1 and 8 scale row blocks, bf16 scales) beside 2-byte ones under float32
    activations: their scales stay as stored while the 2-byte weights go into panels, and the
    tokens are those of the float32 widening. Under bf16 activations the 2-byte float weights
    stay out of the panels (the float kernels take float32 x only), as before."""
    from runtime.quant import QuantizedWeight8bit, quantize

    config = tiny_config(num_layers=2, tie_embeddings=True, num_experts=0,
                         num_selected_experts=0, **PANEL_SHAPES)
    narrow, wide = _two_byte_params(config, dtype, seed=11)
    layer = "language_model/transformer/layers/decoder_layer/"
    for name, blocks in (("mlp/linear_1", 1), ("multi_head_attention/linear", 8)):
        weight = quantize(wide[layer + name]["w"], blocks, scale_dtype=ml_dtypes.bfloat16)
        narrow[layer + name] = wide[layer + name] = {"w": weight}
    got, engine = panel_engine_outputs(config, narrow, 1, False, "float32", True)
    assert got == panel_engine_outputs(config, wide, 1, False, "float32", True)[0]
    kinds = jax.tree.leaves(engine.params, is_leaf=lambda a: isinstance(a, TiledWeight))
    int8 = [t for t in kinds if isinstance(t, TiledWeight) and t.tiles.dtype == jnp.int8]
    assert len(int8) == 2 and all(t.scales.dtype == ml_dtypes.bfloat16 for t in int8)
    assert any(isinstance(t, TiledWeight) and t.tiles.dtype == dtype for t in kinds)
    bf16 = jax.tree.map(lambda a: a.astype(ml_dtypes.bfloat16) if a.dtype == dtype else a, narrow)
    got, engine = panel_engine_outputs(config, bf16, 1, False, "bfloat16", True)
    assert got and engine.layout.tiled == "quantized"
    assert not [t for t in jax.tree.leaves(engine.params, is_leaf=lambda a: isinstance(
        a, TiledWeight)) if isinstance(t, TiledWeight) and t.tiles.dtype != jnp.int8]
    assert not isinstance(engine.params[layer + "mlp/linear"]["w"], QuantizedWeight8bit)
