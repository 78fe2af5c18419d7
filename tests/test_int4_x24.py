"""int4 panels under float x on the integer dots (runtime/cpu_panels_x24.h): x rounded to 24
bits per group, three int8 digits a row. Its products are as close to float64's as the float
loops' are, for every table kind and row count it takes (heavy-tailed x: a group's largest value
rounds to the top code), and RUNTIME_KERNEL_INT4_X24=0 gives the float loops back."""

from __future__ import annotations

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
from runtime.quant4 import dequantize_int4, quantize_int4, super_scaled_panels, tiled4

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="no C++ compiler")


def _native_vnni() -> bool:
    """Whether the kernels (built for this CPU) have the dots the digits need."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_vnni" in flags and "avx512bw" in flags


def _weights(rng):
    """int4 weights in panels of every table kind the digits read, by name."""
    from test_super_scaled_tables import q4_k_like
    weights = {f"{i}x{o} g{g} {name}": tiled4(jax.tree.map(jnp.asarray, quantize_int4(
                   rng.normal(size=(i, o)).astype(np.float32), g, symmetric=sym,
                   scale_dtype=dtype)))
               for i, o, g in ((64, 64, 32), (576, 192, 32), (256, 320, 128), (96, 128, 16))
               for name, sym, dtype in (("f16", True, np.float16), ("f32", True, np.float32),
                                        ("bf16 mins", False, jnp.bfloat16))}
    weights["q4_k 512x256"] = super_scaled_panels(tiled4(jax.tree.map(
        jnp.asarray, q4_k_like(rng.normal(size=(512, 256)), 32))))
    return weights


def _heavy_tailed(rng, rows, inputs):
    """x whose groups span orders of magnitude (a normal times exp of a normal)."""
    return (rng.normal(size=(rows, inputs)) * np.exp(2 * rng.normal(size=(rows, inputs)))
            ).astype(np.float32)


def products(path):
    """y of every weight (_weights) for 1, 2, 3 and 8 heavy-tailed x rows, saved to path."""
    rng = np.random.default_rng(29)  # its own: every process draws the same
    out = {}
    for name, w in _weights(rng).items():
        for rows in (1, 2, 3, 8):
            x = jnp.asarray(_heavy_tailed(rng, rows, w.shape[0]))
            out[f"{name} {rows}"] = np.asarray(jax.jit(linear)(x, w))
            out[f"{name} {rows} x"] = np.asarray(x)
    np.savez(path, **out)


@pytest.mark.parametrize("rows", [1, 2, 3, 8])
def test_digit_products_are_as_close_to_float64_as_float32_keeps(rows):
    """Every table kind, heavy-tailed x: within ~8 float32 ulps of the largest |x| |w| sum
    (a row's y rounds like float32 arithmetic; a lost top digit, or a digit off by 256, misses
    by orders of magnitude)."""
    rng = np.random.default_rng(31)
    for name, w in _weights(rng).items():
        x = _heavy_tailed(rng, rows, w.shape[0])
        from runtime.quant4 import untiled4
        dense = dequantize_int4(untiled4(w)).astype(np.float64)
        want = x.astype(np.float64) @ dense
        scale = np.abs(x).astype(np.float64) @ np.abs(dense)  # what float32 rounding scales by
        got = np.asarray(jax.jit(linear)(jnp.asarray(x), w))
        worst = float(np.max(np.abs(got - want) / scale.max(axis=-1, keepdims=True)))
        assert worst < 1e-6, (name, rows, worst)  # the float loops: up to 7.3e-7 here


@pytest.mark.slow
def test_the_switch_gives_the_float_loops_back_and_both_agree(tmp_path):
    """RUNTIME_KERNEL_INT4_X24=0 (fresh processes: the switch is read once) takes the float
    loops; where the CPU has the dots, the default takes the digits: different arithmetic, so y
    differs in its last bits, within float32's rounding of the same sums."""
    for name, switch in (("digits.npz", "1"), ("floats.npz", "0")):
        script = ("import sys; sys.path[:0] = ['tests', '.']; import test_int4_x24 as t; "
                  f"t.products({str(tmp_path / name)!r})")
        subprocess.run([sys.executable, "-c", script], check=True, timeout=300,
                       env=dict(os.environ, RUNTIME_KERNEL_INT4_X24=switch, JAX_PLATFORMS="cpu"))
    digits, floats = np.load(tmp_path / "digits.npz"), np.load(tmp_path / "floats.npz")
    names = [n for n in digits.files if not n.endswith(" x")]
    assert len(names) == 13 * 4 and sorted(digits.files) == sorted(floats.files)
    differ = 0
    for name in names:
        np.testing.assert_array_equal(digits[name + " x"], floats[name + " x"])
        a, b = digits[name], floats[name]
        np.testing.assert_allclose(a, b, rtol=0, atol=2e-6 * np.abs(b).max(), err_msg=name)
        differ += not np.array_equal(a, b)
    assert (differ > 0) == _native_vnni(), differ
