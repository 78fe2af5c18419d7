"""The int8 weight type: quantisation, the matmul helpers, and int8 vs float logits."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import reference_numpy
from conftest import LAYER, random_params, tiny_config, to_reference
from runtime.models import build_model
from runtime.quant import QuantizedWeight8bit, dequantize, quantize
from runtime.products import linear, per_tile_linear
from runtime.memory import empty_kv

RNG = np.random.default_rng(0)


@pytest.mark.parametrize("rows", [1, 4])
def test_quantize_is_per_channel_and_close(rows):
    w = RNG.normal(size=(3, 16, 6)).astype(np.float32)
    q = quantize(w, rows)
    assert q.weight.dtype == np.int8 and q.weight.shape == w.shape
    assert q.scales.dtype == ml_dtypes.bfloat16 and q.scales.shape == (3, rows, 6)
    assert np.abs(q.weight).max() == 127  # the largest entry of some block maps to +-127
    step = np.repeat(np.asarray(q.scales, np.float32), 16 // rows, axis=-2)
    assert np.all(np.abs(dequantize(q) - w) <= 0.5 * step + 1e-6 * np.abs(w))


def test_exactly_representable_weights_round_trip_bit_exact():
    values = RNG.integers(-127, 128, size=(8, 5)).astype(np.float32)
    values[0] = 127  # pin each column's max so the scale is exactly the chosen one
    scales = np.array([2.0 ** -e for e in range(5)], np.float32)
    w = values * scales
    q = quantize(w)
    np.testing.assert_array_equal(dequantize(q), w)
    np.testing.assert_array_equal(q.weight, values.astype(np.int8))


@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16])
@pytest.mark.parametrize("rows", [1, 4])
def test_matmul_helpers_match_dequantised_product(rows, dtype):
    """Also under bf16 activations (row blocks: XLA:CPU cannot run their batched bf16 dots)."""
    x = RNG.normal(size=(7, 16)).astype(dtype).astype(np.float32)  # representable in dtype
    tolerance = 1e-5 if dtype == np.float32 else 1e-2  # bf16 results
    q = quantize(RNG.normal(size=(16, 6)), rows)
    got = jax.jit(linear)(jnp.asarray(x, dtype), q)
    np.testing.assert_allclose(np.asarray(got, np.float32), x @ dequantize(q), rtol=tolerance,
                               atol=tolerance)

    experts = quantize(RNG.normal(size=(3, 16, 6)), rows)  # [E, I, O]
    choice = np.array([2, 0, 2, 1, 0, 2, 1])
    want = np.einsum("mi,mio->mo", x, dequantize(experts)[choice])
    # one row per tile (decode)
    take = QuantizedWeight8bit(experts.weight[choice], experts.scales[choice])
    got = jax.jit(per_tile_linear)(jnp.asarray(x, dtype)[:, None], take)[:, 0]
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=tolerance,
                               atol=tolerance)
    # several rows per tile (prefill)
    tiles = jnp.asarray(x[:6].reshape(3, 2, 16), dtype)
    got = jax.jit(per_tile_linear)(tiles, experts)
    want = np.einsum("nti,nio->nto", x[:6].reshape(3, 2, 16), dequantize(experts))
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=tolerance,
                               atol=tolerance)


def _representable(w, rows):
    """Snap a float weight to values that int8 x bf16 scales represent exactly."""
    return dequantize(quantize(w, rows))


@pytest.mark.slow
def test_int8_model_gives_the_float_logits_for_representable_weights():
    config = tiny_config()
    float_params = random_params(config, seed=7)
    int8_params = {k: dict(v) for k, v in float_params.items()}
    for module, rows in [("multi_head_attention/query", 1), ("multi_head_attention/key", 1),
                         ("multi_head_attention/value", 1), ("multi_head_attention/linear", 8),
                         ("moe/linear", 1), ("moe/linear_v", 1), ("moe/linear_1", 8)]:
        snapped = _representable(float_params[LAYER + module]["w"], rows)
        float_params[LAYER + module] = {"w": snapped}
        int8_params[LAYER + module] = {"w": quantize(snapped, rows)}
        np.testing.assert_array_equal(dequantize(int8_params[LAYER + module]["w"]), snapped)

    model = build_model(config)
    tokens = jnp.array([[3, 14, 15, 92, 65, 35, 89, 79]])
    kv = empty_kv(config, 1, 8, jnp.float32)
    positions = jnp.arange(8)[None]
    apply = jax.jit(model.apply)
    from_float = np.asarray(apply(float_params, tokens, kv, kv, positions)[0])
    from_int8 = np.asarray(apply(int8_params, tokens, kv, kv, positions)[0])
    np.testing.assert_allclose(from_int8, from_float, rtol=1e-5, atol=1e-5)
    want = reference_numpy.forward(to_reference(int8_params), config, np.asarray(tokens))
    np.testing.assert_allclose(from_int8, want, rtol=2e-4, atol=2e-4)
