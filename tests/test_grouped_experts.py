"""MoE prompts, and decode from two tokens on, with experts in panels: the pairs sorted by expert
go through one kernel call per layer and matmul kind (cpu_panels.cc, grouped_panels), each expert
multiplying exactly its own rows. Checked against per-expert panel calls (themselves checked
against numpy elsewhere) and a float64 numpy product for every weight kind, with empty experts,
groups past the panel row cap and rows past the groups; bad row counts are refused in one line;
engines taking the path give the numpy reference's prefill logits and decode them, and the
per-pair switch's decode logits at two tokens."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import panel_engine_outputs, random_params, tiny_config

import runtime.cpu_kernels as cpu_kernels
from runtime import layout
from runtime.quant import dequantize, quantize, tiled
from runtime.quant4 import dequantize_int4, quantize_int4, tiled4

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="no C++ compiler")
RNG = np.random.default_rng(5)
INPUTS = 128
# an empty expert, one under every kind's many-row threshold (cpu_panels.cc, many_rows_take), one
# over them all and one over most (37: not int8's on AMD CPUs); 3 rows past them all
SIZES = [37, 0, 5, 290]
ROWS = sum(SIZES) + 3


def _weight(kind: str, outputs: int):
    """(kernel operands (tiles, scales, mins), the float64 weight [I, O]) of one kind."""
    w = RNG.normal(size=(INPUTS, outputs)).astype(np.float32)
    if kind == "float32":
        return (tiled(jnp.asarray(w)).tiles, None, None), w.astype(np.float64)
    if kind.startswith("int8"):  # int8-R: R scale row blocks
        q = jax.tree.map(jnp.asarray, quantize(w, int(kind.split("-")[1])))
        t = tiled(q)
        return (t.tiles, t.scales, None), dequantize(q).astype(np.float64)
    q = jax.tree.map(jnp.asarray, quantize_int4(w, 32, symmetric=kind == "int4"))
    t = tiled4(q)
    return (t.tiles, t.scales, t.mins), dequantize_int4(q).astype(np.float64)


def _experts(kind: str):
    """Per expert: (its two weights' operands, their float64 weights) (a gate and an up of
    different widths)."""
    experts = [[_weight(kind, outputs) for outputs in (128, 64)] for _ in SIZES]
    return [[w[0] for w in e] for e in experts], [[w[1] for w in e] for e in experts]


def _grouped(x, operands, int8_x: bool, sizes=SIZES):
    return jax.jit(lambda x, s: cpu_kernels.grouped_panel_linears(x, s, operands,
                                                                  int8_x=int8_x))(
        x, jnp.asarray(sizes, jnp.int32))


@pytest.mark.parametrize("kind,int8_x", [("float32", False), ("int8-1", False), ("int8-8", False),
                                         ("int8-1", True), ("int8-8", True),
                                         ("int4", False), ("int4", True),
                                         ("int4-asymmetric", False),
                                         ("int4-asymmetric", True)])
def test_each_expert_multiplies_exactly_its_rows(kind, int8_x):
    operands, dense = _experts(kind)
    x = jnp.asarray(RNG.normal(size=(ROWS, INPUTS)).astype(np.float32))
    got = [np.asarray(y) for y in _grouped(x, operands, int8_x)]
    start = 0
    for e, size in enumerate(SIZES):
        rows = x[start:start + size]
        if size:  # the same rows through this expert's own panel call: the same numbers
            alone = cpu_kernels.tiled_linears(rows, operands[e], int8_x=int8_x)
            for k in range(2):
                np.testing.assert_array_equal(got[k][start:start + size], np.asarray(alone[k]))
                if not int8_x:  # x as it is: the float64 product within float32 rounding
                    want = np.asarray(rows, np.float64) @ dense[e][k]
                    np.testing.assert_allclose(got[k][start:start + size], want, rtol=1e-4,
                                               atol=1e-4 * np.abs(want).max())
        start += size
    for k in range(2):
        assert not got[k][start:].any()  # rows past the groups: zeros


@pytest.mark.parametrize("sizes", [[37, 0, 5, 294], [40, -3, 5, 290]])
def test_row_counts_that_do_not_fit_are_refused(sizes):
    operands, _ = _experts("float32")
    x = jnp.zeros((ROWS, INPUTS), jnp.float32)
    with pytest.raises(Exception, match="grouped panels: expert row counts must add up"):
        jax.block_until_ready(_grouped(x, operands, False, sizes))


MOE = {"num_layers": 2, "emb_size": 64, "key_size": 16, "intermediate_size": 128}


@pytest.fixture
def grouped_calls(monkeypatch):
    """The grouped kernel calls traced from here on (one per call site and program)."""
    calls, traced = [], cpu_kernels.grouped_panel_linears
    monkeypatch.setattr(cpu_kernels, "grouped_panel_linears",
                        lambda *a, **k: calls.append(1) or traced(*a, **k))
    return calls


@pytest.mark.slow
def test_moe_engine_prompts_take_the_grouped_call_and_match_the_reference(grouped_calls):
    """An unrolled MoE engine with its experts in panels: prompts through the grouped call
    (spied), their logits the numpy reference's, decode logits their prefill's, and the
    greedy tokens of an engine without panels (XLA's tile loop), three slots."""
    import reference_numpy
    from conftest import single_device_mesh, to_reference
    from test_dtype_ladder import assert_decode_equals_prefill, ladder, prompt_for
    from runtime.engine import build_engine

    config = tiny_config(**MOE)
    params = random_params(config, seed=3, scale=0.3)
    engine = build_engine(config, params, single_device_mesh(), slots=2, cache_length=48,
                          unroll_layers=True)
    prompts = [prompt_for(config, seed) for seed in range(2)]
    decoded, prefilled, tokens = ladder(engine, prompts, slot=1)
    assert grouped_calls, "the prompts did not take the grouped kernel call"
    assert_decode_equals_prefill(decoded, prefilled, "float32")
    for i, logits in enumerate(prefilled):
        context = np.asarray([prompts[1] + tokens[:i + 1]])
        want = reference_numpy.forward(to_reference(params), config, context)[0, -1]
        np.testing.assert_allclose(logits, want, atol=2e-4 * np.abs(want).max(), rtol=2e-4)
    got, _ = panel_engine_outputs(config, params, 3, True, "float32", True)  # prompts together
    want, _ = panel_engine_outputs(config, params, 3, True, "float32", False)
    assert got == want


@pytest.mark.slow
def test_int8_experts_in_the_grouped_call_decode_their_prefill_logits(monkeypatch,
                                                                      grouped_calls):
    """int8 experts (groups of 32 rows) in panels, x as it is and rounded to int8, and bf16
    activations: decode logits equal the prefill logits of the same contexts."""
    from conftest import single_device_mesh
    from test_dtype_ladder import assert_decode_equals_prefill, ladder, prompt_for
    from runtime.engine import build_engine
    from runtime.quant import QuantizedWeight8bit

    config = tiny_config(**MOE)
    params = random_params(config, seed=4, scale=0.3)
    for name, leaf in params.items():
        if "/moe/" in name:
            params[name] = {"w": quantize(leaf["w"], leaf["w"].shape[-2] // 32)}
    assert any(isinstance(v.get("w"), QuantizedWeight8bit) for v in params.values())
    for int8_x, dtype in ((False, "float32"), (True, "float32"), (False, "bfloat16")):
        monkeypatch.setattr(layout, "INT8_ACTIVATIONS", int8_x)
        engine = build_engine(config.replace(dtype=dtype), params, single_device_mesh(),
                              slots=2, cache_length=48, unroll_layers=True)
        prompts = [prompt_for(config, seed) for seed in range(2)]
        decoded, prefilled, _ = ladder(engine, prompts, slot=0)
        assert grouped_calls, (int8_x, dtype)
        grouped_calls.clear()
        if dtype == "bfloat16":
            assert_decode_equals_prefill(decoded, prefilled, dtype)
            continue
        magnitude = float(np.abs(prefilled).max())
        worst = float(np.abs(decoded - prefilled).max())
        assert worst <= (2e-3 if int8_x else 1e-5) * magnitude, (int8_x, worst, magnitude)


@pytest.mark.parametrize("weights", ["float32", "int8-1", "int8-8"])  # int8: R row blocks
def test_decode_of_two_tokens_takes_the_grouped_call(monkeypatch, grouped_calls, weights):
    """A decode step of two slots (4 pairs over 4 experts, which the per-pair switch of batch-1
    decode ran before) goes through the grouped call, an expert both tokens chose read once;
    its logits are the switch's (layout.GROUPED_EXPERTS_FROM_TWO_TOKENS False) within float32
    rounding. One slot keeps the switch."""
    from conftest import single_device_mesh
    from runtime.engine import build_engine

    config = tiny_config(**MOE)
    assert 2 * config.num_selected_experts <= config.num_experts  # the switch's range before
    params = random_params(config, seed=7, scale=0.3)
    if weights.startswith("int8"):
        for name, leaf in params.items():
            if "/moe/" in name:
                params[name] = {"w": quantize(leaf["w"], int(weights.split("-")[1]))}
    tokens = np.array([[3], [11]], np.int32)  # [B, 1]
    logits = {}
    for slots, grouped in ((2, True), (2, False), (1, True)):
        monkeypatch.setattr(layout, "GROUPED_EXPERTS_FROM_TWO_TOKENS", grouped)
        engine = build_engine(config, params, single_device_mesh(), slots=slots,
                              cache_length=16, unroll_layers=True)
        grouped_calls.clear()
        out, _ = jax.jit(engine.model.step)(engine.params, engine.memory, tokens[:slots],
                                            np.ones(slots, np.int32))
        assert bool(grouped_calls) == (grouped and slots == 2), (slots, grouped)
        logits[slots, grouped] = np.asarray(out, np.float32)  # [B, V]
    want = logits[2, False]
    np.testing.assert_allclose(logits[2, True], want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    np.testing.assert_allclose(logits[1, True][0], want[0], rtol=1e-5,
                               atol=1e-5 * np.abs(want).max())
