"""The int8 weight type and the matmul helpers that consume it.

Shape glossary: M rows (tokens or token-expert pairs), I input width, O output width,
R scale row blocks, G groups (experts).

A QuantizedWeight8bit holds int8 values `weight [..., I, O]` and `scales [..., R, O]`; scale row r
applies to the r-th contiguous block of I / R input rows (R = 1: one scale per output channel;
the released Grok-1 uses R = 8 for its row-parallel weights; `--quantize int8` uses groups of
at most --int8-group-size input rows, see row_blocks_for). The dequantised weight is
`weight[..., i, :] * scales[..., i // (I / R), :]`. A QuantizedEmbedding is the int8 tied
embedding table [V, D], grouped along D (it is the output head's [D, V] weight, transposed).

The helpers never build a dequantised copy: they multiply the activations by the int8 values
(upcast inside the matmul, which is exact: |q| <= 127 fits bf16 and float32) with float32
accumulation, then apply the scale of each row block to the float32 partial sums. This equals
the reference's float32 product `(q * s) @ x` up to float32 rounding order, and never rounds a
dequantised weight to bf16.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Union

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class QuantizedWeight8bit:
    weight: jax.Array  # int8 [..., I, O]
    scales: jax.Array  # bf16 (or f32) [..., R, O]

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
    A subclass: code that only moves or counts quantised leaves treats both alike."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TransposedWeight:
    """A matmul weight [..., I, O] stored transposed, `weight_t [..., O, I]`: float, or int8
    with `scales [..., R, O]` as in QuantizedWeight8bit (None for a float weight).

    Each output is then a dot over one contiguous row of the weight, which is the faster
    layout for few-row (decode) products on two backends (model.transpose_layer_weights): on
    the CPU for one float32 row only (slower at 2-16 rows, and int8 widened from [O, I] is
    slower than its blocked [I, O] widening, so only a one-slot engine's float32 weights use
    it there); on GPUs for one bf16 or int8 row (BENCHMARKS.md, "Transposed weights for
    one-row products"). Several rows and prefill multiply x @ W^T, the layout of torch's
    nn.Linear weights, which cuBLAS and XLA's GEMM emitters take without a copy.
    """
    weight_t: jax.Array  # [..., O, I] float or int8
    scales: jax.Array | None = None  # [..., R, O] for int8 weight_t

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


def transposed(w) -> TransposedWeight:
    """A 2-D weight [I, O] (float array or QuantizedWeight8bit) stored as TransposedWeight."""
    if isinstance(w, QuantizedWeight8bit):
        return TransposedWeight(w.weight.T, w.scales)
    return TransposedWeight(w.T)


def _transposed_linear(x: jax.Array, w: TransposedWeight) -> jax.Array:
    """x [..., I] @ (w.weight_t [O, I])^T -> float32 [..., O], int8 scaled as in linear()."""
    if w.scales is None or w.scales.shape[-2] == 1:
        product = jnp.einsum("...i,oi->...o", x, w.weight_t.astype(x.dtype),
                             preferred_element_type=jnp.float32)  # [..., O]
        return product if w.scales is None else product * w.scales[0].astype(jnp.float32)
    rows = w.scales.shape[-2]
    out, rows_in = w.weight_t.shape
    weight = w.weight_t.reshape(out, rows, rows_in // rows)  # [O, R, I/R]
    return _row_blocked_product("...ri,ori->...ro", x, weight, w.scales, rows,
                                w.scales.T[:, :, None])  # scales as [O, R, 1]


Weight = Union[jax.Array, np.ndarray, QuantizedWeight8bit, TransposedWeight]


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
    """quantize() in jax.numpy, bit for bit the same rounding, for weights already on a device
    (jit it): scripts/bench.py quantises random weights too large to round-trip through host
    numpy (a 4-layer Grok-1 slice is 80 GB in float32)."""
    w = w.astype(jnp.float32)
    *lead, rows, cols = w.shape
    blocks = w.reshape(*lead, row_blocks, rows // row_blocks, cols)
    scales = (jnp.max(jnp.abs(blocks), axis=-2) / jnp.float32(127.0)).astype(scale_dtype)
    stored = scales.astype(jnp.float32)
    safe = jnp.where(stored == 0, jnp.float32(1.0), stored)
    values = jnp.clip(jnp.rint(blocks / safe[..., None, :]), -127, 127).astype(jnp.int8)
    return QuantizedWeight8bit(values.reshape(w.shape), scales)


def dequantize(w: QuantizedWeight8bit) -> np.ndarray:
    """Float32 copy of a quantised weight (an embedding: its [V, D] table): for tests and
    converters, never for the model."""
    if isinstance(w, QuantizedEmbedding):
        return dequantize(QuantizedWeight8bit(np.asarray(w.weight).T, w.scales)).T
    weight = np.asarray(w.weight).astype(np.float32)
    scales = np.asarray(w.scales).astype(np.float32)
    rows = weight.shape[-2]
    return weight * np.repeat(scales, rows // scales.shape[-2], axis=-2)


def _blocked(x: jax.Array, rows: int) -> jax.Array:
    """[..., I] -> [..., R, I/R]."""
    return x.reshape(*x.shape[:-1], rows, x.shape[-1] // rows)


def _row_block_dtype(x: jax.Array):
    """The dtype a row-blocked product (int8 scales with R > 1: one matmul per row block, a
    batched dot) multiplies in: x's own, but float32 for bf16 activations on the CPU, whose
    batched bf16 x bf16 -> f32 dots XLA:CPU fails to run from two rows up ("UNIMPLEMENTED:
    Unsupported element type for DotThunk::Execute"). Widening bf16 and int8 is exact."""
    if jax.default_backend() == "cpu" and x.dtype == jnp.bfloat16:
        return jnp.float32
    return x.dtype


# A row-blocked product's float32 partial sums [..., R, O] are materialised; once they outgrow
# the dequantised weight (more rows than a scale block has input rows) and this many bytes,
# the weight is dequantised instead (a 2048-token prefill through Llama-8B's down projection
# in groups of 64: 7.5 GB of partials against a 235 MB float32 weight).
PARTIALS_MAX_BYTES = 4 << 20


def _row_blocked_product(spec: str, x: jax.Array, weight: jax.Array, scales: jax.Array,
                         rows: int, weight_scales: jax.Array) -> jax.Array:
    """The int8 product with R = `rows` scale row blocks: float32 [..., O].

    Few rows (decode): one batched matmul over the blocks (einsum `spec` of x [..., R, I/R] and
    the blocked weight, whose axes r, i are adjacent -> [..., R, O]), each block's float32
    partial sums scaled by its scale row (`scales`, broadcast to the partials) and summed.
    Many rows: _dequantised_product, with `weight_scales` broadcast to the blocked weight."""
    dtype = _row_block_dtype(x)
    partial_bytes = 4 * math.prod(x.shape[:-1]) * rows * scales.shape[-1]
    if partial_bytes > max(PARTIALS_MAX_BYTES, 4 * weight.size):
        return _dequantised_product(spec, x.astype(dtype), weight, weight_scales)
    partial = jnp.einsum(spec, _blocked(x.astype(dtype), rows), weight.astype(dtype),
                         preferred_element_type=jnp.float32)  # [..., R, O]
    return jnp.sum(partial * scales.astype(jnp.float32), axis=-2)


def _dequantised_product(spec: str, x: jax.Array, weight: jax.Array,
                         weight_scales: jax.Array) -> jax.Array:
    """The product of `spec` (see _row_blocked_product) with the weight dequantised, as one
    plain matmul of x [..., I] (the r and i axes merged). Exact: q * s has at most 15
    significant bits (7 of q, 8 of a bf16 scale), so it is exact in float32, and for bf16
    activations it is the sum of two bf16 weights (its rounding to bf16 and the exact
    remainder), multiplied in bf16 with float32 accumulation rather than at float32 speed."""
    inputs, output = spec.split("->")
    x_axes, w_axes = inputs.split(",")
    merged = w_axes.index("r")  # r and i are adjacent in the blocked weight
    plain = f"{x_axes.replace('r', '')},{w_axes.replace('r', '')}->{output.replace('r', '')}"
    dequantised = (weight.astype(jnp.float32) * weight_scales.astype(jnp.float32)).reshape(
        *weight.shape[:merged], -1, *weight.shape[merged + 2:])  # [..., I, ...]
    if x.dtype == jnp.float32:
        return jnp.einsum(plain, x, dequantised, preferred_element_type=jnp.float32,
                          precision=jax.lax.Precision.HIGHEST)
    high = dequantised.astype(x.dtype)
    low = (dequantised - high.astype(jnp.float32)).astype(x.dtype)
    return sum(jnp.einsum(plain, x, part, preferred_element_type=jnp.float32)
               for part in (high, low))


# On the CPU, an int8 weight is widened and multiplied in blocks of input rows of about this
# many float32 bytes (see widening_in_blocks).
WIDEN_BLOCK_BYTES = 4 << 20
# ... for products of at most this many rows (decode); a prefill's matmul outweighs the
# widening, and accumulating its larger partial products block by block costs more.
WIDEN_BLOCKS_MAX_ROWS = 64


def widening_in_blocks() -> bool:
    """Whether int8 products widen their weight a block of rows at a time (CPU, one device).

    XLA:CPU's matmuls take one dtype, so it widens an int8 weight into a temporary float32
    copy before the matmul, and its scheduler starts every such independent conversion early:
    all of a program's widened weights are live at once, in a temporary arena mapped afresh
    and page-faulted in on every call. Widened a block at a time inside a loop, the temporary
    is one block, reused while it is in cache: no page faults, while reading a quarter of the
    float32 bytes (BENCHMARKS.md, "int8 widening on XLA:CPU"). Elsewhere (GPU, TPU) the
    conversion fuses into the matmul. With several devices the weight may be sharded along
    its rows, where slicing row blocks would gather it: plain matmul there.
    """
    return jax.default_backend() == "cpu" and jax.device_count() == 1


def _widening_block_rows(rows_in: int, out: int, row_blocks: int) -> int:
    """Input rows kb widened per loop step: within WIDEN_BLOCK_BYTES of float32, either dividing
    one scale row block (large blocks, e.g. Grok-1's R = 8) or a whole number of them (groups of
    64 rows: one group per step would be thousands of steps per decode step)."""
    per_scale = rows_in // row_blocks
    kb = per_scale
    while kb > 8 and kb % 2 == 0 and kb * out * 4 > WIDEN_BLOCK_BYTES:
        kb //= 2
    if kb == per_scale:
        for groups in range(row_blocks, 0, -1):
            if row_blocks % groups == 0 and groups * per_scale * out * 4 <= WIDEN_BLOCK_BYTES:
                return groups * per_scale
    return kb


def _blocked_int8_linear(x: jax.Array, w: QuantizedWeight8bit) -> jax.Array:
    """x [..., I] @ dequantised w [I, O] -> float32 [..., O], widening one block of kb input
    rows at a time inside a loop; a block lies within one scale row block, or spans whole ones
    (then widened and scaled together, exactly, in float32)."""
    rows_in, out = w.weight.shape
    per_scale = rows_in // w.row_blocks  # input rows per scale row block
    kb = _widening_block_rows(rows_in, out, w.row_blocks)
    groups = kb // per_scale  # scale row blocks per block of rows (0: within one)
    lead = x.shape[:-1]
    flat = x.reshape(-1, rows_in)  # [M, I]
    scales = w.scales.astype(jnp.float32)  # [R, O]

    def block(i, acc):
        start = i * kb
        # The barrier keeps the block's widening inside the loop (XLA would otherwise hoist
        # one conversion of the whole weight out of it).
        rows, values = jax.lax.optimization_barrier(
            (jax.lax.dynamic_slice_in_dim(flat, start, kb, axis=1),
             jax.lax.dynamic_slice_in_dim(w.weight, start, kb, axis=0)))  # [M, kb], [kb, O]
        if groups > 1:
            scale = jax.lax.dynamic_slice_in_dim(scales, start // per_scale, groups, axis=0)
            widened = values.astype(jnp.float32).reshape(groups, per_scale, out)
            if flat.shape[0] == 1:  # one row: per-group partial sums [1, g, O], then scaled
                partial = jnp.einsum("mgi,gio->mgo", rows.astype(jnp.float32).reshape(
                    1, groups, per_scale), widened, preferred_element_type=jnp.float32)
                return acc + jnp.sum(partial * scale, axis=1)
            # several rows: XLA:CPU's batched dots are slow past one row (BENCHMARKS.md,
            # "Group-wise int8"): the block dequantised exactly in float32, one dot
            dequantised = (widened * scale[:, None, :]).reshape(kb, out)  # [kb, O]
            return acc + jnp.dot(rows.astype(jnp.float32), dequantised,
                                 preferred_element_type=jnp.float32)
        product = jnp.dot(rows, values.astype(x.dtype), preferred_element_type=jnp.float32)
        if w.row_blocks == 1:
            return acc + product  # [M, O]; the one scale row is applied after the loop
        scale = jax.lax.dynamic_index_in_dim(scales, start // per_scale, keepdims=False)
        return acc + product * scale

    acc = jax.lax.fori_loop(0, rows_in // kb, block,
                            jnp.zeros((flat.shape[0], out), jnp.float32))
    if w.row_blocks == 1:
        acc = acc * scales[0]
    return acc.reshape(*lead, out)


def _blocked_transposed_int8_linear(x: jax.Array, w: TransposedWeight) -> jax.Array:
    """x [..., I] @ (dequantised w.weight_t [O, I])^T -> float32 [..., O] on the CPU, widening
    (and scaling, exactly in float32) one block of output rows at a time inside a loop, for
    the reason of widening_in_blocks: the int8 tied head of a Llama-3.2-1B shape, widened whole,
    is a 1 GB float32 temporary on every step."""
    out, rows_in = w.weight_t.shape
    groups = w.scales.shape[0]
    ob = max(1, min(out, WIDEN_BLOCK_BYTES // (rows_in * 4)))  # output rows per block
    flat = x.reshape(-1, rows_in).astype(jnp.float32)  # [M, I]

    def product(start, size):  # -> [M, size]
        values, scales = jax.lax.optimization_barrier(
            (jax.lax.dynamic_slice_in_dim(w.weight_t, start, size, axis=0),
             jax.lax.dynamic_slice_in_dim(w.scales, start, size, axis=1)))  # [size, I], [R, size]
        dequantised = (values.astype(jnp.float32).reshape(size, groups, rows_in // groups)
                       * scales.T.astype(jnp.float32)[:, :, None]).reshape(size, rows_in)
        return jnp.einsum("mi,oi->mo", flat, dequantised, preferred_element_type=jnp.float32)

    def block(i, acc):
        return jax.lax.dynamic_update_slice_in_dim(acc, product(i * ob, ob), i * ob, axis=1)

    full = out // ob * ob
    acc = jax.lax.fori_loop(0, out // ob, block, jnp.zeros((flat.shape[0], out), jnp.float32))
    if full < out:  # the last, shorter block
        acc = jax.lax.dynamic_update_slice_in_dim(acc, product(full, out - full), full, axis=1)
    return acc.reshape(*x.shape[:-1], out)


def _single_bf16_row_on_cpu(x: jax.Array, w: jax.Array) -> bool:
    """A bf16 x bf16 product of a single row (x [..., I] with one row in all) on the CPU.
    XLA:CPU gives bf16 products of two rows or more to its YNNPACK kernels, which read bf16;
    a lone row goes to a matrix-vector kernel without bf16, behind a standalone widening of
    the whole weight to a fresh float32 temporary (BENCHMARKS.md, "bf16 single-row products
    on the CPU"). linear() computes such a row as two copies of it: the weight is read once,
    in bf16 (the extra row costs nothing in a memory-bound product)."""
    return (jax.default_backend() == "cpu" and x.dtype == jnp.bfloat16
            and w.dtype == jnp.bfloat16 and math.prod(x.shape[:-1]) == 1)


def _int8_decode_product_on_cpu(x: jax.Array, w: QuantizedWeight8bit) -> bool:
    """A product _blocked_int8_linear takes: few rows (decode), a weight larger than one
    block, widening_in_blocks() (CPU, one device)."""
    return (w.weight.ndim == 2 and math.prod(x.shape[:-1]) <= WIDEN_BLOCKS_MAX_ROWS
            and w.weight.size * 4 > WIDEN_BLOCK_BYTES and widening_in_blocks())


def linear(x: jax.Array, w: Weight, out_dtype=None) -> jax.Array:
    """x [..., I] @ w [I, O] -> [..., O] in out_dtype (default x.dtype), float32 accumulation."""
    out_dtype = x.dtype if out_dtype is None else out_dtype
    if isinstance(w, TransposedWeight):
        return _transposed_linear(x, w).astype(out_dtype)
    if not isinstance(w, QuantizedWeight8bit):
        if _single_bf16_row_on_cpu(x, w):  # [1, I] twice -> [2, O] -> the first row
            pair = jnp.concatenate([x.reshape(1, -1)] * 2)
            return linear(pair, w, out_dtype)[:1].reshape(*x.shape[:-1], -1)
        return jnp.einsum("...i,io->...o", x, w.astype(x.dtype),
                          preferred_element_type=jnp.float32).astype(out_dtype)
    if _int8_decode_product_on_cpu(x, w):
        return _blocked_int8_linear(x, w).astype(out_dtype)
    rows = w.row_blocks
    if rows == 1:  # one scale per output channel: a plain matmul, scaled after
        # (written with a unit row-block axis, the matmul has a batch dimension, and XLA:CPU
        # then re-lays the weight out for every call inside a loop)
        product = jnp.einsum("...i,io->...o", x, w.weight.astype(x.dtype),
                             preferred_element_type=jnp.float32)  # [..., O]
        return (product * w.scales[0].astype(jnp.float32)).astype(out_dtype)
    weight = w.weight.reshape(rows, -1, w.weight.shape[-1])  # [R, I/R, O]
    return _row_blocked_product("...ri,rio->...ro", x, weight, w.scales, rows,
                                w.scales[:, None, :]).astype(out_dtype)  # scales as [R, 1, O]


def per_tile_linear(x: jax.Array, w: Weight) -> jax.Array:
    """Each tile of rows with its own weight: x [N, T, I], w [N, I, O] -> [N, T, O].

    The MoE layer gathers one expert's weight per tile of routed rows (a tile of 1 row at
    decode), so only the routed experts' weights are read and multiplied.
    """
    if not isinstance(w, QuantizedWeight8bit):
        return jnp.einsum("nti,nio->nto", x, w.astype(x.dtype),
                          preferred_element_type=jnp.float32).astype(x.dtype)
    rows = w.row_blocks
    n, _, out = w.weight.shape
    weight = w.weight.reshape(n, rows, -1, out)  # [N, R, I/R, O]
    return _row_blocked_product("ntri,nrio->ntro", x, weight, w.scales[:, None],  # [N, 1, R, O]
                                rows, w.scales[:, :, None, :]).astype(x.dtype)  # [N, R, 1, O]


def switched_tile_linear(x: jax.Array, weights, tile_expert: jax.Array) -> jax.Array:
    """Each tile of rows with its expert's weight, from E separate weights: x [N, T, I],
    weights a sequence of E weights [I, O] (float or QuantizedWeight8bit), tile_expert [N]
    int32 -> [N, T, O].

    The same product as per_tile_linear(x, stacked[tile_expert]), computed by a loop over the
    tiles that switches to the chosen expert's branch, whose matmul reads that expert's own
    buffer. Gathering stacked[tile_expert] instead materialises a copy of a whole expert weight
    per tile before the matmul (XLA:CPU; XLA:GPU too), which costs more than the matmul at
    decode.

    The loop is unrolled (N is at most E: the few pairs of a small decode batch). XLA:GPU runs
    a loop from the host, reading its condition back after every iteration; the switches
    themselves run on the device inside the step's CUDA graph. On the CPU, unrolled and looped
    ran alike (BENCHMARKS.md, "Expert weights at batch-1 MoE decode: switch, not gather").
    """
    branches = [lambda rows, w=w: linear(rows, w) for w in weights]

    def tile(carry, inputs):
        rows, expert = inputs
        return carry, jax.lax.switch(expert, branches, rows)

    return jax.lax.scan(tile, None, (x, tile_expert), unroll=True)[1]


def embedding_rows(table, tokens: jax.Array) -> jax.Array:
    """The rows of an embedding table [V, D] (float or QuantizedEmbedding) at tokens [...]:
    [..., D], float32 for an int8 table (dequantised exactly)."""
    if not isinstance(table, QuantizedEmbedding):
        return table[tokens]
    groups, _ = table.scales.shape  # [R, V]
    scale = jnp.moveaxis(table.scales[:, tokens], 0, -1).astype(jnp.float32)  # [..., R]
    values = table.weight[tokens].astype(jnp.float32)  # [..., D]
    blocked = values.reshape(*values.shape[:-1], groups, -1) * scale[..., None]
    return blocked.reshape(values.shape)


def tied_head(x: jax.Array, table) -> jax.Array:
    """x [..., D] times an embedding table [V, D] transposed (the tied output head): float32
    [..., V]; an int8 table is read as its [D, V] head weight, stored transposed."""
    if isinstance(table, QuantizedEmbedding):
        head = TransposedWeight(table.weight, table.scales)
        if math.prod(x.shape[:-1]) <= WIDEN_BLOCKS_MAX_ROWS and widening_in_blocks():
            return _blocked_transposed_int8_linear(x, head)
        return _transposed_linear(x, head)
    return jnp.einsum("...d,vd->...v", x, table.astype(x.dtype),
                      preferred_element_type=jnp.float32)
