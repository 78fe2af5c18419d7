"""Lazy parameters: read only the slices each device needs, straight into global arrays.

A LazyParam knows its global shape and dtype and reads any slice on demand (from memory-mapped
safetensors or ckpt-0 payloads). `place_lazy` builds the global jax.Array with
jax.make_array_from_callback, so each process reads only the slices its own devices hold, and no
process ever holds a whole parameter (let alone the checkpoint) in host memory unless its
devices do. BYTES_READ counts what this process read, for the loading report.
"""

from __future__ import annotations

import threading
from typing import Callable, NamedTuple

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from runtime.quant import QuantizedWeight8bit, quantize

Index = tuple  # of slices, one per dimension


class LazyParam(NamedTuple):
    shape: tuple
    dtype: np.dtype
    read: Callable[[Index], np.ndarray]  # exact slice of the global array


class _Counter:
    def __init__(self):
        self.bytes = 0
        self._lock = threading.Lock()  # make_array_from_callback may call from several threads

    def add(self, n: int) -> None:
        with self._lock:
            self.bytes += int(n)


BYTES_READ = _Counter()


def normalize(index: Index | None, shape: tuple) -> tuple[range, ...]:
    """Slices (possibly None or open-ended) -> concrete ranges, one per dimension."""
    index = tuple(index or ())
    index = index + (slice(None),) * (len(shape) - len(index))
    return tuple(range(*s.indices(n)) for s, n in zip(index, shape))


def as_slices(ranges: tuple[range, ...]) -> tuple[slice, ...]:
    return tuple(slice(r.start, r.stop) for r in ranges)


def quantized_lazy(param: LazyParam) -> QuantizedWeight8bit:
    """int8 weight and bf16 scales of a float LazyParam [..., I, O], quantised per output channel
    as they are read. A slice needs every input row of its output columns (the scale is their
    maximum), so slices that split the input dimension read more than they keep."""
    *lead, rows, cols = param.shape

    def quantized(index: Index) -> QuantizedWeight8bit:
        ranges = normalize(index, param.shape)
        full_rows = ranges[:-2] + (range(rows),) + ranges[-1:]
        return quantize(param.read(as_slices(full_rows)))

    def weight(index: Index) -> np.ndarray:
        ranges = normalize(index, param.shape)
        rows_wanted = ranges[-2]
        return np.asarray(quantized(index).weight)[..., rows_wanted.start:rows_wanted.stop, :]

    def scales(index: Index) -> np.ndarray:
        ranges = normalize(index, (*lead, 1, cols))
        return np.asarray(quantized(as_slices(ranges[:-2] + (range(rows),) + ranges[-1:])).scales)

    import ml_dtypes
    return QuantizedWeight8bit(LazyParam(param.shape, np.dtype(np.int8), weight),
                               LazyParam((*lead, 1, cols), np.dtype(ml_dtypes.bfloat16), scales))


def place_lazy(leaf, spec, mesh: Mesh):
    """A LazyParam (or QuantizedWeight8bit of them) -> global jax.Array(s) under `spec`."""
    if isinstance(leaf, QuantizedWeight8bit):
        return QuantizedWeight8bit(place_lazy(leaf.weight, spec.weight, mesh),
                                   place_lazy(leaf.scales, spec.scales, mesh))
    return jax.make_array_from_callback(leaf.shape, NamedSharding(mesh, spec),
                                        lambda index: leaf.read(index), dtype=leaf.dtype)
