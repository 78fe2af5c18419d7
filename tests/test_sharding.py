"""Partition rules, mesh flags, and sharded results equal to single-device ones."""

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import run_on_8_devices
from runtime import sharding
from runtime.config import load_config
from runtime.errors import ShardingError
from runtime.parameter_shapes import abstract_params
from runtime.sharding import make_mesh, param_specs, parse_mesh_flag

HERE = Path(__file__).resolve().parent


@pytest.mark.parametrize("preset", ["grok-1", "tiny-test"])
def test_every_parameter_matches_exactly_one_rule(preset):
    specs = param_specs(abstract_params(load_config(preset)), make_mesh({"model": 1}))
    assert len(specs) == 14


def test_a_parameter_without_rule_is_named(monkeypatch):
    rules = tuple(r for r in sharding.PARTITION_RULES if "router" not in r[0])
    monkeypatch.setattr(sharding, "PARTITION_RULES", rules)
    with pytest.raises(ShardingError, match="decoder_layer/router/w matches no partition rule"):
        param_specs(abstract_params(load_config("tiny-test")), make_mesh({"model": 1}))


def test_a_parameter_with_two_rules_is_named(monkeypatch):
    rules = sharding.PARTITION_RULES + ((r"rms_norm_3/scale$", ("layers", None)),)
    monkeypatch.setattr(sharding, "PARTITION_RULES", rules)
    with pytest.raises(ShardingError, match="rms_norm_3/scale matches 2 partition rules"):
        param_specs(abstract_params(load_config("tiny-test")), make_mesh({"model": 1}))


def test_grok1_specs_shard_the_big_weights():
    specs = param_specs(abstract_params(load_config("grok-1")), make_mesh({"model": 1}))
    layer = "language_model/transformer/layers/decoder_layer/"
    assert tuple(specs[layer + "moe/linear"]["w"]) == (None, None, None, "model")
    assert tuple(specs[layer + "moe/linear_1"]["w"]) == (None, None, "model", None)
    assert tuple(specs[layer + "multi_head_attention/query"]["w"]) == (None, None, "model")


@pytest.mark.parametrize("flag, message", [
    ("model=0", "size of 'model' must be a positive integer"),
    ("foo=2", "expected AXIS=SIZE"),
    ("model", "expected AXIS=SIZE"),
    ("model=2,model=2", "given twice"),
    ("", "no axes"),
    ("model=64", "needs 64 devices"),
])
def test_bad_mesh_flags_are_named(flag, message):
    with pytest.raises(ShardingError, match=message):
        make_mesh(parse_mesh_flag(flag))


def test_mesh_flag_parses():
    assert parse_mesh_flag("data=2, model=4") == {"data": 2, "model": 4}


@pytest.mark.slow
def test_sharded_equals_single_device_on_8_devices():
    results = json.loads(run_on_8_devices(HERE / "sharded_run.py", timeout=600))
    assert results.pop("default_mesh") == {"data": 1, "model": 8}
    for family in ("llama", "mixtral"):  # Hugging Face checkpoints loaded onto a 2-axis mesh
        result = results.pop(family)
        assert result["embedding_split"] == 4, family  # D split over the model axis
        assert result["tokens"] == result["expected"], family
    transposed = results.pop("transposed")  # the GPU layout on an expert x model mesh
    single = results.pop("model=1")
    assert transposed["tokens"] == single["tokens"]
    assert transposed["devices_holding_query"] == 8
    assert single["devices_holding_moe"] == 1
    assert len(results) == 3
    for mesh, result in results.items():
        assert result["devices_holding_moe"] == 8, mesh
        # 2 KV heads: on model=4 each is stored twice and the memory splits by heads; on
        # model=8 (4 query heads) it splits by head dim and XLA gathers it every step
        assert result["kv_heads"] == (4 if "model=4" in mesh else 2), mesh
        assert (result["memory_spec"][2] == "model") == ("model=4" in mesh), mesh
        assert bool(result["memory_gathered"]) == ("model=8" in mesh), mesh
        assert result["tokens"] == single["tokens"], mesh
        np.testing.assert_allclose(result["logits"], single["logits"], rtol=1e-5, atol=1e-5,
                                   err_msg=mesh)
