"""One GGUF tensor read as natural arrays, a few MB of the memory-mapped file at a time
(gguf_reader assembles the parameters from them).

A tensor's numpy layout is [..., rows, cols] with rows its output features (torch's Linear
layout); a quantised tensor's data is viewed as blocks [..., rows, row blocks, block bytes] and
decoded by gguf_quants. Reads go into the caller's array, transposed where the caller's layout
is [in, out]: whole-tensor numpy passes had allocated (and page-faulted) fresh temporaries
several times a tensor's size, and numpy transposes a 1-byte element at a time (BENCHMARKS.md,
"GGUF loading").
"""

from __future__ import annotations

from typing import Optional

import ml_dtypes
import numpy as np

from runtime.checkpoint.gguf_quants import TYPES
from runtime.checkpoint.lazy import BYTES_READ, transposer
from runtime.host_threads import each_chunk

FLOATS = {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
          "BF16": np.dtype(ml_dtypes.bfloat16)}
READ_CHUNK_BYTES = 1 << 22  # file bytes decoded at a time (_fill)


class Source:
    """One GGUF tensor as natural arrays [..., rows, cols] (its numpy layout; rows are output
    features), with the q/k row order undone; reads touch only the requested bytes. A
    quantised tensor's data is viewed as blocks [..., rows, row blocks, block bytes]."""

    def __init__(self, tensor, kind: str, rows_order: Optional[np.ndarray]):
        self.name, self.kind, self.order = tensor.name, kind, rows_order
        self.shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))  # numpy order
        self.type = TYPES.get(kind)
        data = tensor.data
        if kind == "BF16":
            data = data.view(FLOATS["BF16"])
        elif self.type is not None:
            data = data.reshape(*data.shape[:-1], -1, self.type.size)
        self.data = data

    def _rows(self, lead: tuple, rows: range, tail: tuple) -> np.ndarray:
        """data[lead..., natural rows of HF rows `rows`, *tail]."""
        if self.order is None or not len(rows):
            part = self.data[lead + (slice(rows.start, rows.stop),) + tail]
        else:
            want = self.order[rows.start:rows.stop]
            low, high = int(want.min()), int(want.max()) + 1  # whole heads: one span
            part = np.take(self.data[lead + (slice(low, high),) + tail], want - low,
                           axis=len(lead))
        BYTES_READ.add(part.nbytes)
        return part

    def floats(self, lead: tuple, rows: range, cols: range, out=None,
               transposed: bool = False) -> np.ndarray:
        """Values [..., rows, cols]: as stored for floats, float32 for a quantised type (the
        file's own dequantisation); into `out` as part() does."""
        if self.type is None:
            tail = (slice(cols.start, cols.stop),)
            return _fill(lead, rows, len(cols) * self.data.dtype.itemsize, out, transposed,
                         len(cols), self.data.dtype, lambda sub: self._rows(lead, sub, tail))
        return self.part("floats", lead, rows, cols, out, transposed)

    def part(self, name: str, lead: tuple, rows: range, elems: range, out=None,
             transposed: bool = False) -> np.ndarray:
        """Part `name` of the blocks (gguf_quants.TYPES) [..., rows, elems], elems counted
        along the row (per_block of them per block); reads only that part's bytes of the
        blocks that elems touch. Into `out` ([..., rows, elems], or [..., elems, rows] when
        `transposed`) where given."""
        part = self.type.parts[name]
        b0, b1 = elems.start // part.per_block, -(-elems.stop // part.per_block)
        first = elems.start - b0 * part.per_block
        span_bytes = (b1 - b0) * sum(hi - lo for lo, hi in part.spans)

        def decoded(sub: range) -> np.ndarray:
            raw = np.concatenate([np.ascontiguousarray(self._rows(lead, sub, (slice(b0, b1),
                                                                               slice(lo, hi))))
                                  for lo, hi in part.spans], axis=-1)  # [..., rows, nb, bytes]
            values = part.decode(raw)
            return values.reshape(*values.shape[:-2], -1)[..., first:first + len(elems)]

        return _fill(lead, rows, span_bytes, out, transposed, len(elems), part.dtype, decoded)


def _fill(lead: tuple, rows: range, row_bytes: int, out, transposed: bool, width: int, dtype,
          decoded) -> np.ndarray:
    """out [..., rows, width] (or [..., width, rows]; allocated where None) filled from
    decoded(sub rows) [..., sub, width], READ_CHUNK_BYTES of the file at a time, the chunks
    on the host threads (host_threads.py)."""
    sizes = tuple(s.stop - s.start for s in lead)
    if out is None:
        out = np.empty(sizes + ((width, len(rows)) if transposed else (len(rows), width)), dtype)
    if not out.size:
        return out
    step = max(1, READ_CHUNK_BYTES // max(1, row_bytes * int(np.prod(sizes))))
    swap = transposer(out.nbytes) if transposed else None

    def fill_chunk(chunk: int) -> None:  # each chunk its own rows of out
        start = chunk * step
        block = decoded(rows[start:start + step])
        if transposed:
            out[..., start:start + step] = swap(block)
        else:
            out[..., start:start + step, :] = block

    each_chunk(fill_chunk, -(-len(rows) // step))
    return out
