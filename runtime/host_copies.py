"""The loader's host copies in C++ (host_copies.cc): checkpoint blocks transposed, int8 panels
packed in six bits, a scale table's first super-scaling pass, GGUF Q4_K's, Q5_K's and Q6_K's
codes and K-quants' sub-scales decoded. Each gives the bytes of the numpy
or XLA form it stands in for (tests/test_host_copies.py), several times faster where those move
1-byte elements (BENCHMARKS.md, "Loading on every core").

Built on first use like the CPU kernels (native_build.py), in its own small library: loading
runs before any product and on hosts whose products are not the CPU's. Without a compiler, or
with RUNTIME_HOST_COPIES=0, `available()` is False and the callers keep their numpy forms.
"""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path
from typing import Optional

import numpy as np

from runtime import native_build

SOURCES = [Path(__file__).with_name("host_copies.cc")]
_P, _I64 = ctypes.c_void_p, ctypes.c_int64
SIGNATURES = {  # symbol -> (restype, argtypes)
    "RuntimeHostTranspose": (_I64, [_P, _I64, _I64, _I64, _I64, _P]),
    "RuntimeHostSixBitPack": (None, [_P, _I64, _I64, _P]),
    "RuntimeHostSuperScaleFirstPass": (_I64, [_P, _I64, _I64, _P, _P, _P]),
    "RuntimeHostQ4KPacked": (None, [_P, _I64, _P]),
    "RuntimeHostKSubScales": (None, [_P, _I64, _I64, _P]),
    "RuntimeHostQ6KValues": (None, [_P, _I64, _P]),
    "RuntimeHostQ5KCodes": (None, [_P, _I64, _P]),
}


@functools.lru_cache(maxsize=None)
def _library():
    """The built library with its functions' signatures set, or None (see available)."""
    if os.environ.get("RUNTIME_HOST_COPIES", "1") == "0":
        return None
    def signed(library) -> None:
        for symbol, (restype, argtypes) in SIGNATURES.items():
            function = getattr(library, symbol)
            function.restype, function.argtypes = restype, argtypes

    return native_build.optional_library(
        "host_copies", SOURCES, "the loader's host copies",
        "the loader's C++ copies are unavailable, using numpy's", setup=signed)


def available() -> bool:
    return _library() is not None


def _address(array: np.ndarray) -> int:
    return array.ctypes.data


def transposed(block: np.ndarray) -> np.ndarray:
    """block [..., r, c] -> a new contiguous [..., c, r] (elements of 1, 2, 4 or 8 bytes; the
    library available)."""
    block = np.ascontiguousarray(block)
    *lead, rows, cols = block.shape
    out = np.empty((*lead, cols, rows), block.dtype)
    if block.size:
        done = _library().RuntimeHostTranspose(_address(block), int(np.prod(lead, dtype=np.int64)),
                                               rows, cols, block.dtype.itemsize, _address(out))
        if done != 0:
            raise ValueError(f"no host transpose of {block.dtype.itemsize}-byte elements")
    return out


def transposes(dtype) -> bool:
    """Whether transposed() takes blocks of `dtype` here."""
    return available() and np.dtype(dtype).itemsize in (1, 2, 4, 8)


def six_bit_packed_rows(rows: np.ndarray, out: np.ndarray) -> None:
    """six_bit.packed's rows: int8 [N, 64 I] (codes in [-32, 31], I a multiple of 4) packed
    into out uint8 [N, 48 I] (both contiguous)."""
    assert rows.dtype == np.int8 and out.dtype == np.uint8 and rows.flags.c_contiguous \
        and out.flags.c_contiguous and out.shape == (len(rows), rows.shape[1] // 64 * 48)
    _library().RuntimeHostSixBitPack(_address(rows), len(rows), rows.shape[1], _address(out))


def super_scale_first_pass(blocks: np.ndarray, sub_dtype, supers: np.ndarray,
                           subs: np.ndarray) -> Optional[np.ndarray]:
    """super_scales._decomposed's first pass (its first candidates, all-zero blocks) over
    float32 blocks [N, 8] into supers f16 [N] and subs [N, 8] of `sub_dtype`: the solved [N]
    (bool); None without the library."""
    library = _library()
    if library is None:
        return None
    blocks = np.ascontiguousarray(blocks, np.float32)
    assert supers.dtype == np.float16 and subs.dtype == np.dtype(sub_dtype) \
        and supers.flags.c_contiguous and subs.flags.c_contiguous
    solved = np.empty(len(blocks), np.uint8)
    library.RuntimeHostSuperScaleFirstPass(_address(blocks), len(blocks),
                                           int(np.dtype(sub_dtype) == np.int8), _address(supers),
                                           _address(subs), _address(solved))
    return solved.view(bool)


def _block_decode(symbol: str, raw: np.ndarray, block_bytes: int, width: int, dtype,
                  *options: int):
    """raw [..., nb, block_bytes] decoded by the library's `symbol` (its blocks, `options`)
    into [..., nb, width] of `dtype`; None without the library."""
    library = _library()
    if library is None:
        return None
    raw = np.ascontiguousarray(raw, np.uint8)
    out = np.empty((*raw.shape[:-1], width), dtype)
    getattr(library, symbol)(_address(raw), raw.size // block_bytes, *options, _address(out))
    return out


def q4_k_packed(qs: np.ndarray) -> Optional[np.ndarray]:
    """gguf_quants' Q4_K packed codes of qs [..., nb, 128] -> [..., nb, 128]; None without the
    library."""
    return _block_decode("RuntimeHostQ4KPacked", qs, 128, 128, np.uint8)


def q6_k_values(raw: np.ndarray) -> Optional[np.ndarray]:
    """gguf_quants' Q6_K values of raw [..., nb, 192] (ql | qh) -> int8 [..., nb, 256]; None
    without the library."""
    return _block_decode("RuntimeHostQ6KValues", raw, 192, 256, np.int8)


def q5_k_codes(raw: np.ndarray) -> Optional[np.ndarray]:
    """gguf_quants' Q5_K codes of raw [..., nb, 160] (qh | qs) -> uint8 [..., nb, 256]; None
    without the library."""
    return _block_decode("RuntimeHostQ5KCodes", raw, 160, 256, np.uint8)


def k_sub_scales(raw: np.ndarray, mins: bool) -> Optional[np.ndarray]:
    """gguf_quants' Q4_K / Q5_K scales (d x sc) or mins (-(dmin x m)) of raw [..., nb, 14] (the
    f16, then the 12 scale bytes) -> float32 [..., nb, 8]; None without the library."""
    return _block_decode("RuntimeHostKSubScales", raw, 14, 8, np.float32, int(mins))
