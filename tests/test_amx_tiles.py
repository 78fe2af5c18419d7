"""Many x rows under int8 activations on CPUs with AMX (cpu_panels_amx.h): the tiles' products
equal the VNNI loops' bit for bit. A product's arithmetic for a row never depends on the rows
beside it, so a call of 16 rows or more (the tiles, where this CPU has them) must give exactly
what calls of four rows (the VNNI loops, always) give: for every weight the tiles take (int8
with one and with several x blocks to a scale block, blocks of 16 as Q6_K's, with mins,
super-scaled tables; int4 symmetric and with mins, groups of 16, 32 and 128), float32 and bf16
x, rows padded to a whole tile, one x shared by several weights, rows grouped by expert."""

from __future__ import annotations

import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_int8_activations import int8_reference, product_reference
from test_int8_mins import _asymmetric, _q5_k_like

import runtime.cpu_kernels as cpu_kernels
from runtime import layout
from runtime.models.stored_weights import super_scaled_tables
from runtime.products import grouped_linears, linear, linears
from runtime.quant import LayerOfStack, quantize, tiled
from runtime.quant4 import quantize_int4, tiled4
from runtime.super_scales import is_super_scaled

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="no C++ compiler")
I, O = 256, 128


@pytest.fixture(autouse=True)
def int8_x(monkeypatch):
    monkeypatch.setattr(layout, "INT8_ACTIVATIONS", True)


def _weights(rng) -> dict:
    """One weight [I, O] in panels of each kind the tiles take -> (the weight, a function of x
    giving its float64 reference product, x rounded as the kernel rounds it)."""
    w = rng.normal(0, 0.05, (I, O)).astype(np.float32)
    int8 = lambda q: (tiled(q), lambda x: int8_reference(x, q))  # noqa: E731
    weights = {f"int8, scale blocks of {I // r}": int8(quantize(w, r)) for r in (8, 2, 16, 1)}
    weights["int8 with mins"] = int8(_asymmetric((I, O), rng))
    stack = _q5_k_like((2, I, O), rng)
    q5_k = super_scaled_tables({"m": {"w": tiled(stack)}})["m"]["w"]
    assert is_super_scaled(q5_k.scales) and is_super_scaled(q5_k.mins)
    layer = jax.tree.map(lambda a: a[1], stack)
    weights["int8, super-scaled scales and mins"] = (LayerOfStack(q5_k, jnp.int32(1)),
                                                     lambda x: int8_reference(x, layer))
    for group, symmetric in [(32, True), (16, False), (128, False)]:
        q4 = quantize_int4(w, group, symmetric=symmetric)
        weights[f"int4 {'symmetric' if symmetric else 'with mins'}, groups of {group}"] = (
            tiled4(q4), lambda x, q4=q4: product_reference(x, q4))
    return weights


def _in_fours(f, x):
    """f over x four rows at a time (each call below the tiles' rows), stacked."""
    return jnp.concatenate([f(x[m:m + 4]) for m in range(0, x.shape[0], 4)])


def test_the_tiles_are_used_where_this_cpu_has_them():
    """Never without the CPU's AMX flags; always with them under the default build (-march=
    native with the system's g++; a CXX of other targets builds the VNNI loops alone)."""
    flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("flags")), "").split()
    has_amx = "amx_int8" in flags and "amx_tile" in flags
    assert cpu_kernels.amx_tiles() <= has_amx
    if "CXX" not in os.environ:
        assert cpu_kernels.amx_tiles() == has_amx


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("rows", [16, 37, 100])
def test_many_rows_equal_their_rows_four_at_a_time(rows, dtype):
    rng = np.random.default_rng(rows)
    x = jnp.asarray(rng.normal(0, 1, (rows, I)), dtype)
    product = jax.jit(lambda x, w: linear(x, w, jnp.float32))
    for name, (w, reference) in _weights(rng).items():
        got = product(x, w)
        np.testing.assert_array_equal(got, _in_fours(lambda x: product(x, w), x), err_msg=name)
        want = reference(x)
        assert np.abs(np.asarray(got, np.float64) - want).max() < 0.02 * np.abs(want).max(), name


def test_one_x_for_several_weights_and_rows_grouped_by_expert():
    rng = np.random.default_rng(5)
    weights = [w for w, _ in _weights(rng).values()]
    x = jnp.asarray(rng.normal(0, 1, (40, I)), jnp.float32)
    shared = jax.jit(lambda x, ws: linears(x, ws, jnp.float32))
    for got, want in zip(shared(x, weights), zip(*[shared(x[m:m + 4], weights)
                                                  for m in range(0, 40, 4)])):
        np.testing.assert_array_equal(got, jnp.concatenate(want))
    # three experts' rows: 20 (tiles), 3 and 17 (tiles), each against its own weights
    experts = [[weights[0], weights[6]], [weights[4], weights[7]], [weights[1], weights[8]]]
    sizes = jnp.asarray([20, 3, 17], jnp.int32)
    grouped = jax.jit(lambda x, s: grouped_linears(x, s, experts, jnp.float32))(x, sizes)
    start = 0
    for size, expert in zip([20, 3, 17], experts):
        rows = x[start:start + size]
        for k, w in enumerate(expert):
            want = _in_fours(lambda x: linear(x, w, jnp.float32), rows)
            np.testing.assert_array_equal(grouped[k][start:start + size], want)
        start += size
