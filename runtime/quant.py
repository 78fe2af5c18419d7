"""The int8 weight types and quantisation (the products that consume them: products.py).

Shape glossary: M rows (tokens or token-expert pairs), I input width, O output width,
R scale row blocks, G groups (experts).

A QuantizedWeight8bit holds int8 values `weight [..., I, O]` and `scales [..., R, O]`; scale row r
applies to the r-th contiguous block of I / R input rows (R = 1: one scale per output channel;
the released Grok-1 uses R = 8 for its row-parallel weights; `--quantize int8` uses groups of
at most --int8-group-size input rows, see row_blocks_for). The dequantised weight is
`weight[..., i, :] * scales[..., i // (I / R), :]`, plus `mins[..., i // (I / R), :]` where a
weight has mins (GGUF's asymmetric types, loaded exactly: int8_mins.py). A QuantizedEmbedding is
the int8 tied embedding table [V, D], grouped along D (it is the output head's [D, V] weight,
transposed).
"""

from __future__ import annotations

import dataclasses
from typing import Union

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from runtime import six_bit
from runtime.super_scales import float_table

@jax.tree_util.register_dataclass
@dataclasses.dataclass
class QuantizedWeight8bit:
    weight: jax.Array  # int8 [..., I, O]
    scales: jax.Array  # bf16 (or f32) [..., R, O]
    mins: jax.Array | None = None  # like scales: the asymmetric form (int8_mins.py); None: none

    # Haiku's get_parameter checks `.shape` against the declared logical shape.
    @property
    def shape(self):
        return self.weight.shape

    @property
    def ndim(self):
        return len(self.weight.shape)

    @property
    def row_blocks(self) -> int:
        return self.scales.shape[-2]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class QuantizedEmbedding(QuantizedWeight8bit):
    """An int8 embedding table: `weight` int8 [V, D], `scales` [R, V], token v's value i
    dequantised as weight[v, i] * scales[i // (D / R), v]. Stored this way it is, transposed,
    the int8 head weight [D, V] with its usual [R, V] scales, so the tied head reads the table
    once as a TransposedWeight (tied_head) and a lookup gathers rows (embedding_rows).
    A subclass: code that only moves or counts quantised leaves treats both alike.
    `row_scales` [V, R]: the same scales one row per token, or None; a one-device CPU engine adds
    this copy (with_row_scales) for the tied head's kernel, which reads it in one stream with the
    weight rows (1/32 of the table's bytes for groups of 32)."""
    row_scales: jax.Array | None = None


def with_row_scales(table: QuantizedEmbedding) -> QuantizedEmbedding:
    """The table with its scales also stored one row per token (row_scales [V, R])."""
    return QuantizedEmbedding(table.weight, table.scales, table.mins,
                              row_scales=jnp.asarray(table.scales).T.copy())


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TransposedWeight:
    """A matmul weight [..., I, O] stored transposed, `weight_t [..., O, I]`: float, or int8
    with `scales [..., R, O]` as in QuantizedWeight8bit (None for a float weight).

    Each output is then a dot over one contiguous row of the weight, which is the faster
    layout for few-row (decode) products on two backends (models/stored_weights.py): on
    the CPU for one float32 row only (slower at 2-16 rows, and int8 widened from [O, I] is
    slower than its blocked [I, O] widening, so only a one-slot engine's float32 weights use
    it there); on GPUs for one bf16 or int8 row (BENCHMARKS.md, "Transposed weights for
    one-row products"). Several rows and prefill multiply x @ W^T, the layout of torch's
    nn.Linear weights, which cuBLAS and XLA's GEMM emitters take without a copy.
    """
    weight_t: jax.Array  # [..., O, I] float or int8
    scales: jax.Array | None = None  # [..., R, O] for int8 weight_t
    mins: jax.Array | None = None  # [..., R, O] for asymmetric int8 (int8_mins.py)

    # Haiku's get_parameter checks `.shape` against the declared logical shape [..., I, O].
    @property
    def shape(self):
        *lead, out, rows = self.weight_t.shape
        return (*lead, rows, out)

    @property
    def ndim(self):
        return len(self.weight_t.shape)

    @property
    def dtype(self):
        return self.weight_t.dtype


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LayerOfStack:
    """Layer `index` of a stacked 2-D matmul weight (float [L, I, O], or TransposedWeight,
    TiledWeight of [L, ...] arrays) or of a stacked KV memory [L, B, K, S, H], not sliced out
    of the stack."""
    stack: "Weight"
    index: jax.Array  # int32 [] (the scan's counter)

    @property
    def shape(self):  # the layer's logical shape, which Haiku's get_parameter checks
        return tuple(self.stack.shape[1:])

    @property
    def ndim(self):
        return len(self.shape)

    @property
    def dtype(self):
        return self.stack.dtype

    def layer(self):
        """The layer's weight itself (sliced out, as a plain scan's body gets it)."""
        return jax.tree.map(lambda leaf: jax.lax.dynamic_index_in_dim(leaf, self.index,
                                                                      keepdims=False),
                            self.stack)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TiledWeight:
    """A matmul weight [..., I, O], int8 (QuantizedWeight8bit) or float32, stored in column
    panels for the CPU kernels, `tiles [..., O/64, 64 I]`: panel p holds columns 64p..64p+63 of
    input row 0, then of row 1, and so on. A panel's product (its 64 sums held in registers
    for up to four x rows) then reads one contiguous stream, where a row-major weight was read
    four rows side by side, which streams from memory far slower, and several rows reuse each
    load (BENCHMARKS.md, "Weights in reading order"). `scales [..., R, O]` as in
    QuantizedWeight8bit (None for float32). Products the kernel does not take (prefill)
    multiply `untiled(w)`. int8 codes of six bits may be packed (six_bit.py: uint8 tiles
    [..., O/64, 48 I], dtype still int8)."""
    tiles: jax.Array  # int8 or float32 [..., O/64, 64 I]
    scales: jax.Array | None = None  # [..., R, O] for int8 tiles
    mins: jax.Array | None = None  # [..., R, O] for asymmetric int8 (int8_mins.py)

    # Haiku's get_parameter checks `.shape` against the declared logical shape [..., I, O].
    @property
    def shape(self):
        *lead, panels, width = self.tiles.shape
        return (*lead, width // _row_bytes(self.tiles), PANEL * panels)

    @property
    def ndim(self):
        return len(self.tiles.shape)

    @property
    def dtype(self):  # six-bit tiles hold int8 codes
        return np.dtype(np.int8) if self.tiles.dtype == np.uint8 else self.tiles.dtype


PANEL = 64  # columns per panel: cpu_kernels.cc kPanel (the register tile, four 16-lane vectors)


def _row_bytes(tiles) -> int:
    """Elements of a panel's input row: 64, or 48 bytes where six-bit (uint8 tiles: six_bit.py)."""
    return six_bit.ROW_BYTES if tiles.dtype == np.uint8 else PANEL


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TiledEmbedding(TiledWeight):
    """A tied embedding table [V, D] (float32, or int8 as QuantizedEmbedding) stored as its
    output head [D, V] in panels: `tiles [V/64, 64 D]`, `scales [R, V]` (int8). The head reads
    it through the panel kernel (faster than the [V, D] table's transposed product,
    BENCHMARKS.md, "Weights in reading order"); a lookup gathers token v's D values, column
    v % 64 of panel v // 64 (products.embedding_rows)."""

    @property
    def shape(self):  # the table's logical shape [V, D], which Haiku's get_parameter checks
        panels, width = self.tiles.shape
        return (PANEL * panels, width // _row_bytes(self.tiles))


# Float weights the panel kernel reads: float32, and 2-byte floats as a checkpoint stores them
# (widened exactly as read: half the bytes of float32 copies; BENCHMARKS.md, "F16 and BF16
# weights on the CPU").
PANEL_FLOATS = (np.dtype(np.float32), np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16))


def tileable(w) -> bool:
    """Whether a matmul weight [..., I, O] can be stored in panels: int8 (not a table) or
    float (PANEL_FLOATS), O a multiple of 64."""
    if isinstance(w, QuantizedEmbedding):
        return False
    if isinstance(w, QuantizedWeight8bit):
        return w.weight.shape[-1] % PANEL == 0
    return isinstance(w, (jax.Array, np.ndarray)) and w.dtype in PANEL_FLOATS and w.ndim >= 2 \
        and w.shape[-1] % PANEL == 0


def _tiles(weight):
    """[..., I, O] -> [..., I, O/64, 64] -> [..., O/64, I, 64] -> [..., O/64, 64 I]."""
    *lead, rows, out = weight.shape
    panels = jnp.reshape(weight, (*lead, rows, out // PANEL, PANEL))
    return jnp.swapaxes(panels, -3, -2).reshape(*lead, out // PANEL, PANEL * rows)


def tiled(w) -> TiledWeight:
    """w (tileable: QuantizedWeight8bit or float32) stored in panels."""
    if isinstance(w, QuantizedWeight8bit):
        return TiledWeight(_tiles(w.weight), w.scales, w.mins)
    return TiledWeight(_tiles(w))


def embedding_tileable(table) -> bool:
    """Whether a tied table [V, D] (float32 or QuantizedEmbedding) can be stored as a
    TiledEmbedding: V a multiple of 64."""
    if isinstance(table, QuantizedEmbedding):
        return table.weight.shape[0] % PANEL == 0
    return isinstance(table, (jax.Array, np.ndarray)) and table.dtype in PANEL_FLOATS \
        and table.ndim == 2 and table.shape[0] % PANEL == 0


def tiled_embedding(table) -> TiledEmbedding:
    """The table (embedding_tileable) as TiledEmbedding: its head [D, V] in panels."""
    if isinstance(table, QuantizedEmbedding):
        return TiledEmbedding(_tiles(jnp.swapaxes(table.weight, 0, 1)), table.scales, table.mins)
    return TiledEmbedding(_tiles(jnp.swapaxes(table, 0, 1)))


def untiled_array(tiles: jax.Array) -> jax.Array:
    """Panels [..., O/64, 64 I] of any element back in row-major order [..., I, O]."""
    *lead, panels, width = tiles.shape
    rows = width // PANEL
    weight = jnp.swapaxes(jnp.reshape(tiles, (*lead, panels, rows, PANEL)), -3, -2)
    return weight.reshape(*lead, rows, PANEL * panels)


def untiled(w: TiledWeight):
    """The weight a TiledWeight stores, QuantizedWeight8bit or float32 (a copy in row-major
    order; a TiledEmbedding's head [D, V]; super-scaled scales as their float32 values; six-bit
    codes unpacked)."""
    weight = untiled_array(six_bit.unpacked(w.tiles) if w.tiles.dtype == jnp.uint8 else w.tiles)
    return weight if w.scales is None else QuantizedWeight8bit(weight, float_table(w.scales),
                                                                float_table(w.mins))


def transposed(w) -> TransposedWeight:
    """A weight [..., I, O] (float array or QuantizedWeight8bit) stored as TransposedWeight."""
    if isinstance(w, QuantizedWeight8bit):
        return TransposedWeight(jnp.swapaxes(w.weight, -1, -2), w.scales, w.mins)
    return TransposedWeight(jnp.swapaxes(w, -1, -2))


Weight = Union[jax.Array, np.ndarray, QuantizedWeight8bit, TransposedWeight, TiledWeight,
               LayerOfStack]


def check_quantized_shapes(weight_shape, scales_shape) -> str | None:
    """None when the scales fit the weight, else what is wrong (used by readers and quantize)."""
    if len(scales_shape) != len(weight_shape) or len(weight_shape) < 2:
        return f"scales rank {len(scales_shape)} does not match weight rank {len(weight_shape)}"
    if tuple(scales_shape[:-2]) != tuple(weight_shape[:-2]) or scales_shape[-1] != weight_shape[-1]:
        return f"scales {tuple(scales_shape)} do not fit weight {tuple(weight_shape)}"
    rows = scales_shape[-2]
    if rows < 1 or weight_shape[-2] % rows:
        return f"{rows} scale row blocks do not divide {weight_shape[-2]} input rows"
    return None


def row_blocks_for(rows: int, group_size: int) -> int:
    """R for groups of at most `group_size` of a weight's `rows` input rows: the fewest row
    blocks that divide the rows evenly (576 rows in groups of 128: R = 6 of 96 rows).
    group_size 0 means one scale per output channel (R = 1)."""
    if group_size < 0:
        raise ValueError(f"int8 group size must be 0 (per channel) or positive, got {group_size}")
    if group_size == 0 or group_size >= rows:
        return 1
    return next(r for r in range(-(-rows // group_size), rows + 1) if rows % r == 0)


def quantize_grouped(w, group_size: int, scale_dtype=ml_dtypes.bfloat16) -> QuantizedWeight8bit:
    """quantize() with scale row blocks of at most `group_size` input rows (0: per channel)."""
    return quantize(w, row_blocks_for(np.shape(w)[-2], group_size), scale_dtype)


def quantize_embedding(table, group_size: int,
                       scale_dtype=ml_dtypes.bfloat16) -> QuantizedEmbedding:
    """An embedding table [V, D] as int8 with one scale per token and group of at most
    `group_size` of its D values (0: one scale per token)."""
    head = quantize_grouped(np.asarray(table, np.float32).T, group_size, scale_dtype)  # [D, V]
    return QuantizedEmbedding(np.ascontiguousarray(head.weight.T), head.scales)


def quantize(w, row_blocks: int = 1, scale_dtype=ml_dtypes.bfloat16) -> QuantizedWeight8bit:
    """Symmetric per-output-channel int8 (per row block when row_blocks > 1), on the host.

    The scale is rounded to its storage dtype before the values are computed, so that
    dequantising with the stored scale reproduces exactly-representable weights bit for bit.
    """
    w = np.asarray(w, dtype=np.float32)
    *lead, rows, cols = w.shape
    if rows % row_blocks:
        raise ValueError(f"{row_blocks} row blocks do not divide {rows} input rows")
    blocks = w.reshape(*lead, row_blocks, rows // row_blocks, cols)
    amax = np.max(np.abs(blocks), axis=-2)  # [..., R, O]
    scales = (amax / 127.0).astype(scale_dtype)
    safe = np.where(scales.astype(np.float32) == 0, 1.0, scales.astype(np.float32))
    values = np.clip(np.rint(blocks / safe[..., None, :]), -127, 127).astype(np.int8)
    return QuantizedWeight8bit(values.reshape(w.shape), scales)


def quantize_on_device(w: jax.Array, row_blocks: int = 1,
                       scale_dtype=jnp.bfloat16) -> QuantizedWeight8bit:
    """quantize() in jax.numpy for weights already on a device (jit it): scripts/bench.py
    quantises random weights too large to round-trip through host numpy (a 4-layer Grok-1
    slice is 80 GB in float32). Within one rounding step of quantize()'s values and scales:
    XLA multiplies by the reciprocal of a constant or broadcast divisor, which rounds some
    quotients apart from numpy's division."""
    w = w.astype(jnp.float32)
    *lead, rows, cols = w.shape
    blocks = w.reshape(*lead, row_blocks, rows // row_blocks, cols)
    amax = jnp.max(jnp.abs(blocks), axis=-2)  # [..., R, O]
    scales = (amax / 127.0).astype(scale_dtype)
    stored = scales.astype(jnp.float32)
    safe = jnp.where(stored == 0, jnp.float32(1.0), stored)
    values = jnp.clip(jnp.rint(blocks / safe[..., None, :]), -127, 127).astype(jnp.int8)
    return QuantizedWeight8bit(values.reshape(w.shape), scales)


def dequantize(w: QuantizedWeight8bit) -> np.ndarray:
    """Float32 copy of a quantised weight (an embedding: its [V, D] table): for tests and
    converters, never for the model."""
    if isinstance(w, QuantizedEmbedding):
        return dequantize(QuantizedWeight8bit(np.asarray(w.weight).T, w.scales, w.mins)).T
    weight = np.asarray(w.weight).astype(np.float32)
    scales = np.asarray(w.scales).astype(np.float32)
    rows = weight.shape[-2] // scales.shape[-2]
    values = weight * np.repeat(scales, rows, axis=-2)
    return values if w.mins is None else \
        values + np.repeat(np.asarray(w.mins).astype(np.float32), rows, axis=-2)
