"""Minimal safetensors reading and writing over numpy memory maps.

Written by hand (about 80 lines) rather than through the `safetensors` package because its numpy
backend has no bfloat16 (numpy lacks the type; ml_dtypes provides it here) and because readers
need lazy per-tensor and per-slice access: a memory map reads only the bytes a slice touches.
Format: 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}
(plus an optional "__metadata__" of strings), then the raw little-endian tensor bytes.
"""

from __future__ import annotations

import json
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
    """Lazy view of one .safetensors file: names, dtypes and shapes up front, data on demand."""

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
                header = json.loads(f.read(length))
            size = self.path.stat().st_size
        except OSError as e:
            raise CheckpointError(f"cannot read {self.path}: {e.strerror}") from None
        except (ValueError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{self.path} is not a safetensors file: {e}") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self.start = 8 + length
        self.tensors = {}
        for name, info in header.items():
            try:
                dtype = np.dtype(DTYPES[info["dtype"]])
                shape = tuple(int(d) for d in info["shape"])
                begin, end = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{self.path}: tensor {name!r} has an unsupported or "
                                      f"malformed header entry {info!r}") from None
            if end - begin != dtype.itemsize * int(np.prod(shape)) or self.start + end > size:
                raise CheckpointError(f"{self.path}: tensor {name!r} {list(shape)} does not fit "
                                      f"its byte range (file truncated?)")
            self.tensors[name] = (dtype, shape, begin)
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


def save_safetensors(tensors: Mapping[str, np.ndarray], path: str | Path,
                     metadata: Mapping[str, str] | None = None) -> None:
    """Write tensors (numpy or jax arrays) in name order; written to a temporary name first."""
    path = Path(path)
    header, offset, arrays = {}, 0, []
    for name in sorted(tensors):
        array = np.ascontiguousarray(np.asarray(tensors[name]))
        if array.dtype not in NAMES:
            raise CheckpointError(f"cannot store tensor {name!r} of dtype {array.dtype}")
        header[name] = {"dtype": NAMES[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
        arrays.append(array)
    if metadata:
        header["__metadata__"] = dict(metadata)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keep tensor data 8-byte aligned
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for array in arrays:
            f.write(array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes())
    partial.replace(path)
