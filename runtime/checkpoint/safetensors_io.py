"""safetensors files: a strict, memory-mapped reader, and writing through the `safetensors` package.

Reads stay on a numpy memory map rather than the package's safe_open: a slice reads only the
bytes it touches, and whole tensors came out 3x faster than get_tensor's copies on this VM
(scripts/bench_safetensors_reads.py; BENCHMARKS.md, "safetensors reads"). The header is checked
against the format's rules first (SafetensorsFile). Writing uses the package (bf16 included).
Format: 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}
(plus an optional "__metadata__" of strings), then the raw little-endian tensor bytes.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Mapping

import ml_dtypes
import numpy as np

from runtime.errors import CheckpointError

DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
          "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
          "BOOL": np.bool_}
NAMES = {np.dtype(v): k for k, v in DTYPES.items()}
MAX_HEADER = 100 << 20  # the format's own limit on header size


class SafetensorsFile:
    """Lazy view of one .safetensors file: names, dtypes and shapes up front, data on demand.

    The header is held to the format's rules before anything is read: a JSON object of
    distinct names, each {dtype, shape, data_offsets} with a known dtype, a shape of
    non-negative integers and offsets that span exactly its bytes; the tensors' byte ranges
    tile the data area with no gap, overlap or trailing byte."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                prefix = f.read(8)
                if len(prefix) < 8:
                    raise ValueError("shorter than its 8-byte header length")
                (length,) = struct.unpack("<Q", prefix)
                if length > MAX_HEADER:
                    raise ValueError(f"header length {length} is not plausible")
                header = json.loads(f.read(length), object_pairs_hook=_distinct_names)
            size = self.path.stat().st_size
        except OSError as e:
            raise CheckpointError(f"cannot read {self.path}: {e.strerror}") from None
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            reason = "its header nests too deeply" if isinstance(e, RecursionError) else e
            raise CheckpointError(f"{self.path} is not a safetensors file: {reason}") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path} is not a safetensors file: its header is a "
                                  f"JSON {type(header).__name__}, not an object")
        self.metadata = _metadata(self.path, header.pop("__metadata__", None))
        self.start = 8 + length
        self.tensors = {name: _entry(self.path, name, info) for name, info in header.items()}
        _check_byte_ranges(self.path, self.tensors, size - self.start)
        self.tensors = {name: (dtype, shape, begin)
                        for name, (dtype, shape, begin, _) in self.tensors.items()}
        self._map = None

    def keys(self):
        return self.tensors.keys()

    def shape(self, name: str) -> tuple:
        return self.tensors[name][1]

    def dtype(self, name: str) -> np.dtype:
        return self.tensors[name][0]

    def get(self, name: str) -> np.ndarray:
        """The tensor as a read-only memory-mapped array (slicing it reads only those bytes)."""
        dtype, shape, begin = self.tensors[name]
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        count = int(np.prod(shape))
        raw = self._map[self.start + begin:self.start + begin + count * dtype.itemsize]
        return raw.view(dtype).reshape(shape)


def _distinct_names(pairs: list) -> dict:
    """json object hook: a name given twice is an error (json would keep the last silently)."""
    out = {}
    for name, value in pairs:
        if name in out:
            raise ValueError(f"tensor name {name!r} appears twice in its header")
        out[name] = value
    return out


def _metadata(path: Path, metadata) -> dict:
    if metadata is None:
        return {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: __metadata__ must map names to strings")
    return metadata


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _entry(path: Path, name: str, info) -> tuple:
    """(dtype, shape, begin, end) of one header entry, or a CheckpointError naming it."""
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry "
                              f"(want dtype, shape and data_offsets): {_short(info)}")
    if not isinstance(info["dtype"], str) or info["dtype"] not in DTYPES:
        raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype "
                              f"{_short(info['dtype'])} (supported: {', '.join(DTYPES)})")
    shape, offsets = info["shape"], info["data_offsets"]
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise CheckpointError(f"{path}: tensor {name!r} has shape {_short(shape)}: not a list "
                              f"of non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_is_count, offsets)) \
            or offsets[0] > offsets[1]:
        raise CheckpointError(f"{path}: tensor {name!r} has data_offsets {_short(offsets)}: "
                              f"not [begin, end] with 0 <= begin <= end")
    dtype = np.dtype(DTYPES[info["dtype"]])
    if offsets[1] - offsets[0] != dtype.itemsize * math.prod(shape):
        raise CheckpointError(f"{path}: tensor {name!r} {shape} {info['dtype']} needs "
                              f"{dtype.itemsize * math.prod(shape)} bytes, its data_offsets "
                              f"span {offsets[1] - offsets[0]}")
    return dtype, tuple(shape), offsets[0], offsets[1]


def _check_byte_ranges(path: Path, tensors: dict, data_bytes: int) -> None:
    """The tensors' [begin, end) ranges must tile [0, data_bytes): sorted, each begins where
    the previous ended (two tensors on the same bytes overlap), the last ends at the file's
    end (past it: truncated; before it: unindexed bytes)."""
    position, previous = 0, None
    for name, (_, _, begin, end) in sorted(tensors.items(), key=lambda t: (t[1][2], t[1][3])):
        if begin != position:
            what = f"overlaps tensor {previous!r}" if begin < position else \
                f"leaves {begin - position} bytes unindexed before it"
            raise CheckpointError(f"{path}: tensor {name!r} at bytes [{begin}, {end}) {what}")
        position, previous = end, name
    if position > data_bytes:
        raise CheckpointError(f"{path}: tensor {previous!r} does not fit its byte range: it ends "
                              f"at byte {position} of the data, which holds {data_bytes} "
                              f"(file truncated?)")
    if position < data_bytes:
        raise CheckpointError(f"{path}: {data_bytes - position} bytes after the last tensor are "
                              f"not indexed by the header")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def save_safetensors(tensors: Mapping[str, np.ndarray], path: str | Path,
                     metadata: Mapping[str, str] | None = None) -> None:
    """Write tensors (numpy or jax arrays) with the `safetensors` package (the format's own
    writer); written to a temporary name first, so a crash leaves no half-written file."""
    from safetensors.numpy import save_file

    path = Path(path)
    arrays = {}
    for name in sorted(tensors):
        array = np.ascontiguousarray(np.asarray(tensors[name]))
        if array.dtype not in NAMES:
            raise CheckpointError(f"cannot store tensor {name!r} of dtype {array.dtype}")
        arrays[name] = array
    partial = path.with_name(path.name + ".partial")
    save_file(arrays, str(partial), metadata=dict(metadata) if metadata else None)
    partial.replace(path)
