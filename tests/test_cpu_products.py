"""The CPU-only ways products are computed (products.py, int8_widening.py; the rules in layout.py), and bf16 weights widened at load.

XLA:CPU widens a weight whose dtype its matmul kernel lacks into a temporary float32 copy;
these paths exist so that no such whole-weight copy is made per step. Each test checks the
values against the dequantised product and, on a real-sized weight, that the compiled program's
temporaries stay well below one float32 copy of the weight (and exceed it on the plain path,
so that the check can fail).
"""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import runtime.cpu_kernels as cpu_kernels
import runtime.int8_widening as int8_widening
import runtime.layout as layout
from runtime.checkpoint.lazy import LazyParam, widened_lazy
from runtime.config import load_config
from runtime.quant import dequantize, quantize
from runtime.products import linear

RNG = np.random.default_rng(3)


@pytest.fixture(autouse=True)
def xla_products(monkeypatch):
    """These are the XLA forms of the products: the FFI kernels (test_cpu_kernels) kept out."""
    monkeypatch.setattr(cpu_kernels, "usable", lambda *args, **kwargs: False)


def _has_loop(fn, *args) -> bool:
    jaxpr = str(jax.make_jaxpr(fn)(*args))  # a fori_loop with static bounds is a scan
    return "while" in jaxpr or "scan" in jaxpr


def _temp_bytes(fn, *args) -> int:
    traced = jax.jit(lambda *a: fn(*a))  # a new function: jit's cache would keep the old trace
    return traced.lower(*args).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("row_blocks", [1, 4])
@pytest.mark.parametrize("rows", [1, 3])
def test_int8_decode_product_widened_in_blocks_matches_dequantised(monkeypatch, row_blocks,
                                                                    rows):
    q = quantize(RNG.normal(size=(64, 6)), row_blocks)  # [I, O]
    x = RNG.normal(size=(2, rows, 64)).astype(np.float32)  # [B, T, I]
    monkeypatch.setattr(int8_widening, "WIDEN_BLOCK_BYTES", 8 * 6 * 4)  # blocks of 8 rows: 8 blocks
    assert _has_loop(linear, jnp.asarray(x), q)
    np.testing.assert_allclose(linear(jnp.asarray(x), q), x @ dequantize(q), rtol=1e-5,
                               atol=1e-5)


def test_prefill_sized_int8_products_are_not_blocked(monkeypatch):
    q = quantize(RNG.normal(size=(64, 6)))
    monkeypatch.setattr(int8_widening, "WIDEN_BLOCK_BYTES", 8 * 6 * 4)
    x = jnp.asarray(RNG.normal(size=(int8_widening.WIDEN_BLOCKS_MAX_ROWS + 1, 64)), jnp.float32)
    assert not _has_loop(linear, x, q)
    assert _has_loop(linear, x[:int8_widening.WIDEN_BLOCKS_MAX_ROWS], q)


def test_int8_decode_product_holds_no_float32_copy_of_the_weight(monkeypatch):
    inputs, outputs = 1024, 2816  # a Llama-shaped FFN weight; 11.5 MB in float32
    q = quantize(RNG.normal(size=(inputs, outputs)).astype(np.float32))
    x = jnp.ones((1, 1, inputs), jnp.float32)
    widened = inputs * outputs * 4
    assert _temp_bytes(linear, x, q) < widened / 2
    monkeypatch.setattr(layout, "widening_in_blocks", lambda: False)
    assert _temp_bytes(linear, x, q) >= widened  # the plain path: the copy this avoids


def test_single_bf16_row_is_computed_in_bf16_without_a_float32_copy(monkeypatch):
    inputs, outputs = 1024, 2816
    w = jnp.asarray(RNG.normal(size=(inputs, outputs)) / 32, jnp.bfloat16)
    x = jnp.asarray(RNG.normal(size=(1, 1, inputs)), jnp.bfloat16)  # [B, T, I]: one row
    got = np.asarray(linear(x, w, jnp.float32))
    want = np.asarray(x, np.float32) @ np.asarray(w, np.float32)
    assert got.shape == (1, 1, outputs)
    np.testing.assert_allclose(got, want, rtol=2e-2, atol=2e-2)
    widened = inputs * outputs * 4
    assert _temp_bytes(lambda x, w: linear(x, w, jnp.float32), x, w) < widened / 2
    monkeypatch.setattr(layout, "single_bf16_row_doubled", lambda *operands: False)
    assert _temp_bytes(lambda x, w: linear(x, w, jnp.float32), x, w) >= widened


def test_narrow_float_params_are_widened_as_read_and_others_left_alone():
    data = RNG.normal(size=(4, 6)).astype(ml_dtypes.bfloat16)
    lazy = LazyParam(data.shape, data.dtype, lambda index: data[index])
    wide = widened_lazy(lazy, np.float32)
    assert wide.dtype == np.float32 and wide.shape == data.shape
    part = wide.read((slice(1, 3), slice(None)))
    assert part.dtype == np.float32
    np.testing.assert_array_equal(part, data[1:3].astype(np.float32))  # exact: bf16 in f32
    for kept in (np.zeros((2, 2), np.float32), np.zeros((2, 2), np.int8)):
        same = LazyParam(kept.shape, kept.dtype, lambda index, k=kept: k[index])
        assert widened_lazy(same, np.float32) is same


def test_weights_are_widened_on_the_cpu_only_under_float32_activations():
    config = load_config("tiny-test")
    assert layout.widen_floats_at_load(config.replace(dtype="float32")) == np.float32
    assert layout.widen_floats_at_load(config.replace(dtype="bfloat16")) is None


def test_float32_options_are_chosen_per_program():
    from runtime.layout import CPU_FLOAT32_OPTIONS, cpu_float32_options

    moe = load_config("tiny-test").replace(dtype="float32")
    dense = moe.replace(num_experts=0, num_selected_experts=0)
    assert moe.is_moe and not dense.is_moe
    assert cpu_float32_options(dense, "prefill") == CPU_FLOAT32_OPTIONS
    assert cpu_float32_options(dense, "decode") == CPU_FLOAT32_OPTIONS
    assert cpu_float32_options(moe, "decode") == CPU_FLOAT32_OPTIONS
    assert cpu_float32_options(moe, "prefill") is None  # its expert tiles run faster on YNNPACK
    assert cpu_float32_options(dense.replace(dtype="bfloat16"), "prefill") is None
    assert cpu_float32_options(dense.replace(dtype="bfloat16"), "decode") is None


def test_float32_options_take_matmuls_off_ynnpack():
    from runtime.layout import CPU_FLOAT32_OPTIONS

    x, w = jnp.ones((16, 256), jnp.float32), jnp.ones((256, 256), jnp.float32)
    default = jax.jit(lambda x, w: x @ w).lower(x, w).compile().as_text()
    chosen = jax.jit(lambda x, w: x @ w, compiler_options=CPU_FLOAT32_OPTIONS)
    assert "__ynn_fusion" in default  # otherwise the option has nothing left to change
    assert "__ynn_fusion" not in chosen.lower(x, w).compile().as_text()
    np.testing.assert_allclose(chosen(x, w), x @ w)
