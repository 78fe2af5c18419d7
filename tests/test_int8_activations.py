"""int4 and int8 weights multiplying activations rounded to int8 (run.py --int8-activations,
layout.INT8_ACTIVATIONS; int4 per group, int8 per layout.int8_x_block): the panel kernel's
integer dots (cpu_panels.cc), the row and transposed kernels and XLA's products on
int4_widening.int8_rounded's x, all against a numpy statement of the rounding in float64;
engines in the mode whose decode logits equal their prefill logits and whose panels decode
the tokens of row-major weights."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import LAYER, panel_engine_outputs, random_params, tiny_config

import runtime.cpu_kernels as cpu_kernels
from runtime import layout
from runtime.int4_widening import int8_rounded
from runtime.products import linear, linears, per_tile_linear
from runtime.tables import tied_head
from runtime.quant import (LayerOfStack, QuantizedWeight8bit, TransposedWeight, dequantize,
                           quantize, quantize_embedding, tiled, tiled_embedding)
from runtime.quant4 import (QuantizedWeight4bit, dequantize_int4, quantize_int4, tiled4,
                            untiled4)

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="no C++ compiler")
RNG = np.random.default_rng(45)


@pytest.fixture
def int8_x(monkeypatch):
    monkeypatch.setattr(layout, "INT8_ACTIVATIONS", True)


def _int4(inputs, outputs, group, symmetric, scale_dtype=np.float16, lead=()):
    w = RNG.normal(size=(*lead, inputs, outputs)).astype(np.float32)
    return jax.tree.map(jnp.asarray, quantize_int4(w, group, symmetric=symmetric,
                                                   scale_dtype=scale_dtype))


def rounded_reference(x: np.ndarray, groups: int) -> np.ndarray:
    """x rounded per group: codes rint(x * (127 / max|x|)) in float32 (the kernel's own
    arithmetic, so the codes are the same), times max|x| / 127 in float64."""
    grouped = np.asarray(x, np.float32).reshape(*x.shape[:-1], groups, -1)
    peak = np.abs(grouped).max(-1, keepdims=True)
    inverse = np.where(peak > 0, np.float32(127) / np.where(peak > 0, peak, 1), 0)
    codes = np.rint(grouped * inverse.astype(np.float32)).astype(np.float64)
    assert np.abs(codes).max() <= 127
    return (codes * (peak.astype(np.float64) / 127)).reshape(x.shape)


def product_reference(x, w: QuantizedWeight4bit) -> np.ndarray:
    return rounded_reference(np.asarray(x), w.groups) @ dequantize_int4(w).astype(np.float64)


def product(x, w):
    """linear(x, w) in a fresh jit: the mode is read while tracing, and jax.jit(linear) would
    reuse a trace made under the other setting (here or in another test)."""
    return jax.jit(lambda x, w: linear(x, w))(x, w)


def assert_close(got, want):
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=2e-5,
                               atol=2e-5 * np.abs(want).max())


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 16, 67])  # 67: a prompt's rows, 4 at a time
@pytest.mark.parametrize("inputs,outputs,group", [(576, 192, 32), (96, 64, 16), (512, 128, 64)])
@pytest.mark.parametrize("symmetric,scale_dtype", [(True, np.float16), (False, np.float16),
                                                   (False, jnp.bfloat16), (True, np.float32)])
def test_panels_multiply_x_rounded_per_group(int8_x, rows, inputs, outputs, group, symmetric,
                                             scale_dtype):
    w = _int4(inputs, outputs, group, symmetric, scale_dtype)
    x = RNG.normal(size=(rows, inputs)).astype(np.float32)
    x[0, :group] *= 40  # one group far larger than the rest: its own scale
    assert_close(product(jnp.asarray(x), tiled4(w)), product_reference(x, w))


def test_the_mode_changes_the_product_and_off_it_does_not(monkeypatch):
    """The reference is not the float product (the rounding shows), and without the mode the
    panels give the float product: the test above could fail."""
    w = _int4(576, 128, 32, True)
    x = jnp.asarray(RNG.normal(size=(2, 576)).astype(np.float32))
    exact = np.asarray(x, np.float64) @ dequantize_int4(w).astype(np.float64)
    rounded = product_reference(x, w)
    assert np.abs(rounded - exact).max() > 1e-3 * np.abs(exact).max()
    assert_close(product(x, tiled4(w)), exact)
    monkeypatch.setattr(layout, "INT8_ACTIVATIONS", True)
    assert_close(product(x, tiled4(w)), rounded)


def test_xla_and_row_kernel_paths_round_alike(int8_x):
    """Prompt rows in panels (the kernel) and row-major (XLA), row-major int4 (the row kernel),
    a stacked layer read in place, groups the quad loop cannot take (12 rows: XLA's rounding),
    zero groups."""
    w = _int4(96, 128, 16, False)
    many = RNG.normal(size=(40, 96)).astype(np.float32)  # the panel kernel; row-major: XLA
    assert_close(product(jnp.asarray(many), tiled4(w)), product_reference(many, w))
    assert_close(product(jnp.asarray(many), w), product_reference(many, w))
    few = RNG.normal(size=(3, 96)).astype(np.float32)
    few[1, 16:48] = 0  # two groups of zeros: zero codes, no division by zero
    assert_close(product(jnp.asarray(few), w), product_reference(few, w))
    assert_close(product(jnp.asarray(few), tiled4(w)), product_reference(few, w))
    stack = _int4(64, 128, 32, True, lead=(3,))
    at = jax.jit(lambda i: linear(jnp.asarray(few[:, :64]), LayerOfStack(tiled4(stack), i)))
    for layer in range(3):
        one = QuantizedWeight4bit(stack.packed[layer], stack.scales[layer])
        assert_close(at(layer), product_reference(few[:, :64], one))
    odd = _int4(96, 64, 12, True)  # 8 groups of 12 rows
    assert not cpu_kernels.int4_panels_usable(1, tiled4(odd).tiles, False, 8, int8_x=True)
    assert cpu_kernels.int4_panels_usable(1, tiled4(odd).tiles, False, 8, int8_x=False)
    assert_close(product(jnp.asarray(few), tiled4(odd)), product_reference(few, odd))
    with pytest.raises(Exception, match="multiple of 8 rows"):
        t = tiled4(odd)
        np.asarray(cpu_kernels.tiled_linears(jnp.asarray(few), [(t.tiles, t.scales, None)],
                                             int8_x=True)[0])


def test_one_call_of_int4_int8_and_float_panels_rounds_each_as_its_own(int8_x):
    """In one shared call, int4 panels round x per group, int8 ones per int8_x_block, and
    float32 ones take x as it is."""
    x = RNG.normal(size=(3, 64)).astype(np.float32)
    w4 = _int4(64, 128, 32, True)
    w8 = jax.tree.map(jnp.asarray, quantize(RNG.normal(size=(64, 192)).astype(np.float32), 2))
    w32 = jnp.asarray(RNG.normal(size=(64, 64)).astype(np.float32))
    weights = [tiled4(w4), tiled(w8), tiled(w32)]
    together = jax.jit(lambda x, ws: linears(x, ws))(jnp.asarray(x), weights)
    assert_close(together[0], product_reference(x, w4))
    assert_close(together[1], int8_reference(x, w8))
    assert_close(together[2], x.astype(np.float64) @ np.asarray(w32, np.float64))
    assert untiled4(weights[0]).scales is w4.scales


def test_int8_rounded_keeps_its_codes_and_the_dtype():
    x = jnp.asarray(RNG.normal(size=(4, 64)).astype(np.float32))
    once = int8_rounded(x, 2)
    # the same codes again (values within float rounding of the scale's round trip)
    np.testing.assert_allclose(np.asarray(int8_rounded(once, 2)), np.asarray(once), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(once, np.float64), rounded_reference(np.asarray(x), 2),
                               rtol=1e-6, atol=1e-7)
    assert int8_rounded(x.astype(jnp.bfloat16), 2).dtype == jnp.bfloat16


def _quantized_params(config, group):
    """int4 (symmetric and asymmetric) and int8 (groups of 16, per channel) layer weights, the
    tied table int8: every kind the mode rounds x for."""
    params = random_params(config, seed=17, scale=0.3)
    for i, name in enumerate(("mlp/linear", "mlp/linear_v", "mlp/linear_1")):
        params[LAYER + name] = {"w": quantize_int4(params[LAYER + name]["w"], group,
                                                   symmetric=i % 2 == 0)}
    for rows, name in ((4, "multi_head_attention/query"), (1, "multi_head_attention/linear")):
        params[LAYER + name] = {"w": quantize(params[LAYER + name]["w"], rows)}
    module = "language_model/in_out_embed"
    params[module] = {"embeddings": quantize_embedding(params[module]["embeddings"], 16)}
    return params


@pytest.mark.slow
def test_engines_in_the_mode_decode_their_prefill_logits_and_panel_tokens(monkeypatch):
    """Decode logits equal prefill logits of the same context (the one int8 step of an x code
    that float rounding may flip between the two paths bounds the tolerance), and engines with
    int4 and int8 in panels (the VNNI kernel) decode the greedy tokens of row-major weights
    (XLA and the row kernels on int8_rounded's x), one slot and three."""
    from test_dtype_ladder import assert_greedy_tokens, ladder, prompt_for
    from runtime.engine import build_engine
    from conftest import single_device_mesh
    monkeypatch.setattr(layout, "INT8_ACTIVATIONS", True)
    config = tiny_config(num_layers=2, num_experts=0, num_selected_experts=0, emb_size=64,
                         key_size=16, intermediate_size=128)
    params = _quantized_params(config, 32)
    engine = build_engine(config, params, single_device_mesh(), slots=2, cache_length=48)
    prompts = [prompt_for(config, seed) for seed in range(2)]
    decoded, prefilled, tokens = ladder(engine, prompts, slot=1)
    magnitude = float(np.abs(prefilled).max())
    worst = float(np.abs(decoded - prefilled).max())
    assert worst <= 2e-3 * magnitude, (worst, magnitude)
    assert_greedy_tokens(engine, prompts, 1, tokens, decoded, "bfloat16")
    for slots in (1, 3):
        got, _ = panel_engine_outputs(config, params, slots, False, "float32", True)
        want, _ = panel_engine_outputs(config, params, slots, False, "float32", False)
        assert got == want, slots


@pytest.mark.slow
def test_bf16_engines_in_the_mode_decode_their_prefill_logits(monkeypatch):
    """bf16 activations in the mode (x rounded to int8 from bf16, the codes' products back in
    bf16): decode logits equal prefill logits within bf16's ladder tolerance, and the float32
    engine's in the mode within the bf16-against-float32 tolerance."""
    from test_dtype_ladder import (assert_bf16_equals_float32, assert_decode_equals_prefill,
                                   ladder, prefill_logits, prompt_for)
    from runtime.engine import build_engine
    from conftest import single_device_mesh
    monkeypatch.setattr(layout, "INT8_ACTIVATIONS", True)
    config = tiny_config(num_layers=2, num_experts=0, num_selected_experts=0, emb_size=64,
                         key_size=16, intermediate_size=128)
    params = _quantized_params(config, 32)
    prompts = [prompt_for(config, seed) for seed in range(2)]
    contexts = [prompts[1][:n] for n in (3, 7, len(prompts[1]))]
    logits = {}
    for dtype in ("bfloat16", "float32"):
        engine = build_engine(config.replace(dtype=dtype), params, single_device_mesh(),
                              slots=2, cache_length=48)
        logits[dtype] = prefill_logits(engine, contexts)
        if dtype == "bfloat16":
            decoded, prefilled, _ = ladder(engine, prompts, slot=0)
            assert_decode_equals_prefill(decoded, prefilled, dtype)
    assert_bf16_equals_float32(logits["bfloat16"], logits["float32"])


@pytest.mark.slow
def test_run_py_int8_activations_says_so_and_mostly_keeps_int4s_tokens():
    """run.py --int8-activations on the demo quantised to int4: the log line, and greedy tokens
    mostly those of int4 with float activations (the rounding's accuracy cost is measured in
    BENCHMARKS.md, "int8 activations")."""
    import json
    import os
    import subprocess
    import sys
    from conftest import ROOT

    def greedy(*flags):
        argv = [sys.executable, str(ROOT / "run.py"), "--checkpoint", str(ROOT / "checkpoints" /
                "demo"), "--quantize", "int4", "--group-size", "32", "--temperature", "0",
                "--max-new-tokens", "8", "--json", "--no-compilation-cache", *flags]
        for prompt in ("Return the", "The file is", "If the argument is"):
            argv += ["--prompt", prompt]
        done = subprocess.run(argv, env=dict(os.environ, JAX_PLATFORMS="cpu"),
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        rows = sorted(map(json.loads, done.stdout.splitlines()), key=lambda row: row["index"])
        return [row["output_ids"] for row in rows], done.stderr

    plain, plain_log = greedy()
    rounded, log = greedy("--int8-activations")
    assert "--int8-activations" in log and "--int8-activations" not in plain_log
    pairs = [(a, b) for x, y in zip(plain, rounded) for a, b in zip(x, y)]
    assert len(pairs) >= 12 and sum(a == b for a, b in pairs) / len(pairs) >= 0.5


# --- int8 weights ---------------------------------------------------------------------------------

def int8_reference(x, w) -> np.ndarray:
    """x rounded per layout.int8_x_block of the weight's scale blocks, times the weight."""
    inputs = x.shape[-1]
    blocks = inputs // layout.int8_x_block(inputs, w.scales.shape[-2])
    return rounded_reference(np.asarray(x), blocks) @ dequantize(w).astype(np.float64)


@pytest.mark.parametrize("rows", [1, 3, 4, 16, 67])
@pytest.mark.parametrize("inputs,outputs,blocks", [(576, 192, 18), (576, 128, 9), (576, 64, 1),
                                                   (576, 64, 8), (96, 64, 6)])  # 8: 72 rows
def test_int8_panels_multiply_x_rounded_per_block(int8_x, rows, inputs, outputs, blocks):
    w = jax.tree.map(jnp.asarray, quantize(RNG.normal(size=(inputs, outputs)), blocks))
    x = RNG.normal(size=(rows, inputs)).astype(np.float32)
    x[0, :32] *= 40
    assert cpu_kernels.usable(rows, tiled(w).tiles, False, blocks, tiled=True, int8_x=True)
    assert_close(product(jnp.asarray(x), tiled(w)), int8_reference(x, w))
    assert_close(product(jnp.asarray(x), w), int8_reference(x, w))  # row-major: XLA, row kernel


@pytest.mark.parametrize("rows", [1, 3, 5])
def test_int8_codes_of_minus_128_multiply_exactly(int8_x, rows):
    """-128, a code no symmetric quantizer writes but a GGUF Q8_0 file may hold, beside x codes
    of -127 and 127: AVX2's loop takes |w| as the unsigned operand (128) and x's sign from w,
    where w's sign from x would wrap -(-128) back to -128."""
    w = quantize(RNG.normal(size=(96, 128)), 3)
    codes = np.asarray(w.weight).copy()
    codes[::2, ::3] = -128
    w = QuantizedWeight8bit(jnp.asarray(codes), w.scales)
    x = RNG.normal(size=(rows, 96)).astype(np.float32)
    x[:, ::4] = -3.0 * np.abs(x).max()  # each block's peak, negative: codes of -127
    x[:, 1::8] *= -1.0
    assert cpu_kernels.usable(rows, tiled(w).tiles, False, 3, tiled=True, int8_x=True)
    assert_close(product(jnp.asarray(x), tiled(w)), int8_reference(x, w))


MANY_ROW_FORMS = {  # weight [576, 192]: int8 (blocks of 32, 64, one of 576 rows), int4 groups
    "int8, one x block a block": lambda w: quantize(w, 18),
    "int8, two x blocks a block": lambda w: quantize(w, 9),
    "int8, a block longer than a chunk": lambda w: quantize(w, 1),
    "int4": lambda w: quantize_int4(w, 32, symmetric=True),
    "int4 with mins": lambda w: quantize_int4(w, 64, symmetric=False, scale_dtype=np.float32),
}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("form", MANY_ROW_FORMS)
def test_many_rows_give_each_row_the_product_of_that_row_alone(int8_x, form, dtype):
    """A prompt's products (67 rows: the loop of many rows, cpu_panels_int8_x_many_rows.h) give
    each row the y of that row alone (the four-row loops), bit for bit: the same terms in the
    same order, chunk after chunk of the panel's blocks; float32 and bf16 activations."""
    quantized = jax.tree.map(jnp.asarray, MANY_ROW_FORMS[form](RNG.normal(size=(576, 192))))
    w = tiled4(quantized) if isinstance(quantized, QuantizedWeight4bit) else tiled(quantized)
    x = jnp.asarray(RNG.normal(size=(67, 576)).astype(np.float32), dtype)
    x = x.at[3].multiply(1e3)  # rows far apart in size: each its own scales
    many = np.asarray(product(x, w))
    alone = jax.jit(lambda x, w: linear(x, w))
    for row in (0, 3, 11, 12, 47, 48, 66):
        np.testing.assert_array_equal(many[row], np.asarray(alone(x[row:row + 1], w))[0],
                                      err_msg=str(row))


def test_int8_weights_in_every_form_round_alike(int8_x):
    """A stack read in place, a transposed weight, the tied head (an int8 table, in panels and
    not), MoE tiles, and a block of 90 rows the quad loop cannot take (XLA rounds it)."""
    x = RNG.normal(size=(3, 64)).astype(np.float32)
    stack = jax.tree.map(jnp.asarray, quantize(RNG.normal(size=(2, 64, 128)), 2))
    for layer in range(2):
        one = QuantizedWeight8bit(stack.weight[layer], stack.scales[layer])
        got = jax.jit(lambda x, i: linear(x, LayerOfStack(tiled(stack), i)))(x, layer)
        assert_close(got, int8_reference(x, one))
    w = jax.tree.map(jnp.asarray, quantize(RNG.normal(size=(64, 128)), 2))
    assert_close(product(jnp.asarray(x), TransposedWeight(w.weight.T, w.scales)),
                 int8_reference(x, w))
    table = quantize_embedding(RNG.normal(size=(128, 64)), 32)
    head = QuantizedWeight8bit(np.asarray(table.weight).T, np.asarray(table.scales))
    for form in (table, tiled_embedding(table)):
        got = jax.jit(lambda x, t: tied_head(x, t))(jnp.asarray(x), form)
        assert_close(got, int8_reference(x, head))
    tiles = RNG.normal(size=(2, 5, 64)).astype(np.float32)
    got = jax.jit(lambda x, w: per_tile_linear(x, w))(jnp.asarray(tiles), stack)
    for n in range(2):
        one = QuantizedWeight8bit(stack.weight[n], stack.scales[n])
        assert_close(got[n], int8_reference(tiles[n], one))
    odd = jax.tree.map(jnp.asarray, quantize(RNG.normal(size=(90, 64)), 1))
    assert not cpu_kernels.usable(3, tiled(odd).tiles, False, 1, tiled=True, int8_x=True)
    x90 = RNG.normal(size=(3, 90)).astype(np.float32)
    assert_close(product(jnp.asarray(x90), tiled(odd)), int8_reference(x90, odd))
