"""The FFI products for XLA:CPU (runtime/cpu_kernels.cc, cpu_kernels.py): built on this machine,
equal to the float64 product of the dequantised weight within float32 rounding for every row
count, width tail and scale layout, taken by products.py for decode on one CPU device, and
left alone (XLA's forms) when disabled or when the build fails."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import runtime.cpu_kernels as cpu_kernels
from runtime.products import linear
from runtime.tables import tied_head
from runtime.quant import (QuantizedEmbedding, TransposedWeight, dequantize, quantize,
                           with_row_scales)
from runtime.quant4 import QuantizedWeight4bit

RNG = np.random.default_rng(11)


def _int8(shape, blocks, outputs):
    """Random int8 codes of `shape` and scales [blocks, outputs] in [0.5, 1.5)."""
    weight = RNG.integers(-127, 128, shape, dtype=np.int8)
    return weight, (RNG.random((blocks, outputs)) + 0.5).astype(np.float32)


def _reference(x, weight, scales, transposed):
    """float64 x @ dequantised weight; weight [I, O] or (transposed) [O, I], scales [R, O]."""
    w = weight.T if transposed else weight  # [I, O]
    w = w.astype(np.float64)
    if scales is not None:
        blocks = scales.shape[0]
        w = (w.reshape(blocks, -1, w.shape[1]) * scales[:, None, :]).reshape(w.shape)
    return x.astype(np.float64) @ w


def test_kernels_build_and_register_on_this_machine():
    assert cpu_kernels.available()  # a C++ compiler is part of the CI image, as here


SCALE_DTYPES = [jnp.float32, jnp.float16, jnp.bfloat16]  # read as stored


def _stored(scales, dtype):
    """The scales in `dtype` (what the kernel gets) and as float32 (what the reference uses)."""
    stored = jnp.asarray(scales, dtype)
    return stored, np.asarray(stored, np.float32)


def _check_int8_and_float(x, inputs, outputs, blocks, scale_dtype, transposed):
    """The kernel of this layout against the float64 reference: an int8 weight with its
    scales stored in scale_dtype, then a float32 weight without scales."""
    product = cpu_kernels.transposed_linear if transposed else cpu_kernels.rows_linear
    shape = (outputs, inputs) if transposed else (inputs, outputs)
    weight, scales = _int8(shape, blocks, outputs)
    stored, scales = _stored(scales, scale_dtype)
    floats = RNG.normal(size=shape).astype(np.float32)
    for got, want in ((jax.jit(product)(x, weight, stored),
                       _reference(x, weight, scales, transposed)),
                      (jax.jit(product)(x, floats), _reference(x, floats, None, transposed))):
        np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5,
                                   atol=2e-5 * np.abs(want).max())


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 16])
@pytest.mark.parametrize("inputs,outputs,blocks", [(576, 1536, 9), (64, 37, 1), (96, 200, 3),
                                                   (100, 30, 1), (256, 40, 8),  # rows split
                                                   (8, 300, 1), (12, 520, 4)])  # column chunks
@pytest.mark.parametrize("scale_dtype", SCALE_DTYPES)
def test_row_major_int8_and_float_products(rows, inputs, outputs, blocks, scale_dtype):
    x = RNG.normal(size=(rows, inputs)).astype(np.float32)
    _check_int8_and_float(x, inputs, outputs, blocks, scale_dtype, transposed=False)


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 16])  # float32 from 5 rows: all in registers
@pytest.mark.parametrize("inputs,outputs,blocks", [(576, 1000, 18), (64, 37, 1), (96, 7, 2),
                                                   (40, 13, 1)])  # a tail of 8 inputs
@pytest.mark.parametrize("scale_dtype", SCALE_DTYPES)
def test_transposed_int8_and_float_products(rows, inputs, outputs, blocks, scale_dtype):
    x = RNG.normal(size=(rows, inputs)).astype(np.float32)
    _check_int8_and_float(x, inputs, outputs, blocks, scale_dtype, transposed=True)


def test_kernels_inside_a_scan_over_stacked_weights():
    stacked = RNG.integers(-127, 128, (3, 64, 48), dtype=np.int8)  # [L, I, O]
    scales = (RNG.random((3, 4, 48)) + 0.5).astype(np.float32)  # [L, R, O]
    x = RNG.normal(size=(2, 64)).astype(np.float32)

    def body(carry, layer):
        weight, scale = layer
        return carry, cpu_kernels.rows_linear(x, weight, scale)

    got = jax.jit(lambda w, s: jax.lax.scan(body, None, (w, s))[1])(stacked, scales)
    for layer in range(3):
        want = _reference(x, stacked[layer], scales[layer], False)
        np.testing.assert_allclose(np.asarray(got[layer]), want, rtol=2e-5,
                                   atol=2e-5 * np.abs(want).max())


@pytest.mark.parametrize("transposed", [False, True])
def test_kernels_read_one_layer_of_a_stack_in_place(transposed):
    """A stacked weight [L, I, O] (or [L, O, I]) with the layer as a traced operand, as the
    layer scan hands it over (models/layer_scan.py): each layer equals its own product, int8
    and float32, and a layer out of range is refused rather than read past the stack."""
    layers, inputs, outputs, blocks = 3, 96, 40, 3
    shape = (layers, outputs, inputs) if transposed else (layers, inputs, outputs)
    product = cpu_kernels.transposed_linear if transposed else cpu_kernels.rows_linear
    stacked = RNG.integers(-127, 128, shape, dtype=np.int8)
    scales = (RNG.random((layers, blocks, outputs)) + 0.5).astype(np.float32)
    floats = RNG.normal(size=shape).astype(np.float32)
    x = RNG.normal(size=(2, inputs)).astype(np.float32)
    int8_at = jax.jit(lambda i: product(x, stacked, scales, i))
    float_at = jax.jit(lambda i: product(x, floats, None, i))
    for layer in range(layers):
        for got, want in ((int8_at(layer), _reference(x, stacked[layer], scales[layer],
                                                      transposed)),
                          (float_at(layer), _reference(x, floats[layer], None, transposed))):
            np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5,
                                       atol=2e-5 * np.abs(want).max())
    with pytest.raises(Exception, match="layer in range"):
        np.asarray(int8_at(layers))


def _int4_reference(x, w) -> np.ndarray:
    """float64 x @ the dequantised int4 weight, unpacked here from its stated layout: within a
    group of n rows, byte row j holds row j (low nibble) and row j + n/2 (high nibble)."""
    packed = np.asarray(w.packed)  # [I/2, O]
    groups, out = w.scales.shape
    n = 2 * packed.shape[0] // groups
    blocks = packed.reshape(groups, n // 2, out)
    codes = np.concatenate([blocks & 15, blocks >> 4], axis=1).astype(np.float64)  # [G, n, O]
    scales = np.asarray(w.scales, np.float64)[:, None, :]
    offsets = -8 * scales if w.mins is None else np.asarray(w.mins, np.float64)[:, None, :]
    return x.astype(np.float64) @ (codes * scales + offsets).reshape(groups * n, out)


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 16])
@pytest.mark.parametrize("inputs,outputs,group", [(576, 1536, 32), (64, 37, 16), (96, 20, 8)])
@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_products(rows, inputs, outputs, group, symmetric):
    packed = RNG.integers(0, 256, (inputs // 2, outputs), dtype=np.uint8)
    groups = inputs // group
    scales = jnp.asarray(RNG.random((groups, outputs)) + 0.5, jnp.float16)
    mins = None if symmetric else jnp.asarray(RNG.normal(size=(groups, outputs)), jnp.float16)
    w = QuantizedWeight4bit(jnp.asarray(packed), scales, mins)
    x = RNG.normal(size=(rows, inputs)).astype(np.float32)
    got = jax.jit(cpu_kernels.int4_rows_linear)(x, w.packed, w.scales, w.mins)
    want = _int4_reference(x, w)
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-5 * np.abs(want).max())
    assert "runtime_int4_rows" in _hlo(linear, x, w)
    np.testing.assert_allclose(np.asarray(linear(x, w, jnp.float32)), want, rtol=2e-5,
                               atol=2e-5 * np.abs(want).max())


def _hlo(fn, *args) -> str:
    return jax.jit(fn).lower(*args).as_text()


def test_products_take_the_kernels_for_decode_rows_only():
    q = quantize(RNG.normal(size=(64, 48)), 4)  # int8 [I, O] in 4 row blocks
    one = jnp.asarray(RNG.normal(size=(1, 1, 64)), jnp.float32)
    assert "runtime_int8_rows" in _hlo(linear, one, q)
    np.testing.assert_allclose(linear(one, q), np.asarray(one) @ dequantize(q), rtol=1e-5,
                               atol=1e-5)
    many = jnp.ones((1, cpu_kernels.MAX_ROWS + 1, 64), jnp.float32)
    assert "runtime_int8_rows" not in _hlo(linear, many, q)
    floats = jnp.asarray(RNG.normal(size=(64, 48)), jnp.float32)
    assert "runtime_f32_rows" in _hlo(linear, one, floats)
    assert "runtime_f32_rows" not in _hlo(linear, jnp.ones((2, 64), jnp.float32), floats)
    assert "runtime_f32_rows" not in _hlo(linear, one.astype(jnp.bfloat16), floats)
    transposed = TransposedWeight(jnp.asarray(floats.T), None)
    assert "runtime_f32_transposed" in _hlo(linear, one, transposed)


def test_tied_heads_take_the_transposed_kernels():
    table = RNG.normal(size=(40, 64)).astype(np.float32)  # [V, D]
    x = jnp.asarray(RNG.normal(size=(2, 64)), jnp.float32)
    assert "runtime_f32_transposed" in _hlo(tied_head, x[:1], jnp.asarray(table))
    q = quantize(table.T, 4)  # [D, V] in 4 row blocks, stored as the table [V, D]
    embedding = QuantizedEmbedding(jnp.asarray(q.weight).T, q.scales)
    assert "runtime_int8_transposed" in _hlo(tied_head, x, embedding)
    np.testing.assert_allclose(tied_head(x, embedding), np.asarray(x) @ dequantize(q),
                               rtol=1e-5, atol=1e-5)
    rows = with_row_scales(embedding)  # the scales also one row per token: [V, R]
    assert np.array_equal(np.asarray(rows.row_scales), np.asarray(q.scales).T)
    assert "runtime_int8_transposed_row_scales" in _hlo(tied_head, x, rows)
    np.testing.assert_array_equal(tied_head(x, rows), tied_head(x, embedding))


@pytest.mark.parametrize("rows", [1, 2, 5, 16])
@pytest.mark.parametrize("inputs,outputs,blocks", [(576, 1000, 18), (64, 37, 1), (96, 300, 3),
                                                   (64, 40, 8)])
@pytest.mark.parametrize("scale_dtype", SCALE_DTYPES)
def test_transposed_int8_with_row_scales(rows, inputs, outputs, blocks, scale_dtype):
    """The same table as row_scales [O, R]: the same sums, bit for bit (only the reading of
    the scales differs), and both equal the float64 reference."""
    weight, scales = _int8((outputs, inputs), blocks, outputs)
    stored, scales = _stored(scales, scale_dtype)
    x = RNG.normal(size=(rows, inputs)).astype(np.float32)
    got = jax.jit(lambda x: cpu_kernels.transposed_linear(x, weight, row_scales=stored.T))(x)
    np.testing.assert_array_equal(got, jax.jit(cpu_kernels.transposed_linear)(x, weight, stored))
    want = _reference(x, weight, scales, True)
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-5 * np.abs(want).max())


SCRIPT = """
import sys, jax.numpy as jnp, numpy as np
import runtime.cpu_kernels as k
from runtime.products import linear
from runtime.quant import quantize
q = quantize(np.ones((64, 8), np.float32))
x = jnp.ones((1, 64), jnp.float32)
text = __import__("jax").jit(linear).lower(x, q).as_text()
print(k.available(), "runtime_int8_rows" in text, float(linear(x, q)[0, 0]))
"""


def _run(env_extra, cache):
    """SCRIPT in a fresh process with its own kernel cache folder: its printed words, stderr."""
    env = {**os.environ, "RUNTIME_KERNEL_CACHE": str(cache), **env_extra}
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          env=env, cwd=str(Path(__file__).parents[1]))
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.split(), done.stderr


@pytest.mark.slow  # fresh processes that build the kernels: in the full suite only
def test_disabled_or_unbuildable_kernels_leave_xla_products(tmp_path):
    # the same script takes the kernel when it can (built in the suite's cache: every other
    # kernel test runs that build from nothing on a fresh machine)
    from runtime.native_build import cache_dir
    out, _ = _run({}, cache_dir())
    assert out[:2] == ["True", "True"] and abs(float(out[2]) - 64) < 0.1
    out, _ = _run({"RUNTIME_CPU_KERNELS": "0"}, tmp_path / "a")
    assert out[:2] == ["False", "False"] and abs(float(out[2]) - 64) < 0.1
    out, err = _run({"CXX": "/bin/false"}, tmp_path / "b")
    assert out[:2] == ["False", "False"] and abs(float(out[2]) - 64) < 0.1
    messages = [line for line in err.splitlines() if "CPU kernels unavailable" in line]
    assert len(messages) == 1 and "/bin/false failed on the CPU kernels" in messages[0]


def test_engines_add_row_scales_for_int8_tied_heads(monkeypatch):
    """A CPU engine adds an int8 table's row_scales where it does not tile it, its head reads
    them, and it decodes the tokens an engine without them decodes."""
    from conftest import random_params, single_device_mesh, tiny_config
    from runtime import layout
    from runtime.engine import build_engine
    from runtime.quant import quantize_embedding
    from runtime.request import Request

    config = tiny_config(num_layers=2)
    params = random_params(config, seed=7)
    module = "language_model/in_out_embed"
    params[module]["embeddings"] = quantize_embedding(params[module]["embeddings"], 8)

    def engine_and_tokens():
        engine = build_engine(config, params, single_device_mesh(), slots=1, cache_length=16)
        done = engine.generate([Request((5, 6, 7), max_new_tokens=6)])
        return engine.params[module]["embeddings"], [c.output_ids for c in done]

    monkeypatch.setattr(layout, "TILED_WEIGHTS", False)  # a tiled table needs no row scales
    table, tokens = engine_and_tokens()
    assert table.row_scales is not None and table.row_scales.shape == table.scales.shape[::-1]
    monkeypatch.setattr(layout, "head_row_scales", lambda: False)
    plain, plain_tokens = engine_and_tokens()
    assert plain.row_scales is None and tokens == plain_tokens
