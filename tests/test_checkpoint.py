"""The Grok-1 ckpt-0 reader/writer and the restricted unpickler, on the 12-layer tiny-test model.

File indices below are worked out by hand from the released layout (2 global files, then 12 per
layer, layers in the string order 0, 1, 10, 11, 2, ..., 9), not from reference_file_table:
  0 embeddings, 1 final rms_norm; layer l's block starts at 2 + 12 * position(l), with
  position: 0->0, 1->1, 10->2, 11->3, 2->4, ..., 9->11; inside a block:
  +0 moe/linear, +1 moe/linear_1, +2 moe/linear_v, +3 key, +4 attention linear, +5 query,
  +6 value, +7..+10 rms_norm, rms_norm_1, rms_norm_2, rms_norm_3, +11 router.
"""

import dataclasses
import os
import pickle
import pickletools
import shutil
import sys
import warnings

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from runtime.checkpoint.grok_ckpt import write_ckpt0
from runtime.checkpoint.load import load_params
from ckpt0_helpers import (LAYERS, QuantizedWeight8bit, RunsCommand, as_numpy1_pickle,
                           mixed_params)
from runtime.checkpoint.safe_pickle import QuantizedWeight8bitRecord, load_file
from runtime.config import load_config
from runtime.errors import CheckpointError
from runtime.quant import QuantizedWeight8bit as RuntimeQW8

def dump(path, obj):
    path.write_bytes(pickle.dumps(obj, protocol=4))


def opcodes(data: bytes):
    """The opcode stream, with numpy's module spelled the numpy-1 way and frame sizes dropped."""
    spell = {"numpy._core.multiarray": "numpy.core.multiarray"}
    return [(op.name, spell.get(arg, arg) if isinstance(arg, str) else arg)
            for op, arg, _ in pickletools.genops(data) if op.name != "FRAME"]


@pytest.fixture(scope="module")
def config():
    return load_config("tiny-test")


@pytest.fixture(scope="module")
def params(config):
    return mixed_params(config)


@pytest.fixture(scope="module")
def written(params, config, tmp_path_factory):
    """A download folder holding ckpt-0/ written from `params`."""
    root = tmp_path_factory.mktemp("download")
    write_ckpt0(params, root, config)
    return root


@pytest.fixture
def ckpt(written, tmp_path):
    """A private copy of the written ckpt-0 folder that a test may damage."""
    return shutil.copytree(written / "ckpt-0", tmp_path / "ckpt-0")


def leaf(params, sub, name="w"):
    return params[f"{LAYERS}/{sub}"][name]


def test_round_trip_is_bit_exact(params, written, config):
    loaded = load_params(written, config, kind="ckpt-0")
    assert loaded.keys() == params.keys()
    for module, leaves in params.items():
        assert loaded[module].keys() == leaves.keys()
        for name, want in leaves.items():
            got = loaded[module][name]
            if isinstance(want, RuntimeQW8):
                assert isinstance(got, RuntimeQW8), (module, name)
                for part in ("weight", "scales"):
                    a, b = getattr(got, part), getattr(want, part)
                    assert a.dtype == b.dtype and np.array_equal(a, b), (module, name, part)
            else:
                assert got.dtype == np.float32 and np.array_equal(got, want), (module, name)
    assert leaf(loaded, "moe/linear_1").scales.shape == (12, 4, 8, 32)
    assert leaf(loaded, "multi_head_attention/query").scales.shape == (12, 1, 32)


def test_writer_accepts_jax_arrays(params, config, tmp_path):
    as_jax = jax.tree.map(jnp.asarray, params)  # QuantizedWeight8bit is a pytree: both fields
    embed = params["language_model/in_out_embed"]["embeddings"].astype(ml_dtypes.bfloat16)
    as_jax["language_model/in_out_embed"]["embeddings"] = jnp.asarray(embed)  # bf16, widened
    loaded = load_params(write_ckpt0(as_jax, tmp_path, config), config, kind="ckpt-0")
    got = loaded["language_model/in_out_embed"]["embeddings"]
    assert got.dtype == np.float32 and np.array_equal(got, embed.astype(np.float32))
    want, got = leaf(params, "moe/linear_1"), leaf(loaded, "moe/linear_1")
    assert np.array_equal(got.weight, want.weight) and np.array_equal(got.scales, want.scales)


def test_ckpt0_folder_itself_is_accepted(written, config, params):
    loaded = load_params(written / "ckpt-0", config, progress=True, kind="ckpt-0")
    assert np.array_equal(leaf(loaded, "router"), leaf(params, "router"))


def test_files_are_in_lexicographic_layer_order(written, params):
    def content(index):
        return load_file(written / "ckpt-0" / f"tensor{index:05d}_000")

    files = sorted(os.listdir(written / "ckpt-0"))
    assert len(files) == 2 + 12 * 12 and files[-1] == "tensor00145_000"
    assert np.array_equal(content(0), params["language_model/in_out_embed"]["embeddings"])
    assert np.array_equal(content(1), params["language_model/rms_norm"]["scale"])

    def same_qw8(obj, sub, layer):
        want = leaf(params, sub)
        assert isinstance(obj, QuantizedWeight8bitRecord)
        assert np.array_equal(obj.weight, want.weight[layer])
        assert np.array_equal(obj.scales, want.scales[layer])

    same_qw8(content(2), "moe/linear", 0)
    same_qw8(content(3), "moe/linear_1", 0)
    same_qw8(content(6), "multi_head_attention/linear", 0)
    assert np.array_equal(content(10), leaf(params, "rms_norm_1", "scale")[0])
    assert np.array_equal(content(13), leaf(params, "router")[0])
    same_qw8(content(14), "moe/linear", 1)
    assert np.array_equal(content(25), leaf(params, "router")[1])
    same_qw8(content(26), "moe/linear", 10)  # layer 10 right after layer 1's 12 files
    assert np.array_equal(content(37), leaf(params, "router")[10])
    same_qw8(content(38), "moe/linear", 11)
    same_qw8(content(50), "moe/linear", 2)
    assert np.array_equal(content(145), leaf(params, "router")[9])


def test_written_files_match_the_reference_pickles(written, params, monkeypatch):
    # The reference pickled a dataclass defined in its launch script, i.e. `__main__`.
    ref_class = dataclasses.make_dataclass("QuantizedWeight8bit", ["weight", "scales"])
    ref_class.__module__ = "__main__"
    monkeypatch.setattr(sys.modules["__main__"], "QuantizedWeight8bit", ref_class, raising=False)
    want = leaf(params, "moe/linear_1")
    reference = pickle.dumps(ref_class(want.weight[0], want.scales[0]), protocol=4)
    ours = (written / "ckpt-0" / "tensor00003_000").read_bytes()
    assert opcodes(ours) == opcodes(reference)
    assert ("SHORT_BINUNICODE", "__main__") in opcodes(ours)

    router = leaf(params, "router")[0]
    ours = (written / "ckpt-0" / "tensor00013_000").read_bytes()
    assert opcodes(ours) == opcodes(pickle.dumps(router, protocol=4))
    assert ("SHORT_BINUNICODE", "numpy.core.multiarray") in opcodes(ours)  # as numpy 1.x wrote


def test_pickle_that_runs_a_command_is_refused(ckpt, tmp_path, config):
    marker = tmp_path / "pwned"
    dump(ckpt / "tensor00002_000", RunsCommand(f"touch {marker}"))
    with pytest.raises(CheckpointError, match=r"refusing to load .*posix\.system|refusing to load "
                                              r".*os\.system"):
        load_file(ckpt / "tensor00002_000")
    # Hidden inside a quantised weight's state, inside a whole checkpoint.
    scales = np.ones((4, 1, 48), ml_dtypes.bfloat16)
    dump(ckpt / "tensor00014_000", QuantizedWeight8bit(RunsCommand(f"touch {marker}"), scales))
    with pytest.raises(CheckpointError) as err:
        load_params(ckpt, config, kind="ckpt-0")
    text = str(err.value)
    assert "tensor00002_000 (language_model/transformer/decoder_layer_0/moe/linear/w)" in text
    assert "tensor00014_000 (language_model/transformer/decoder_layer_1/moe/linear/w)" in text
    assert text.count("refusing to load") == 2 and "system" in text
    assert not marker.exists()


def test_truncated_file_names_the_file(ckpt, config):
    data = (ckpt / "tensor00005_000").read_bytes()
    (ckpt / "tensor00005_000").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt checkpoint file tensor00005_000 "
                                              r"\(language_model/transformer/decoder_layer_0/"
                                              r"multi_head_attention/key/w\)"):
        load_params(ckpt, config, kind="ckpt-0")


def test_missing_file(ckpt, config):
    (ckpt / "tensor00007_000").unlink()
    with pytest.raises(CheckpointError, match=r"tensor00007_000 \(language_model/transformer/"
                                              r"decoder_layer_0/multi_head_attention/query/w\): "
                                              "missing"):
        load_params(ckpt, config, kind="ckpt-0")


def test_shape_mismatches_are_reported_together(ckpt, config):
    dump(ckpt / "tensor00013_000", np.zeros((32, 5), np.float32))
    dump(ckpt / "tensor00040_000", QuantizedWeight8bit(np.zeros((4, 32, 40), np.int8),
                                                       np.ones((4, 1, 40), ml_dtypes.bfloat16)))
    with pytest.raises(CheckpointError) as err:
        load_params(ckpt, config, kind="ckpt-0")
    lines = [line.strip() for line in str(err.value).splitlines()]
    assert len(lines) == 3 and "2 problems" in lines[0]
    assert lines[1] == ("tensor00013_000 (language_model/transformer/decoder_layer_0/router/w): "
                        "expected [32, 4], got [32, 5]")
    assert lines[2] == ("tensor00040_000 (language_model/transformer/decoder_layer_11/moe/linear_v/"
                        "w): expected [4, 32, 48], got [4, 32, 40]")


def test_wrong_kind_and_inconsistent_row_blocks(ckpt, config):
    # A norm scale stored as int8 and layer 1's attention output with 4 row blocks, not 8.
    dump(ckpt / "tensor00009_000", QuantizedWeight8bit(np.zeros((32,), np.int8),
                                                       np.ones((1,), ml_dtypes.bfloat16)))
    dump(ckpt / "tensor00018_000", QuantizedWeight8bit(np.zeros((32, 32), np.int8),
                                                       np.ones((4, 32), ml_dtypes.bfloat16)))
    with pytest.raises(CheckpointError) as err:
        load_params(ckpt, config, kind="ckpt-0")
    text = str(err.value)
    assert "tensor00009_000 (language_model/transformer/decoder_layer_0/rms_norm/scale): " \
           "expected a float array [32], got a QuantizedWeight8bit" in text
    assert "tensor00018_000 (language_model/transformer/decoder_layer_1/multi_head_attention/" \
           "linear/w): holds a QuantizedWeight8bit with 4 scale row blocks, but tensor00006_000 " \
           "(layer 0) holds a QuantizedWeight8bit with 8 scale row blocks" in text


def test_foreign_files(ckpt, config):
    garbage = np.random.default_rng(0).bytes(4096)
    assert garbage[0] != 0x80
    (ckpt / "tensor00003_000").write_bytes(garbage)
    (ckpt / "tensor00004_000").write_bytes(b"\x80\x04" + garbage)  # a pickle header, then noise
    with pytest.raises(CheckpointError) as err:
        load_params(ckpt, config, kind="ckpt-0")
    text = str(err.value)
    assert "truncated or corrupt checkpoint file tensor00003_000 (" in text and "not a pickle" in text
    assert "truncated or corrupt checkpoint file tensor00004_000 (" in text


def test_hostile_pickles_are_named(ckpt, config):
    """300k nested lists (RecursionError inside the unpickler) and an object array: one error
    naming each file, never a traceback."""
    (ckpt / "tensor00003_000").write_bytes(b"\x80\x04" + b"]" * 300_001 + b"a" * 300_000 + b".")
    dump(ckpt / "tensor00004_000", np.array([1, "a", None], dtype=object))
    with pytest.raises(CheckpointError) as err:
        load_params(ckpt, config, kind="ckpt-0")
    text = str(err.value)
    assert "truncated or corrupt checkpoint file tensor00003_000 (" in text
    assert "RecursionError" in text
    assert "tensor00004_000 (" in text and "got object" in text


def test_a_config_claiming_more_layers_than_the_files_is_refused_first(ckpt, config):
    with pytest.raises(CheckpointError, match="num_layers 1000000000 needs 12000000002 files; "
                                              ".* holds 146"):
        load_params(ckpt, config.replace(num_layers=10**9), kind="ckpt-0")


def test_extra_file_is_an_error(ckpt, config):
    shutil.copy(ckpt / "tensor00145_000", ckpt / "tensor00146_000")
    with pytest.raises(CheckpointError, match="tensor00146_000: not part of a 12-layer"):
        load_params(ckpt, config, kind="ckpt-0")


def test_missing_directory(tmp_path, config):
    with pytest.raises(CheckpointError) as err:
        load_params(tmp_path / "nowhere", config, kind="ckpt-0")
    assert str(tmp_path / "nowhere") in str(err.value) and "\n" not in str(err.value)


def test_numpy1_pickles_load(tmp_path):
    array = np.random.default_rng(1).normal(size=(3, 5)).astype(np.float32)
    path = tmp_path / "array"
    path.write_bytes(as_numpy1_pickle(pickle.dumps(array, protocol=4)))
    with warnings.catch_warnings():  # numpy 2's numpy.core shim may warn; the fixture is valid
        warnings.simplefilter("ignore")
        assert np.array_equal(pickle.loads(path.read_bytes()), array)
    got = load_file(path)
    assert type(got) is np.ndarray and got.dtype == np.float32 and np.array_equal(got, array)

    weight = np.arange(-60, 60, dtype=np.int8).reshape(8, 15)
    scales = np.linspace(0.5, 2, 15, dtype=np.float32).astype(ml_dtypes.bfloat16)[None]
    path.write_bytes(as_numpy1_pickle(pickle.dumps(QuantizedWeight8bit(weight, scales.copy()),
                                                   protocol=4)))
    got = load_file(path)
    assert isinstance(got, QuantizedWeight8bitRecord)
    assert got.weight.dtype == np.int8 and np.array_equal(got.weight, weight)
    assert got.scales.dtype == ml_dtypes.bfloat16 and np.array_equal(got.scales, scales)


def test_bf16_float_tensor_loads_as_float32_exactly(ckpt, config):
    # Values that need all of bf16's mantissa bits, from a numpy-1.x-style pickle.
    norm = (np.arange(32, dtype=np.float32) * 1.0078125 - 7.5).astype(ml_dtypes.bfloat16)
    (ckpt / "tensor00001_000").write_bytes(as_numpy1_pickle(pickle.dumps(norm, protocol=4)))
    got = load_params(ckpt, config, kind="ckpt-0")["language_model/rms_norm"]["scale"]
    assert got.dtype == np.float32 and np.array_equal(got, norm.astype(np.float32))


def test_writer_refuses_a_checkpoint_folder_in_use(written, params, config):
    with pytest.raises(CheckpointError, match="already holds checkpoint files"):
        write_ckpt0(params, written, config)
