"""--quantize int4 end to end: flags, the eager and lazy loaders, native int4 files, the memory
plan, and run.py.

The shipped demo checkpoint stores its attention and expert weights in int8, which --quantize
int4 re-quantises from their exact values; most tests use a float copy of it (the int8 weights
dequantised, written as a native checkpoint): its int4 leaves are then compared with
quant4.quantize_int4 of those float weights, bit for bit, and the shipped demo's with them.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, xla_flags  # noqa: F401  (puts ROOT on sys.path)

from runtime.checkpoint.lazy import LazyParam, as_slices, normalize, quantized_int4_lazy
from runtime.checkpoint.load import load_params, load_params_on_mesh
from runtime.checkpoint.native import FILE, FORMAT, write_native
from runtime.checkpoint.safetensors_io import SafetensorsFile, save_safetensors
from runtime.config import DEFAULT_INT8_GROUP_SIZE, load_config, save_config
from runtime.errors import CheckpointError
from runtime.paths import quantized_kind
from runtime.quant import (QuantizedEmbedding, QuantizedWeight8bit, dequantize, quantize,
                           quantize_embedding)
from runtime.quant4 import (DEFAULT_GROUP_SIZE, QuantizedWeight4bit, dequantize_int4, groups_for,
                            quantize_int4)

DEMO = ROOT / "checkpoints" / "demo"
sys.path.insert(0, str(ROOT / "scripts"))


def fields(leaf) -> list[np.ndarray]:
    """The stored arrays of a leaf, host copies (None for an absent mins)."""
    if isinstance(leaf, QuantizedWeight4bit):
        return [np.asarray(leaf.packed), np.asarray(leaf.scales),
                None if leaf.mins is None else np.asarray(leaf.mins)]
    if isinstance(leaf, QuantizedWeight8bit):
        return [np.asarray(leaf.weight), np.asarray(leaf.scales)]
    return [np.asarray(leaf)]


def assert_same_tree(got: dict, want: dict) -> None:
    """Same modules, params, leaf types, dtypes and values, bit for bit."""
    assert got.keys() == want.keys()
    for module in want:
        assert got[module].keys() == want[module].keys(), module
        for name, leaf in want[module].items():
            other = got[module][name]
            assert type(other) is type(leaf) or not isinstance(leaf, (QuantizedWeight4bit,
                                                                      QuantizedWeight8bit)), \
                (module, name, type(other), type(leaf))
            for a, b in zip(fields(other), fields(leaf)):
                assert (a is None) == (b is None), (module, name)
                if a is not None:
                    assert a.dtype == b.dtype and a.shape == b.shape, (module, name)
                    np.testing.assert_array_equal(a, b, err_msg=f"{module}/{name}")


@pytest.fixture(scope="module")
def float_demo(tmp_path_factory):
    """(folder, config, float params): the demo with its int8 weights dequantised to float32,
    as a native checkpoint beside its tokenizer."""
    config = load_config(DEMO / "config.yaml")
    shipped = load_params(DEMO, config, kind="ckpt-0")
    floats = {module: {name: dequantize(leaf) if isinstance(leaf, QuantizedWeight8bit)
                       else np.asarray(leaf, np.float32) for name, leaf in leaves.items()}
              for module, leaves in shipped.items()}
    folder = tmp_path_factory.mktemp("demo-float")
    write_native(floats, folder, config)
    save_config(config, folder / "config.yaml")
    shutil.copy2(DEMO / "tokenizer.model", folder / "tokenizer.model")
    return folder, config, floats


@pytest.fixture(scope="module")
def int4_demo(float_demo):
    folder, config, _ = float_demo
    return load_params(folder, config, "int4", group_size=32)


# --- flags -----------------------------------------------------------------------------------

def test_cli_default_group_size_is_quant4s():
    from runtime.cli import INT4_DEFAULT_GROUP_SIZE, parse_args
    assert INT4_DEFAULT_GROUP_SIZE == DEFAULT_GROUP_SIZE
    args = parse_args(["--quantize", "int4"])
    assert (args.quantize, args.group_size) == ("int4", DEFAULT_GROUP_SIZE)
    args = parse_args(["--quantize", "int4", "--group-size", "128"])
    assert args.group_size == 128 and args.int8_group_size == DEFAULT_INT8_GROUP_SIZE


@pytest.mark.parametrize("argv, named", [
    (["--quantize", "int4", "--group-size", "3"], "'3'"),
    (["--quantize", "int4", "--group-size", "0"], "'0'"),
    (["--quantize", "int4", "--group-size", "-2"], "'-2'"),
    (["--quantize", "int4", "--group-size", "x"], "'x'"),
    (["--quantize", "int8", "--group-size", "32"], "--int8-group-size"),
    (["--group-size", "32"], "int4 only"),
    (["--quantize", "int2"], "'int2'"),
])
def test_bad_int4_flags_are_one_line_errors(argv, named, capsys):
    from runtime.cli import parse_args
    with pytest.raises(SystemExit) as exited:
        parse_args(argv)
    err = capsys.readouterr().err
    assert exited.value.code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: argument --") and named in err, err


def test_loader_refuses_bad_group_sizes(float_demo):
    folder, config, _ = float_demo
    for bad in (3, 0, 1):
        with pytest.raises(CheckpointError, match=rf"^--group-size {bad}: expected an even"):
            load_params(folder, config, "int4", group_size=bad)


# --- what the loaders store ------------------------------------------------------------------

def test_odd_input_rows_are_named():
    from runtime.checkpoint.load import quantized_int4
    path = "language_model/transformer/layers/decoder_layer/mlp/linear_1/w"
    with pytest.raises(CheckpointError, match=rf"^--quantize int4: {path} \[2, 7, 4\] needs an "
                                              r"even number of input rows"):
        quantized_int4(path, np.ones((2, 7, 4), np.float32), load_config("tiny-test"))


def test_int4_stores_every_quantizable_weight_as_quantize_int4_does(float_demo, int4_demo):
    folder, config, floats = float_demo
    checked = 0
    for module, leaves in floats.items():
        for name, w in leaves.items():
            leaf, kind = int4_demo[module][name], quantized_kind(f"{module}/{name}", config)
            if kind == "weight":
                assert isinstance(leaf, QuantizedWeight4bit) and leaf.mins is None, module
                assert leaf.scales.dtype == np.float16 and leaf.packed.dtype == np.uint8
                assert leaf.groups == groups_for(w.shape[-2], 32)
                want = quantize_int4(w, 32, symmetric=True)
                np.testing.assert_array_equal(leaf.packed, want.packed)
                np.testing.assert_array_equal(dequantize_int4(leaf), dequantize_int4(want))
                # within one step of its group's scale of the float weight: the code for
                # -max clips to 7 steps, one short (x 1.01: the scale is rounded to float16)
                rows = w.shape[-2] // leaf.groups
                step = np.repeat(np.abs(leaf.scales.astype(np.float32)), rows, axis=-2)
                error = np.abs(dequantize_int4(leaf) - w)
                assert np.all(error <= step * 1.01) and np.mean(error <= step / 2) > 0.95
                checked += 1
            elif kind == "embedding":  # the tied head: int8, as --quantize int8 makes it
                assert isinstance(leaf, QuantizedEmbedding)
                want = quantize_embedding(w, DEFAULT_INT8_GROUP_SIZE)
                np.testing.assert_array_equal(leaf.weight, want.weight)
                np.testing.assert_array_equal(leaf.scales, want.scales)
            else:
                np.testing.assert_array_equal(leaf, w)
    assert checked == 7  # query, key, value, linear; moe linear, linear_v, linear_1


def test_int8_weights_become_int4_from_their_exact_values(float_demo, int4_demo):
    """The shipped demo's int8 matmul weights (as released Grok-1's) are re-quantised to int4
    from their exact dequantised values: the same leaves as int4 of the float copy, eagerly
    and lazily onto a mesh; its float tied table becomes int8."""
    from runtime.sharding import make_mesh
    config = float_demo[1]
    int4 = load_params(DEMO, config, "int4", kind="ckpt-0", group_size=32)
    assert_same_tree(int4, int4_demo)
    layer = "language_model/transformer/layers/decoder_layer/"
    assert isinstance(int4[layer + "moe/linear_1"]["w"], QuantizedWeight4bit)
    placed = load_params_on_mesh(DEMO, config, make_mesh({"data": 1, "model": 1}), "int4",
                                 kind="ckpt-0", group_size=32)
    assert_same_tree(placed, int4_demo)


def test_lazy_on_one_device_equals_eager(float_demo, int4_demo):
    from runtime.sharding import make_mesh
    folder, config, _ = float_demo
    placed = load_params_on_mesh(folder, config, make_mesh({"data": 1, "model": 1}), "int4",
                                 group_size=32)
    assert_same_tree(placed, int4_demo)


def test_lazy_slices_read_whole_groups_and_cut_them():
    """Any slice of the lazy int4 leaf equals that slice of the whole weight's quantisation,
    also across group boundaries, and reads only the groups it touches."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(3, 48, 10)).astype(np.float32)  # 48 rows in groups of 12: 4 groups
    reads = []

    def read(index):
        reads.append(normalize(index, w.shape))
        return w[as_slices(normalize(index, w.shape))]

    lazy = quantized_int4_lazy(LazyParam(w.shape, w.dtype, read), 12)
    whole = quantize_int4(w, 12)
    assert lazy.packed.shape == whole.packed.shape and lazy.scales.shape == whole.scales.shape
    for index in [(slice(1, 3), slice(5, 13), slice(2, 9)), (slice(None), slice(0, 24)),
                  (slice(0, 1), slice(23, 24), slice(9, 10))]:
        reads.clear()
        np.testing.assert_array_equal(lazy.packed.read(index), whole.packed[index])
        rows = reads[0][-2]  # packed rows 5..12 are in groups 0..2 (6 packed rows a group)
        first = index[1].start // 6
        assert rows.start == first * 12 and len(rows) % 12 == 0
    for index in [(slice(None), slice(1, 3), slice(None)), (slice(2, 3), slice(3, 4))]:
        np.testing.assert_array_equal(lazy.scales.read(index), whole.scales[index])


# --- native int4 files -----------------------------------------------------------------------

def test_converter_writes_int4_that_loads_bit_equal(float_demo, tmp_path):
    import convert_checkpoint
    folder, config, _ = float_demo
    out = tmp_path / "int4"
    assert convert_checkpoint.main(["--checkpoint", str(folder), "--output", str(out),
                                    "--quantize", "int4", "--group-size", "64"]) == 0
    stored = SafetensorsFile(out / FILE)
    assert stored.metadata["int4_group_size"] == "64" and stored.metadata["quantize"] == "int4"
    name = "language_model/transformer/layers/decoder_layer/multi_head_attention/query/w"
    assert stored.dtype(name + ":int4") == np.uint8 and stored.dtype(name + ":scales") == np.float16
    assert stored.shape(name + ":int4") == (4, 128, 256) and not stored.keys() & {name + ":mins"}
    want = load_params(folder, config, "int4", group_size=64)
    assert_same_tree(load_params(out, config), want)
    # quantising an int4 file again keeps its int4 leaves as stored
    assert_same_tree(load_params(out, config, "int4", group_size=32), want)


def test_asymmetric_int4_and_float16_int8_scales_load(float_demo, tmp_path):
    """Native files may hold int4 with mins (GGUF Q4_1's form) and int8 with f16 scales."""
    folder, config, floats = float_demo
    params = {module: dict(leaves) for module, leaves in floats.items()}
    query = "language_model/transformer/layers/decoder_layer/multi_head_attention/query"
    key = "language_model/transformer/layers/decoder_layer/multi_head_attention/key"
    params[query]["w"] = quantize_int4(floats[query]["w"], 32, symmetric=False)
    params[key]["w"] = quantize(floats[key]["w"], 4, scale_dtype=np.float16)
    write_native(params, tmp_path, config)
    loaded = load_params(tmp_path, config)
    assert loaded[query]["w"].mins is not None and loaded[key]["w"].scales.dtype == np.float16
    assert_same_tree(loaded, params)


def test_mismatched_int4_scales_are_one_line_errors_naming_the_tensor(float_demo, tmp_path):
    folder, config, _ = float_demo
    good = tmp_path / "good"
    write_native(load_params(folder, config, "int4", group_size=32), good, config)
    stored = SafetensorsFile(good / FILE)
    tensors = {name: np.asarray(stored.get(name)) for name in stored.keys()}
    name = "language_model/transformer/layers/decoder_layer/moe/linear_1/w:scales"
    cases = {name: tensors[name][:, :, :-1],  # 42 of 43 groups
             name.replace("linear_1", "linear"): tensors[name.replace("linear_1", "linear")]
             .astype(np.float32)}
    for broken, value in cases.items():
        folder_bad = tmp_path / f"bad{len(list(tmp_path.iterdir()))}"
        folder_bad.mkdir()
        save_safetensors({**tensors, broken: value}, folder_bad / FILE, {"format": FORMAT})
        with pytest.raises(CheckpointError) as refused:
            load_params(folder_bad, config)
        message = str(refused.value)
        print(message)
        assert "\n" not in message and broken in message, message


# --- the memory plan -------------------------------------------------------------------------

def grok_int4_bytes_per_device(config, model: int, group: int = 32) -> int:
    """Parameters per device of Grok-1 under --quantize int4 with every device on `model`,
    by hand: each int4 weight [.., I, O] is I*O/2 packed bytes + I/group*O f16 scales, split
    m ways (whole groups per device); the tied table int8 [V, D] split over D with bf16
    scales [D/64, V] replicated; router and norms float32, replicated. Over 8 KV heads,
    model=16 stores each KV head twice (kv_heads.py), so key/value are D x 2*K*H wide."""
    d, f, e, layers = config.emb_size, config.ffn_size, config.num_experts, config.num_layers
    heads, kv = config.num_q_heads * config.key_size, config.num_kv_heads * config.key_size
    kv *= max(1, model // config.num_kv_heads)
    int4 = lambda i, o: i * o // 2 + i // group * o * 2  # noqa: E731
    layer = (int4(d, heads) + 2 * int4(d, kv) + int4(heads, d)
             + e * (2 * int4(d, f) + int4(f, d)))
    table = config.vocab_size * d // model + d // 64 * config.vocab_size * 2
    small = layers * (d * e + 4 * d) * 4 + d * 4  # router, 4 sandwich norms; final norm
    return layers * layer // model + table + small


def grok_kv_bytes_per_device(config, model: int, slots: int, length: int) -> int:
    """Keys and values [L, B, S, K', H] bf16 split by heads (K' = K or its copies), positions."""
    kv_heads = max(config.num_kv_heads, model)
    return 2 * config.num_layers * slots * length * kv_heads * config.key_size * 2 // model \
        + 4 * slots


@pytest.mark.parametrize("target, model, capacity", [("h100x4", 4, 80 * 10**9),
                                                    ("v5e-16", 16, 16 * 2**30)])
def test_grok1_int4_fits_4_h100_and_a_v5e_16(target, model, capacity):
    from runtime.planning import plan_for_target
    grok = load_config("grok-1")
    assert grok.tie_embeddings and grok.ffn_size == 32768
    plan = plan_for_target(grok, target, "int4", 1, 8192, label="grok-1")
    assert plan.mesh_sizes == {"data": 1, "model": model}
    assert plan.device_memory_bytes == capacity
    assert plan.param_bytes == grok_int4_bytes_per_device(grok, model)
    assert plan.kv_bytes == grok_kv_bytes_per_device(grok, model, 1, 8192)
    assert plan.fits and plan.total_bytes < capacity
    text = plan.table()
    assert "weights int4 (4-bit codes packed 2 per byte + f16 scales per <= 32" in text
    print(f"\n{target}: params {plan.param_bytes / 2**30:.2f} GiB, KV "
          f"{plan.kv_bytes / 2**30:.2f} GiB, working set {plan.working_bytes / 2**30:.2f} GiB, "
          f"total {plan.total_bytes / 2**30:.2f} of {capacity / 2**30:.2f} GiB per device")
    # int8 does not fit 4 x H100: int4 is what makes this machine enough
    assert not plan.replan(weight_format="int8").fits


def test_group_size_reaches_the_plan():
    from runtime.planning import make_plan
    grok = load_config("grok-1")
    g32 = make_plan(grok, {"model": 8}, "int4", 1, 8192, int4_group_size=32)
    g128 = make_plan(grok, {"model": 8}, "int4", 1, 8192, int4_group_size=128)
    assert g32.param_bytes == grok_int4_bytes_per_device(grok, 8, 32)
    assert g128.param_bytes == grok_int4_bytes_per_device(grok, 8, 128) < g32.param_bytes


def test_run_py_plan_with_quantize_int4():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, str(ROOT / "run.py"), "--plan", "--quantize", "int4",
                           "--group-size", "64", "--plan-target", "h100x4"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "=> fits" in done.stdout and "f16 scales per <= 64 input rows" in done.stdout
    assert "mesh data=1,model=4: 4 x NVIDIA H100 80GB" in done.stdout


# --- run.py ----------------------------------------------------------------------------------

PROMPTS = ["Return the", "The file is", "If the argument is", "This module provides"]


def greedy_ids(checkpoint: Path, *flags: str) -> list[list[int]]:
    argv = [sys.executable, str(ROOT / "run.py"), "--checkpoint", str(checkpoint),
            "--temperature", "0", "--max-new-tokens", "8", "--json", *flags]
    for prompt in PROMPTS:
        argv += ["--prompt", prompt]
    done = subprocess.run(argv, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = sorted((json.loads(line) for line in done.stdout.splitlines()),
                  key=lambda row: row["index"])
    return [row["output_ids"] for row in rows]


@pytest.mark.slow
def test_run_py_quantize_int4_agrees_mostly_with_float(float_demo):
    folder = float_demo[0]
    floats = greedy_ids(folder)
    int4 = greedy_ids(folder, "--quantize", "int4", "--group-size", "32")
    # the shipped demo's int8 weights are re-quantised from the same values: the same tokens
    assert greedy_ids(DEMO, "--quantize", "int4", "--group-size", "32") == int4
    pairs = [(a, b) for x, y in zip(floats, int4) for a, b in zip(x, y)]
    agreement = sum(a == b for a, b in pairs) / len(pairs)
    print(f"\nint4 g32 vs float greedy tokens: {agreement:.0%} of {len(pairs)} agree")
    assert len(pairs) >= len(PROMPTS) * 4 and agreement >= 0.5
    assert math.isfinite(agreement)


def test_int4_is_suggested_where_int8_does_not_fit():
    from runtime.planning import make_plan
    grok = load_config("grok-1")
    plan = make_plan(grok, {"model": 4}, "bfloat16", 1, 8192, device_memory_bytes=80 * 10**9)
    assert not plan.fits and not plan.replan(weight_format="int8", float_dtype="bfloat16").fits
    found = [s for s in plan.suggested_changes() if s.changes.get("weight_format") == "int4"]
    assert len(found) == 1 and "--quantize int4" in found[0].text
    assert plan.replan(**found[0].changes).fits


@pytest.mark.slow
def test_lazy_on_4_devices_equals_eager(float_demo):
    """Placed per slice on model=4 (simulated CPU devices): linear_1's 43 groups do not split
    in 4 (its rows are not split), the attention weights' groups do."""
    folder = float_demo[0]
    env = dict(os.environ, XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=4"),
               JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, __file__, str(folder)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("equal"), done.stderr[-3000:]


def child_main(folder: Path) -> None:
    import jax
    from runtime.checkpoint.load import local_bytes
    from runtime.sharding import leaf_spec, make_mesh
    config = load_config(folder / "config.yaml")
    mesh = make_mesh({"data": 1, "model": 4})
    placed = load_params_on_mesh(folder, config, mesh, "int4", group_size=32)
    linear_1 = placed["language_model/transformer/layers/decoder_layer/moe/linear_1"]["w"]
    assert len(linear_1.packed.sharding.device_set) == 4
    # 43 groups do not split in 4: the rows stay whole on each device (sharding._int4_spec)
    assert linear_1.packed.addressable_shards[0].data.shape == (4, 8, 172, 256)
    attention_out = placed["language_model/transformer/layers/decoder_layer/"
                           "multi_head_attention/linear"]["w"]  # row-parallel, groups split
    for part in (attention_out.packed, attention_out.scales):
        assert part.addressable_shards[0].data.shape[-2] * 4 == part.shape[-2]
    assert_same_tree(jax.device_get(placed), load_params(folder, config, "int4", group_size=32))
    lazy = quantized_int4_lazy(LazyParam((4, 8, 344, 256), np.dtype(np.float32), None), 32)
    spec = leaf_spec("language_model/transformer/layers/decoder_layer/moe/linear_1/w", lazy,
                     mesh)
    # the distinct bytes this process holds: the packed rows and the f16 scales, once each
    assert local_bytes(lazy, spec, mesh) == 4 * 8 * 172 * 256 + 4 * 8 * 43 * 256 * 2
    print("equal")


if __name__ == "__main__":
    child_main(Path(sys.argv[1]))
