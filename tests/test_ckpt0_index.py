"""Lazy ckpt-0 reading: pickle indexing (ckpt0_index), plan_ckpt0 and read_ckpt0_slice.

Checks that indexed files give the arrays a full restricted unpickle gives, as memory maps; that
slices of stacked parameters equal slices of the fully read ones (quantised scales following the
documented row-block rule); that a slice reads about its share of the payload bytes; and that
the index keeps the unpickler's allow-list, numpy 1.x pickles and corruption errors.
"""

import mmap
import os
import pickle
import shutil
import warnings

import ml_dtypes
import numpy as np
import pytest

from runtime.checkpoint import ckpt0_index
from runtime.checkpoint.ckpt0_arrays import LazyArray, normalize_index
from runtime.checkpoint.ckpt0_index import index_pickle, lazy_pickle
from runtime.checkpoint.grok_ckpt import (plan_ckpt0, read_ckpt0_slice, reference_file_table,
                                          write_ckpt0)
from runtime.checkpoint.load import load_params
from ckpt0_helpers import (LAYERS, ROW_PARALLEL, QuantizedWeight8bit, RunsCommand,
                           as_numpy1_pickle, mixed_params)
from runtime.checkpoint.safe_pickle import QuantizedWeight8bitRecord, load_file
from runtime.config import load_config
from runtime.errors import CheckpointError
from runtime.parameter_shapes import abstract_params
from runtime.quant import QuantizedWeight8bit as RuntimeQW8, dequantize


@pytest.fixture(scope="module")
def config():
    return load_config("tiny-test")


@pytest.fixture(scope="module")
def params(config):
    return mixed_params(config)


@pytest.fixture(scope="module")
def written(params, config, tmp_path_factory):
    root = tmp_path_factory.mktemp("download")
    write_ckpt0(params, root, config)
    return root / "ckpt-0"


@pytest.fixture(scope="module")
def loaded(written, config):
    return load_params(written, config, kind="ckpt-0")


@pytest.fixture(scope="module")
def plan(written, config):
    return plan_ckpt0(written, config)


@pytest.fixture
def ckpt(written, tmp_path):
    """A private copy of the written ckpt-0 folder that a test may damage."""
    return shutil.copytree(written, tmp_path / "ckpt-0")


def is_file_map(array, path) -> bool:
    """A read-only numpy memmap of `path` (not a copy of its data)."""
    return (isinstance(array, np.memmap) and isinstance(array.base, mmap.mmap)
            and os.path.samefile(array.filename, path) and not array.flags.writeable)


# ---------------------------------------------------------------------------------------------
# (a) indexing gives the unpickled arrays, as memory maps


def test_index_pickle_equals_full_unpickle_and_maps_the_file(written, config):
    mapped = 0
    for entry in reference_file_table(config):
        path = written / entry.file_name
        full, lazy = load_file(path), index_pickle(path, entry.tag)
        pairs = ([(full, lazy)] if isinstance(full, np.ndarray) else
                 [(full.weight, lazy.weight), (full.scales, lazy.scales)])
        assert isinstance(lazy, type(full))
        for want, got in pairs:
            assert got.dtype == want.dtype and got.shape == want.shape
            assert np.array_equal(got, want), entry.tag
            assert not got.flags.writeable
            if want.nbytes > ckpt0_index.INLINE_MAX:
                assert is_file_map(got, path), entry.tag
                mapped += 1
    assert mapped > 150  # most arrays of the tiny model are mapped, not inlined


def test_lazy_pickle_records_offsets_not_data(written):
    path = written / "tensor00003_000"  # layer 0 moe/linear_1: int8 [4, 48, 32], bf16 [4, 8, 32]
    lazy = lazy_pickle(path)
    assert isinstance(lazy, QuantizedWeight8bitRecord)
    weight, scales = lazy.weight, lazy.scales
    assert isinstance(weight, LazyArray) and isinstance(scales, LazyArray)
    assert (weight.dtype, weight.shape) == (np.dtype(np.int8), (4, 48, 32))
    assert (scales.dtype, scales.shape) == (np.dtype(ml_dtypes.bfloat16), (4, 8, 32))
    data = path.read_bytes()
    full = load_file(path)
    assert data[weight.offset:weight.offset + weight.nbytes] == full.weight.tobytes()
    assert data[scales.offset:scales.offset + scales.nbytes] == full.scales.tobytes()


def test_fortran_big_endian_and_bf16_arrays(tmp_path):
    rng = np.random.default_rng(3)
    arrays = [np.asfortranarray(rng.normal(size=(9, 7, 5)).astype(np.float32)),
              rng.normal(size=(6, 11)).astype(">f4"),
              rng.normal(size=(5, 40)).astype(ml_dtypes.bfloat16),
              np.arange(6, dtype=np.float32)]  # 24 bytes: kept inline
    indices = [(), (1,), (slice(None, None, -1), 2), (..., slice(1, None, 2)),
               (slice(4, 0, -2), slice(None), 3), (-1, ...)]
    for n, array in enumerate(arrays):
        path = tmp_path / f"a{n}"
        path.write_bytes(pickle.dumps(array, protocol=4))
        mapped = index_pickle(path)
        assert mapped.dtype == array.dtype and np.array_equal(mapped, array)
        lazy = lazy_pickle(path)
        assert (lazy.offset is None) == (array.nbytes <= ckpt0_index.INLINE_MAX)
        for index in indices:
            try:
                want = array[index]
            except IndexError:
                continue
            got = lazy[index]
            assert got.dtype == array.dtype and np.shape(got) == np.shape(want), (n, index)
            assert np.array_equal(got, want), (n, index)


def test_normalize_index():
    assert normalize_index((1, ..., slice(None, None, -1)), (3, 4, 5)) == (
        1, range(0, 4), range(4, -1, -1))
    assert normalize_index(-1, (3, 4)) == (2, range(0, 4))
    with pytest.raises(IndexError):
        normalize_index((3,), (3,))
    with pytest.raises(TypeError):
        normalize_index(([0, 1],), (3,))


# ---------------------------------------------------------------------------------------------
# the plan and load_params on it


def test_plan_reads_no_payloads(plan, loaded, written):
    assert set(plan) == {(m, p) for m, leaves in loaded.items() for p in leaves}
    pieces = plan[(f"{LAYERS}/moe/linear_1", "w")]
    assert [p.index for p in pieces] == [(layer,) for layer in range(12)]
    assert [p.entry.file_name for p in pieces[:3]] == ["tensor00003_000", "tensor00015_000",
                                                       "tensor00051_000"]
    assert isinstance(pieces[0].leaf, RuntimeQW8) and isinstance(pieces[0].leaf.weight, LazyArray)
    (embed,) = plan[("language_model/in_out_embed", "embeddings")]
    assert embed.index == () and isinstance(embed.leaf, LazyArray)
    assert embed.leaf.shape == (256, 32) and embed.leaf.offset is not None


# ---------------------------------------------------------------------------------------------
# (b) slices equal slices of the fully read parameter


def expected_scales_index(dims, weight_shape, row_blocks):
    """The documented rule, written independently: rows covering the selected input rows."""
    *lead, rows, cols = dims
    block = weight_shape[-2] // row_blocks
    if isinstance(rows, int):
        r = rows // block
    elif len(rows) == weight_shape[-2]:
        r = slice(None)
    elif len(rows) == 0:
        r = slice(0, 0)
    else:
        r = slice(min(rows) // block, max(rows) // block + 1)
    as_numpy = [d if isinstance(d, int) else
                slice(d.start, None if d.stop < 0 else d.stop, d.step) for d in (*lead, cols)]
    return (*as_numpy[:-1], r, as_numpy[-1])


def random_index(rng, shape, *, ascending_dim=None):
    index = []
    for axis, n in enumerate(shape):
        kind = rng.integers(5)
        if kind == 0:
            index.append(int(rng.integers(-n, n)))
        elif kind == 1:
            index.append(slice(None))
        else:
            a, b = sorted(int(x) for x in rng.integers(0, n + 1, size=2))
            step = int(rng.choice([1, 1, 2, 3, -1, -2]))
            if axis == ascending_dim:
                step = abs(step)
            index.append(slice(a, b, step) if step > 0 else slice(b, a if a else None, step))
    if rng.integers(4) == 0:  # drop some trailing full dims, or write them as '...'
        keep = int(rng.integers(1, len(index) + 1))
        index = index[:keep] + ([...] if rng.integers(2) else [])
    return tuple(index)


@pytest.mark.parametrize("sub,name", [("moe/linear", "w"), ("moe/linear_1", "w"),
                                      ("multi_head_attention/linear", "w"),
                                      ("multi_head_attention/query", "w"), ("router", "w"),
                                      ("rms_norm_2", "scale")])
def test_random_slices_of_stacked_parameters(plan, loaded, sub, name):
    rng = np.random.default_rng(abs(hash(sub)) % 1000)
    key = (f"{LAYERS}/{sub}", name)
    full = loaded[key[0]][name]
    quantized = isinstance(full, RuntimeQW8)
    shape = full.weight.shape if quantized else full.shape
    for trial in range(25):
        index = random_index(rng, shape, ascending_dim=len(shape) - 2 if quantized else None)
        got = read_ckpt0_slice(plan[key], index)
        if not quantized:
            want = full[index]
            assert got.dtype == np.float32 and np.array_equal(got, want), index
            continue
        dims = normalize_index(index, shape)
        want_scales = full.scales[expected_scales_index(dims, shape, full.row_blocks)]
        assert got.weight.dtype == np.int8 and np.array_equal(got.weight, full.weight[index]), index
        assert got.scales.dtype == ml_dtypes.bfloat16, index
        assert got.scales.shape == want_scales.shape and np.array_equal(got.scales, want_scales), \
            index


def test_unstacked_parameters_and_layer_ints(plan, loaded):
    embed = loaded["language_model/in_out_embed"]["embeddings"]
    entry = plan[("language_model/in_out_embed", "embeddings")]
    for index in [(slice(10, 200, 3),), (5, slice(None, None, -1)), (..., 7), ()]:
        assert np.array_equal(read_ckpt0_slice(entry, index), embed[index])
    key = (f"{LAYERS}/moe/linear", "w")
    got = read_ckpt0_slice(plan[key], (10, 2))  # one layer, one expert: [D, F] and [1, F]
    full = loaded[key[0]]["w"]
    assert np.array_equal(got.weight, full.weight[10, 2])
    assert np.array_equal(got.scales, full.scales[10, 2])
    empty = read_ckpt0_slice(plan[key], (slice(3, 3),))
    assert empty.weight.shape == (0, 4, 32, 48) and empty.scales.shape == (0, 4, 1, 48)


def test_block_aligned_input_slices_are_valid_quantized_weights(plan, loaded):
    key = (f"{LAYERS}/moe/linear_1", "w")  # int8 [12, 4, 48, 32], scales [12, 4, 8, 32]
    full = loaded[key[0]]["w"]  # 8 row blocks of 6 input rows
    whole = dequantize(full)
    for rows in (slice(0, 12), slice(18, 48), slice(6, 12)):
        index = (slice(2, 7), slice(None), rows, slice(5, 30))
        got = read_ckpt0_slice(plan[key], index)
        assert got.scales.shape[-2] == (rows.stop - rows.start) // 6
        assert np.array_equal(dequantize(got), whole[index])
    # Rows not at block boundaries: the blocks covering them (here rows 5..20 -> blocks 0..3).
    got = read_ckpt0_slice(plan[key], (0, 1, slice(5, 21)))
    assert np.array_equal(got.scales, full.scales[0, 1, 0:4])
    got = read_ckpt0_slice(plan[key], (0, 1, 17))  # one input row: its one scale row
    assert np.array_equal(got.weight, full.weight[0, 1, 17])
    assert np.array_equal(got.scales, full.scales[0, 1, 2])
    with pytest.raises(ValueError, match="negative step"):
        read_ckpt0_slice(plan[key], (0, 1, slice(None, None, -1)))


# ---------------------------------------------------------------------------------------------
# (c) bytes actually read


class CountingReads:
    """Wraps os.preadv (the only read the index and the lazy arrays use), counting bytes."""

    def __init__(self, monkeypatch):
        self.bytes = 0
        self.calls = 0
        real = os.preadv

        def preadv(fd, buffers, offset, *flags):
            n = real(fd, buffers, offset, *flags)
            self.bytes += n
            self.calls += 1
            return n

        monkeypatch.setattr(os, "preadv", preadv)

    def take(self):
        n, self.bytes, self.calls = self.bytes, 0, 0
        return n


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """A 2-layer checkpoint with F = 8192: moe weights int8 [4, 64, 8192] (2 MiB per file)."""
    config = load_config("tiny-test", num_layers=2, emb_size=64, intermediate_size=8192)
    rng = np.random.default_rng(5)
    params = {}
    for module, leaves in abstract_params(config).items():
        sub = module[len(LAYERS) + 1:] if module.startswith(LAYERS) else None
        params[module] = {}
        for name, spec in leaves.items():
            if name == "w" and sub != "router":
                rows = 8 if sub in ROW_PARALLEL else 1
                scales = (*spec.shape[:-2], rows, spec.shape[-1])
                params[module][name] = RuntimeQW8(
                    rng.integers(-127, 128, size=spec.shape, dtype=np.int8),
                    rng.uniform(0.01, 0.02, size=scales).astype(ml_dtypes.bfloat16))
            else:
                params[module][name] = rng.normal(size=spec.shape).astype(np.float32)
    root = tmp_path_factory.mktemp("big")
    return write_ckpt0(params, root, config), config, params


def test_slice_reads_its_share_of_the_payload(big, monkeypatch):
    ckpt, config, params = big
    reads = CountingReads(monkeypatch)
    plan = plan_ckpt0(ckpt, config)
    planned = reads.take()
    files = sorted(ckpt.iterdir())
    total = sum(f.stat().st_size for f in files)
    # Planning reads pickle headers only: one or two 4 KiB pages per file, never the payloads.
    assert planned <= len(files) * 3 * 4096 and planned < total / 20

    for sub, index in [("moe/linear", (..., slice(1024, 2048))),  # 1/8 of the output dim
                       ("moe/linear_v", (slice(None), slice(None), slice(None), slice(7168, None))),
                       ("moe/linear_1", (..., slice(4096, 5120), slice(None)))]:  # input rows
        pieces = plan[(f"{LAYERS}/{sub}", "w")]
        payload = sum(p.leaf.weight.nbytes + p.leaf.scales.nbytes for p in pieces)
        got = read_ckpt0_slice(pieces, index)
        read = reads.take()
        want = params[f"{LAYERS}/{sub}"]["w"]
        assert np.array_equal(got.weight, want.weight[index])
        needed = got.weight.nbytes + got.scales.nbytes
        # The selected bytes, plus at most the small gaps between scale rows that are cheaper to
        # read through than to skip with another call: about 1/8 of the payload.
        assert needed <= read <= needed + 2 * 4 * 4096, (sub, read, needed)
        assert 0.12 * payload <= read <= 0.13 * payload, (sub, read / payload)

    # Coalescing: a slice with small gaps is read as whole spans, never more than it spans.
    pieces = plan[(f"{LAYERS}/multi_head_attention/query", "w")]  # int8 [64, 32] per layer
    got = read_ckpt0_slice(pieces, (slice(None), slice(None), slice(0, 16)))
    read = reads.take()
    assert np.array_equal(got.weight, params[f"{LAYERS}/multi_head_attention/query"]["w"]
                          .weight[:, :, :16])
    assert read <= sum(p.leaf.weight.nbytes + p.leaf.scales.nbytes for p in pieces)


def test_read_ckpt0_reads_each_payload_once(big, monkeypatch):
    ckpt, config, params = big
    reads = CountingReads(monkeypatch)
    loaded = load_params(ckpt, config, kind="ckpt-0")
    total = sum(f.stat().st_size for f in ckpt.iterdir())
    assert reads.bytes <= total + len(list(ckpt.iterdir())) * 4096
    want = params[f"{LAYERS}/moe/linear_1"]["w"]
    got = loaded[f"{LAYERS}/moe/linear_1"]["w"]
    assert np.array_equal(got.weight, want.weight) and np.array_equal(got.scales, want.scales)


# ---------------------------------------------------------------------------------------------
# (d) security


def test_pickle_that_runs_a_command_is_refused(ckpt, tmp_path, config):
    marker = tmp_path / "pwned"
    bad = ckpt / "tensor00002_000"
    bad.write_bytes(pickle.dumps(RunsCommand(f"touch {marker}"), protocol=4))
    for reader in (index_pickle, lazy_pickle):
        with pytest.raises(CheckpointError, match=r"refusing to load .*(posix|os)\.system"):
            reader(bad)
    # Hidden inside a quantised weight's state, next to a large payload that gets indexed.
    scales = np.ones((4, 1, 48), ml_dtypes.bfloat16)
    hidden = ckpt / "tensor00014_000"
    hidden.write_bytes(pickle.dumps(QuantizedWeight8bit(RunsCommand(f"touch {marker}"), scales),
                                    protocol=4))
    with pytest.raises(CheckpointError, match="refusing to load"):
        index_pickle(hidden)
    with pytest.raises(CheckpointError) as err:
        plan_ckpt0(ckpt, config)
    text = str(err.value)
    assert "tensor00002_000 (language_model/transformer/decoder_layer_0/moe/linear/w)" in text
    assert "tensor00014_000 (language_model/transformer/decoder_layer_1/moe/linear/w)" in text
    assert text.count("refusing to load") == 2
    assert not marker.exists()


def test_persistent_ids_in_a_file_are_refused(tmp_path):
    # The index uses persistent ids for its payload markers; a file may not bring its own.
    class WithPid(pickle.Pickler):
        def persistent_id(self, obj):
            return 0 if isinstance(obj, str) and obj == "x" else None

    path = tmp_path / "pid"
    with open(path, "wb") as f:
        WithPid(f, protocol=4).dump(["x", np.zeros(100, np.float32)])
    with pytest.raises(CheckpointError, match="truncated or corrupt .*persistent id"):
        index_pickle(path)


def test_other_globals_are_refused(tmp_path):
    path = tmp_path / "g"
    path.write_bytes(pickle.dumps([np.zeros(50, np.float32), shutil.rmtree], protocol=4))
    with pytest.raises(CheckpointError, match=r"refusing to load .*shutil\.rmtree"):
        index_pickle(path)


# ---------------------------------------------------------------------------------------------
# (e) numpy 1.x pickles


def test_numpy1_pickles_index(tmp_path):
    rng = np.random.default_rng(1)
    array = rng.normal(size=(30, 50)).astype(np.float32)
    path = tmp_path / "array"
    path.write_bytes(as_numpy1_pickle(pickle.dumps(array, protocol=4)))
    with warnings.catch_warnings():  # numpy 2's numpy.core shim may warn; the fixture is valid
        warnings.simplefilter("ignore")
        assert np.array_equal(pickle.loads(path.read_bytes()), array)
    got = index_pickle(path)
    assert is_file_map(got, path) and got.dtype == np.float32 and np.array_equal(got, array)

    weight = rng.integers(-127, 128, size=(64, 150), dtype=np.int8)
    scales = rng.uniform(0.5, 2, size=(8, 150)).astype(ml_dtypes.bfloat16)
    path.write_bytes(as_numpy1_pickle(pickle.dumps(QuantizedWeight8bit(weight, scales),
                                                   protocol=4)))
    got = index_pickle(path)
    assert isinstance(got, QuantizedWeight8bitRecord)
    assert is_file_map(got.weight, path) and np.array_equal(got.weight, weight)
    assert is_file_map(got.scales, path) and got.scales.dtype == ml_dtypes.bfloat16
    assert np.array_equal(got.scales, scales)
    lazy = lazy_pickle(path)
    assert np.array_equal(lazy.weight[10:20, ::7], weight[10:20, ::7])


# ---------------------------------------------------------------------------------------------
# (f) truncated and corrupt files


def test_truncated_payload_names_the_file(ckpt, config):
    path = ckpt / "tensor00005_000"  # layer 0 attention key: int8 [32, 16]
    data = path.read_bytes()
    lazy = lazy_pickle(path)
    path.write_bytes(data[:lazy.weight.offset + 100])  # cut inside the weight's payload
    with pytest.raises(CheckpointError, match=r"truncated or corrupt checkpoint file .*"
                                              r"tensor00005_000: a payload of 512 bytes .* runs "
                                              r"past the end of the file"):
        index_pickle(path)
    with pytest.raises(CheckpointError, match="truncated or corrupt checkpoint file tensor00005_000 "
                                              r"\(language_model/transformer/decoder_layer_0/"
                                              r"multi_head_attention/key/w\): a payload"):
        plan_ckpt0(ckpt, config)


def test_file_truncated_after_planning(ckpt, config):
    plan = plan_ckpt0(ckpt, config)
    path = ckpt / "tensor00003_000"
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(CheckpointError, match=r"truncated or corrupt checkpoint file "
                                              r"tensor00003_000 \(.*moe/linear_1/w\): it ends"):
        read_ckpt0_slice(plan[(f"{LAYERS}/moe/linear_1", "w")], (0,))


def test_corrupt_headers(tmp_path):
    path = tmp_path / "x"
    cases = {b"": "not a pickle", b"garbage!": "not a pickle",
             b"\x80\x04\xff\xff": "truncated or corrupt", b"\x80\x04K\x01": "no STOP",
             pickle.dumps(np.zeros(100), protocol=4) + b"\0": "unexpected bytes after the end"}
    for data, message in cases.items():
        path.write_bytes(data)
        with pytest.raises(CheckpointError, match=message) as err:
            index_pickle(path, label="LABEL")
        assert "LABEL" in str(err.value)
