"""The CPU kernels' software prefetch (cpu_kernels.h): 2 KB ahead of the weight streams by
default; on AMD CPUs none ahead of float streams, nor of quantized ones on Zen 4 (AVX-512
builds on family 19h; their hardware prefetcher did better alone), RUNTIME_KERNEL_PREFETCH
overriding; scale table rows six blocks ahead (into the next panel's first ones past the last)
unless RUNTIME_KERNEL_PREFETCH_TABLES=0, RUNTIME_KERNEL_TABLE_AHEAD overriding; and a prefetch
changes no product, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import (cpu_family, cpu_has_avx512, cpu_vendor, python_in_fresh_process,
                      saved_in_fresh_process)

import runtime.cpu_kernels as cpu_kernels

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="no C++ compiler")


PREFETCH_VARIABLES = ("RUNTIME_KERNEL_PREFETCH", "RUNTIME_KERNEL_TABLE_AHEAD")


def _in_fresh_process(script: str, **settings) -> str:
    """script's output in a fresh process (the switches are read once) with only the prefetch
    variables in `settings` set."""
    return python_in_fresh_process(script, PREFETCH_VARIABLES, **settings)


def test_the_distance_defaults_by_vendor_and_build_and_follows_the_variable():
    """Intel: 2048 ahead of every stream. AMD: none ahead of float streams; quantized ones
    2048 except on Zen 4 (family 19h with AVX-512; the kernels build for the CPU they run on, so
    /proc/cpuinfo's flags say which build)."""
    script = ("import runtime.cpu_kernels as k; "
              "print(k.prefetch_bytes(), k.prefetch_bytes(float_stream=True))")
    amd = cpu_vendor() == "AuthenticAMD"
    zen4 = amd and cpu_has_avx512() and cpu_family() == 0x19
    default = (0 if zen4 else 2048, 0 if amd else 2048)
    assert tuple(map(int, _in_fresh_process(script).split())) == default
    assert _in_fresh_process(script, RUNTIME_KERNEL_PREFETCH=0).split() == ["0", "0"]
    assert _in_fresh_process(script, RUNTIME_KERNEL_PREFETCH=4000).split() == ["3968"] * 2


def test_the_table_rows_distance_defaults_to_six_blocks_and_follows_the_variables():
    script = "import runtime.cpu_kernels as k; print(k.table_blocks_ahead())"
    assert int(_in_fresh_process(script)) == 6
    assert int(_in_fresh_process(script, RUNTIME_KERNEL_TABLE_AHEAD=2)) == 2
    assert int(_in_fresh_process(script, RUNTIME_KERNEL_PREFETCH_TABLES=0)) == 0


def _products(path: str) -> None:
    """x [M, I] @ float32, int8 (1, 8, 18 row blocks), int4 and Q4_K-like panels, one and
    several x rows, float and int8 x, saved to path."""
    import jax
    import jax.numpy as jnp
    from runtime import layout
    from runtime.products import linear
    from runtime.quant import quantize, tiled
    from runtime.quant4 import quantize_int4, super_scaled_panels, tiled4
    from test_super_scaled_tables import q4_k_like

    rng = np.random.default_rng(3)  # its own: both processes draw the same weights
    w = rng.normal(size=(576, 320)).astype(np.float32)
    weights = {"f32": tiled(jnp.asarray(w)),
               "int8": tiled(jax.tree.map(jnp.asarray, quantize(w, 18, np.float16))),
               "int8 1 block": tiled(jax.tree.map(jnp.asarray, quantize(w, 1))),
               "int8 8 blocks": tiled(jax.tree.map(jnp.asarray, quantize(w, 8))),
               "int4": tiled4(jax.tree.map(jnp.asarray, quantize_int4(w, 32, symmetric=True))),
               "q4_k": super_scaled_panels(tiled4(jax.tree.map(jnp.asarray,
                                                               q4_k_like(w[:512], 32))))}
    out = {}
    for rows in (1, 3):
        for int8_x in (False, True):
            layout.INT8_ACTIVATIONS = int8_x
            for name, weight in weights.items():
                x = jnp.asarray(rng.normal(size=(rows, weight.shape[0])).astype(np.float32))
                product = jax.jit(lambda x, w: linear(x, w))  # traced anew: int8 x or not
                out[f"{name} rows {rows} int8 x {int8_x}"] = np.asarray(product(x, weight))
    np.savez(path, **out)


@pytest.mark.slow  # two fresh processes
def test_products_with_and_without_prefetch_agree_bit_for_bit(tmp_path):
    # "all": table rows six blocks ahead, into the next panel's (the int8 weights of 1 and 8
    # blocks: further than it has, where nothing is asked for)
    without, ahead = (saved_in_fresh_process("test_kernel_prefetch", "_products",
                                             tmp_path / f"{name}.npz", PREFETCH_VARIABLES,
                                             RUNTIME_KERNEL_PREFETCH=distance,
                                             RUNTIME_KERNEL_PREFETCH_TABLES=tables)
                      for name, distance, tables in (("none", 0, 0), ("all", 2048, 1)))
    assert sorted(without) == sorted(ahead) and len(without) == 24
    for name in without:
        np.testing.assert_array_equal(without[name], ahead[name], err_msg=name)
        assert np.abs(without[name]).max() > 1.0, name  # real products, not zeros
