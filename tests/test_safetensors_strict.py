"""safetensors files held to the format's rules (issue: corrupt files loaded silently or crashed):
every malformed header is one CheckpointError naming the file and the tensor, never a
traceback; hypothesis mutates valid headers to look for any other outcome."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runtime.checkpoint.hf_config import read_hf_config
from runtime.checkpoint.load import load_params
from runtime.checkpoint.safetensors_io import SafetensorsFile, save_safetensors
from runtime.errors import CheckpointError, MAX_LISTED, problem_report

FIXTURES = Path(__file__).parent / "fixtures" / "hf"


def write_raw(path: Path, header, data: bytes) -> Path:
    """A file with exactly this header (any JSON value, or raw bytes) and data."""
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


def entry(dtype="F32", shape=(2,), begin=0, end=8):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}


def test_package_written_files_round_trip(tmp_path):
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    tensors = {"a": a, "b": a.astype(ml_dtypes.bfloat16), "c": np.arange(5, dtype=np.int8)}
    save_safetensors(tensors, tmp_path / "x.safetensors", {"format": "pt"})
    f = SafetensorsFile(tmp_path / "x.safetensors")
    assert f.metadata == {"format": "pt"}
    for name, want in tensors.items():
        assert f.dtype(name) == want.dtype and f.shape(name) == want.shape
        np.testing.assert_array_equal(np.asarray(f.get(name)), want)
    assert not (tmp_path / "x.safetensors.partial").exists()


@pytest.mark.parametrize("header,data,culprit", [
    (b'{"a": ' + json.dumps(entry()).encode() + b', "a": '
     + json.dumps(entry(begin=8, end=16)).encode() + b"}", 16, "'a' appears twice"),
    ({"a": entry(), "b": entry()}, 8, "tensor 'b' at bytes \\[0, 8\\) overlaps tensor 'a'"),
    ({"a": entry(), "b": entry(begin=12, end=20)}, 20, "leaves 4 bytes unindexed"),
    ({"a": entry()}, 12, "4 bytes after the last tensor are not indexed"),
    ({"a": entry(begin=-8, end=0)}, 8, "tensor 'a' has data_offsets \\[-8, 0\\]"),
    ({"a": entry(begin=8, end=0)}, 8, "tensor 'a' has data_offsets"),
    ({"a": entry(shape=(2.5,))}, 8, "tensor 'a' has shape \\[2.5\\]"),
    ({"a": entry(shape=(True, 2))}, 8, "tensor 'a' has shape"),
    ({"a": entry(shape=(3,))}, 8, "needs 12 bytes, its data_offsets span 8"),
    ({"a": entry(dtype="Q4")}, 8, "tensor 'a' has unsupported dtype 'Q4'"),
    ({"a": {"dtype": "F32", "shape": [2]}}, 8, "tensor 'a' has a malformed header entry"),
    ({"a": [1, 2]}, 8, "tensor 'a' has a malformed header entry"),
    ([1, 2, 3], 0, "its header is a JSON list, not an object"),
    ("text", 0, "its header is a JSON str, not an object"),
    (b"[" * 100_000 + b"]" * 100_000, 0, "its header nests too deeply"),
    (b"\xff\xfe", 0, "is not a safetensors file"),
    ({"__metadata__": {"a": 1}}, 0, "__metadata__ must map names to strings"),
    ({"a": entry(shape=(4,), end=16)}, 8, "does not fit its byte range.*truncated"),
])
def test_malformed_headers_are_one_named_error(tmp_path, header, data, culprit):
    path = write_raw(tmp_path / "bad.safetensors", header, bytes(data))
    with pytest.raises(CheckpointError, match=culprit) as error:
        SafetensorsFile(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def _hf_copy(tmp_path: Path, name: str = "llama") -> Path:
    folder = tmp_path / name
    shutil.copytree(FIXTURES / name, folder)
    return folder


def test_a_float_weight_stored_as_integers_is_refused(tmp_path):
    folder = _hf_copy(tmp_path)
    shard = folder / "model.safetensors"
    f = SafetensorsFile(shard)
    tensors = {n: np.array(f.get(n)) for n in f.keys()}
    norm = tensors["model.norm.weight"]
    tensors["model.norm.weight"] = norm.view(np.int32) if norm.dtype == np.float32 else \
        norm.astype(np.float32).view(np.int32)
    save_safetensors(tensors, shard)
    with pytest.raises(CheckpointError, match="model.norm.weight .*stored as I32, .*needs a "
                                              "float type"):
        load_params(folder, read_hf_config(folder))


@pytest.mark.parametrize("target", ["../outside.safetensors", "/etc/passwd", "", 7,
                                    "sub/../../x.safetensors"])
def test_an_index_may_not_point_outside_the_folder(tmp_path, target):
    folder = _hf_copy(tmp_path)
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.norm.weight": target}}))
    with pytest.raises(CheckpointError, match="is not a file name inside the checkpoint folder"):
        load_params(folder, read_hf_config(folder))


def test_an_index_that_is_not_an_object_is_named(tmp_path):
    folder = _hf_copy(tmp_path)
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": ["model.safetensors"]}))
    with pytest.raises(CheckpointError, match="weight_map is a list"):
        load_params(folder, read_hf_config(folder))


def test_problem_lists_are_capped():
    error = problem_report("checkpoint x does not match", [f"junk {i}" for i in range(200_000)],
                           CheckpointError)
    lines = str(error).splitlines()
    assert lines[0] == "checkpoint x does not match (200000 problems):"
    assert len(lines) == MAX_LISTED + 2 and lines[-1].strip() == f"... and {200_000 - MAX_LISTED} more"
    assert str(problem_report("s", ["one"], CheckpointError)) == "s: one"


# --- fuzz: mutated headers end in CheckpointError or in a file whose tensors all read ----------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                 max_size=4),
    max_leaves=12)
FIELDS = st.sampled_from(["dtype", "shape", "data_offsets", "extra"])


@st.composite
def mutated_files(draw):
    names = ["a", "b", "c"]
    header, offset = {}, 0
    for name in names:
        rows = draw(st.integers(0, 3))
        header[name] = entry("F32", (rows, 2), offset, offset + rows * 8)
        offset += rows * 8
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.sampled_from(names + ["__metadata__"]))
        if name == "__metadata__" or draw(st.booleans()):
            header[name] = draw(JSON_VALUES)
        elif isinstance(header.get(name), dict):
            header[name][draw(FIELDS)] = draw(JSON_VALUES)
    return header, offset + draw(st.sampled_from([0, 0, 4, -4]))


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=mutated_files())
def test_fuzzed_headers_never_escape_as_other_errors(tmp_path, case):
    header, data = case
    path = write_raw(tmp_path / "fuzz.safetensors", header, bytes(max(data, 0)))
    try:
        f = SafetensorsFile(path)
    except CheckpointError as e:
        assert str(path) in str(e)
        return
    for name in f.keys():  # accepted: every tensor must read as declared
        assert np.asarray(f.get(name)).shape == f.shape(name)
