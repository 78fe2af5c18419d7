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
LazyArray (ckpt0_arrays.py) reads slices with positioned reads of only the byte runs a slice needs.
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

from runtime.checkpoint.ckpt0_arrays import LazyArray, _read_exact
from runtime.checkpoint.safe_pickle import (QuantizedWeight8bitRecord, RestrictedUnpickler,
                                            _reconstruct, _scalar, corrupt_message, reading)
from runtime.errors import CheckpointError

INLINE_MAX = 64  # bytes payloads up to this size stay in the patched stream
HEADER_CHUNK = 4096  # the scanner reads the file in pieces of this size (one page)
MAX_LINE = 1 << 16  # protocol-0 text arguments longer than this are not plausible

_BYTES_LENGTH = {"SHORT_BINBYTES": "<B", "BINBYTES": "<I", "BINBYTES8": "<Q", "BYTEARRAY8": "<Q"}
_BININT = pickle.BININT  # b"J": 4-byte signed int
_BINPERSID = pickle.BINPERSID  # b"Q"


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
