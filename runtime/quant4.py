"""The group-wise 4-bit weight type and its quantisation (the products: products.py).

Shape glossary: I input width, O output width, G groups along the input (I / G rows each,
an even number), P = I / 2 packed rows.

A QuantizedWeight4bit holds a weight [..., I, O] as 4-bit codes q in 0..15, two per byte,
`packed` uint8 [..., P, O], with `scales` [..., G, O] and, for the asymmetric form, `mins`
[..., G, O]. Input row i is in group g = i // (I / G), and its value is

    symmetric (mins is None):  scales[g] * (q - 8)          (GGUF Q4_0)
    asymmetric:                scales[g] * q + mins[g]      (GGUF Q4_1)

Within a group of n rows, packed row j of the group holds row j in its low nibble and row
j + n/2 in its high nibble: the block layout of GGUF's Q4_0 / Q4_1 (n = 32), so those load by
reshaping, and a product can take the low and high halves as two int8 operands without
interleaving them. Row-parallel sharding splits P and G together (whole groups per shard).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from runtime.super_scales import float_table, super_scaled_on_device
from runtime.quant import PANEL, QuantizedEmbedding, QuantizedWeight8bit, tiled, untiled_array

SCALE_DTYPE = np.float16  # GGUF's Q4_0 / Q4_1 scale and min dtype: those load exactly
DEFAULT_GROUP_SIZE = 32  # GGUF's Q4 block; smaller groups track the weights more closely


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class QuantizedWeight4bit:
    packed: jax.Array  # uint8 [..., P, O]
    scales: jax.Array  # f16 (or bf16, f32) [..., G, O]
    mins: jax.Array | None = None  # like scales; None: symmetric

    # Haiku's get_parameter checks `.shape` against the declared logical shape [..., I, O].
    @property
    def shape(self):
        *lead, rows, out = self.packed.shape
        return (*lead, 2 * rows, out)

    @property
    def ndim(self):
        return len(self.packed.shape)

    @property
    def groups(self) -> int:
        return self.scales.shape[-2]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TiledWeight4:
    """A QuantizedWeight4bit stored in column panels for the CPU kernels (cpu_panels.cc):
    `tiles` uint8 [..., O/64, 64 P], panel p holding columns 64p..64p+63 of packed row 0, then
    of packed row 1, and so on (quant.TiledWeight's order over the packed rows: a panel's
    product reads one stream); scales and mins as stored. Products the kernel does not take
    (prefill) multiply `untiled4(w)`."""
    tiles: jax.Array  # uint8 [..., O/64, 64 P]
    scales: jax.Array  # [..., G, O]
    mins: jax.Array | None = None

    @property
    def shape(self):  # the logical [..., I, O], which Haiku's get_parameter checks
        *lead, panels, width = self.tiles.shape
        return (*lead, 2 * (width // PANEL), PANEL * panels)

    @property
    def ndim(self):
        return len(self.tiles.shape)

    @property
    def dtype(self):
        return self.tiles.dtype


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TiledEmbedding4(TiledWeight4):
    """A tied int8 table [V, D] whose values fit 4 bits (codes q - 8 in -8..7: a GGUF Q4_0
    table, which the reader widens to a QuantizedEmbedding) stored as its head [D, V] in int4
    panels: `tiles [V/64, 64 D/2]`, `scales [G, V]` (the table's). The head reads half the
    int8 table's bytes through the panel kernel; a lookup gathers token v's D/2 bytes, column
    v % 64 of panel v // 64 (products.embedding_rows)."""

    @property
    def shape(self):  # the table's logical shape [V, D], which Haiku's get_parameter checks
        panels, width = self.tiles.shape
        return (PANEL * panels, 2 * (width // PANEL))


def table_fits_int4(table) -> bool:
    """Whether an int8 table (QuantizedEmbedding [V, D], V a multiple of 64) holds int4 codes:
    every value in -8..7, groups of an even number of rows, no row scales to keep."""
    if not isinstance(table, QuantizedEmbedding) or table.mins is not None \
            or table.weight.ndim != 2 \
            or table.weight.shape[0] % PANEL or (table.weight.shape[1] // table.row_blocks) % 2:
        return False
    return bool(jnp.min(table.weight) >= -8) and bool(jnp.max(table.weight) <= 7)


def tiled_embedding4(table: QuantizedEmbedding) -> TiledEmbedding4:
    """The table (table_fits_int4) as TiledEmbedding4: codes q + 8 of its head [D, V], packed
    in quant4's order (low nibble row j of a group, high row j + n/2), in panels."""
    codes = (jnp.swapaxes(table.weight, 0, 1).astype(jnp.int16) + 8).astype(jnp.uint8)  # [D, V]
    rows, vocab = codes.shape
    grouped = codes.reshape(table.row_blocks, rows // table.row_blocks, vocab)  # [G, n, V]
    half = grouped.shape[1] // 2
    packed = (grouped[:, :half] | (grouped[:, half:] << 4)).reshape(rows // 2, vocab)
    return TiledEmbedding4(tiled(packed).tiles, table.scales)


def tileable4(w) -> bool:
    """Whether an int4 weight can be stored in panels: O a multiple of 64."""
    return isinstance(w, QuantizedWeight4bit) and w.packed.shape[-1] % PANEL == 0


def tiled4(w: QuantizedWeight4bit) -> TiledWeight4:
    return TiledWeight4(tiled(w.packed).tiles, w.scales, w.mins)


def untiled4(w: TiledWeight4) -> QuantizedWeight4bit:
    """The QuantizedWeight4bit a TiledWeight4 stores (its packed rows copied back in order,
    super-scaled tables as their float32 values)."""
    return QuantizedWeight4bit(untiled_array(w.tiles), float_table(w.scales),
                               float_table(w.mins))


def super_scaled_panels(w: TiledWeight4) -> TiledWeight4:
    """The panel weight with each float32 table (scales, mins) super-scaled where exact
    (super_scales.super_scaled_on_device): unsigned subs (Q4_K's, Q2_K's), else signed ones
    (Q3_K's scales d * (sc - 32)); concrete arrays (not traced)."""
    def compact(table):
        unsigned = super_scaled_on_device(table)
        return unsigned if unsigned is not table else super_scaled_on_device(table, np.int8)
    return TiledWeight4(w.tiles, compact(w.scales), compact(w.mins))


def check_int4_shapes(packed_shape, scales_shape, mins_shape=None) -> str | None:
    """None when scales (and mins) fit the packed codes, else what is wrong."""
    if len(packed_shape) < 2 or len(scales_shape) != len(packed_shape):
        return f"scales rank {len(scales_shape)} does not match packed rank {len(packed_shape)}"
    if tuple(scales_shape[:-2]) != tuple(packed_shape[:-2]) or scales_shape[-1] != packed_shape[-1]:
        return f"scales {tuple(scales_shape)} do not fit packed codes {tuple(packed_shape)}"
    if mins_shape is not None and tuple(mins_shape) != tuple(scales_shape):
        return f"mins {tuple(mins_shape)} differ from scales {tuple(scales_shape)}"
    groups = scales_shape[-2]
    if groups < 1 or packed_shape[-2] % groups:
        return f"{groups} groups do not divide {2 * packed_shape[-2]} input rows evenly in pairs"
    return None


def groups_for(rows: int, group_size: int) -> int:
    """G for groups of at most `group_size` of a weight's `rows` input rows: the fewest groups
    of an even number of rows that divide the rows (576 rows in groups of 128: G = 6 of 96)."""
    if group_size < 2 or group_size % 2:
        raise ValueError(f"int4 group size must be an even number of at least 2, got {group_size}")
    if rows % 2:
        raise ValueError(f"int4 needs an even number of input rows, got {rows}")
    return next(g for g in range(-(-rows // group_size), rows // 2 + 1)
                if rows % g == 0 and (rows // g) % 2 == 0)


def _grouped(w: np.ndarray, groups: int) -> np.ndarray:
    *lead, rows, cols = w.shape
    return w.reshape(*lead, groups, rows // groups, cols)  # [..., G, n, O]


def pack_codes(codes) -> np.ndarray:
    """Codes uint8 0..15 [..., G, n, O] -> packed uint8 [..., G * n/2, O] (module docstring)."""
    codes = np.asarray(codes, np.uint8)
    *lead, groups, n, cols = codes.shape
    low, high = codes[..., : n // 2, :], codes[..., n // 2:, :]
    return (low | (high << 4)).reshape(*lead, groups * (n // 2), cols)


def quantize_int4(w, group_size: int = DEFAULT_GROUP_SIZE, symmetric: bool = True,
                  scale_dtype=SCALE_DTYPE) -> QuantizedWeight4bit:
    """Group-wise 4-bit quantisation of w [..., I, O] on the host, in groups of `group_size`
    input rows. Symmetric: the scale maps the group's value of largest magnitude to code 0
    (-8 steps), so all 16 codes are used. Asymmetric: the group's range [min, max] over 15
    steps. Scales and mins are rounded to their storage dtype before the codes are chosen."""
    w = np.asarray(w, np.float32)
    groups = groups_for(w.shape[-2], group_size)
    blocks = _grouped(w, groups)  # [..., G, n, O]
    if symmetric:
        index = np.argmax(np.abs(blocks), axis=-2)[..., None, :]
        extreme = np.take_along_axis(blocks, index, axis=-2)[..., 0, :]  # [..., G, O], signed
        scales = (extreme / -8.0).astype(scale_dtype)
        stored = scales.astype(np.float32)
        safe = np.where(stored == 0, 1.0, stored)[..., None, :]
        codes = np.clip(np.rint(blocks / safe) + 8, 0, 15)
        return QuantizedWeight4bit(pack_codes(codes), scales)
    low, high = blocks.min(axis=-2), blocks.max(axis=-2)
    mins = low.astype(scale_dtype)
    scales = ((high - mins.astype(np.float32)) / 15.0).astype(scale_dtype)
    stored = scales.astype(np.float32)
    safe = np.where(stored == 0, 1.0, stored)[..., None, :]
    codes = np.clip(np.rint((blocks - mins.astype(np.float32)[..., None, :]) / safe), 0, 15)
    return QuantizedWeight4bit(pack_codes(codes), scales, mins)


def unpacked_codes(packed, groups: int, xp=jnp):
    """packed uint8 [..., P, O] -> codes uint8 0..15 [..., I, O] (xp: jnp or np)."""
    *lead, rows, cols = packed.shape
    grouped = packed.reshape(*lead, groups, rows // groups, cols)  # [..., G, n/2, O]
    halves = xp.concatenate([grouped & 15, grouped >> 4], axis=-2)  # [..., G, n, O]
    return halves.reshape(*lead, 2 * rows, cols)


def as_int8(w: QuantizedWeight4bit) -> QuantizedWeight8bit:
    """The int8 weight with R = G row blocks of the same values, exact: q - 8 times the scales
    (symmetric), or q 0..15 times the scales plus the mins (int8_mins.py). In a jitted product
    this is a transient int8 array, half the packed weight's bytes again; the float weight is
    never built."""
    codes = unpacked_codes(w.packed, w.groups).astype(jnp.int8)
    if w.mins is None:
        return QuantizedWeight8bit(codes - jnp.int8(8), w.scales)
    return QuantizedWeight8bit(codes, w.scales, w.mins)


def dequantize_int4(w: QuantizedWeight4bit) -> np.ndarray:
    """Float32 copy of an int4 weight: for tests and converters, never for the model."""
    codes = unpacked_codes(np.asarray(w.packed), w.groups, np).astype(np.float32)
    grouped = _grouped(codes, w.groups)  # [..., G, n, O]
    scales = np.asarray(w.scales).astype(np.float32)[..., None, :]
    if w.mins is None:
        values = (grouped - 8.0) * scales
    else:
        values = grouped * scales + np.asarray(w.mins).astype(np.float32)[..., None, :]
    return values.reshape(codes.shape)
