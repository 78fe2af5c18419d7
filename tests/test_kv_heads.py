"""KV heads stored several times over when the model axis has more devices than the model has KV
heads (runtime/kv_heads.py): when that applies, and that the copied model computes the same
logits. The 8-device engines (tests/sharded_run.py, tests/test_plan.py) check the placement."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import LAYER, random_params, tiny_config

from runtime.config import load_config
from runtime.kv_heads import (copy_kv_heads, head_splitting_meshes, kv_head_copies,
                              memory_split_by_heads, with_kv_head_copies)
from runtime.memory import empty_kv
from runtime.models import build_model
from runtime.planning import plan_for_target
from runtime.quant import QuantizedWeight8bit, quantize


@pytest.mark.parametrize("kv_heads, q_heads, model_axis, copies", [
    (2, 4, 1, 1),  # one device
    (2, 4, 2, 1),  # the heads split already
    (2, 4, 4, 2),
    (2, 4, 8, 1),  # 8 copies would leave half a query head per device: not helped
    (8, 48, 8, 1),  # Grok-1 on 8 devices
    (8, 48, 16, 2),  # Grok-1 on 16
    (8, 48, 12, 3),  # lcm(8, 12) = 24 heads, 2 per device
    (8, 48, 32, 1),  # 48 query heads do not split over 32
    (1, 8, 8, 8),  # multi-query attention
])
def test_copies_follow_the_model_axis(kv_heads, q_heads, model_axis, copies):
    config = tiny_config(num_kv_heads=kv_heads, num_q_heads=q_heads)
    assert kv_head_copies(config, model_axis) == copies
    served = with_kv_head_copies(config, copies)
    assert served.num_kv_heads == kv_heads * copies
    assert (served is config) == (copies == 1)


def test_other_architectures_keep_their_layout():
    assert kv_head_copies(load_config("demo").replace(architecture="mamba2"), 8) == 1


@pytest.mark.slow
@pytest.mark.parametrize("int8", [False, True])
def test_copied_heads_give_the_same_logits(int8):
    """Each KV head stored 2 (and 4) times: the copied model, on the copied projections, computes
    the logits and the (copied) KV of the original, int8 projections included."""
    config = tiny_config(num_layers=2, num_q_heads=8, num_kv_heads=2)
    params = random_params(config, seed=13)
    if int8:
        for name in ("key", "value"):
            path = LAYER + f"multi_head_attention/{name}"
            params[path] = {"w": quantize(params[path]["w"])}
    tokens = jnp.array([[5, 6, 7, 8, 9], [40, 41, 42, 43, 44]])
    positions = jnp.broadcast_to(jnp.arange(5), (2, 5))
    base = build_model(config)
    kv = empty_kv(config, 2, 5, jnp.float32)
    want_logits, want_keys, _ = jax.jit(base.apply)(params, tokens, kv, kv, positions)
    for copies in (2, 4):
        served = with_kv_head_copies(config, copies)
        copied = copy_kv_heads(params, config.num_kv_heads, copies)
        key = copied[LAYER + "multi_head_attention/key"]["w"]
        stored = key.weight if isinstance(key, QuantizedWeight8bit) else key
        assert stored.shape[-1] == copies * config.num_kv_heads * config.key_size
        assert copied[LAYER + "moe/linear"] is params[LAYER + "moe/linear"]  # untouched
        kv = empty_kv(served, 2, 5, jnp.float32)
        logits, keys, _ = jax.jit(build_model(served).apply)(copied, tokens, kv, kv, positions)
        np.testing.assert_allclose(np.asarray(logits), np.asarray(want_logits), rtol=1e-5,
                                   atol=1e-5)
        # copy c of head k is head k: [L, B, K * copies, S, H] -> [L, B, K, copies, S, H]
        np.testing.assert_allclose(
            np.asarray(keys).reshape(*want_keys.shape[:2], config.num_kv_heads, copies,
                                     *want_keys.shape[3:]),
            np.repeat(np.asarray(want_keys)[:, :, :, None], copies, axis=3), rtol=1e-5,
            atol=1e-6)


def test_meshes_that_split_grok_memory_by_heads():
    grok = load_config("grok-1")
    assert [memory_split_by_heads(grok, m) for m in (1, 8, 16, 32)] == [True, True, True, False]
    assert head_splitting_meshes(grok, {"data": 1, "model": 32})[0] == \
        {"data": 1, "expert": 2, "model": 16}
    dense = tiny_config(num_q_heads=4, num_kv_heads=2, num_experts=0, num_selected_experts=0)
    assert head_splitting_meshes(dense, {"model": 8}) == [{"model": 4, "data": 2},
                                                         {"model": 2, "data": 4},
                                                         {"model": 1, "data": 8}]


def test_the_plan_warns_when_the_memory_splits_by_head_dim():
    grok = load_config("grok-1")
    pod = plan_for_target(grok, "v5e-32", "grok-int8", slots=8, cache_length=4096).table()
    pod = " ".join(pod.split())  # the note is wrapped
    assert "the KV memory splits by head dim" in pod
    assert "--mesh data=1,expert=2,model=16 splits it by heads" in pod
    box = plan_for_target(grok, "h100x8", "grok-int8", slots=1, cache_length=8192).table()
    assert "head dim" not in box
