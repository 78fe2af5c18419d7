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
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from runtime.checkpoint.params_tree import SCALE_DTYPE
from runtime.quant import (QuantizedEmbedding, QuantizedWeight8bit, quantize,
                           quantize_embedding, row_blocks_for)

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


def quantized_lazy(param: LazyParam, group_size: int = 0) -> QuantizedWeight8bit:
    """int8 weight and bf16 scales of a float LazyParam [..., I, O], quantised as they are read,
    per output channel (group_size 0) or in groups of at most group_size input rows. A slice
    needs every input row of its output columns (whichever scale blocks it touches), so slices
    that split the input dimension read more than they keep."""
    *lead, rows, cols = param.shape
    blocks = row_blocks_for(rows, group_size)

    def quantized(ranges) -> QuantizedWeight8bit:  # ranges over [..., any rows, O]
        full_rows = ranges[:-2] + (range(rows),) + ranges[-1:]
        return quantize(param.read(as_slices(full_rows)), blocks)

    def weight(index: Index) -> np.ndarray:
        ranges = normalize(index, param.shape)
        return np.asarray(quantized(ranges).weight)[..., as_slices(ranges[-2:-1])[0], :]

    def scales(index: Index) -> np.ndarray:
        ranges = normalize(index, (*lead, blocks, cols))
        return np.asarray(quantized(ranges).scales)[..., as_slices(ranges[-2:-1])[0], :]

    return QuantizedWeight8bit(LazyParam(param.shape, np.dtype(np.int8), weight),
                               LazyParam((*lead, blocks, cols), SCALE_DTYPE, scales))


def quantized_embedding_lazy(param: LazyParam, group_size: int = 0) -> QuantizedEmbedding:
    """A float LazyParam embedding table [V, D] as a QuantizedEmbedding read slice by slice;
    a slice reads whole rows (all D values) of the tokens it covers."""
    vocab, width = param.shape
    blocks = row_blocks_for(width, group_size)

    def quantized(tokens: range) -> QuantizedEmbedding:
        return quantize_embedding(param.read(as_slices((tokens, range(width)))), group_size)

    def weight(index: Index) -> np.ndarray:
        tokens, columns = normalize(index, param.shape)
        return np.asarray(quantized(tokens).weight)[:, as_slices((columns,))[0]]

    def scales(index: Index) -> np.ndarray:
        groups, tokens = normalize(index, (blocks, vocab))
        return np.asarray(quantized(tokens).scales)[as_slices((groups,))[0]]

    return QuantizedEmbedding(LazyParam(param.shape, np.dtype(np.int8), weight),
                              LazyParam((blocks, vocab), SCALE_DTYPE, scales))


def widened_lazy(param: LazyParam, dtype) -> LazyParam:
    """A float LazyParam stored narrower than `dtype` (bf16, f16) read widened to it, slice by
    slice; other params as they are."""
    dtype = np.dtype(dtype)
    if not jnp.issubdtype(param.dtype, jnp.floating) or param.dtype.itemsize >= dtype.itemsize:
        return param
    return LazyParam(param.shape, dtype, lambda index: param.read(index).astype(dtype))


def place_lazy(leaf, spec, mesh: Mesh):
    """A LazyParam (or QuantizedWeight8bit of them) -> global jax.Array(s) under `spec`.

    When this process's devices together hold one box of the array (the usual case: a run of
    shards along the split dimensions), that box is read once with a few large reads and each
    device's shard is cut from it; otherwise every shard is read on its own. Either way the
    process reads only bytes its devices hold, and keeps at most its own share of one
    parameter in host memory.
    """
    if isinstance(leaf, QuantizedWeight8bit):  # or a QuantizedEmbedding: keep the type
        return type(leaf)(place_lazy(leaf.weight, spec.weight, mesh),
                                   place_lazy(leaf.scales, spec.scales, mesh))
    sharding = NamedSharding(mesh, spec)
    shards = {tuple(normalize(i, leaf.shape)) for i in
              sharding.addressable_devices_indices_map(leaf.shape).values()}
    box = tuple(range(min(r[d].start for r in shards), max(r[d].stop for r in shards))
                for d in range(len(leaf.shape)))
    covered = sum(int(np.prod([len(r) for r in shard])) for shard in shards)
    if covered != int(np.prod([len(r) for r in box])):  # the shards do not tile one box
        return jax.make_array_from_callback(leaf.shape, sharding,
                                            lambda index: leaf.read(index), dtype=leaf.dtype)
    block = leaf.read(as_slices(box))

    def cut(index):
        ranges = normalize(index, leaf.shape)
        return block[tuple(slice(r.start - b.start, r.stop - b.start)
                           for r, b in zip(ranges, box))]

    return jax.make_array_from_callback(leaf.shape, sharding, cut, dtype=leaf.dtype)
