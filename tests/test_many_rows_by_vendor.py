"""Which loop a panel product of many float-x rows takes (cpu_panels.cc, many_rows_take): the
chunks of cpu_panels_many_rows.h or the passes of a few rows at a time. Each vendor's default is
a choice of speed only: both loops give the float64 product within float32 rounding (float
weights: the same bits), and for int8 the default equals the loop its vendor's rule names, bit
for bit (AMD CPUs in AVX-512 builds: the passes up to 128 rows, and for float32 and 2-byte
floats at any count; others, AMD's AVX2 builds included: the chunks past 12 rows, float32 past
4).
RUNTIME_KERNEL_MANY_ROWS forces one loop; it is read once, so each setting runs in a fresh
process."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import cpu_has_avx512, cpu_vendor, saved_in_fresh_process

import runtime.cpu_kernels as cpu_kernels

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="no C++ compiler")
ROWS = (7, 40, 150)
KINDS = ("float32", "float16", "bfloat16", "int8")


def products(path: str) -> None:
    """x [M, 576] @ [576, 192] panels of each kind at each row count in ROWS, and the float64
    products, saved to path (run in a fresh process)."""
    import jax
    import jax.numpy as jnp
    from runtime.products import linear
    from runtime.quant import dequantize, quantize, tiled

    rng = np.random.default_rng(11)  # its own: every process draws the same weights
    w = rng.normal(size=(576, 192)).astype(np.float32)
    q = jax.tree.map(jnp.asarray, quantize(w, 18, np.float16))
    weights = {"int8": (tiled(q), np.asarray(dequantize(q), np.float64))}
    for dtype in KINDS[:3]:
        stored = jnp.asarray(w, dtype)
        weights[dtype] = (tiled(stored), np.asarray(stored.astype(jnp.float32), np.float64))
    out = {}
    product = jax.jit(lambda x, w: linear(x, w))
    for rows in ROWS:
        x = rng.normal(size=(rows, 576)).astype(np.float32)
        for name, (weight, dense) in weights.items():
            out[f"{name} {rows}"] = np.asarray(product(jnp.asarray(x), weight))
            out[f"{name} {rows} float64"] = x.astype(np.float64) @ dense
    np.savez(path, **out)


def _chunks_by_default(kind: str, rows: int, amd: bool) -> bool:
    if kind == "int8":
        return rows > (128 if amd else 12)
    return not amd and rows > (4 if kind == "float32" else 12)


def test_both_loops_give_the_product_and_the_default_is_its_vendors_choice(tmp_path):
    def products_with(name: str, **many_rows) -> dict:
        return saved_in_fresh_process("test_many_rows_by_vendor", "products",
                                      tmp_path / f"{name}.npz", ("RUNTIME_KERNEL_MANY_ROWS",),
                                      **many_rows)

    default = products_with("default")
    chunks = products_with("chunks", RUNTIME_KERNEL_MANY_ROWS=0)
    passes = products_with("passes", RUNTIME_KERNEL_MANY_ROWS=100000)
    amd = cpu_vendor() == "AuthenticAMD" and cpu_has_avx512()
    for kind in KINDS:
        for rows in ROWS:
            name, want = f"{kind} {rows}", chunks[f"{kind} {rows} float64"]
            for loop in (chunks, passes):
                np.testing.assert_allclose(loop[name], want, rtol=1e-5,
                                           atol=1e-5 * np.abs(want).max(), err_msg=name)
            # float weights: each column's FMAs in input order in both loops, the same bits;
            # int8: scales applied per block or to a dequantized chunk, other bits
            assert np.array_equal(chunks[name], passes[name]) == (kind != "int8"), name
            chosen = chunks if _chunks_by_default(kind, rows, amd) else passes
            np.testing.assert_array_equal(default[name], chosen[name], err_msg=name)
