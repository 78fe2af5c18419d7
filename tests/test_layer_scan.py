"""The layer scan that hands its layers views of the stacked matmul weights (models/layer_scan.py):
the same parameters and the same logits as hk.layer_stack, the CPU kernels reading each layer of
a float32 stack where it lies (no slice copied out), and the layout choosing it only where that
pays (float32 stacks, one slot, one CPU device)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import random_params, tiny_config
from runtime import layout
from runtime.layout import Layout
from runtime.memory import empty_kv
from runtime.models import build_model
from runtime.quant import quantize

DENSE = {"num_experts": 0, "num_selected_experts": 0}


def _prefill_then_decode(model, params, tokens):
    """Logits of a prefill of tokens[:, :-1], then of a decode of the last tokens over the
    memory it wrote (B rows: the products the CPU kernels take): ([B, T-1, V], [B, 1, V])."""
    rows, length = tokens.shape
    kv = empty_kv(model.config, rows, length, jnp.float32)
    apply = jax.jit(model.apply)
    positions = jnp.broadcast_to(jnp.arange(length - 1), (rows, length - 1))
    prompt, keys, values = apply(params, tokens[:, :-1], kv, kv, positions)
    step, _, _ = apply(params, tokens[:, -1:], keys, values,
                       jnp.full((rows, 1), length - 1))
    return np.asarray(prompt), np.asarray(step)


@pytest.mark.parametrize("options", [DENSE, {}], ids=["dense", "moe"])
def test_views_compute_what_the_layer_stack_computes(options):
    config = tiny_config(num_layers=3, **options)
    params = random_params(config, seed=3)
    tokens = jnp.array([[5, 6, 7, 8, 9]])
    want = _prefill_then_decode(build_model(config), params, tokens)
    got = _prefill_then_decode(build_model(config, layer_views=True), params, tokens)
    for a, b in zip(want, got):  # the kernel's summation order against XLA's dot: rounding
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
    # decode equals the prefill of the same context (the whole prompt at once)
    kv = empty_kv(config, 1, 5, jnp.float32)
    views = build_model(config, layer_views=True)
    full = np.asarray(jax.jit(views.apply)(params, tokens, kv, kv, jnp.arange(5)[None])[0])
    np.testing.assert_allclose(got[1][0, -1], full[0, -1], rtol=1e-5, atol=1e-5)


def _weight_slices(model, params, config) -> int:
    """How many per-layer copies of the query weight [D, N*H] the compiled one-row decode
    makes (slices out of the stack, as fusions or dynamic-slices)."""
    kv = empty_kv(config, 1, 4, jnp.float32)
    text = jax.jit(model.apply).lower(params, jnp.array([[5]]), kv, kv,
                                      jnp.array([[3]])).compile().as_text()
    shape = f"f32[{config.emb_size},{config.num_q_heads * config.key_size}]"
    return len(re.findall(re.escape(shape) + r"\{1,0\} (?:fusion|dynamic-slice)\(", text))


def test_the_kernels_read_the_float32_stack_in_place():
    config = tiny_config(num_layers=3, **DENSE)
    params = random_params(config, seed=4)
    assert _weight_slices(build_model(config), params, config) > 0  # the plain scan copies
    assert _weight_slices(build_model(config, layer_views=True), params, config) == 0


def test_the_layout_tiles_weights_and_reads_stacks_in_place(monkeypatch):
    config = tiny_config(num_layers=2, emb_size=64, key_size=16, intermediate_size=128, **DENSE)
    floats = random_params(config, seed=5)
    int8 = {module: {name: quantize(leaf) if name == "w" and np.ndim(leaf) == 3 else leaf
                     for name, leaf in leaves.items()} for module, leaves in floats.items()}

    def views(params, config=config, slots=1, **choices):
        chosen = Layout.choose(config, params, 1, slots, **choices)
        return chosen.layer_views, chosen.transposed, chosen.tiled

    assert views(floats) == (True, None, "all")  # scanned (tiny layers): panels
    assert views(floats, slots=16) == (True, None, "all")  # panels for 16 rows too
    many = layout.PANEL_SLOTS
    assert views(floats, slots=many) == (True, None, "all")  # and up to the panels' cap
    assert views(floats, slots=many + 1)[0] is False  # more rows than the kernels take
    assert views(int8) == (True, None, "quantized")
    assert views(int8, slots=many) == (True, None, "quantized")
    assert views(int8, slots=many + 1) == (False, None, None)
    assert views(int8, unroll_layers=True) == (False, "float", "quantized")  # per-layer buffers
    assert views(floats, unroll_layers=True) == (False, None, "all")  # not transposed
    assert views(floats, config.replace(dtype="bfloat16")) == (False, None, None)
    assert views(int8, config.replace(dtype="bfloat16")) == (True, None, "quantized")
    assert views(int8, kernels_built=False) == (False, None, None)  # no compiler: no kernels
    narrow = random_params(tiny_config(num_layers=2, **DENSE), seed=5)  # 32 columns: no panels
    assert views(narrow, tiny_config(num_layers=2, **DENSE), slots=4) == (True, "float", None)
    monkeypatch.setattr(layout, "TILED_WEIGHTS", False)  # row-major: int8 slices copied
    assert views(int8) == (False, None, None)
    assert views(floats) == (True, None, None)
    assert views(floats, slots=16) == (True, "float", None)  # the transposed kernel
    assert views(floats, slots=17) == (False, None, None)  # more rows than it takes
    monkeypatch.setattr(layout, "LAYER_VIEWS_IN_SCAN", False)  # the A/B switch
    assert views(floats) == (False, None, None)


def test_transposed_stacks_under_views_decode_several_rows_alike():
    """A several-slot engine's layout: float stacks transposed [L, O, I] and viewed, three rows
    of decode through the float32 transposed kernel, against the plain scan."""
    from runtime.models.stored_weights import transpose_stacked_weights

    config = tiny_config(num_layers=3, **DENSE)
    params = random_params(config, seed=6)
    tokens = jnp.array([[5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 15, 16]])
    want = _prefill_then_decode(build_model(config), params, tokens)
    stacks = jax.jit(transpose_stacked_weights)(params)
    got = _prefill_then_decode(build_model(config, layer_views=True), stacks, tokens)
    for a, b in zip(want, got):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
