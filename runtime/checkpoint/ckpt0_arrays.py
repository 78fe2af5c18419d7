"""LazyArray: a read-only view of one array inside a checkpoint file (dtype, shape, order, byte
offset), reading any slice with positioned reads (`os.preadv`) of only the byte runs it needs.
ckpt0_index.py finds the arrays in a pickle without reading them and makes these views.
"""

from __future__ import annotations

import math
import operator
import os
from pathlib import Path

import numpy as np

from runtime.checkpoint.safe_pickle import corrupt_message
from runtime.errors import CheckpointError

# What one positioned read costs, counted in bytes: a slice is read in the fewest, smallest runs
# that minimise (runs * CALL_COST + bytes read); reading less than a page never pays.
CALL_COST = 4096
MAX_BUFFER = 64 << 20  # the most a read of a non-contiguous run may stage in memory at once
MAX_CALLS = 1 << 22  # ... unless staging less would take more read calls than this


def _read_exact(fd: int, buffer, offset: int, label: str) -> None:
    """Fill `buffer` from the file at `offset`, or raise: the file ends too early."""
    view = memoryview(buffer).cast("B")
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise CheckpointError(f"{corrupt_message(label)}: it ends at byte {offset + done}, inside data "
                                  f"that runs to byte {offset + len(view)}")
        done += n


# ---------------------------------------------------------------------------------------------
# Lazy arrays


def normalize_index(index, shape: tuple) -> tuple:
    """`index` (ints, slices, at most one Ellipsis) as one int or range per dimension of `shape`.

    Ints come back non-negative; slices as the ranges of positions they select (in their order).
    Fancy indexing (lists, arrays, None) is refused.
    """
    if not isinstance(index, tuple):
        index = (index,)
    ellipses = [i for i, ix in enumerate(index) if ix is Ellipsis]
    if len(ellipses) > 1:
        raise IndexError("an index can only have a single ellipsis ('...')")
    if ellipses:
        at = ellipses[0]
        fill = len(shape) - (len(index) - 1)
        index = index[:at] + (slice(None),) * max(fill, 0) + index[at + 1:]
    if len(index) > len(shape):
        raise IndexError(f"too many indices for an array of shape {tuple(shape)}: {len(index)}")
    index = index + (slice(None),) * (len(shape) - len(index))
    dims = []
    for axis, (ix, n) in enumerate(zip(index, shape)):
        if isinstance(ix, slice):
            dims.append(range(*ix.indices(n)))
            continue
        if isinstance(ix, (bool, np.bool_)):
            raise TypeError("boolean indices are not supported; use ints and slices")
        try:
            i = operator.index(ix)
        except TypeError:
            raise TypeError(f"only ints, slices and '...' can index a lazy checkpoint array, got "
                            f"{type(ix).__name__}") from None
        if not -n <= i < n:
            raise IndexError(f"index {i} is out of bounds for axis {axis} with size {n}")
        dims.append(i % n)
    return tuple(dims)


def _as_slice(dim):
    """An int or a range of normalize_index as an ordinary numpy index."""
    if isinstance(dim, int):
        return dim
    # A descending range that runs through 0 stops at -1, which a slice would read as "the end".
    return slice(dim.start, None if dim.stop < 0 else dim.stop, dim.step)


def _c_strides(shape: tuple, itemsize: int) -> list[int]:
    strides, step = [], itemsize
    for n in reversed(shape):
        strides.append(step)
        step *= n
    return strides[::-1]


def _gather(path, label: str, offset: int, shape: tuple, dtype: np.dtype, ranges: list,
            call_cost: int) -> np.ndarray:
    """The C-order array at `offset` in the file, indexed by ascending `ranges`: read by runs.

    Level k means: for every combination of the positions chosen on dims < k, read the byte span
    from the first to the last element chosen on dims >= k in one call. Level ndim reads single
    elements; level 0 one span. The level with the least (calls * call_cost + bytes) wins.
    """
    counts = [len(r) for r in ranges]
    out = np.empty(counts, dtype)
    if out.size == 0:
        return out
    itemsize, ndim = dtype.itemsize, len(shape)
    strides = _c_strides(shape, itemsize)
    levels = []
    for k in range(ndim + 1):
        lo = sum(r[0] * s for r, s in zip(ranges[k:], strides[k:]))
        span = sum((r[-1] - r[0]) * s for r, s in zip(ranges[k:], strides[k:])) + itemsize
        needed = math.prod(counts[k:]) * itemsize
        blocks = math.prod(counts[:k])
        levels.append((blocks * (span + call_cost), k, lo, span, needed, blocks))
    # Prefer levels that stage at most MAX_BUFFER bytes per block (the first of equal costs),
    # unless that means an absurd number of calls.
    staged = [level for level in levels if level[3] == level[4] or level[3] <= MAX_BUFFER]
    best = min(staged, key=lambda level: level[:2])
    if best[5] > MAX_CALLS:
        best = min(levels, key=lambda level: level[:2])
    _, k, lo, span, needed, blocks = best
    starts = np.zeros(1, np.int64)
    for r, s in zip(ranges[:k], strides[:k]):
        starts = (starts[:, None] + np.arange(r.start, r.stop, r.step, dtype=np.int64) * s).ravel()
    starts += offset + lo
    fd = os.open(path, os.O_RDONLY)
    try:
        if span == needed:  # each block is contiguous in the file: read straight into `out`
            view = memoryview(out.reshape(-1).view(np.uint8))
            preadv = os.preadv
            for i, start in enumerate(starts.tolist()):
                part = view[i * needed:(i + 1) * needed]
                if preadv(fd, [part], start) != needed:  # a short read: finish it, or fail
                    _read_exact(fd, part, start, label)
        else:  # read each block's span, then pick its elements
            buffer = np.empty(span, np.uint8)
            extent = [r[-1] - r[0] + 1 for r in ranges[k:]]
            box = np.ndarray(extent, dtype, buffer=buffer, strides=strides[k:])
            picked = box[tuple(slice(0, None, r.step) for r in ranges[k:])]
            dest = out.reshape(blocks, *counts[k:])
            for i, start in enumerate(starts.tolist()):
                _read_exact(fd, buffer, start, label)
                dest[i] = picked
    finally:
        os.close(fd)
    return out


class LazyArray:
    """A read-only array stored in a checkpoint file, read on demand.

    `shape`, `dtype`, `ndim`, `size`, `nbytes` are known from the pickle header. `read(index)` (or
    `lazy[index]`) returns a numpy copy of just that slice, reading only the byte runs it needs;
    `mmap()` a read-only numpy memmap of the whole payload. A small array stored inline in the
    pickle holds its bytes (`offset` is None). Fortran-ordered payloads are supported.
    """

    __slots__ = ("path", "label", "offset", "dtype", "shape", "fortran", "_data")

    def __init__(self, path, label: str, offset: int | None, dtype, shape: tuple,
                 fortran: bool = False, data: np.ndarray | None = None):
        self.path = Path(path)
        self.label = label
        self.offset = offset  # of the first payload byte in the file; None: held inline
        self.dtype = np.dtype(dtype)
        self.shape = tuple(shape)
        self.fortran = bool(fortran)
        self._data = data

    @classmethod
    def inline(cls, array: np.ndarray, path, label: str) -> "LazyArray":
        data = array.view()
        data.flags.writeable = False
        return cls(path, label, None, array.dtype, array.shape, False, data)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def __len__(self) -> int:
        if not self.shape:
            raise TypeError("len() of a 0-d array")
        return self.shape[0]

    def __repr__(self) -> str:
        where = "inline" if self.offset is None else f"at byte {self.offset}"
        order = ", Fortran order" if self.fortran else ""
        return f"LazyArray({self.label}, {self.dtype} {list(self.shape)} {where}{order})"

    def mmap(self) -> np.ndarray:
        """The whole array as a read-only memory map of the file (an inline array as itself)."""
        if self._data is not None:
            return self._data
        if self.size == 0:
            return np.empty(self.shape, self.dtype)
        return np.memmap(self.path, dtype=self.dtype, mode="r", offset=self.offset,
                         shape=self.shape, order="F" if self.fortran else "C")

    def read(self, index=(), *, call_cost: int = CALL_COST) -> np.ndarray:
        """A copy of `self[index]` (ints, slices, '...'), reading only the bytes it needs."""
        return self.read_dims(normalize_index(index, self.shape), call_cost=call_cost)

    __getitem__ = read

    def __array__(self, dtype=None, copy=None):
        array = self.read()
        return array if dtype is None else array.astype(dtype, copy=False)

    def read_dims(self, dims: tuple, *, call_cost: int = CALL_COST) -> np.ndarray:
        """`read` for an index already in normalize_index's form (one int or range per dim)."""
        if self._data is not None:
            return np.asarray(np.array(self._data[tuple(map(_as_slice, dims))]))
        # Ascending ranges for the reader; ints are ranges of one position, dropped afterwards.
        ranges, post = [], []
        for d in dims:
            if isinstance(d, int):
                ranges.append(range(d, d + 1))
                post.append(0)
            elif d.step < 0:
                ranges.append(d[::-1])
                post.append(slice(None, None, -1))
            else:
                ranges.append(d)
                post.append(slice(None))
        if self.fortran:  # a Fortran array is the transpose of the C array of reversed shape
            out = _gather(self.path, self.label, self.offset, self.shape[::-1], self.dtype,
                          ranges[::-1], call_cost).T
        else:
            out = _gather(self.path, self.label, self.offset, self.shape, self.dtype, ranges,
                          call_cost)
        if any(not isinstance(p, slice) or p.step for p in post):
            out = np.asarray(out[tuple(post)])
        return out

    def read_into(self, out: np.ndarray) -> None:
        """Fill `out` (this shape; any dtype numpy casts to) with the whole array."""
        if out.shape != self.shape:
            raise ValueError(f"cannot read {self!r} into an array of shape {out.shape}")
        if (self._data is None and not self.fortran and out.dtype == self.dtype
                and out.flags.c_contiguous and out.size):
            fd = os.open(self.path, os.O_RDONLY)
            try:
                _read_exact(fd, out.reshape(-1).view(np.uint8), self.offset, self.label)
            finally:
                os.close(fd)
        else:
            out[...] = self.read()
