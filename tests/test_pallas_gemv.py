"""runtime/pallas_gemv.py in Pallas interpret mode on the CPU, against a float64 numpy
re-statement of the dequantised product: y[b, o] = sum_i x[b, i] * q[o, i] * s[i // G, o]."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from runtime import pallas_gemv
from runtime.pallas_gemv import int8_gemv, plan, supported

RTOL = 1e-5  # of the largest output: float32 accumulation against float64


def reference(x, weight_t, scales) -> np.ndarray:
    """float64 [B, O]: the weight dequantised with numpy, group r covering I/R input values."""
    q = np.asarray(weight_t).astype(np.float64)  # [O, I]
    s = np.asarray(scales).astype(np.float64)  # [R, O]
    out, inp = q.shape
    group = inp // s.shape[0]
    dequantised = np.empty_like(q)
    for i in range(inp):
        dequantised[:, i] = q[:, i] * s[i // group, :]
    return np.asarray(x).astype(np.float64) @ dequantised.T


def operands(rows, out, inp, groups, x_dtype, scale_dtype, seed=0):
    rng = np.random.default_rng(seed)
    weight_t = rng.integers(-127, 128, (out, inp), dtype=np.int8)
    scales = (rng.uniform(0.5, 2.0, (groups, out)) / 127).astype(scale_dtype)
    x = rng.standard_normal((rows, inp)).astype(np.float32).astype(x_dtype)
    return x, weight_t, scales


def check(y, want):
    y = np.asarray(y)
    assert y.dtype == np.float32 and y.shape == want.shape
    np.testing.assert_allclose(y, want, rtol=RTOL, atol=RTOL * np.max(np.abs(want)))


BF16 = ml_dtypes.bfloat16
CASES = [  # rows, O, I, R, x dtype, scale dtype, kernel arguments
    (1, 64, 256, 4, BF16, BF16, {}),  # the rows variant, 4 whole groups per step
    (1, 64, 256, 1, np.float32, np.float32, {}),  # one scale per output
    (3, 96, 512, 8, np.float32, BF16, {"block_in": 128}),
    (3, 64, 512, 1, BF16, np.float32, {"block_in": 128, "split_in": 2}),  # R = 1, split I
    (8, 64, 512, 8, BF16, BF16, {}),  # the dot variant (default from 5 rows)
    (8, 64, 512, 8, np.float32, np.float32, {"use_dot": False, "split_in": 2}),
    (16, 64, 256, 4, np.float32, BF16, {"block_in": 128}),  # dot, float32 x (IEEE)
    (16, 32, 256, 1, BF16, np.float32, {"use_dot": True, "block_out": 16}),
    (2, 64, 512, 4, BF16, np.float16, {"block_in": 32}),  # chunks inside a group of 128
]


@pytest.mark.parametrize("rows,out,inp,groups,x_dtype,scale_dtype,kwargs", CASES)
def test_matches_the_dequantised_product(rows, out, inp, groups, x_dtype, scale_dtype, kwargs):
    x, weight_t, scales = operands(rows, out, inp, groups, x_dtype, scale_dtype)
    assert supported(rows, weight_t, scales, x.dtype)
    y = int8_gemv(jnp.asarray(x), jnp.asarray(weight_t), jnp.asarray(scales), interpret=True,
                  **kwargs)
    check(y, reference(x, weight_t, scales))


@pytest.mark.parametrize("rows,use_dot", [(3, False), (16, True)])
def test_output_not_a_multiple_of_the_block(rows, use_dot):
    """O = 72 in blocks of 32: the last block's rows past O are masked."""
    x, weight_t, scales = operands(rows, 72, 256, 4, np.float32, BF16, seed=1)
    y = int8_gemv(jnp.asarray(x), jnp.asarray(weight_t), jnp.asarray(scales), interpret=True,
                  block_out=32, use_dot=use_dot)
    check(y, reference(x, weight_t, scales))


def test_input_not_a_multiple_of_the_block():
    """I = 320 (groups of 64) with block_in 256: the kernel steps one group at a time."""
    x, weight_t, scales = operands(2, 64, 320, 5, np.float32, np.float32, seed=2)
    p = plan(2, 64, 320, 5, block_in=256)
    assert (p.chunk, p.chunks) == (64, 1)
    y = int8_gemv(jnp.asarray(x), jnp.asarray(weight_t), jnp.asarray(scales), interpret=True,
                  block_in=256)
    check(y, reference(x, weight_t, scales))


def test_a_wrong_scale_layout_fails_the_check():
    """The reference tells the scale layouts apart: scales [R, O] read with their groups
    reversed give a product that the check rejects (the kernel's result, checked above,
    is not merely close to any scaled product)."""
    x, weight_t, scales = operands(1, 64, 256, 4, np.float32, np.float32, seed=3)
    y = int8_gemv(jnp.asarray(x), jnp.asarray(weight_t), jnp.asarray(scales), interpret=True)
    with pytest.raises(AssertionError):
        check(y, reference(x, weight_t, scales[::-1]))


def test_default_plans():
    assert not plan(1, 14336, 4096, 64).dot and plan(8, 14336, 4096, 64).dot
    narrow = plan(1, 1024, 4096, 64)  # 32 output blocks: I split to fill the GPU
    assert narrow.splits > 1 and 64 % narrow.splits == 0
    with pytest.raises(ValueError):
        plan(1, 64, 256, 4, block_out=48)
    with pytest.raises(ValueError):
        plan(1, 64, 256, 4, split_in=8)  # 4 groups cannot be split 8 ways


def test_supported_shapes_and_dtypes():
    x, weight_t, scales = operands(1, 64, 256, 4, np.float32, BF16)
    assert supported(16, weight_t, scales, np.float32)
    assert not supported(17, weight_t, scales)  # more rows than a decode product
    assert not supported(1, weight_t, scales, np.float16)  # x dtype
    assert not supported(1, weight_t.astype(np.uint8), scales)
    assert not supported(1, weight_t, scales[:, :32])  # scales do not fit O
    assert not supported(1, weight_t, np.ones((32, 64), np.float32))  # I / R = 8
    assert not supported(1, weight_t, np.ones((3, 64), np.float32))  # R does not divide I
    assert not supported(1, weight_t[None], scales[None])
    with pytest.raises(ValueError):
        int8_gemv(jnp.ones((17, 256)), jnp.asarray(weight_t), jnp.asarray(scales))


def test_products_take_the_kernel_where_layout_says(monkeypatch):
    """products.linear on a TransposedWeight: the kernel (interpret mode here) where
    layout.int8_gemv_in_pallas says so, the same values as XLA's form; XLA's form elsewhere."""
    from runtime import layout, products
    from runtime.quant import TransposedWeight
    x, weight_t, scales = operands(3, 96, 256, 4, np.float32, BF16)
    w = TransposedWeight(jnp.asarray(weight_t), jnp.asarray(scales))
    x = jnp.asarray(x).reshape(1, 3, 256)
    assert not layout.int8_gemv_in_pallas()  # a CPU
    expected = np.asarray(products.linear(x, w))
    calls = []
    real = pallas_gemv.int8_gemv
    monkeypatch.setattr(layout, "int8_gemv_in_pallas", lambda: True)
    monkeypatch.setattr(products, "kernel_product", lambda *a, **k: None)  # CPU kernels off
    monkeypatch.setattr(pallas_gemv, "int8_gemv",
                        lambda *a, **k: calls.append(a[0].shape) or real(*a, interpret=True))
    got = np.asarray(products.linear(x, w))
    assert calls == [(3, 256)]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize("rows,out,x_dtype,scale_dtype", [
    (1, 14336, BF16, BF16),  # the rows variant, Llama-8B's gate/up
    (8, 14336, BF16, BF16),  # the dot variant on tensor cores
    (16, 4100, np.float32, np.float32),  # the dot variant in IEEE float32, O masked
    (2, 1000, BF16, np.float16),  # the rows variant, O masked
])
def test_the_kernel_lowers_to_triton_for_cuda_here(rows, out, x_dtype, scale_dtype):
    """The GPU lowering runs on this CPU (jax lowers for a platform it does not have): the
    kernel's Pallas-to-Triton translation, which interpret mode skips, takes every operation
    the kernel uses, so a lowering error shows here and not first on a lent GPU."""
    x = jax.ShapeDtypeStruct((rows, 4096), x_dtype)
    w = jax.ShapeDtypeStruct((out, 4096), np.int8)
    s = jax.ShapeDtypeStruct((64, out), scale_dtype)
    text = jax.jit(int8_gemv).trace(x, w, s).lower(lowering_platforms=("cuda",)).as_text()
    assert "__gpu$xla.gpu.triton" in text, text[:2000]
