"""GGUF layer stacks of several types (layer_types.LayersByType): Q4_K_M files keep ffn_down and
attn_v in Q6_K in some layers and Q4_K in the others. Kept one stack per type, every layer holds
its file's own values (a merged int8 stack holds them exactly too, at three times the bytes) in
its own bytes; engines that unroll or view their layers read them so, and the others merge them
into the reader's one int8 stack, bit for bit."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import LAYER, run_on_8_devices, single_device_mesh
from gguf_helpers import (KQUANT_MODEL, dequantized, kquant_model_shapes, random_blocks,
                          write_tensors_gguf)

import runtime.cpu_kernels as cpu_kernels
from runtime import layout
from runtime.checkpoint.gguf_file import open_gguf
from runtime.checkpoint.gguf_reader import Piece, Source, _by_type, _quantized_leaf
from runtime.checkpoint.lazy import LazyParam
from runtime.checkpoint.load import default_config, load_params, load_params_on_mesh
from runtime.layer_types import LayersByType, layer_of, merged
from runtime.quant import QuantizedWeight8bit, dequantize
from runtime.quant4 import QuantizedWeight4bit, dequantize_int4

def _read(leaf):
    return jax.tree.map(lambda part: part.read(None), leaf,
                        is_leaf=lambda x: isinstance(x, LazyParam))


def _values(leaf) -> np.ndarray:
    leaf = jax.tree.map(np.asarray, leaf)
    return dequantize_int4(leaf) if isinstance(leaf, QuantizedWeight4bit) else dequantize(leaf)


@pytest.fixture(scope="module")
def layers_file(tmp_path_factory):
    """Two [24, 512] tensors (numpy layout: 24 outputs, two K-quant super-blocks a row) of each
    type, `<type>` and `<type>.b`, to stack as layers; and gguf-py's float values of each."""
    rng = np.random.default_rng(29)
    tensors = {q + tail: (random_blocks(q, (24, 512), rng), q) for tail in ("", ".b")
               for q in ("Q8_0", "Q5_0", "Q6_K", "Q4_0", "Q4_K", "Q5_K")}
    path = tmp_path_factory.mktemp("layers") / "layers.gguf"
    write_tensors_gguf(path, tensors)
    sources = {t.name: Source(t, t.tensor_type.name, None) for t in open_gguf(path).tensors}
    return sources, {q: dequantized(*value).T for q, value in tensors.items()}  # [I, O]


@pytest.mark.parametrize("types", [("Q6_K", "Q4_K", "Q6_K", "Q4_K"), ("Q4_K", "Q8_0"),
                                   ("Q4_0", "Q5_K", "Q4_0"), ("Q8_0", "Q6_K")])
def test_each_layer_keeps_its_values_and_merged_is_the_readers_stack(layers_file, types):
    sources, want = layers_file
    names = [q + ".b" * types[:layer].count(q) for layer, q in enumerate(types)]
    pieces = [Piece(sources[name], (layer,), "matrix") for layer, name in enumerate(names)]
    full = (len(types), 512, 24)
    typed = _read(_by_type(full, pieces))
    kinds = sorted(set(types))
    assert isinstance(typed, LayersByType) and typed.shape == full
    assert typed.kinds == tuple(kinds.index(q) for q in types)
    for stack, name in zip(typed.stacks, kinds):
        assert stack.shape == (types.count(name), 512, 24)
        assert isinstance(stack, QuantizedWeight4bit if name in ("Q4_0", "Q4_K")
                          else QuantizedWeight8bit), name
    for layer, (qtype, name) in enumerate(zip(types, names)):  # the file's own values
        np.testing.assert_array_equal(_values(layer_of(typed, layer)), want[name])
    # merged: the one int8 stack the reader makes of the mixed pieces, bit for bit
    one = _read(_quantized_leaf(full, pieces, table=False))
    both = merged(typed)
    assert both.weight.dtype == np.int8 and both.scales.dtype == one.scales.dtype
    np.testing.assert_array_equal(both.weight, one.weight)
    np.testing.assert_array_equal(both.scales, one.scales)
    assert (both.mins is None) == (one.mins is None) == (not {"Q4_K", "Q5_K"} & set(types))
    if one.mins is not None:
        assert both.mins.dtype == one.mins.dtype
        np.testing.assert_array_equal(both.mins, one.mins)
    np.testing.assert_array_equal(dequantize(one), np.stack([want[name] for name in names]))


@pytest.mark.slow  # engines over two typed stacks, each R: in the full suite
@pytest.mark.parametrize("row_blocks", [1, 8])
def test_int8_stacks_of_any_row_blocks_beside_int4_ones(row_blocks):
    """ffn_down as Q4_K-like int4 layers (0, 2) and an int8 layer (1) of `row_blocks` scale
    blocks, ffn_up as int8 layers (0, 2) beside an int4 layer (1): engines scanned (3 slots)
    and unrolled (1 slot), one in float32 and one in bf16 activations (crossed over the two
    R). Decode logits equal prefill logits; float32 prefill logits equal those of a scanned
    engine over the float values."""
    from test_dtype_ladder import assert_decode_equals_prefill
    from test_super_scaled_tables import q4_k_like
    from conftest import random_params, tiny_config
    from runtime.quant import quantize
    config = tiny_config(num_layers=3, num_experts=0, num_selected_experts=0, emb_size=64,
                         key_size=16, intermediate_size=128)
    params = random_params(config, seed=23, scale=0.3)
    floats = dict(params)
    for name, kinds in (("mlp/linear_1", (0, 1, 0)), ("mlp/linear_v", (1, 0, 1))):
        w = np.asarray(params[LAYER + name]["w"])  # [3, I, O]
        int4 = q4_k_like(w[[layer for layer in range(3) if kinds[layer] == 0]], 8)
        int8 = quantize(w[[layer for layer in range(3) if kinds[layer] == 1]], row_blocks,
                        np.float32)
        typed = LayersByType([int4, int8], kinds)
        params[LAYER + name] = {"w": typed}
        floats[LAYER + name] = {"w": np.stack([_values(layer_of(typed, layer))
                                               for layer in range(3)])}
    want = _engine_logits(config, floats, 3, False)[0]  # the scan: no layer_of
    dtypes = ("float32", "bfloat16") if row_blocks == 1 else ("bfloat16", "float32")
    for (slots, unroll), dtype in zip(((3, False), (1, True)), dtypes):
        logits, (decoded, prefilled, _), engine = _engine_logits(config, params, slots, unroll,
                                                                 dtype)
        assert engine.layout.unrolled == unroll
        if cpu_kernels.available():  # else merged: a plain scan
            assert engine.layout.layer_views != unroll
        assert_decode_equals_prefill(decoded, prefilled, dtype)
        if dtype == "float32":
            error = np.abs(logits - want).max() / np.abs(want).max()
            assert error < 1e-5, (slots, unroll, error)


# ---- a Q4_K_M-like model: Q6_K in the first and last layers' attn_v / ffn_down --------------

HF3 = dict(KQUANT_MODEL, num_hidden_layers=3)
MOE = dict(HF3, num_local_experts=4, num_experts_per_tok=2)
MIXED = {"blk.0.attn_v": "Q6_K", "blk.2.attn_v": "Q6_K", "blk.0.ffn_down": "Q6_K",
         "blk.2.ffn_down": "Q6_K", "blk.0.ffn_down_exps": "Q6_K", "blk.2.ffn_down_exps": "Q6_K",
         "token_embd": "Q6_K", "output": "Q6_K", "blk.1.ffn_up": "Q5_0", "blk.0.ffn_up": "Q8_0",
         "blk.2.ffn_up": "Q8_0"}


def _q4_k_m_file(folder, hf: dict, seed: int, types: dict = MIXED, bulk: str = "Q4_K",
                 name: str = "q4_k_m"):
    """(a Q4_K_M-like GGUF `<name>.gguf` of the K-quant model of `hf`, an F32 GGUF of gguf-py's
    values of it): `types` (MIXED: ffn_up of Q5_0 and Q8_0 layers, int8 in one group and scale
    dtype, one stack), `bulk` elsewhere, routers float."""
    tensors, floats = {}, {}
    rng = np.random.default_rng(seed)
    for tensor, shape in kquant_model_shapes(hf).items():
        qtype = "F32" if len(shape) == 1 or "gate_inp" in tensor else \
            types.get(tensor[:-len(".weight")], bulk)
        value = rng.uniform(0.8, 1.2, shape) if len(shape) == 1 else \
            rng.normal(0, 0.05, shape) if qtype == "F32" else random_blocks(qtype, shape, rng)
        tensors[tensor] = (value, qtype)
        floats[tensor] = (dequantized(value, qtype), "F32")
    write_tensors_gguf(folder / f"{name}.gguf", tensors, hf)
    write_tensors_gguf(folder / "f32.gguf", floats, hf)
    return folder / f"{name}.gguf", folder / "f32.gguf"


@pytest.fixture(scope="module")
def q4_k_m_files(tmp_path_factory):
    return _q4_k_m_file(tmp_path_factory.mktemp("q4_k_m"), HF3, seed=5)


def _engine_logits(config, params, slots: int, unroll, dtype: str = "float32"):
    """(prefill logits of three contexts, decode logits and the prefill logits of the same
    contexts, the engine) of an engine over `params`."""
    from test_dtype_ladder import ladder, prefill_logits, prompt_for
    from runtime.engine import build_engine
    engine = build_engine(config.replace(dtype=dtype), params, single_device_mesh(),
                          slots=slots, cache_length=40, unroll_layers=unroll)
    prompts = [prompt_for(config, seed) for seed in range(3)]
    return prefill_logits(engine, prompts), ladder(engine, prompts[:slots], slots - 1), engine


@pytest.mark.slow  # five engines over the GGUF model: in the full suite
@pytest.mark.skipif(not cpu_kernels.available(), reason="no C++ compiler")
def test_engines_read_each_layer_in_its_own_type(q4_k_m_files, monkeypatch):
    """Loaded for one CPU device, the mixed stacks stay one stack per type, ffn_up's int8 types
    one stack. Engines scanned (layer views, 3 slots: a switch on each layer's type) and
    unrolled (1 slot), float32 and bf16 activations (and int8, scanned): prefill logits equal the float model's
    of the file's values, decode logits equal prefill logits, and a step reads fewer bytes
    than over the merged stacks. An engine whose scan slices its stacks (no panels) merges
    them: its logits equal those of the stacks merged by the reader, bit for bit."""
    from test_dtype_ladder import assert_decode_equals_prefill
    from runtime.benchmark import weight_bytes_per_step
    path, floats = q4_k_m_files
    config = default_config(path)
    assert layout.layer_types_kept()
    params = load_params_on_mesh(path, config, single_device_mesh())
    for module in ("multi_head_attention/value", "mlp/linear_1"):
        leaf = params[LAYER + module]["w"]
        assert isinstance(leaf, LayersByType) and leaf.kinds == (1, 0, 1), module
        assert [type(s).__name__ for s in leaf.stacks] == ["QuantizedWeight4bit",
                                                           "QuantizedWeight8bit"]
    assert isinstance(params[LAYER + "mlp/linear_v"]["w"], QuantizedWeight8bit)
    reference = _engine_logits(config, load_params(floats, config), 1, True)[0]
    monkeypatch.setattr(layout, "LAYER_TYPES_KEPT", False)
    one_stack = load_params_on_mesh(path, config, single_device_mesh())
    monkeypatch.setattr(layout, "LAYER_TYPES_KEPT", True)
    assert isinstance(one_stack[LAYER + "mlp/linear_1"]["w"], QuantizedWeight8bit)
    for slots, unroll, dtype in ((3, False, "float32"), (1, True, "float32"),
                                 (3, False, "bfloat16")):
        logits, (decoded, prefilled, _), engine = _engine_logits(config, params, slots, unroll,
                                                                 dtype)
        assert engine.layout.unrolled == unroll and engine.layout.layer_views != unroll
        assert_decode_equals_prefill(decoded, prefilled, dtype)
        if dtype == "float32":
            error = np.abs(logits - reference).max() / np.abs(reference).max()
            assert error < 1e-5, (slots, unroll, error)
            merged_engine = _engine_logits(config, one_stack, slots, unroll)[2]
            typed_bytes, merged_bytes = (sum(weight_bytes_per_step(config, e.params, slots)
                                             .values()) for e in (engine, merged_engine))
            assert typed_bytes < merged_bytes, (typed_bytes, merged_bytes)
    monkeypatch.setattr(layout, "INT8_ACTIVATIONS", True)  # x rounded to int8 for each type
    _, (decoded, prefilled, _), engine = _engine_logits(config, params, 3, False)
    assert isinstance(engine.params[LAYER + "mlp/linear_1"]["w"], LayersByType)
    assert_decode_equals_prefill(decoded, prefilled, "float32")
    monkeypatch.setattr(layout, "INT8_ACTIVATIONS", False)
    monkeypatch.setattr(layout, "TILED_WEIGHTS", False)  # a plain scan: merged by the engine
    sliced, _, engine = _engine_logits(config, params, 3, False)
    assert not engine.layout.layer_views
    assert isinstance(engine.params[LAYER + "mlp/linear_1"]["w"], QuantizedWeight8bit)
    np.testing.assert_array_equal(sliced, _engine_logits(config, one_stack, 3, False)[0])


@pytest.mark.slow  # three MoE engines: in the full suite
@pytest.mark.skipif(not cpu_kernels.available(), reason="no C++ compiler")
def test_moe_expert_stacks_keep_their_types_unrolled(tmp_path):
    """Mixtral Q4_K_M files mix Q4_K and Q6_K layers of ffn_down_exps [L, E, I, O]: kept one
    stack per type, the unrolled engine (experts in panels) gives the float model's logits of
    the file's values; a scanned one (whose scan slices expert stacks) merges them, its logits
    those of the experts merged by the reader, bit for bit."""
    from test_dtype_ladder import assert_decode_equals_prefill
    path, floats = _q4_k_m_file(tmp_path, MOE, seed=6)
    config = default_config(path)
    params = load_params_on_mesh(path, config, single_device_mesh())
    experts = params[LAYER + "moe/linear_1"]["w"]
    assert isinstance(experts, LayersByType) and experts.kinds == (1, 0, 1)
    assert experts.stacks[0].shape == (1, 4, 256, 256)
    reference = _engine_logits(config, load_params(floats, config), 3, False)[0]  # no layer_of
    logits, (decoded, prefilled, _), engine = _engine_logits(config, params, 1, None)
    assert engine.layout.unrolled
    assert_decode_equals_prefill(decoded, prefilled, "float32")
    error = np.abs(logits - reference).max() / np.abs(reference).max()
    assert error < 1e-5, error
    scanned, (decoded, prefilled, _), engine = _engine_logits(config, params, 3, False)
    assert isinstance(engine.params[LAYER + "moe/linear_1"]["w"], QuantizedWeight8bit)
    assert_decode_equals_prefill(decoded, prefilled, "float32")
    monkeypatch = pytest.MonkeyPatch()
    with monkeypatch.context() as patched:
        patched.setattr(layout, "LAYER_TYPES_KEPT", False)
        one_stack = load_params_on_mesh(path, config, single_device_mesh())
    down = LAYER + "moe/linear_1"  # the reader's merged experts, the other stacks as kept
    partly = {**params, down: {"w": one_stack[down]["w"]}}
    np.testing.assert_array_equal(scanned, _engine_logits(config, partly, 3, False)[0])


@pytest.mark.slow  # a subprocess on 8 simulated devices: in the full suite
def test_mixed_stacks_on_a_mesh_keep_their_types_or_merge_there(q4_k_m_files):
    """tests/layer_types_on_8_devices.py: unrolled on data 2 x model 4 (KV heads copied), the
    float model's logits of the file's values; scanned, the reader's merged stacks' logits."""
    path, floats = q4_k_m_files
    last = run_on_8_devices(Path(__file__).parent / "layer_types_on_8_devices.py",
                            Path(__file__).parent, path, floats, timeout=600)
    assert last.startswith("ok "), last


# ---- a Q2_K-like model: Q2_K, Q3_K and Q4_K layers, all int4 in groups of 16 or 32 --------

Q2_K_FILE = {"blk.0.attn_v": "Q4_K", "blk.1.attn_v": "Q3_K", "blk.2.attn_v": "Q3_K",
             "blk.0.ffn_down": "Q3_K", "blk.2.ffn_down": "Q4_K", "token_embd": "Q2_K",
             "output": "Q6_K"}


@pytest.mark.slow  # engines over the GGUF model: in the full suite
@pytest.mark.skipif(not cpu_kernels.available(), reason="no C++ compiler")
def test_q2_k_and_q3_k_load_as_int4_in_groups_of_16(tmp_path, monkeypatch):
    """llama.cpp's Q2_K file mixes Q2_K (codes 0..3 with mins), Q3_K (symmetric, q - 4) and
    Q4_K layers: each exact as int4 (groups of 16 and 32), mixed stacks one stack per type, a
    Q2_K table as int8 with mins. Engines scanned (layer views, 3 slots) and unrolled (1 slot),
    float32 and bf16 and int8 activations: float32 prefill logits equal the float model's of
    the file's values, decode equals prefill."""
    from test_dtype_ladder import assert_decode_equals_prefill
    path, floats = _q4_k_m_file(tmp_path, HF3, 9, Q2_K_FILE, "Q2_K", "q2_k")
    config = default_config(path)
    params = load_params_on_mesh(path, config, single_device_mesh())
    query = params[LAYER + "multi_head_attention/query"]["w"]
    assert isinstance(query, QuantizedWeight4bit) and query.scales.shape[-2] == 256 // 16
    value = params[LAYER + "multi_head_attention/value"]["w"]
    assert isinstance(value, LayersByType) and value.kinds == (1, 0, 0)  # Q3_K, Q4_K
    assert [s.scales.shape[-2] for s in value.stacks] == [16, 8]
    assert value.stacks[0].mins is None  # Q3_K: symmetric
    assert params["language_model/in_out_embed"]["embeddings"].mins is not None
    reference = _engine_logits(config, load_params(floats, config), 1, True)[0]
    for slots, unroll, dtype in ((3, False, "float32"), (1, True, "float32"),
                                 (3, False, "bfloat16")):
        logits, (decoded, prefilled, _), engine = _engine_logits(config, params, slots, unroll,
                                                                 dtype)
        assert engine.layout.unrolled == unroll
        if not unroll:  # panels: the tables in their two-level form, Q3_K's with signed subs
            from runtime.super_scales import is_super_scaled
            query = engine.params[LAYER + "multi_head_attention/query"]["w"]
            q3_k = engine.params[LAYER + "multi_head_attention/value"]["w"].stacks[0]
            assert is_super_scaled(query.scales) and is_super_scaled(query.mins)
            assert q3_k.scales.dtype == np.int8
        assert_decode_equals_prefill(decoded, prefilled, dtype)
        if dtype == "float32":
            error = np.abs(logits - reference).max() / np.abs(reference).max()
            assert error < 1e-5, (slots, unroll, error)
    monkeypatch.setattr(layout, "INT8_ACTIVATIONS", True)  # int4 groups of 16 under int8 x
    logits, (decoded, prefilled, _), _ = _engine_logits(config, params, 3, False)
    scale = np.abs(reference).max()
    assert np.abs(logits - reference).max() < 0.05 * scale
    assert np.abs(decoded - prefilled).max() < 0.01 * scale
