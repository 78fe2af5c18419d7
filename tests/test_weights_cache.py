"""The prepared weights cache (runtime/weights_cache.py): a second start maps one CPU device's
prepared weights from the file the first stored and samples the same tokens; the engine's
parameters are that file's pages, leaf for leaf the bytes a fresh load prepares; a changed
checkpoint or flag is a new entry; a damaged entry is one line and a fresh load; the size
limit, the switch and a bad setting."""

import json
import os
from pathlib import Path

import jax
import numpy as np
import pytest

pytest.importorskip("gguf")

from gguf_helpers import kquant_files  # noqa: E402
from runtime import cli, weights_cache  # noqa: E402
from runtime.app import main, open_model  # noqa: E402
from runtime.app_engine import load_engine  # noqa: E402

PROMPTS = ("1 2 3 4 5", "7 8 9")


@pytest.fixture(autouse=True)
def any_free_space(monkeypatch):
    """Entries of a few MB stored whatever the test machine's disk holds (the free-space rule
    is for users' multi-GB entries)."""
    monkeypatch.setattr(weights_cache, "MIN_FREE_BYTES", 0)
    monkeypatch.setattr(weights_cache, "MIN_FREE_FRACTION", 0.0)


@pytest.fixture(scope="module")
def kquant_file(tmp_path_factory):
    """A Q4_K_M-like GGUF file: int4 panels with super-scaled tables, six-bit int8 panels, a
    stack of mixed types, a quantised table and head."""
    return kquant_files(tmp_path_factory.mktemp("kquants"))[0]


def _argv(path, cache, *extra):
    argv = ["--checkpoint", str(path), "--compilation-cache", str(cache), "--json",
            "--max-new-tokens", "6", *extra]
    for prompt in PROMPTS:
        argv += ["--prompt-ids", prompt]
    return argv


def _run(capsys, argv) -> tuple[list, str]:
    """(output ids of each prompt, stderr) of run.py with argv."""
    assert main(cli.parse_args(argv)) == 0
    out, err = capsys.readouterr()
    return [json.loads(line)["output_ids"] for line in out.splitlines()], err


def _entries(cache: Path) -> list:
    return sorted((cache / weights_cache.SUBDIRECTORY).glob("weights-*"))


def _mapped_files() -> dict:
    """{(start, end): path} of this process's file mappings."""
    found = {}
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 6 and fields[5].startswith("/"):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            found[(start, end)] = fields[5]
    return found


def _engine(path, cache, monkeypatch, cached: bool):
    monkeypatch.setenv(weights_cache.SWITCH_ENV, "1" if cached else "0")
    args = cli.parse_args(_argv(path, cache))
    return load_engine(args, open_model(args), 2, 32)


@pytest.mark.parametrize("sampling", [["--temperature", "0"],
                                      ["--temperature", "0.8", "--seed", "3"]])
def test_a_second_start_maps_the_prepared_weights_and_samples_the_same_tokens(
        kquant_file, tmp_path, capsys, sampling):
    cache = tmp_path / "cache"
    first, err = _run(capsys, _argv(kquant_file, cache, *sampling))
    assert "[weights cache] stored the prepared weights" in err and "read" in err
    assert len(_entries(cache)) == 1
    second, err = _run(capsys, _argv(kquant_file, cache, *sampling))
    assert "prepared weights mapped from" in err and "[load p0] read" not in err
    assert second == first and all(len(ids) == 6 for ids in first)


def test_the_mapped_parameters_are_the_files_pages_and_a_fresh_loads_bytes(
        kquant_file, tmp_path, monkeypatch, capsys):
    cache = tmp_path / "cache"
    fresh = _engine(kquant_file, cache, monkeypatch, cached=False)
    assert not _entries(cache)  # switched off: nothing stored
    _engine(kquant_file, cache, monkeypatch, cached=True)  # stores
    mapped = _engine(kquant_file, cache, monkeypatch, cached=True)
    assert "prepared weights mapped" in capsys.readouterr().err
    assert mapped.layout == fresh.layout
    leaves, tree = jax.tree.flatten(mapped.params)
    want, want_tree = jax.tree.flatten(fresh.params)
    assert tree == want_tree and len(leaves) > 10
    kinds = {type(node).__name__ for module in mapped.params.values() for node in module.values()}
    assert {"TiledWeight4", "TiledWeight", "LayersByType"} <= kinds, kinds
    (entry,) = _entries(cache)
    maps = _mapped_files()
    for got, expected in zip(leaves, want):
        assert got.dtype == expected.dtype and got.shape == expected.shape
        assert got.sharding == expected.sharding
        np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))
        pointer = got.unsafe_buffer_pointer()
        assert [path for (start, end), path in maps.items() if start <= pointer < end] == \
            [str(entry)], "a leaf copied out of the mapped file"


def test_a_changed_checkpoint_or_flag_is_a_new_entry(kquant_file, tmp_path, capsys):
    cache, path = tmp_path / "cache", tmp_path / "k.gguf"
    path.write_bytes(kquant_file.read_bytes())
    first, _ = _run(capsys, _argv(path, cache))
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    again, err = _run(capsys, _argv(path, cache))
    assert "[load p0] read" in err and again == first and len(_entries(cache)) == 2
    _, err = _run(capsys, _argv(path, cache, "--int8-group-size", "16"))
    assert "[load p0] read" in err and len(_entries(cache)) == 3


def _damaged(entry: Path, how: str) -> None:
    data = bytearray(entry.read_bytes())
    if how == "truncated":
        entry.write_bytes(data[:len(data) // 2])
    elif how == "magic":
        entry.write_bytes(b"NOTACACH" + data[8:])
    else:
        offset = int.from_bytes(data[8:16], "little")
        header = json.loads(data[offset:])
        if how == "node type":
            text = json.dumps(header).replace('"TiledWeight4"', '"os.system"', 1)
        else:  # a leaf past the end of the file
            header["leaves"][0]["offset"] = len(data) * 4096
            text = json.dumps(header)
        entry.write_bytes(data[:offset] + text.encode())
        entry.write_bytes(entry.read_bytes()[:8] + offset.to_bytes(8, "little")
                          + len(text).to_bytes(8, "little") + entry.read_bytes()[24:])


@pytest.mark.parametrize("how", ["truncated", "magic", "node type", "offset"])
def test_a_damaged_entry_is_one_line_and_a_fresh_load(kquant_file, tmp_path, capsys, how):
    cache = tmp_path / "cache"
    first, _ = _run(capsys, _argv(kquant_file, cache))
    (entry,) = _entries(cache)
    _damaged(entry, how)
    again, err = _run(capsys, _argv(kquant_file, cache))
    said = [line for line in err.splitlines() if line.startswith(f"[weights cache] {entry}:")]
    assert len(said) == 1 and said[0].endswith("; loading the checkpoint instead"), err
    assert "[load p0] read" in err and "stored the prepared weights" in err
    assert again == first
    _, err = _run(capsys, _argv(kquant_file, cache))
    assert "prepared weights mapped" in err  # stored again, whole


def test_the_size_limit_evicts_the_least_recently_used(kquant_file, tmp_path, capsys,
                                                       monkeypatch):
    cache, other = tmp_path / "cache", tmp_path / "other.gguf"
    other.write_bytes(kquant_file.read_bytes())
    monkeypatch.setenv(weights_cache.SIZE_ENV, "1e-6")
    _, err = _run(capsys, _argv(kquant_file, cache))
    assert "[weights cache] not stored: " in err and f"is over {weights_cache.SIZE_ENV}" in err
    assert not _entries(cache)
    monkeypatch.delenv(weights_cache.SIZE_ENV)
    _run(capsys, _argv(kquant_file, cache))
    (kept,) = _entries(cache)
    room = kept.stat().st_size * 1.5 / 2**30  # one entry, not two
    monkeypatch.setenv(weights_cache.SIZE_ENV, str(room))
    _run(capsys, _argv(other, cache))
    assert len(_entries(cache)) == 1 and _entries(cache) != [kept]  # the older one evicted
    monkeypatch.setenv(weights_cache.SIZE_ENV, "lots")
    assert main(cli.parse_args(_argv(other, tmp_path / "fresh"))) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        f"error: {weights_cache.SIZE_ENV}='lots': not a number of GB"


@pytest.mark.parametrize("dtype", sorted(weights_cache.DTYPES))
def test_every_dtype_and_node_round_trips_bit_for_bit(tmp_path, dtype):
    """store() then load() of a tree holding each node type the cache writes: the same tree,
    the same bytes (NaN payloads and -0 included), the same shardings."""
    from runtime.layer_types import LayersByType
    from runtime.layout import Layout
    from runtime.quant import QuantizedWeight8bit, TiledWeight
    from runtime.quant4 import TiledWeight4
    from conftest import single_device_mesh
    mesh = single_device_mesh()
    rng = np.random.default_rng(0)
    kind = weights_cache.DTYPES[dtype]

    def leaf(*shape):
        raw = rng.integers(0, 256, (*shape, kind.itemsize), dtype=np.uint8)
        return jax.device_put(raw.view(kind).reshape(shape), jax.devices()[0])

    params = {"a": {"w": TiledWeight(leaf(2, 64 * 3), leaf(1, 128), None),
                    "v": LayersByType([QuantizedWeight8bit(leaf(1, 3, 4), leaf(1, 1, 4)),
                                       TiledWeight4(leaf(1, 2, 64), leaf(1, 1, 128),
                                                    leaf(1, 1, 128))], [1, 0])},
              "b": {"scale": leaf(5), "empty": leaf(0, 7), "scalar": leaf()}}
    layout = Layout(unrolled=True, transposed="all", kv_copies=2, layer_views=False,
                    tiled="quantized")
    owner = {"checkpoint": "/c", "source": "s"}
    assert weights_cache.store(tmp_path, "k", layout, params, float(1 << 30), owner) is not None
    got_layout, got = weights_cache.load(tmp_path, "k", mesh)
    assert got_layout == layout
    leaves, tree = jax.tree.flatten(got)
    want, want_tree = jax.tree.flatten(params)
    assert tree == want_tree and got["a"]["v"].kinds == (1, 0)
    for a, b in zip(leaves, want):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()


def test_entries_of_older_runtime_code_for_the_checkpoint_are_dropped(tmp_path):
    """An entry written by other runtime code for the same checkpoint goes when one is stored
    (no start of this code maps it again); other checkpoints' entries, and this code's other
    entries of the checkpoint (other flags), stay."""
    from runtime.layout import Layout
    params = {"m": {"w": jax.device_put(np.ones((4, 64), np.float32))}}
    layout = Layout(unrolled=False, transposed=None, kv_copies=1)

    def store(key, checkpoint, source):
        owner = {"checkpoint": checkpoint, "source": source}
        assert weights_cache.store(tmp_path, key, layout, params, 1e9, owner) is not None

    store("a", "/x", "old"), store("b", "/y", "old")
    (tmp_path / "weights-z").write_bytes(b"damaged")  # unreadable: left to its own load
    store("c", "/x", "new"), store("d", "/x", "new")
    assert sorted(p.name for p in tmp_path.glob("weights-*")) == \
        ["weights-b", "weights-c", "weights-d", "weights-z"]
