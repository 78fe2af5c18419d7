"""int4 panels under float x on the integer dots (runtime/cpu_panels_x24.h): x rounded to 24
bits per group, three int8 digits a row. Its products are as close to float64's as the float
loops' are, for every table kind and row count it takes (heavy-tailed x: a group's largest value
rounds to the top code), and RUNTIME_KERNEL_INT4_X24=0 gives the float loops back."""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import saved_in_fresh_process

import runtime.cpu_kernels as cpu_kernels
from runtime.products import linear
from runtime.quant4 import dequantize_int4, untiled4

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="no C++ compiler")


def _weights(rng):
    """int4 weights in panels of every table kind the digits read, by name."""
    from test_int4_panels import table_kind_panels
    return table_kind_panels(rng, ((64, 64, 32), (576, 192, 32), (256, 320, 128), (96, 128, 16)))


def _heavy_tailed(rng, rows, inputs):
    """x whose groups span orders of magnitude (a normal times exp of a normal)."""
    return (rng.normal(size=(rows, inputs)) * np.exp(2 * rng.normal(size=(rows, inputs)))
            ).astype(np.float32)


ROWS = (1, 2, 3, 8, 16, 40)  # past 8 (int4's many-row threshold): the float chunks, where off


def _worst(x, w, got) -> float:
    """got's worst error against float64, in units of its row's largest |x| |w| sum (what
    float32 rounding scales by)."""
    dense = dequantize_int4(untiled4(w)).astype(np.float64)
    want = x.astype(np.float64) @ dense
    scale = (np.abs(x).astype(np.float64) @ np.abs(dense)).max(axis=-1, keepdims=True)
    return float(np.max(np.abs(got - want) / scale))


def products(path):
    """y of every weight (_weights) for ROWS heavy-tailed x rows, and its error (_worst), saved
    to path."""
    rng = np.random.default_rng(29)  # its own: every process draws the same
    out = {}
    for name, w in _weights(rng).items():
        for rows in ROWS:
            x = _heavy_tailed(rng, rows, w.shape[0])
            y = np.asarray(jax.jit(linear)(jnp.asarray(x), w))
            out[f"{name} {rows}"], out[f"{name} {rows} error"] = y, _worst(x, w, y)
    np.savez(path, **out)


@pytest.mark.parametrize("rows", ROWS)
def test_digit_products_are_as_close_to_float64_as_float32_keeps(rows):
    """Every table kind, heavy-tailed x: within ~8 float32 ulps of the largest |x| |w| sum
    (a row's y rounds like float32 arithmetic; a lost top digit, or a digit off by 256, misses
    by orders of magnitude)."""
    rng = np.random.default_rng(31)
    for name, w in _weights(rng).items():
        x = _heavy_tailed(rng, rows, w.shape[0])
        worst = _worst(x, w, np.asarray(jax.jit(linear)(jnp.asarray(x), w)))
        assert worst < 1e-6, (name, rows, worst)  # the float loops: up to 1.5e-6


@pytest.mark.slow
def test_the_switch_gives_the_float_loops_back_and_both_agree(tmp_path):
    """RUNTIME_KERNEL_INT4_X24=0 (fresh processes: the switch is read once) takes the float
    loops (and past 8 rows the chunks); where the CPU has the dots, the default takes the
    digits: different arithmetic, so y differs in its last bits, both within float32's rounding
    of float64's."""
    digits, floats = (saved_in_fresh_process("test_int4_x24", "products", tmp_path / name,
                                             RUNTIME_KERNEL_INT4_X24=switch)
                      for name, switch in (("digits.npz", 1), ("floats.npz", 0)))
    names = [n for n in digits if not n.endswith(" error")]
    assert len(names) == 13 * len(ROWS) and sorted(digits) == sorted(floats)
    differ, dots = 0, cpu_kernels.int4_digits()  # the build has the dots (else both: floats)
    for name in names:
        # the float loops' own worst here: 1.5e-6 (rounding at every FMA); the digits' 5.1e-7
        assert digits[name + " error"] < (1e-6 if dots else 2e-6), name
        assert floats[name + " error"] < 2e-6, name
        differ += not np.array_equal(digits[name], floats[name])
    assert (differ > 0) == dots, differ


def test_a_row_takes_the_same_arithmetic_whatever_the_rows_beside_it():
    """One row (its sums in registers) and the same row among 8 and 11 (kX24Rows at a time, sums
    in memory between groups; a second block of 3): the same y, bit for bit (where the build
    has the digits' dots)."""
    rng = np.random.default_rng(37)
    for name, w in _weights(rng).items():
        x = jnp.asarray(_heavy_tailed(rng, 11, w.shape[0]))
        product = jax.jit(linear)
        alone = [np.asarray(product(x[m:m + 1], w))[0] for m in (0, 5, 9)]
        for rows in (8, 11):
            together = np.asarray(product(x[:rows], w))
            for m, y in zip((0, 5, 9), alone):
                if m < rows and cpu_kernels.int4_digits():
                    np.testing.assert_array_equal(together[m], y, err_msg=f"{name} {m}/{rows}")
                elif m < rows:  # no dots (AVX2): the float loops, whose sums a row count
                    # orders its own way (two rows: low and high nibbles apart)
                    np.testing.assert_allclose(together[m], y, rtol=0, err_msg=name,
                                               atol=2e-6 * np.abs(y).max())
