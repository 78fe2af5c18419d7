"""Index a checkpoint pickle without reading its array data: lazy, read-only views of its payloads.

A Grok-1 `ckpt-0` file is a protocol-4 pickle whose array bytes sit raw inside the stream (one
BINBYTES/BINBYTES8 opcode per array). `lazy_pickle` finds them without reading them:

1. Scan the opcodes with pickletools' tables, reading only opcode arguments. A bytes payload
   (SHORT_BINBYTES, BINBYTES, BINBYTES8, BYTEARRAY8) longer than INLINE_MAX bytes is not read:
   its (offset, length) is recorded, checked against the file size, and skipped.
2. Re-emit the opcodes as a small in-memory stream: FRAME opcodes are dropped (framing is
   optional, and the patched stream would break their lengths), and each skipped payload becomes
   a persistent id (`BININT k; BINPERSID`) naming entry k of the payload table. The source file may
   not use persistent ids itself, so every persistent id the unpickler sees is one of ours.
3. Unpickle that stream with `_IndexUnpickler`, a subclass of safe_pickle's RestrictedUnpickler:
   its `find_class` asks the parent's allow-list first (a refused global raises there, exactly as
   load_file refuses it), and only then swaps two of the allowed callables for wrappers: numpy's
   `_reconstruct` builds a placeholder whose `__setstate__(version, shape, dtype, is_fortran,
   rawdata)` turns a payload into a `LazyArray` (dtype, shape, order, file offset), and numpy's
   `scalar` reads a payload back into bytes. Nothing outside the allow-list can be resolved.

`lazy_pickle` returns what `safe_pickle.load_file` would, with each ndarray replaced by a LazyArray
(small arrays keep their bytes inline); `index_pickle` returns it with numpy memmaps instead.
LazyArray reads slices with positioned reads (`os.preadv`) of only the byte runs a slice needs.
"""

from __future__ import annotations

import io
import math
import operator
import os
import pickle
import pickletools
import struct
from pathlib import Path

import numpy as np

from runtime.checkpoint.safe_pickle import (QuantizedWeight8bitRecord, RestrictedUnpickler,
                                            _reconstruct, _scalar, corrupt_message, reading)
from runtime.errors import CheckpointError

INLINE_MAX = 64  # bytes payloads up to this size stay in the patched stream
HEADER_CHUNK = 4096  # the scanner reads the file in pieces of this size (one page)
MAX_LINE = 1 << 16  # protocol-0 text arguments longer than this are not plausible
# What one positioned read costs, counted in bytes: a slice is read in the fewest, smallest runs
# that minimise (runs * CALL_COST + bytes read); reading less than a page never pays.
CALL_COST = 4096
MAX_BUFFER = 64 << 20  # the most a read of a non-contiguous run may stage in memory at once
MAX_CALLS = 1 << 22  # ... unless staging less would take more read calls than this

_BYTES_LENGTH = {"SHORT_BINBYTES": "<B", "BINBYTES": "<I", "BINBYTES8": "<Q", "BYTEARRAY8": "<Q"}
_BININT = pickle.BININT  # b"J": 4-byte signed int
_BINPERSID = pickle.BINPERSID  # b"Q"


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


# ---------------------------------------------------------------------------------------------
# Scanning the pickle


class _Payload:
    """A bytes payload left in the file: `length` bytes at `offset`."""

    __slots__ = ("path", "label", "offset", "length", "mutable")

    def __init__(self, path, label, offset, length, mutable):
        self.path, self.label, self.offset, self.length = path, label, offset, length
        self.mutable = mutable  # BYTEARRAY8 builds a bytearray

    def materialise(self):
        """The payload as the object plain unpickling would have built (read now)."""
        data = bytearray(self.length)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            _read_exact(fd, data, self.offset, self.label)
        finally:
            os.close(fd)
        return data if self.mutable else bytes(data)


class _HeaderReader:
    """A file-like reader over positioned reads, fetching HEADER_CHUNK bytes at a time."""

    def __init__(self, fd: int, size: int):
        self.fd, self.size, self.pos = fd, size, 0
        self.buf, self.buf_at = b"", 0
        self.tap = bytearray()  # every byte returned by read/readline, for copying opcodes

    def _fetch(self, n: int) -> None:
        """Make the buffer hold [pos, pos + n) (or up to the end of the file)."""
        if self.buf_at <= self.pos and self.pos + n <= self.buf_at + len(self.buf):
            return
        want = min(max(n, HEADER_CHUNK), self.size - self.pos)
        data = bytearray(want)
        got = 0
        while got < want:
            k = os.preadv(self.fd, [memoryview(data)[got:]], self.pos + got)
            if k <= 0:
                break
            got += k
        self.buf, self.buf_at = bytes(data[:got]), self.pos

    def read(self, n: int) -> bytes:
        if n > self.size - self.pos:  # never allocate for a length the file cannot hold
            raise ValueError(f"an argument of {n} bytes runs past the end of the file")
        self._fetch(n)
        start = self.pos - self.buf_at
        data = self.buf[start:start + n]
        self.pos += len(data)
        self.tap += data
        return data

    def readline(self) -> bytes:
        line = b""
        while True:
            self._fetch(1)
            start = self.pos - self.buf_at
            chunk = self.buf[start:]
            if not chunk:
                return line
            end = chunk.find(b"\n")
            part = chunk if end < 0 else chunk[:end + 1]
            line += part
            self.pos += len(part)
            self.tap += part
            if end >= 0:
                return line
            if len(line) > MAX_LINE:
                raise ValueError("a text argument longer than any checkpoint needs")

    def skip(self, n: int) -> None:
        self.pos += n


def _scan(fd: int, size: int, path, label: str) -> tuple[bytes, list[_Payload]]:
    """The patched opcode stream and its payload table (see the module docstring)."""
    reader = _HeaderReader(fd, size)
    head = reader.read(min(2, size))
    # Every pickle of protocol >= 2 starts with PROTO n; the released files use 4.
    if len(head) < 2 or head[0] != pickle.PROTO[0] or not 2 <= head[1] <= 5:
        what = "it is empty" if not head else f"it starts with {head!r}"
        raise CheckpointError(f"{corrupt_message(label)}: not a pickle ({what}); a foreign file?")
    out = bytearray(head)
    payloads: list[_Payload] = []
    while True:
        code = reader.read(1) if reader.pos < size else b""
        if not code:
            raise pickle.UnpicklingError("pickle data was truncated (no STOP opcode)")
        op = pickletools.code2op.get(code.decode("latin-1"))
        if op is None:
            raise pickle.UnpicklingError(f"invalid load key, {code!r}")
        name = op.name
        if name == "FRAME":
            reader.read(8)
            continue
        if name in ("PERSID", "BINPERSID"):
            raise pickle.UnpicklingError("persistent ids, which checkpoints never use")
        if name in _BYTES_LENGTH:
            fmt = _BYTES_LENGTH[name]
            raw = reader.read(struct.calcsize(fmt))
            (length,) = struct.unpack(fmt, raw)
            if length > INLINE_MAX:
                start = reader.pos
                if start + length > size:
                    raise CheckpointError(
                        f"{corrupt_message(label)}: a payload of {length} bytes at byte {start} runs "
                        f"past the end of the file ({size} bytes)")
                out += _BININT + struct.pack("<i", len(payloads)) + _BINPERSID
                payloads.append(_Payload(path, label, start, length, name == "BYTEARRAY8"))
                reader.skip(length)
            else:
                out += code + raw + reader.read(length)
            continue
        if op.arg is not None:  # copy the argument's bytes as they are
            reader.tap.clear()
            op.arg.reader(reader)
            out += code + reader.tap
        else:
            out += code
        if name == "STOP":
            break
    if reader.pos != size:
        raise CheckpointError(f"{corrupt_message(label)}: unexpected bytes after the end of the pickle")
    return bytes(out), payloads


# ---------------------------------------------------------------------------------------------
# Unpickling the patched stream


class _Pending:
    """What the wrapped `_reconstruct` returns: an ndarray waiting for its state."""

    __slots__ = ("base", "value", "unpickler")

    def __init__(self, base, unpickler):
        self.base = base  # numpy's own (empty) reconstruction, for states we do not index
        self.value = None
        self.unpickler = unpickler

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) in (4, 5) and isinstance(state[-1], _Payload):
            self.value = self.unpickler.lazy_array(self.base, state)
            return
        self.base.__setstate__(_resolve(state))  # numpy's rules, on real bytes
        self.value = self.base

    def result(self):
        return self.base if self.value is None else self.value


class _IndexRecord(QuantizedWeight8bitRecord):
    """The record class while unpickling: its state's arrays are placeholders until resolved."""

    def __setstate__(self, state):
        super().__setstate__(_resolve(state))


def _resolve(obj, seen=None):
    """`obj` with placeholders replaced: arrays by their values, stray payloads by their bytes."""
    if isinstance(obj, _Pending):
        return obj.result()
    if isinstance(obj, _Payload):
        return obj.materialise()
    if type(obj) is _IndexRecord:
        record = QuantizedWeight8bitRecord.__new__(QuantizedWeight8bitRecord)
        record.__dict__.update({k: _resolve(v, seen) for k, v in obj.__dict__.items()})
        return record
    if isinstance(obj, (list, tuple, dict)):
        seen = set() if seen is None else seen
        if id(obj) in seen:
            return obj
        seen.add(id(obj))
        if isinstance(obj, tuple):
            return tuple(_resolve(x, seen) for x in obj)
        items = obj.items() if isinstance(obj, dict) else enumerate(obj)
        for key, value in list(items):
            obj[key] = _resolve(value, seen)
    return obj


class _IndexUnpickler(RestrictedUnpickler):
    """RestrictedUnpickler over a patched stream: same allow-list, lazy array payloads."""

    def __init__(self, file, label: str, path, payloads: list[_Payload]):
        super().__init__(file, label)
        self._path = path
        self._payloads = payloads

    def find_class(self, module: str, name: str):
        found = super().find_class(module, name)  # the allow-list decides; refusals raise here
        if found is _reconstruct:
            return self._reconstruct
        if found is _scalar:
            return _scalar_with_payloads
        if found is QuantizedWeight8bitRecord:
            return _IndexRecord
        return found

    def persistent_load(self, pid):
        # Only the scanner writes persistent ids (the source may not): k is a payload index.
        if type(pid) is int and 0 <= pid < len(self._payloads):
            return self._payloads[pid]
        raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")

    def _reconstruct(self, *args):
        return _Pending(_reconstruct(*args), self)

    def lazy_array(self, base, state) -> LazyArray:
        """numpy's ndarray.__setstate__ rules, for a state whose data stayed in the file."""
        if type(base) is not np.ndarray:
            raise TypeError(f"cannot index a pickled {type(base).__name__}")
        if len(state) == 5:
            version, shape, dtype, fortran, payload = state
            if version != 1:
                raise ValueError(f"unsupported ndarray pickle state version {version!r}")
        else:
            shape, dtype, fortran, payload = state
        if not isinstance(dtype, np.dtype):
            raise TypeError(f"ndarray state holds a {type(dtype).__name__} where a dtype belongs")
        if not isinstance(shape, tuple):
            raise TypeError(f"ndarray state holds a {type(shape).__name__} shape")
        shape = tuple(operator.index(n) for n in shape)
        if any(n < 0 for n in shape):
            raise ValueError(f"negative dimension in shape {list(shape)}")
        if dtype.hasobject or dtype.itemsize == 0:
            raise ValueError(f"cannot read {dtype} data from raw bytes")
        if math.prod(shape) * dtype.itemsize != payload.length:
            raise ValueError(f"buffer size does not match array size: {payload.length} bytes for "
                             f"{dtype} {list(shape)}")
        return LazyArray(self._path, self._label, payload.offset, dtype, shape, bool(fortran))


def _scalar_with_payloads(*args):
    return _scalar(*(_resolve(a) for a in args))


def _map_arrays(obj, fn, seen=None):
    """Apply fn to every LazyArray / ndarray leaf of the structures a checkpoint can hold."""
    if isinstance(obj, (np.ndarray, LazyArray)):
        return fn(obj)
    if type(obj) is QuantizedWeight8bitRecord:
        record = QuantizedWeight8bitRecord.__new__(QuantizedWeight8bitRecord)
        record.__dict__.update({k: _map_arrays(v, fn, seen) for k, v in obj.__dict__.items()})
        return record
    if isinstance(obj, (list, tuple, dict)):
        seen = set() if seen is None else seen
        if id(obj) in seen:
            return obj
        seen.add(id(obj))
        if isinstance(obj, tuple):
            return tuple(_map_arrays(x, fn, seen) for x in obj)
        items = obj.items() if isinstance(obj, dict) else enumerate(obj)
        for key, value in list(items):
            obj[key] = _map_arrays(value, fn, seen)
    return obj


def lazy_pickle(path, label: str | None = None):
    """What `safe_pickle.load_file(path, label)` returns, with every ndarray as a LazyArray.

    Reads only the pickle's opcodes (a few KB), never its array payloads. Refuses the same
    globals as load_file; any failure is one CheckpointError naming the file by `label`.
    """
    label = label or str(path)
    path = Path(path)
    with reading(label):
        fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            stream, payloads = _scan(fd, size, path, label)
        finally:
            os.close(fd)
        obj = _IndexUnpickler(io.BytesIO(stream), label, path, payloads).load()
        obj = _resolve(obj)
    return _map_arrays(obj, lambda a: a if isinstance(a, LazyArray)
                       else LazyArray.inline(a, path, label) if type(a) is np.ndarray else a)


def index_pickle(path, label: str | None = None):
    """What `safe_pickle.load_file(path, label)` returns, with every array a lazy read-only view:
    a numpy memmap of its payload bytes in the file (arrays of at most INLINE_MAX bytes are held
    inline, as read-only ndarrays). Reads only the pickle's opcodes, never the payloads.
    """
    label = label or str(path)
    lazy = lazy_pickle(path, label)
    try:
        return _map_arrays(lazy, lambda a: a.mmap())
    except (OSError, ValueError) as e:  # e.g. the file shrank since it was indexed
        raise CheckpointError(f"cannot map checkpoint file {label}: {e}") from None
