"""Lazy parameters: read only the slices each device needs, straight into global arrays.

A LazyParam knows its global shape and dtype and reads any slice on demand (from memory-mapped
safetensors or ckpt-0 payloads). `place_lazy` builds the global jax.Array with
jax.make_array_from_callback, so each process reads only the slices its own devices hold, and no
process ever holds a whole parameter (let alone the checkpoint) in host memory unless its
devices do. BYTES_READ counts what this process read, for the loading report.
"""

from __future__ import annotations

import functools
import threading
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from runtime import host_copies
from runtime.checkpoint.params_tree import SCALE_DTYPE
from runtime.host_threads import each_chunk
from runtime.layer_types import LayersByType
from runtime.quant import (QuantizedEmbedding, QuantizedWeight8bit, quantize,
                           quantize_embedding, row_blocks_for)
from runtime.quant4 import SCALE_DTYPE as INT4_SCALE_DTYPE, QuantizedWeight4bit, groups_for, \
    quantize_int4

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
# XLA's CPU client holds a host buffer of this alignment as it is, without a copy (others it
# copies): each parameter read into one is placed on a CPU device for free.
HOST_ALIGNMENT = 64


def host_empty(shape: tuple, dtype) -> np.ndarray:
    """np.empty(shape, dtype) starting on a HOST_ALIGNMENT boundary (numpy's own start 16 bytes
    past a page for large arrays)."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + HOST_ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % HOST_ALIGNMENT
    return raw[start:start + nbytes].view(dtype).reshape(shape)


XLA_TRANSPOSE_BYTES = 1 << 24  # smaller arrays are transposed by numpy: no program to compile
TRANSPOSE_CHUNK_BYTES = 1 << 22


@functools.lru_cache(maxsize=1)
def host_transpose():
    """block [..., r, c] -> [..., c, r] by XLA on the host's CPU device, or None where JAX has
    none: numpy transposes element by element (0.28 GB/s for bf16 here, 0.3-0.45 for int8,
    against XLA's 1.5-1.65; BENCHMARKS.md, "GGUF loading")."""
    try:
        cpu = jax.devices("cpu")[0]
    except RuntimeError:  # JAX_PLATFORMS without cpu
        return None
    swap = jax.jit(lambda block: jnp.swapaxes(block, -1, -2))
    return lambda block: np.asarray(swap(jax.device_put(block, cpu)))


def transposer(nbytes: int) -> Callable[[np.ndarray], np.ndarray]:
    """block [..., r, c] -> [..., c, r] for the chunks of an array of `nbytes`: the C++ host
    copy where built (host_copies.py), else host_transpose from XLA_TRANSPOSE_BYTES on (or
    where JAX has no CPU device), numpy below."""
    swap = host_transpose() if nbytes >= XLA_TRANSPOSE_BYTES else None
    swap = swap or (lambda block: np.swapaxes(block, -1, -2))
    if not host_copies.available():
        return swap
    return lambda block: host_copies.transposed(block) if host_copies.transposes(block.dtype) \
        else swap(block)


def copy_transposed(out: np.ndarray, natural: np.ndarray) -> None:
    """out [..., c, r] = natural [..., r, c] (a memory-mapped slice), TRANSPOSE_CHUNK_BYTES of
    natural at a time: each chunk read in file order, then transposed (transposer); the chunks
    on the host threads (host_threads.py)."""
    swap, rows = transposer(out.nbytes), natural.shape[-2]
    step = max(1, TRANSPOSE_CHUNK_BYTES // max(1, natural.nbytes // max(1, rows)))

    def copy_chunk(chunk: int) -> None:  # each chunk its own rows of natural
        start = chunk * step
        block = np.ascontiguousarray(natural[..., start:start + step, :])
        out[..., start:start + step] = swap(block)

    each_chunk(copy_chunk, -(-rows // step))


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


def quantized_int4_lazy(param: LazyParam, group_size: int) -> QuantizedWeight4bit:
    """Symmetric int4 codes and f16 scales of a float LazyParam [..., I, O] in groups of at most
    group_size input rows (quant4.groups_for), quantised as they are read. A slice reads the
    whole groups its rows touch (and only its own lead and output ranges), so a shard of a
    row-split weight reads little more than its own rows."""
    *lead, rows, cols = param.shape
    groups = groups_for(rows, group_size)
    n = rows // groups  # input rows per group (even): n / 2 packed rows

    def quantized(ranges, first: int, last: int) -> QuantizedWeight4bit:  # groups [first, last)
        block = ranges[:-2] + (range(first * n, last * n),) + ranges[-1:]
        return quantize_int4(param.read(as_slices(block)), n)  # exactly last - first groups

    def packed(index: Index) -> np.ndarray:
        ranges = normalize(index, (*lead, rows // 2, cols))
        kept = ranges[-2]  # packed rows
        if not len(kept):
            return np.zeros(tuple(map(len, ranges)), np.uint8)
        first, last = kept.start // (n // 2), -(-kept.stop // (n // 2))
        offset = first * (n // 2)
        return quantized(ranges, first, last).packed[..., kept.start - offset:
                                                     kept.stop - offset, :]

    def scales(index: Index) -> np.ndarray:
        ranges = normalize(index, (*lead, groups, cols))
        kept = ranges[-2]
        if not len(kept):
            return np.zeros(tuple(map(len, ranges)), INT4_SCALE_DTYPE)
        return np.asarray(quantized(ranges, kept.start, kept.stop).scales)

    return QuantizedWeight4bit(LazyParam((*lead, rows // 2, cols), np.dtype(np.uint8), packed),
                               LazyParam((*lead, groups, cols), np.dtype(INT4_SCALE_DTYPE),
                                         scales))


def dequantized_lazy(leaf: QuantizedWeight8bit) -> LazyParam:
    """A lazy int8 weight [..., I, O] (LazyParam fields) read as float32, slice by slice: a
    slice reads its own int8 values and the scale rows of the blocks its rows fall in (exact:
    q * s has at most 15 significant bits; plus the mins where it has them)."""
    *lead, rows, cols = leaf.weight.shape
    per_block = rows // leaf.scales.shape[-2]

    def read(index: Index) -> np.ndarray:
        ranges = normalize(index, leaf.weight.shape)
        kept = ranges[-2]
        if not len(kept):
            return np.zeros(tuple(map(len, ranges)), np.float32)
        first, last = kept.start // per_block, (kept.stop - 1) // per_block + 1
        scales = leaf.scales.read(as_slices(ranges[:-2] + (range(first, last),) + ranges[-1:]))
        row_scales = np.repeat(np.asarray(scales, np.float32), per_block, axis=-2)  # [..., rows, O]
        offset = kept.start - first * per_block
        values = np.asarray(leaf.weight.read(index), np.float32) * \
            row_scales[..., offset:offset + len(kept), :]
        if leaf.mins is None:
            return values
        mins = leaf.mins.read(as_slices(ranges[:-2] + (range(first, last),) + ranges[-1:]))
        row_mins = np.repeat(np.asarray(mins, np.float32), per_block, axis=-2)
        return values + row_mins[..., offset:offset + len(kept), :]

    return LazyParam(tuple(leaf.weight.shape), np.dtype(np.float32), read)


def widened_lazy(param: LazyParam, dtype) -> LazyParam:
    """A float LazyParam stored narrower than `dtype` (bf16, f16) read widened to it, slice by
    slice; other params as they are."""
    dtype = np.dtype(dtype)
    if not jnp.issubdtype(param.dtype, jnp.floating) or param.dtype.itemsize >= dtype.itemsize:
        return param
    return LazyParam(param.shape, dtype, lambda index: param.read(index).astype(dtype))


def place_lazy(leaf, spec, mesh: Mesh):
    """A LazyParam (or QuantizedWeight8bit / QuantizedWeight4bit of them) -> global
    jax.Array(s) under `spec`.

    When this process's devices together hold one box of the array (the usual case: a run of
    shards along the split dimensions), that box is read once with a few large reads and each
    device's shard is cut from it; otherwise every shard is read on its own. Either way the
    process reads only bytes its devices hold, and keeps at most its own share of one
    parameter in host memory.
    """
    if isinstance(leaf, LayersByType):  # one stack per type, each under its own spec
        return LayersByType([place_lazy(stack, stack_spec, mesh) for stack, stack_spec
                             in zip(leaf.stacks, spec.stacks)], leaf.kinds)
    if isinstance(leaf, QuantizedWeight8bit):  # or a QuantizedEmbedding: keep the type
        return type(leaf)(place_lazy(leaf.weight, spec.weight, mesh),
                          place_lazy(leaf.scales, spec.scales, mesh),
                          None if leaf.mins is None else place_lazy(leaf.mins, spec.mins, mesh))
    if isinstance(leaf, QuantizedWeight4bit):  # each field under its own spec (sharding.py)
        return QuantizedWeight4bit(place_lazy(leaf.packed, spec.packed, mesh),
                                   place_lazy(leaf.scales, spec.scales, mesh),
                                   None if leaf.mins is None
                                   else place_lazy(leaf.mins, spec.mins, mesh))
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
    # CPU devices hold an aligned host buffer as it is (host_empty): one device's whole box is
    # `block` itself; other shards are copied into buffers of their own (a device holding a
    # view of `block` would keep all of it alive)
    on_cpu = all(d.platform == "cpu" for d in sharding.device_set)

    def cut(index):
        ranges = normalize(index, leaf.shape)
        shard = block[tuple(slice(r.start - b.start, r.stop - b.start)
                            for r, b in zip(ranges, box))]
        if not on_cpu or len(shards) == 1:
            return shard
        own = host_empty(shard.shape, shard.dtype)
        own[...] = shard
        return own

    return jax.make_array_from_callback(leaf.shape, sharding, cut, dtype=leaf.dtype)
