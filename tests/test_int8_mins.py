"""Int8 weights with mins (int8_mins.py): GGUF's asymmetric types (Q5_K, Q5_1; Q4_K and Q4_1
where they load as int8) hold their file's own values, scale * q + min, and every product
adds the mins' term to its codes' product: each stored form of a weight and of a table, every
engine layout, float32 and bf16 activations and int8 ones, MoE experts, 8 devices."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import LAYER, run_on_8_devices, single_device_mesh
from test_layer_types import HF3, MOE, _engine_logits, _q4_k_m_file

import runtime.cpu_kernels as cpu_kernels
from runtime import layout
from runtime.checkpoint.load import default_config, load_params, load_params_on_mesh
from runtime.layer_types import LayersByType
from runtime.products import linear, linears, per_tile_linear
from runtime.quant import (LayerOfStack, QuantizedEmbedding, QuantizedWeight8bit, dequantize,
                           tiled, tiled_embedding, transposed, with_row_scales)
from runtime.super_scales import is_super_scaled
from runtime.tables import embedding_rows, tied_head

I, O, GROUP = 128, 192, 32


def _asymmetric(shape, rng, group=GROUP) -> QuantizedWeight8bit:
    """Q5_K-like int8 [..., I, O]: codes 0..31, float32 scales and (negative) mins per group
    whose term is as large as the codes' (so a product that drops it is far off)."""
    *lead, rows, out = shape
    groups = (*lead, rows // group, out)
    return QuantizedWeight8bit(jnp.asarray(rng.integers(0, 32, shape), jnp.int8),
                               jnp.asarray(rng.uniform(1e-3, 2e-3, groups), jnp.float32),
                               jnp.asarray(-rng.uniform(0, 0.03, groups), jnp.float32))


def _close(got, want, dtype, label=""):
    error = np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max()
    assert error < {"float32": 2e-6, "bfloat16": 1e-2, "int8_x": 2e-2}[dtype], (label, error)


def _forms(w: QuantizedWeight8bit) -> dict:
    """The stored forms of one weight [I, O] an engine's layouts use (layer views of stacks
    included)."""
    stack = jax.tree.map(lambda a: jnp.stack([a * 0, a]), w)
    return {"as read": w, "panels": tiled(w), "transposed": transposed(w),
            "view of a stack": LayerOfStack(stack, jnp.int32(1)),
            "view of panels": LayerOfStack(tiled(stack), jnp.int32(1))}


@pytest.mark.parametrize("group", [GROUP, I, 16])  # R = 4, 1 and 8 scale row blocks
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8_x"])
@pytest.mark.parametrize("rows", [1, 4, 40])
def test_every_form_of_a_weight_adds_its_mins(dtype, rows, group, monkeypatch):
    rng = np.random.default_rng(rows)
    w = _asymmetric((I, O), rng, group)
    monkeypatch.setattr(layout, "INT8_ACTIVATIONS", dtype == "int8_x")
    x = jnp.asarray(rng.normal(0, 1, (rows, I)), jnp.bfloat16 if dtype == "bfloat16"
                    else jnp.float32)
    want = np.asarray(x, np.float64) @ dequantize(w)
    for name, form in _forms(w).items():
        got = jax.jit(lambda x, w: linear(x, w, jnp.float32))(x, form)
        _close(got, want, dtype, name)
    # the products of one x in one kernel call (query, key and value)
    others = [_asymmetric((I, O), rng, group) for _ in range(2)]
    for got, weight in zip(jax.jit(lambda x, ws: linears(x, ws, jnp.float32))(
            x, [tiled(v) for v in [w, *others]]), [w, *others]):
        _close(got, np.asarray(x, np.float64) @ dequantize(weight), dtype)


def test_expert_tiles_add_their_mins():
    rng = np.random.default_rng(3)
    w = _asymmetric((3, I, O), rng)  # [N, I, O]: a tile's expert each
    x = jnp.asarray(rng.normal(0, 1, (3, 2, I)), jnp.float32)
    want = np.einsum("nti,nio->nto", np.asarray(x, np.float64), dequantize(w))
    _close(jax.jit(per_tile_linear)(x, w), want, "float32")


@pytest.mark.parametrize("rows", [1, 6])
def test_tables_with_mins_look_up_and_head_exactly(rows):
    """A Q4_K-like table [V, D] (codes 0..15, scales and mins [R, V]): its rows are its own
    values; its tied head, as read, with row scales (the CPU kernel's) and in panels, is x
    times the table transposed."""
    rng = np.random.default_rng(rows)
    head = _asymmetric((64, 256), rng, group=32)  # [D, V]
    table = QuantizedEmbedding(head.weight.T, head.scales, head.mins)
    values = dequantize(table)  # [V, D]
    tokens = jnp.asarray(rng.integers(0, 256, (2, 5)))
    for form in (table, tiled_embedding(table)):
        np.testing.assert_allclose(np.asarray(jax.jit(embedding_rows)(form, tokens)),
                                   values[np.asarray(tokens)], rtol=1e-6, atol=1e-7)
    x = jnp.asarray(rng.normal(0, 1, (rows, 64)), jnp.float32)
    for form in (table, with_row_scales(table), tiled_embedding(table)):
        _close(jax.jit(tied_head)(x, form), np.asarray(x, np.float64) @ values.T, "float32")


def _q5_k_like(shape, rng) -> QuantizedWeight8bit:
    """_asymmetric's codes with Q5_K's tables: d * sc and -dmin * m per group of 32 rows, d
    and dmin f16 per 8 groups, sc and m 6-bit (as the GGUF reader loads them)."""
    *lead, rows, out = shape
    supers = (*lead, rows // GROUP // 8, 1, out)
    d, dmin = (rng.uniform(2e-5, 4e-5, supers).astype(np.float16).astype(np.float32)
               for _ in range(2))
    sc, m = (rng.integers(0, 64, (*lead, rows // GROUP // 8, 8, out)) for _ in range(2))
    groups = (*lead, rows // GROUP, out)
    return QuantizedWeight8bit(jnp.asarray(rng.integers(0, 32, shape), jnp.int8),
                               jnp.asarray((d * sc).reshape(groups), jnp.float32),
                               jnp.asarray(-(dmin * m).reshape(groups), jnp.float32))


@pytest.mark.parametrize("rows", [1, 4, 40])
def test_q5_k_tables_in_panels_are_super_scaled_and_give_the_same_products(rows):
    """A one-device CPU engine holds Q5_K's scales and mins in panels in the file's two-level
    form (super_scales.py: 1.25 bytes a group and column, not 4): the kernel's products equal
    those over the float32 tables bit for bit, XLA's (untiled) within float32 rounding."""
    from runtime.models.stored_weights import super_scaled_tables
    from runtime.quant import untiled
    rng = np.random.default_rng(rows)
    plain = tiled(_q5_k_like((2, 512, O), rng))  # a stack of two layers
    compact = super_scaled_tables({"m": {"w": plain}})["m"]["w"]
    assert is_super_scaled(compact.scales) and is_super_scaled(compact.mins)
    assert compact.mins.nbytes * 3 < plain.mins.nbytes
    x = jnp.asarray(rng.normal(0, 1, (rows, 512)), jnp.float32)
    product = jax.jit(lambda x, w: linear(x, w, jnp.float32))
    for layer in range(2):
        want = product(x, LayerOfStack(plain, jnp.int32(layer)))
        np.testing.assert_array_equal(product(x, LayerOfStack(compact, jnp.int32(layer))), want)
        _close(product(x, jax.tree.map(lambda a: a[layer], untiled(compact))),
               np.asarray(x, np.float64) @ dequantize(jax.tree.map(lambda a: a[layer],
                                                                   untiled(plain))), "float32")


# ---- a Q5_K_M-like model ---------------------------------------------------------------------
# llama.cpp's Q5_K_M: Q5_K, with Q6_K in some layers' attn_v / ffn_down; Q5_1 where a row is
# not a whole super-block (SmolLM-135M's 576); here a Q4_K table, a Q5_K head.
Q5_K_M = {"blk.0.attn_v": "Q6_K", "blk.2.attn_v": "Q6_K", "blk.0.ffn_down": "Q6_K",
          "blk.2.ffn_down": "Q6_K", "blk.0.ffn_down_exps": "Q6_K", "blk.2.ffn_down_exps": "Q6_K",
          "token_embd": "Q4_K", "blk.0.ffn_up": "Q5_1", "blk.1.ffn_up": "Q5_1",
          "blk.2.ffn_up": "Q8_0"}


def _q5_k_m_file(folder: Path, hf: dict, seed: int):
    """(a Q5_K_M-like GGUF of the K-quant model of `hf`, an F32 GGUF of gguf-py's values)."""
    return _q4_k_m_file(folder, hf, seed, Q5_K_M, "Q5_K", "q5_k_m")


@pytest.fixture(scope="module")
def q5_k_m_files(tmp_path_factory):
    return _q5_k_m_file(tmp_path_factory.mktemp("q5_k_m"), HF3, seed=7)


@pytest.mark.slow  # engines over the GGUF model: in the full suite
@pytest.mark.skipif(not cpu_kernels.available(), reason="no C++ compiler")
def test_engines_over_a_q5_k_m_file_give_the_float_models_logits(q5_k_m_files, monkeypatch):
    """Every weight loads as the file's values (Q5_K and Q5_1 with mins, attn_v / ffn_down
    one stack per type, the table with mins); engines scanned (3 slots, layer views), unrolled
    (1 slot), a plain scan (the typed stacks merged, with mins), float32 and bf16 and int8
    activations: float32 prefill logits equal the float model's within 1e-5, decode logits
    equal prefill logits."""
    from test_dtype_ladder import assert_decode_equals_prefill
    path, floats = q5_k_m_files
    config = default_config(path)
    params = load_params_on_mesh(path, config, single_device_mesh())
    query = params[LAYER + "multi_head_attention/query"]["w"]
    assert isinstance(query, QuantizedWeight8bit) and query.mins.dtype == np.float32
    assert params[LAYER + "mlp/linear_v"]["w"].mins.dtype == np.float16  # Q5_1 (and Q8_0)
    value = params[LAYER + "multi_head_attention/value"]["w"]
    assert isinstance(value, LayersByType) and [s.mins is None for s in value.stacks] == \
        [False, True]  # Q5_K, Q6_K
    assert params["language_model/in_out_embed"]["embeddings"].mins is not None
    reference = _engine_logits(config, load_params(floats, config), 1, True)[0]
    cases = [(3, False, "float32", {}), (1, True, "float32", {}), (3, False, "bfloat16", {}),
             (3, False, "float32", {"TILED_WEIGHTS": False})]
    for slots, unroll, dtype, patches in cases:
        with monkeypatch.context() as patched:
            for name, setting in patches.items():
                patched.setattr(layout, name, setting)
            logits, (decoded, prefilled, _), engine = _engine_logits(config, params, slots,
                                                                     unroll, dtype)
        assert engine.layout.unrolled == unroll
        if not unroll and not patches:  # panels: Q5_K's tables in their two-level form
            query = engine.params[LAYER + "multi_head_attention/query"]["w"]
            assert is_super_scaled(query.scales) and is_super_scaled(query.mins)
        assert_decode_equals_prefill(decoded, prefilled, dtype)
        if dtype == "float32":
            error = np.abs(logits - reference).max() / np.abs(reference).max()
            assert error < 1e-5, (slots, unroll, patches, error)
    # int8 activations (the panel kernels add the mins' term): within 5% of the float model.
    # Decode and prefill round the same x alike, but their attention differs in the last
    # float bits, which can move an activation across a rounding boundary (one int8 step of
    # one input: here up to 0.3% of the largest logit), so they agree to 1%, not to float32's.
    monkeypatch.setattr(layout, "INT8_ACTIVATIONS", True)
    logits, (decoded, prefilled, _), _ = _engine_logits(config, params, 3, False)
    scale = np.abs(reference).max()
    assert np.abs(logits - reference).max() < 0.05 * scale
    assert np.abs(decoded - prefilled).max() < 0.01 * scale


@pytest.mark.slow  # two MoE engines: in the full suite
@pytest.mark.skipif(not cpu_kernels.available(), reason="no C++ compiler")
def test_moe_experts_with_mins(tmp_path):
    """Q5_K expert stacks (Q6_K in two layers' ffn_down_exps): unrolled and scanned engines
    give the float model's logits of the file's values; decode equals prefill."""
    from test_dtype_ladder import assert_decode_equals_prefill
    path, floats = _q5_k_m_file(tmp_path, MOE, seed=8)
    config = default_config(path)
    params = load_params_on_mesh(path, config, single_device_mesh())
    assert params[LAYER + "moe/linear"]["w"].mins is not None
    reference = _engine_logits(config, load_params(floats, config), 3, False)[0]
    for slots, unroll in ((1, None), (3, False)):
        logits, (decoded, prefilled, _), _ = _engine_logits(config, params, slots, unroll)
        assert_decode_equals_prefill(decoded, prefilled, "float32")
        error = np.abs(logits - reference).max() / np.abs(reference).max()
        assert error < 1e-5, (slots, unroll, error)


@pytest.mark.slow  # a subprocess on 8 simulated devices: in the full suite
def test_q5_k_m_on_a_mesh(q5_k_m_files):
    """tests/layer_types_on_8_devices.py over the Q5_K_M-like file: mins sharded as their
    scales, KV heads (and their mins) copied; unrolled and scanned (merged with mins), the
    float model's logits."""
    path, floats = q5_k_m_files
    last = run_on_8_devices(Path(__file__).parent / "layer_types_on_8_devices.py",
                            Path(__file__).parent, path, floats, timeout=600)
    assert last.startswith("ok "), last


def test_the_native_format_refuses_int8_with_mins(tmp_path):
    """The native format stores no mins: a weight with them is refused by name, not written
    without them."""
    from conftest import ROOT
    from runtime.checkpoint.hf_config import read_hf_config
    from runtime.checkpoint.native import write_native
    from runtime.errors import CheckpointError
    fixture = ROOT / "tests" / "fixtures" / "hf" / "llama3"
    config = read_hf_config(fixture)
    params = load_params(fixture, config, "int8", int8_group_size=16)
    query = params[LAYER + "multi_head_attention/query"]["w"]
    params[LAYER + "multi_head_attention/query"]["w"] = QuantizedWeight8bit(
        query.weight, query.scales, np.zeros_like(query.scales))
    with pytest.raises(CheckpointError, match=r"^[^\n]*multi_head_attention/query/w: int8 with "
                                              r"mins \(GGUF [^\n]*\) has no stored form"):
        write_native(params, tmp_path, config)
    assert not list(tmp_path.iterdir())  # nothing written
