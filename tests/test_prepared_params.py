"""Parameters a caller hands over (run.py's load: build_engine(consume_params=True)) are
prepared a module at a time: the same engine, and the loaded arrays deleted as they go, so a load peaks at the parameters plus one module rather than twice
the parameters (prepared_params.py)."""

import jax
import pytest

from conftest import random_params, single_device_mesh, tiny_config
from runtime import prepared_params as prepared_module
from runtime.engine import build_engine
from runtime.quant import quantize
from runtime.request import Request
from runtime.sharding import place_params

LAYER = "language_model/transformer/layers/decoder_layer/"


@pytest.mark.parametrize("unroll", [True, False])
def test_a_handed_over_tree_is_prepared_a_module_at_a_time_into_the_same_engine(monkeypatch,
                                                                                 unroll):
    config = tiny_config(num_layers=2, emb_size=64, key_size=16)
    params = random_params(config, seed=9)
    for module in ("moe/linear", "moe/linear_v", "moe/linear_1", "multi_head_attention/query"):
        params[LAYER + module]["w"] = quantize(params[LAYER + module]["w"])
    requests = [Request((5, 6, 7), max_new_tokens=6), Request((9, 10), max_new_tokens=6)]

    def tokens(engine):
        return [c.output_ids for c in engine.generate(requests)]

    mesh = single_device_mesh()
    want = tokens(build_engine(config, params, mesh, slots=2, cache_length=16,
                               unroll_layers=unroll))
    handed = place_params(params, mesh)  # as the loader places them
    modules = []
    real = prepared_module.by_module
    monkeypatch.setattr(prepared_module, "PREPARE_BY_MODULE_BYTES", 0)
    monkeypatch.setattr(prepared_module, "by_module",
                        lambda prepare, tree: modules.extend(tree) or real(prepare, tree))
    got = tokens(build_engine(config, handed, mesh, slots=2, cache_length=16,
                              unroll_layers=unroll, consume_params=True))
    assert got == want
    assert len(modules) == len(params)
    assert all(leaf.is_deleted() for leaf in jax.tree.leaves(handed))  # freed as prepared
    kept = place_params(params, mesh)
    build_engine(config, kept, mesh, slots=2, cache_length=16, unroll_layers=unroll)
    assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(kept))  # not handed over
