"""Memory plans: per-device bytes equal what placement allocates; impossible plans are refused
before anything is loaded, with suggestions that really fit.

Run as a script (`--child`, with 8 simulated CPU devices) it prints per-device bytes of real
placements on several meshes as one JSON object, for test_plan_matches_placement_on_8_devices.
"""

import json
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from conftest import LAYER, random_params, run_on_8_devices, tiny_config  # noqa: E402  (also puts ROOT on sys.path)

import jax  # noqa: E402

from runtime.checkpoint.load import quantized_int4, quantized_int8  # noqa: E402
from runtime.config import load_config  # noqa: E402
from runtime.errors import RuntimeInputError, ShardingError  # noqa: E402
from runtime.memory import init_memory, memory_specs  # noqa: E402
from runtime.planning import (TARGETS, WEIGHT_FORMATS, abstract_weights,  # noqa: E402
                              check_plan, default_weight_format, device_capacity, make_plan,
                              parse_bytes, plan_for_target, weight_format_of)
from runtime.quant import QuantizedWeight8bit, quantize  # noqa: E402
from runtime.sharding import make_mesh, param_specs, shardings  # noqa: E402

HERE = Path(__file__).resolve()
GB80 = 80 * 10**9
# The released Grok-1 layout, written out independently of runtime/planning: module -> R
GROK_ROW_BLOCKS = {"multi_head_attention/query": 1, "multi_head_attention/key": 1,
                   "multi_head_attention/value": 1, "multi_head_attention/linear": 8,
                   "moe/linear": 1, "moe/linear_v": 1, "moe/linear_1": 8}
CHILD_MESHES = [{"model": 8}, {"data": 2, "model": 4}, {"expert": 2, "model": 4}]
CHILD_SLOTS = (3, 4)  # data=2 splits 4 slots, not 3
CHILD_CACHE = 16


def materialize(config, weight_format, seed=0) -> dict:
    """Real parameters stored in `weight_format` (float32 numpy from the reference's draws)."""
    out = {}
    for module, leaves in random_params(config, seed).items():
        out[module] = {}
        for name, leaf in leaves.items():
            rows = GROK_ROW_BLOCKS.get(module[len(LAYER):]) if module.startswith(LAYER) else None
            if weight_format == "grok-int8" and rows is not None:
                leaf = quantize(leaf, rows)
            elif weight_format == "int8":
                leaf = quantized_int8(f"{module}/{name}", leaf, config)
            elif weight_format == "int4":
                leaf = quantized_int4(f"{module}/{name}", leaf, config)
            elif weight_format == "bfloat16":
                leaf = np.asarray(leaf).astype(ml_dtypes.bfloat16)
            else:
                leaf = np.asarray(leaf, np.float32)
            out[module][name] = leaf
    return out


def per_device_bytes(tree) -> dict[int, int]:
    """Bytes each device holds of the arrays in `tree` (its addressable shards)."""
    held: dict[int, int] = {}
    for array in jax.tree.leaves(tree):
        for shard in array.addressable_shards:
            held[shard.device.id] = held.get(shard.device.id, 0) + shard.data.nbytes
    return held


def place(params, mesh):
    return jax.device_put(params, shardings(param_specs(params, mesh), mesh))


def place_memory(config, slots, length, mesh):
    return jax.device_put(init_memory(config, slots, length),
                          shardings(memory_specs(config, slots, mesh), mesh))


# --- (1) the plan equals what is allocated -------------------------------------------------------

@pytest.mark.parametrize("weight_format", WEIGHT_FORMATS)
def test_abstract_weights_match_the_stored_tree(weight_format):
    config = tiny_config()
    real = materialize(config, weight_format)
    abstract = abstract_weights(config, weight_format)
    is_q = lambda x: isinstance(x, QuantizedWeight8bit)  # noqa: E731
    assert jax.tree.structure(real, is_leaf=is_q) == jax.tree.structure(abstract, is_leaf=is_q)
    for a, b in zip(jax.tree.leaves(real), jax.tree.leaves(abstract)):
        assert (a.shape, np.dtype(a.dtype)) == (b.shape, np.dtype(b.dtype))
    assert weight_format_of(real) == weight_format_of(abstract) == weight_format


@pytest.mark.parametrize("weight_format", WEIGHT_FORMATS)
def test_plan_matches_placement_on_one_device(weight_format):
    config = tiny_config()
    mesh = make_mesh({"data": 1, "model": 1})
    placed = place(materialize(config, weight_format), mesh)
    plan = make_plan(config, {"data": 1, "model": 1}, weight_format, slots=3, cache_length=32)
    assert per_device_bytes(placed) == {jax.devices()[0].id: plan.param_bytes}
    assert plan.param_bytes == plan.param_logical_bytes  # nothing split on one device
    memory = init_memory(config, 3, 32)
    assert sum(a.nbytes for a in jax.tree.leaves(memory)) == plan.kv_bytes == plan.kv_logical_bytes


def test_plan_counts_a_bf16_kv_memory_at_two_bytes():
    """--kv-dtype bfloat16 under float32 activations: the memory allocated and the plan's KV
    rows (and prefill's KV rows in the working set) at half the float32 bytes."""
    config = tiny_config(dtype="float32")
    sizes = {"data": 1, "model": 1}
    full = make_plan(config, sizes, "float32", slots=3, cache_length=32)
    half = make_plan(config.replace(kv_dtype="bfloat16"), sizes, "float32", slots=3,
                     cache_length=32)
    memory = init_memory(config.replace(kv_dtype="bfloat16"), 3, 32)
    assert {a.dtype for a in jax.tree.leaves((memory.keys, memory.values))} == \
        {np.dtype(jax.numpy.bfloat16)}
    assert sum(a.nbytes for a in jax.tree.leaves(memory)) == half.kv_bytes
    assert half.kv_bytes - 4 * 3 == (full.kv_bytes - 4 * 3) // 2  # positions stay int32
    assert half.working_bytes < full.working_bytes
    assert "KV memory (3 x 32, bfloat16)" in half.table()


@pytest.mark.slow
def test_plan_matches_placement_on_8_devices():
    measured = json.loads(run_on_8_devices(HERE, "--child", timeout=300))
    config = tiny_config()
    checked = 0
    for sizes in CHILD_MESHES:
        mesh = ",".join(f"{a}={n}" for a, n in sizes.items())
        for weight_format in WEIGHT_FORMATS:
            held = measured[f"{weight_format} {mesh}"]
            plan = make_plan(config, sizes, weight_format, slots=1, cache_length=CHILD_CACHE)
            assert len(held) == 8 and set(held) == {plan.param_bytes}, (weight_format, mesh)
            assert plan.param_bytes < plan.param_logical_bytes  # really split
            checked += 1
        for slots in CHILD_SLOTS:
            held = measured[f"kv {slots} {mesh}"]
            plan = make_plan(config, sizes, "float32", slots=slots, cache_length=CHILD_CACHE)
            assert len(held) == 8 and set(held) == {plan.kv_bytes}, (slots, mesh)
            checked += 1
    assert checked == len(CHILD_MESHES) * (len(WEIGHT_FORMATS) + len(CHILD_SLOTS))


def child_main():
    """8 simulated devices: per-device bytes of real placements, one JSON object. As the
    engine holds them: the tiny model's 2 KV heads are stored model-axis times over
    (kv_heads.py: copied projections, memory of the copied heads) where that splits them."""
    from runtime.kv_heads import copy_kv_heads, kv_head_copies, with_kv_head_copies

    assert jax.device_count() == 8, jax.devices()
    config = tiny_config()
    out = {}
    for sizes in CHILD_MESHES:
        mesh = make_mesh(sizes)
        name = ",".join(f"{a}={n}" for a, n in sizes.items())
        copies = kv_head_copies(config, sizes["model"])  # model=4: 2; model=8: 1 (4 q heads)
        assert copies == (2 if sizes["model"] == 4 else 1)
        for weight_format in WEIGHT_FORMATS:
            placed = place(materialize(config, weight_format), mesh)
            held = per_device_bytes(copy_kv_heads(placed, config.num_kv_heads, copies, mesh))
            out[f"{weight_format} {name}"] = [held.get(d.id, 0) for d in jax.devices()]
        for slots in CHILD_SLOTS:
            held = per_device_bytes(place_memory(with_kv_head_copies(config, copies), slots,
                                                 CHILD_CACHE, mesh))
            out[f"kv {slots} {name}"] = [held.get(d.id, 0) for d in jax.devices()]
    print(json.dumps(out))


@pytest.mark.slow
def test_working_set_bounds_what_xla_allocates():
    """The estimate (without its fixed overhead) is at least XLA's own temp-buffer size for
    the engine's prefill and decode programs (CPU, float32: the CPU computes bf16 in f32).
    A 128-token bucket makes the attention logits count; 24 slots take the grouped MoE path."""
    from conftest import single_device_mesh
    from runtime.engine import build_engine
    from runtime.sampling_state import bias_arrays, neutral_rows

    slots, cache_length = 24, 128
    config = tiny_config(num_layers=2, sequence_len=cache_length)
    engine = build_engine(config, materialize(config, "int8"), single_device_mesh(),
                          slots=slots, cache_length=cache_length)
    if not hasattr(engine, "_prefill") or not hasattr(engine, "_decode"):
        pytest.skip("the engine no longer exposes its jitted _prefill/_decode")
    i32 = np.zeros(1, np.int32)  # one prompt
    bias = bias_arrays([], 1, config.vocab_size)
    prefill = engine._prefill.lower(engine.params, engine.memory, engine.history,
                                    np.zeros((1, cache_length), np.int32), i32, i32, i32,
                                    neutral_rows(1), *bias).compile().memory_analysis()
    ints = np.zeros(slots, np.int32)
    decode = engine._decode.lower(engine.params, engine.memory, engine.history, ints,
                                  np.zeros(slots, bool), ints, neutral_rows(slots)
                                  ).compile().memory_analysis()
    plan = make_plan(config, {"data": 1, "model": 1}, "int8", slots, cache_length)
    assert plan.prefill_bytes >= prefill.temp_size_in_bytes
    assert plan.decode_bytes >= decode.temp_size_in_bytes
    # outputs are written in place of the donated KV memory: nothing else to count
    for analysis in (prefill, decode):
        assert analysis.output_size_in_bytes - analysis.alias_size_in_bytes < 1024


# --- (2) impossible plans are refused, possible ones pass ----------------------------------------

@pytest.fixture(scope="module")
def grok():
    return load_config("grok-1")


@pytest.mark.parametrize("weight_format", ["float32", "bfloat16"])
def test_grok1_float_on_one_80gb_device_is_refused(grok, weight_format):
    plan = make_plan(grok, {"model": 1}, weight_format, slots=1, cache_length=8192,
                     device_memory_bytes=GB80, label="grok-1")
    assert not plan.fits
    with pytest.raises(RuntimeInputError) as refused:
        check_plan(plan)
    message = str(refused.value)
    assert "nothing was loaded" in message
    assert plan.table() in message and "DOES NOT FIT" in message
    assert "--mesh model=" in message  # more devices on the model axis
    assert "--quantize int8" in message


def test_grok1_int8_on_one_80gb_device_is_refused(grok):
    plan = make_plan(grok, {"data": 1, "model": 1}, "grok-int8", 1, 8192, GB80)
    with pytest.raises(RuntimeInputError, match=r"--mesh data=1,model=8 \(8 devices\)"):
        check_plan(plan)
    assert "even 1 slot x cache length 1" in "\n".join(plan.suggestions())


def test_grok1_int8_on_8_80gb_gpus_fits(grok):
    plan = make_plan(grok, {"data": 1, "model": 8}, "grok-int8", 1, 8192, GB80)
    assert plan.fits and check_plan(plan) is plan and plan.suggestions() == []
    target = plan_for_target(grok, "h100x8", "grok-int8", 1, 8192)
    assert target.total_bytes == plan.total_bytes and target.fits
    # by hand: linear/linear_v int8 [64, 8, 6144, 32768] + bf16 scales [64, 8, 1, 32768] split
    # on their last dim; linear_1 int8 [64, 8, 32768, 6144] split on F, scales [64, 8, 8, 6144]
    # replicated (their 8 row blocks are not the weight's F rows)
    experts = (2 * (64 * 8 * 6144 * 32768 // 8 + 64 * 8 * 1 * 32768 // 8 * 2)
               + 64 * 8 * 32768 // 8 * 6144 + 64 * 8 * 8 * 6144 * 2)
    assert target.group_bytes()["experts (MoE)"] == (
        3 * 64 * 8 * 6144 * 32768 + 2 * 64 * 8 * 32768 * 2 + 64 * 8 * 8 * 6144 * 2, experts)
    # KV: [64, 1, 8192, 8, 128] bf16 keys and values, kv heads split over 8; positions int32
    assert target.kv_bytes == 2 * 64 * 8192 * 8 * 128 * 2 // 8 + 4


def test_refusal_happens_before_loading(grok, monkeypatch):
    """Planning and refusing read no checkpoint and place nothing on any device."""
    from runtime.checkpoint import grok_ckpt, hf, load, native

    def forbidden(*args, **kwargs):
        raise AssertionError("planning must not load or place anything")

    for module, name in ((load, "load_params"), (load, "lazy_params"), (grok_ckpt, "lazy_ckpt0"),
                         (hf, "lazy_hf"), (native, "lazy_native"), (jax, "device_put")):
        monkeypatch.setattr(module, name, forbidden)
    plan = make_plan(grok, {"model": 2}, "grok-int8", 32, 8192, parse_bytes("24GB"))
    with pytest.raises(RuntimeInputError, match="nothing was loaded"):
        check_plan(plan)


def test_unknown_capacity_refuses_nothing():
    plan = make_plan(tiny_config(), {"model": 1}, "float32", 3, 64)
    assert plan.fits and plan.headroom is None and plan.suggestions() == []
    assert "capacity unknown" in plan.table()



def test_cpu_devices_plan_against_the_host_memory_available():
    """CPU devices report no limit: each gets its share of the host memory available now."""
    from runtime.planning.targets import host_memory_available
    capacity, _ = device_capacity()
    available = host_memory_available()
    assert available and 0 < capacity <= available // jax.local_device_count()
    plan = make_plan(tiny_config(), {"model": 1}, "float32", 10**6, 64, capacity)
    assert not plan.fits  # a million slots: refused before anything is allocated


def test_mesh_the_rules_cannot_split_is_named(grok):
    with pytest.raises(ShardingError, match="cannot be split over mesh axis 'model' of size 3"):
        make_plan(grok, {"model": 3}, "grok-int8", 1, 8192)


# --- (3) suggestions are computed and consistent -------------------------------------------------

def _tight_plan():
    plan = make_plan(tiny_config(), {"data": 2, "model": 2}, "float32", 8, 64, overhead_bytes=0)
    return plan.replan(device_memory_bytes=plan.total_bytes - 1)


# Plans that do not fit, by name; each made when its test runs (planning Grok-1 takes about a
# second that collection need not pay).
REFUSED = {
    "grok float32 1 x 80GB": lambda: make_plan(load_config("grok-1"), {"model": 1}, "float32",
                                               1, 8192, GB80),
    "grok bf16 2 x 80GB, 16 slots": lambda: make_plan(load_config("grok-1"),
                                                      {"data": 1, "model": 2}, "bfloat16", 16,
                                                      8192, GB80),
    # 32 slots fit since prefill works in chunks (13.2 GiB per chip); 96 do not
    "grok-int8 v5e-32, 96 slots": lambda: plan_for_target(load_config("grok-1"), "v5e-32",
                                                          "grok-int8", 96, 8192),
    "grok-int8 8 x 48GB, 64 slots": lambda: make_plan(load_config("grok-1"), {"model": 8},
                                                      "grok-int8", 64, 8192, 48 * 10**9),
    "tiny, one byte short": _tight_plan,
}


@pytest.mark.parametrize("name", REFUSED)
def test_every_suggestion_fits_when_replanned(name):
    plan = REFUSED[name]()
    assert not plan.fits, name
    suggestions = plan.suggested_changes()
    actionable = [s for s in suggestions if s.changes]
    assert actionable, (name, plan.suggestions())
    for s in actionable:
        replanned = plan.replan(**s.changes)
        assert replanned.fits, (name, s.text)
        assert check_plan(replanned) is replanned
    for s in suggestions:
        changes = s.changes
        if set(changes) == {"mesh_sizes"}:  # the smallest model axis: half of it does not fit
            half = changes["mesh_sizes"]["model"] // 2
            if half > plan.mesh_sizes.get("model", 1):
                try:
                    assert not plan.replan(mesh_sizes={**changes["mesh_sizes"],
                                                       "model": half}).fits
                except ShardingError:
                    pass
        if set(changes) == {"cache_length"}:  # the largest (tidy) length: 256 more does not fit
            longer = changes["cache_length"] + 256
            if longer < plan.cache_length:
                assert not plan.replan(cache_length=longer).fits, s.text
        if set(changes) == {"slots"} and plan.mesh_sizes.get("data", 1) == 1:
            assert not plan.replan(slots=changes["slots"] + 1).fits, s.text


def test_suggestions_name_concrete_values(grok):
    plan = make_plan(grok, {"data": 1, "model": 1}, "float32", 1, 8192, GB80)
    text = "\n".join(plan.suggestions())
    assert "--mesh data=1,model=32 (32 devices)" in text  # 4 bytes x 316B / 32 < 74.5 GiB
    assert "int8 weights (--quantize int8) with --mesh data=1,model=8" in text
    v5e = plan_for_target(grok, "v5e-32", "grok-int8", 96, 8192)
    lengths = [s.changes["cache_length"] for s in v5e.suggested_changes()
               if "cache_length" in s.changes]
    assert len(lengths) == 1 and 1024 <= lengths[0] < 8192
    assert f"--cache-length {lengths[0]}" in "\n".join(v5e.suggestions())


def test_default_weight_format():
    assert default_weight_format("ckpt-0") == default_weight_format("ckpt-0", "int8") == "grok-int8"
    assert default_weight_format("hf", "int8") == default_weight_format(None, "int8") == "int8"
    assert default_weight_format("hf", "int4") == "int4"
    assert default_weight_format("ckpt-0", "int4") == "int4"  # int8 weights re-quantised
    assert default_weight_format("native") == default_weight_format(None) == "float32"


def test_row_blocks_that_straddle_shards_cost_working_set(grok):
    """Grok-1's R = 8 row-parallel weights align with shards for m <= 8 only (a whole
    1024-token prompt: prefill_chunk 0)."""
    def term(sizes, weight_format):
        return make_plan(grok, sizes, weight_format, 1, 1024,
                         prefill_chunk=0).transients["prefill"]["row blocks"]

    # aligned: the float32 partials of attention/linear [6144, 6144] (R = 8, 1024 rows) are
    # past 64 MiB, so the product dequantises its shard of the weight instead
    assert term({"model": 8}, "grok-int8") == term({"expert": 4, "model": 8}, "grok-int8") \
        == 6144 // 8 * 6144 * 4
    # int8 in groups of 64: query/w is not split by its input (R = 96): its whole dequantised copy
    assert term({"model": 32}, "int8") == 6144 * 6144 * 4
    # moe/linear_1 [F, D] with T*k = 2048 rows: its input regathered, two float32 partial sums
    assert term({"model": 16}, "grok-int8") == 2048 * 32768 * 2 + 2 * 2048 * 6144 * 4


def test_targets_are_the_showcase_machines():
    assert TARGETS["h100x8"].mesh_sizes == {"data": 1, "model": 8}
    assert TARGETS["h100x8"].device_memory_bytes == 80 * 10**9
    assert TARGETS["v5e-32"].mesh_sizes == {"data": 1, "model": 32}
    assert TARGETS["v5e-32"].device_memory_bytes == 16 * 2**30


def test_table_lists_every_part(grok):
    table = plan_for_target(grok, "h100x8", "grok-int8", 8, 8192, label="grok-1").table()
    for row in ("embeddings", "attention", "experts (MoE)", "norms + router",
                "output head                   tied to embeddings", "KV memory (8 x 8192",
                "working set (estimate, [1])", "total per device", "device capacity",
                "headroom", "=> fits", "mesh data=1,model=8: 8 x NVIDIA H100 80GB",
                "weights grok-int8", "[1] max(prefill"):
        assert row in table, row


# --- (4) sizes from flags -----------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("80GB", 80 * 10**9), ("16GiB", 16 * 2**30), ("1.5TB", 15 * 10**11), ("512 MiB", 2**29),
    ("80gb", 80 * 10**9), ("1000000", 10**6), ("96G", 96 * 10**9), ("2TiB", 2 * 2**40),
])
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["80 GBs", "lots", "-5GB", "0", "GB", "", "1.5.2GB", "0.1B"])
def test_parse_bytes_errors_name_the_flag_value(text):
    with pytest.raises(RuntimeInputError) as error:
        parse_bytes(text)
    assert f"--device-memory {text!r}" in str(error.value)
    with pytest.raises(RuntimeInputError, match=r"^--host-memory "):
        parse_bytes(text, flag="--host-memory")


if __name__ == "__main__" and "--child" in sys.argv:
    child_main()
