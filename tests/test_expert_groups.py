"""Pairs grouped by expert and run through their own expert in tiles (the MoE prefill and
batched-decode path) give every pair its own expert's product, whatever the group sizes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import runtime.models.transformer as model_module
from runtime.expert_groups import group_by_expert, group_tile, run_grouped
from runtime.quant import dequantize, quantize
from runtime.products import linear

RNG = np.random.default_rng(7)


def _expected(rows, choice, weights):
    return np.einsum("md,mdo->mo", rows, weights[choice])


@pytest.mark.parametrize("tile", [1, 2, 4, 16])
@pytest.mark.parametrize("int8", [False, True])
def test_every_pair_gets_its_own_experts_product(tile, int8):
    experts = 5
    # skewed groups: expert 1 empty, expert 3 a multiple of most tiles, expert 0 large
    choice = np.array([0] * 11 + [2] * 3 + [3] * 8 + [4] * 1)
    choice = RNG.permutation(choice)
    rows = RNG.normal(size=(len(choice), 12)).astype(np.float32)
    weights = RNG.normal(size=(experts, 12, 7)).astype(np.float32)
    stored = quantize(weights) if int8 else weights
    dense = dequantize(stored) if int8 else weights

    def expert_fn(e, x):
        return linear(x, jax.tree.map(lambda a: jnp.asarray(a)[e], stored))

    got = jax.jit(lambda r, c: run_grouped(r, c, experts, tile, expert_fn, 7))(
        jnp.asarray(rows), jnp.asarray(choice))
    np.testing.assert_allclose(np.asarray(got), _expected(rows, choice, dense), rtol=1e-5,
                               atol=1e-5)


@pytest.mark.slow
def test_each_expert_runs_only_as_many_tiles_as_its_group_needs():
    calls = []  # (expert, number of rows of the tile) per traced call; count tiles at run time
    choice = jnp.asarray([2, 2, 2, 0, 2, 2])
    order, starts, sizes = group_by_expert(choice, 3)
    assert np.asarray(sizes).tolist() == [1, 0, 5]
    assert np.asarray(starts).tolist() == [0, 1, 1]
    assert np.asarray(choice)[np.asarray(order)].tolist() == [0, 2, 2, 2, 2, 2]

    def expert_fn(e, x):
        calls.append(e)
        jax.debug.callback(lambda e=e: ran.append(e))
        return x

    ran = []
    out = run_grouped(jnp.arange(12.0).reshape(6, 2), choice, 3, 2, expert_fn, 2)
    jax.effects_barrier()
    np.testing.assert_array_equal(np.asarray(out), np.arange(12.0).reshape(6, 2))
    assert sorted(calls) == [0, 1, 2]  # one loop body per expert
    assert sorted(ran) == [0, 2, 2, 2]  # 1 row: 1 tile; none: 0; 5 rows in tiles of 2: 3


def test_group_tile_covers_the_mean_group():
    assert [group_tile(m, 8) for m in (16, 32, 64, 256, 4096, 100_000)] == \
        [8, 8, 8, 32, 256, 256]


@pytest.mark.slow
@pytest.mark.parametrize("unrolled", [False, True])
def test_moe_layer_with_small_tiles_matches_reference(monkeypatch, unrolled):
    """Groups that span several tiles, with partial last tiles spilling into the next expert's
    rows, through the whole model against the numpy reference."""
    import reference_numpy
    from conftest import random_params, tiny_config, to_reference
    from test_model import forward_logits

    monkeypatch.setattr(model_module, "group_tile", lambda pairs, experts: 2)
    config = tiny_config()
    params = random_params(config, seed=11)
    tokens = np.array([[17, 42, 99, 5, 61, 7, 8, 120, 33, 2, 64]])
    want = reference_numpy.forward(to_reference(params), config, tokens)
    model = model_module.build_transformer(config, unroll_layers=unrolled)
    if unrolled:  # one buffer per layer and per expert: the grouped loops read those
        params = model.prepare_params(params)
    got = forward_logits(model, params, tokens)
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=2e-4)
