"""The loader's C++ host copies (runtime/host_copies.cc) give the bytes of the numpy forms they
stand in for: transposes of every element size at shapes off the 16- and 64-element tiles,
six-bit packing, and the scale tables' super-scaling (its first pass in C++, the rest in numpy)
on K-quant-like tables with zero, negative-zero, unsolvable and non-finite blocks; without a
compiler the callers keep their numpy forms."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from runtime import host_copies, six_bit, super_scales
from runtime.checkpoint import lazy

pytestmark = pytest.mark.skipif(not host_copies.available(), reason="no C++ compiler")


@pytest.fixture
def numpy_only(monkeypatch):
    """Runs the callers' numpy forms (the library reported unbuilt)."""
    def use_numpy():
        monkeypatch.setattr(host_copies, "_library", lambda: None)
    return use_numpy


@pytest.mark.parametrize("dtype", [np.int8, np.uint8, np.float16, ml_dtypes.bfloat16,
                                   np.float32, np.int64])
@pytest.mark.parametrize("shape", [(1, 1), (16, 16), (17, 33), (64, 64), (130, 200),
                                   (3, 47, 80), (0, 5)])
def test_transposed_is_numpys_swap(dtype, shape):
    rng = np.random.default_rng(sum(shape))
    block = (rng.standard_normal(shape) * 60).astype(dtype)
    got = host_copies.transposed(block)
    assert got.flags.c_contiguous and got.dtype == block.dtype
    bits = np.dtype(f"u{block.dtype.itemsize}")  # compared bit for bit
    np.testing.assert_array_equal(got.view(bits), np.swapaxes(block.view(bits), -1, -2))


def test_transposer_takes_the_host_copy_and_numpy_for_other_elements():
    rng = np.random.default_rng(0)
    swap = lazy.transposer(1 << 30)
    codes = rng.integers(0, 255, (96, 130), dtype=np.uint8)
    np.testing.assert_array_equal(swap(codes), codes.T)
    words = rng.integers(0, 255, (5, 7, 3), dtype=np.uint8).view("V3")  # 3-byte elements
    np.testing.assert_array_equal(lazy.transposer(words.nbytes)(words), np.swapaxes(words, -1, -2))


def test_six_bit_packing_is_numpys(numpy_only):
    rng = np.random.default_rng(1)
    tiles = rng.integers(-32, 32, (3, 5, 64 * 24), dtype=np.int8)  # [L, P, 64 I]
    host = six_bit.packed(tiles)
    numpy_only()
    np.testing.assert_array_equal(host, six_bit.packed(tiles))


def _two_level(rng, groups: int, cols: int, signed: bool) -> np.ndarray:
    """A K-quant-like float32 table [G, O]: an f16 per 8 groups and column times integer subs,
    the largest sub where the quantisers put it in most blocks, not in others."""
    supers = rng.uniform(1e-4, 1e-2, (groups // 8, 1, cols)).astype(np.float16)
    if signed:  # Q6_K-like: -128 in half the blocks; the other half's largest anywhere
        subs = rng.integers(-127, 128, (groups // 8, 8, cols))
        subs[::2, 3, :] = -128
    else:  # Q4_K-like: 63 in most blocks
        subs = rng.integers(0, 64, (groups // 8, 8, cols))
        subs[::4, 5, :] = 63
    return (supers.astype(np.float32) * subs).reshape(groups, cols).astype(np.float32)


@pytest.mark.parametrize("signed", [False, True])
def test_super_scaling_is_numpys(numpy_only, signed):
    rng = np.random.default_rng(2 + signed)
    table = _two_level(rng, 64, 96, signed)
    table[:8, 0] = 0.0
    table[:8, 1] = -0.0
    table[8:16, 2] = np.float32(3.0) * np.float32(np.pi)  # no f16 times subs: numpy searches
    sub_dtype = np.int8 if signed else np.uint8
    with_nan = table[:, 3:].copy()
    with_nan[20, 0] = np.nan
    host = [super_scales.super_scaled(t, sub_dtype) for t in (table[:, :2], table[:, 3:],
                                                              with_nan, table)]
    numpy_only()
    ref = [super_scales.super_scaled(t, sub_dtype) for t in (table[:, :2], table[:, 3:],
                                                             with_nan, table)]
    assert host[2] is None and ref[2] is None and host[3] is None and ref[3] is None
    for got, want in zip(host[:2], ref[:2]):
        assert got is not None and got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(super_scales.float_table(host[1]), table[:, 3:])


def test_first_pass_leaves_what_it_cannot_solve():
    blocks = np.array([[0.0] * 8, [-0.0] * 8, [63.0 * 0.5] + [0.5] * 7, [1.0, np.inf] + [0] * 6,
                       [1.0, 3.0, 7.0, 11.0, 13.0, 17.0, 19.0, 23.0]], np.float32)
    supers, subs = np.zeros(len(blocks), np.float16), np.zeros(blocks.shape, np.uint8)
    solved = host_copies.super_scale_first_pass(blocks, np.uint8, supers, subs)
    np.testing.assert_array_equal(solved, [True, True, True, False, False])
    np.testing.assert_array_equal(supers[:3], [0, 0, 0.5])
    np.testing.assert_array_equal(subs[2], [63] + [1] * 7)


def test_without_a_compiler_the_callers_use_numpy(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("RUNTIME_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    host_copies._library.cache_clear()
    try:
        assert not host_copies.available()
        assert "the loader's C++ copies are unavailable" in capsys.readouterr().err
        codes = np.arange(12, dtype=np.uint8).reshape(3, 4)
        np.testing.assert_array_equal(lazy.transposer(codes.nbytes)(codes), codes.T)
        tiles = np.full((1, 64 * 4), -3, np.int8)
        assert six_bit.packed(tiles).shape == (1, 192)
    finally:
        host_copies._library.cache_clear()
    monkeypatch.setenv("RUNTIME_HOST_COPIES", "0")
    monkeypatch.delenv("CXX")
    try:
        assert not host_copies.available()
    finally:
        host_copies._library.cache_clear()


@pytest.mark.parametrize("kind", ["Q4_K", "Q5_K", "Q6_K"])
def test_k_quant_decodes_are_numpys(numpy_only, kind):
    """Every part of the type's blocks (the C++ decodes: Q4_K's packed codes, Q5_K's codes,
    Q6_K's values, the Q4_K / Q5_K scales and mins; and the rest) equal numpy's bit for bit
    on random block bytes (an inf factor included), the whole-block floats too."""
    from runtime.checkpoint import gguf_quants
    block = gguf_quants.TYPES[kind]
    rng = np.random.default_rng(4)
    blocks = rng.integers(0, 256, (3, 5, block.size), dtype=np.uint8)  # [rows, nb, bytes]
    factors = [(0, 4)] if kind != "Q6_K" else [(208, 210)]  # the f16 d (and dmin)
    for lo, hi in factors:
        blocks[..., lo:hi] = np.asarray(rng.uniform(-2, 2, (3, 5, (hi - lo) // 2)),
                                        np.float16).view(np.uint8)
        blocks[0, 0, lo:lo + 2] = np.asarray([np.inf], np.float16).view(np.uint8)

    def decoded():
        out = {}
        with np.errstate(invalid="ignore"):  # inf x 0
            for name, part in block.parts.items():
                raw = np.concatenate([blocks[..., lo:hi] for lo, hi in part.spans], axis=-1)
                out[name] = part.decode(raw)
        return out

    host = decoded()
    numpy_only()
    for name, want in decoded().items():
        got = host[name]
        assert got.dtype == want.dtype and got.shape == want.shape, name
        np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8), err_msg=name)
