"""Six-bit panels: int8 panel weights whose codes all fit six bits stored packed, 3/4 of the
int8 bytes, for the CPU panel kernel (cpu_panels_six.h). GGUF Q6_K (codes -32..31), Q5_K, Q5_1
and Q5_0 load as int8 codes that fit: Q4_K_M files keep their head and half their layers'
ffn_down / attn_v in Q6_K, which in int8 read 8.6 bits a weight against the file's 6.56
(BENCHMARKS.md, "Six-bit panels").

Every four input rows of a panel (a quad: 4 x 64 codes v in [-32, 31]) become 64 little-endian
24-bit words, one per column, s_0 | s_1 << 6 | s_2 << 12 | s_3 << 18 (s_r = v_r & 63: row r's
code in six bits, two's complement), 192 bytes; the columns in the order the kernel's integer
dots keep their sums (cpu_panels_int8_x.h, quad_columns): word j of a quad is column
16 (j // 4 % 4) + 4 (j // 16) + j % 4. One byte permute puts 16 columns' words in 32-bit lanes,
a shift pair gives a row's codes, a multishift and a mask all four rows' for the dots. tiles
int8 [..., O/64, 64 I] -> uint8 [..., O/64, 48 I] (quant.TiledWeight holds either; uint8 tiles
are six-bit).

Shape glossary: P panels (O/64), I input rows, W = 64 columns of a panel, Q = I/4 quads.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from runtime import host_copies
from runtime.host_threads import each_chunk

QUAD_ROWS = 4  # input rows packed together
ROW_BYTES = 48  # bytes of a packed input row of a 64-column panel
LOW, HIGH = -32, 31  # the codes six bits hold
PACK_CODES = 1 << 20  # codes packed (or checked) at a time: temporaries in the caches


def fits(tiles, groups: int) -> bool:
    """Whether int8 panel tiles [..., P, 64 I] with `groups` scale blocks pack: I and every
    block a multiple of 4 rows, every code in [-32, 31] (a concrete array: read whole once)."""
    rows = tiles.shape[-1] // 64
    if tiles.dtype != np.int8 or rows % QUAD_ROWS or rows % groups \
            or (rows // groups) % QUAD_ROWS:
        return False
    flat = np.asarray(tiles).reshape(-1)  # numpy, a few MB at a time: XLA's comparisons
    for start in range(0, flat.size, PACK_CODES):  # had made full-size temporaries
        part = flat[start:start + PACK_CODES]
        if part.min() < LOW or part.max() > HIGH:
            return False
    return True


# word j of a quad -> its column; the inverse
WORD_COLUMNS = np.array([16 * (j // 4 % 4) + 4 * (j // 16) + j % 4 for j in range(64)])
COLUMN_WORDS = np.argsort(WORD_COLUMNS)


def packed(tiles: np.ndarray) -> np.ndarray:
    """int8 panel tiles [..., P, 64 I] (codes in [-32, 31]) -> uint8 [..., P, 48 I]."""
    *lead, panels, width = tiles.shape
    flat = tiles.reshape(-1, width)  # [N P, 64 I]
    out = np.empty((len(flat), width // 64 * ROW_BYTES), np.uint8)
    step = max(1, PACK_CODES // width)

    def pack(chunk: int) -> None:  # temporaries in the caches; chunks on the host threads
        start = chunk * step
        part = flat[start:start + step]
        if host_copies.available():
            host_copies.six_bit_packed_rows(np.ascontiguousarray(part), out[start:start + step])
            return
        fields = part.reshape(len(part), width // 256, QUAD_ROWS, 64).view(np.uint8) & 63
        words = fields[..., 0, :].astype(np.uint32)  # [n, Q, W]
        for r in range(1, QUAD_ROWS):
            words |= fields[..., r, :].astype(np.uint32) << (6 * r)
        little = np.ascontiguousarray(words[..., WORD_COLUMNS], "<u4").view(np.uint8)
        out[start:start + step] = little.reshape(len(part), -1, 64, 4)[..., :3] \
            .reshape(len(part), -1)  # [n, Q, W, 3]

    each_chunk(pack, -(-len(flat) // step))
    return out.reshape(*lead, panels, width // 64 * ROW_BYTES)


def unpacked(tiles: jax.Array) -> jax.Array:
    """packed()'s inverse: uint8 [..., P, 48 I] -> int8 [..., P, 64 I] (XLA paths: prompts past
    the kernel's rows, other products)."""
    *lead, panels, width = tiles.shape
    words = tiles.reshape(*lead, panels, width // 192, 64, 3)[..., COLUMN_WORDS, :]
    return _codes(words).reshape(*lead, panels, width // ROW_BYTES * 64)


def columns(tiles: jax.Array, tokens: jax.Array) -> jax.Array:
    """A tied table's head in six-bit panels [V/64, 48 D]: token v's D codes, column v % 64 of
    panel v // 64 -> int8 [..., D] (only the looked-up columns unpacked)."""
    panels, width = tiles.shape
    words = tiles.reshape(panels, width // 192, 64, 3)
    picked = words[tokens // 64, :, jnp.asarray(COLUMN_WORDS)[tokens % 64]]  # [..., Q, 3]
    return _codes(picked[..., None, :]).reshape(*tokens.shape, -1)  # [..., Q, 4, 1] -> [..., D]


def _codes(words: jax.Array) -> jax.Array:
    """[..., Q, W, 3] packed bytes (W columns' words) -> int8 codes [..., Q, 4, W]."""
    wide = words.astype(jnp.int32)
    word = wide[..., 0] | (wide[..., 1] << 8) | (wide[..., 2] << 16)  # [..., Q, W]
    fields = [(word >> (6 * r)) & 63 for r in range(QUAD_ROWS)]
    return jnp.stack([((f ^ 32) - 32).astype(jnp.int8) for f in fields], axis=-2)
