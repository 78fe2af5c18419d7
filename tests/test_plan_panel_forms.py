"""The memory plan of a GGUF file whose quantised weights one CPU device's panel kernels hold
(planning/panel_forms.py): K-quant tables super-scaled, codes of six bits packed, a tied table
of int4 codes in int4 panels, a stack of several types one stack per type. The plan's parameter
bytes are the engine's, byte for byte; on a mesh of several devices (no panels) and for another
machine the plan stays the loaded form."""

from __future__ import annotations

from pathlib import Path

import jax
import pytest
from conftest import single_device_mesh
from test_layer_types import HF3, MIXED, MOE, _q4_k_m_file

import runtime.cpu_kernels as cpu_kernels
from runtime.checkpoint.gguf_reader import stored_tables, weight_format
from runtime.checkpoint.load import default_config, load_params_on_mesh
from runtime.engine import build_engine
from runtime.planning import make_plan
from runtime.planning.panel_forms import panel_bytes, panels_here

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="no C++ compiler")

# (hf config, per-tensor types, bulk type): what each file exercises
FILES = {
    "q4_k_m": (HF3, MIXED, "Q4_K"),  # int4 + int8 stacks by type, Q6_K table and head, Q5_0/Q8_0
    "q5_k": (HF3, {}, "Q5_K"),  # int8 with mins, six-bit, two-level scales and mins
    "q4_0": (HF3, {}, "Q4_0"),  # f16 tables as they are; the table's int4 codes in int4 panels
    "q3_k": (HF3, {"token_embd": "Q3_K", "output": "Q2_K"}, "Q3_K"),  # groups of 16
    "q8_0": (HF3, {}, "Q8_0"),  # nothing to compact
    "moe": (MOE, MIXED, "Q4_K"),  # expert stacks split into panels, by type
}
FAST = ("q4_k_m",)


def _plan(path: Path, config, sizes: dict, held: bool):
    return make_plan(config, sizes, weight_format(path), 1, 32, int8_group_size=32,
                     int4_group_size=32, stored_tables=stored_tables(path, config),
                     panel_bytes=panel_bytes(path, config) if held else None,
                     cpu_panels=held)


@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n in FAST else pytest.mark.slow)
                                  for n in FILES])
def test_the_plan_holds_the_engines_bytes(name, tmp_path):
    hf, types, bulk = FILES[name]
    path = _q4_k_m_file(tmp_path, hf, seed=11, types=types, bulk=bulk, name=name)[0]
    config = default_config(path)
    assert panels_here(config, {"data": 1, "model": 1}, 1)
    assert not panels_here(config, {"data": 1, "model": 2}, 1)
    engine = build_engine(config, load_params_on_mesh(path, config, single_device_mesh()),
                          single_device_mesh(), slots=1, cache_length=32)
    assert engine.layout.tiled
    held = sum(leaf.nbytes for leaf in jax.tree.leaves(engine.params))
    planned = _plan(path, config, {"data": 1, "model": 1}, True)
    assert planned.param_bytes == held, (name, planned.param_bytes, held)
    loaded = _plan(path, config, {"data": 1, "model": 1}, False)
    if bulk == "Q8_0":
        assert loaded.param_bytes == held
    else:  # the loaded form (float32 tables, int8 codes, merged stacks) overstated it
        assert loaded.param_bytes > held, (name, loaded.param_bytes, held)
    # two devices: no panels, so their bytes do not apply (the same plan with them or without)
    two = {"data": 2, "model": 1}
    assert _plan(path, config, two, True).param_bytes == _plan(path, config, two, False).param_bytes


def test_run_py_plans_a_gguf_file_at_the_panels_bytes_here_and_as_loaded_elsewhere(tmp_path):
    """run.py --plan's plan (app_memory.make_plan_for_flags): the panels' bytes on this
    machine's one CPU device, said so; the loaded form for --plan-target's machine."""
    from runtime.app_memory import make_plan_for_flags
    from runtime.cli import parse_args
    path = _q4_k_m_file(tmp_path, HF3, seed=3)[0]
    config = default_config(path)
    held = _plan(path, config, {"data": 1, "model": 1}, True).param_bytes
    loaded = _plan(path, config, {"data": 1, "model": 1}, False).param_bytes
    assert held < loaded

    def plan(*flags):
        args = parse_args(["--plan", "--checkpoint", str(path), *flags])
        return make_plan_for_flags(args, config, path, weight_format(path), "gguf", path)

    here = plan("--mesh", "data=1,model=1")
    assert here.param_bytes == held and "panel kernels hold them" in here.table()
    assert here.cpu_panels and not plan("--plan-target", "h100x4").cpu_panels
    assert "int4 + float32 scales and mins per 32" in here.table()
    assert plan("--mesh", "data=1,model=1", "--slots", "1000").param_bytes == loaded  # no panels
    elsewhere = plan("--plan-target", "h100x4")
    assert "panel kernels hold them" not in elsewhere.table()
    assert elsewhere.param_bytes == _plan(path, config, {"data": 1, "model": 4}, False).param_bytes


@pytest.mark.parametrize("weights", ["gguf", "int8", "float32"])
def test_the_working_set_counts_no_copies_of_weights_the_panels_read_in_place(tmp_path, weights):
    """Weights in panels (a GGUF file's types; float32 ones quantised at load, --quantize
    int8; float32 ones under float32 activations): the plan counts no converted layer or head
    copy and no row-blocked partials for them (XLA's programs hold none), only the kernels'
    scratch; the estimate still bounds XLA's own temp buffers of the engine's prefill and
    decode."""
    import numpy as np
    from runtime.sampling_state import bias_arrays, neutral_rows
    stored = weights == "gguf"
    quantized, f32 = _q4_k_m_file(tmp_path, HF3, seed=7)
    path = quantized if stored else f32
    config = default_config(path)
    slots, cache, mesh = 2, 64, single_device_mesh()
    params = load_params_on_mesh(path, config, mesh,
                                 quantize_to="int8" if weights == "int8" else None)
    engine = build_engine(config, params, mesh, slots=slots, cache_length=cache)
    assert engine.layout.tiled == ("all" if weights == "float32" else "quantized")

    def plan(panels: bool):
        layout = dict(stored_tables=stored_tables(path, config),
                      panel_bytes=panel_bytes(path, config) if panels else None) if stored else {}
        return make_plan(config, {"data": 1, "model": 1}, weight_format(path) if stored else
                         weights, slots, cache, int8_group_size=32, int4_group_size=32,
                         cpu_panels=panels, **layout)

    held, loaded = plan(True), plan(False)
    for phase in ("prefill", "decode"):
        parts = held.transients[phase]
        assert parts["output head"] == 0 and parts["row blocks"] == 0, parts
        assert parts["layer weights"] == 2 * 2 * config.emb_size * 4, parts  # 2 x its two norms
        assert parts["kernel scratch"] > 0
        assert loaded.transients[phase]["layer weights"] > 100 * parts["layer weights"]
    # float32 activations: the decode attention kernel reads the memory in place
    assert held.transients["decode"]["layer KV slices"] == 0
    assert loaded.transients["decode"]["layer KV slices"] > 0
    i1, ints = np.zeros(1, np.int32), np.zeros(slots, np.int32)
    prefill = engine._prefill.lower(engine.params, engine.memory, engine.history,
                                    np.zeros((1, cache), np.int32), i1, i1, i1, neutral_rows(1),
                                    *bias_arrays([], 1, config.vocab_size)).compile()
    decode = engine._decode.lower(engine.params, engine.memory, engine.history, ints,
                                  np.zeros(slots, bool), ints, neutral_rows(slots)).compile()
    assert held.prefill_bytes >= prefill.memory_analysis().temp_size_in_bytes
    assert held.decode_bytes >= decode.memory_analysis().temp_size_in_bytes


def test_the_loading_peak_counts_the_weights_as_read_and_the_preparing_copy(tmp_path,
                                                                           monkeypatch):
    """One CPU device with panels: the plan's loading peak is the tree load_params_on_mesh
    returns, byte for byte (float32 K-quant tables, unpacked codes), plus the preparing
    program's copy (of all of it, a tree under 1 GiB; of its largest module above) plus the
    overhead; a capacity between the running total and that peak does not fit."""
    from runtime.errors import RuntimeInputError
    from runtime.planning import check_plan, plan as plan_module
    from runtime.planning.units import format_bytes
    path = _q4_k_m_file(tmp_path, HF3, seed=5)[0]
    config = default_config(path)
    params = load_params_on_mesh(path, config, single_device_mesh())
    as_read = sum(leaf.nbytes for leaf in jax.tree.leaves(params))

    def plan(**changes):
        return make_plan(config, {"data": 1, "model": 1}, weight_format(path), 1, 32,
                         int8_group_size=32, int4_group_size=32,
                         stored_tables=stored_tables(path, config),
                         panel_bytes=panel_bytes(path, config), cpu_panels=True,
                         read_bytes=panel_bytes(path, config, as_read=True), **changes)

    small = plan()
    assert small.loading_bytes == as_read + small.param_bytes + small.overhead_bytes
    assert as_read > small.param_bytes  # the tables before super-scaling, the codes unpacked
    monkeypatch.setattr(plan_module, "PREPARE_BY_MODULE_BYTES", 1)  # by module
    big = plan()
    modules = {}
    for leaf in big.leaves:
        module = leaf.path.rsplit("/", 1)[0]
        modules[module] = modules.get(module, 0) + leaf.device_bytes
    assert big.loading_bytes == as_read + max(modules.values()) + big.overhead_bytes
    assert big.loading_bytes > big.total_bytes - big.overhead_bytes  # not the running total
    monkeypatch.setattr(plan_module, "PREPARE_BY_MODULE_BYTES", 1 << 30)
    lean = plan(overhead_bytes=0)  # this tiny model's peak is its loading then
    assert lean.loading_bytes > lean.total_bytes, (lean.loading_bytes, lean.total_bytes)
    between = plan(overhead_bytes=0,
                   device_memory_bytes=(lean.total_bytes + lean.loading_bytes) // 2)
    assert not between.fits and "loading peak" in between.table()
    with pytest.raises(RuntimeInputError, match=f"needs {format_bytes(lean.loading_bytes)}"):
        check_plan(between)
    assert plan(overhead_bytes=0, device_memory_bytes=lean.loading_bytes).fits
    assert make_plan(config, {"data": 1, "model": 1}, weight_format(path), 1, 32,
                     int8_group_size=32, int4_group_size=32,
                     stored_tables=stored_tables(path, config)).loading_bytes is None
